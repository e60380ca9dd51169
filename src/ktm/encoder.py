"""The merge encoder: one block of K token embeddings (K * d numbers) -> one embedding (d).

    f(x) = mean_k(x_k) + MLP(concat_k x_k)          (residual="mean")
    MLP  = Linear(K*d, h) -> ReLU -> Linear(h, K*d) -> ReLU -> Linear(K*d, d)

Initialisations (``init``):

* ``"mean"`` (default): mean residual and the MLP's last layer set to zero, so at
  initialisation the output *equals* the block mean exactly and training starts from
  mean pooling.
* ``"paper"``: the authors' release: mean residual plus a randomly initialised MLP.
* ``"random"``: the paper's ablation: the MLP alone, randomly initialised, no residual.

``norm=True`` rescales each merged embedding to the mean norm of its block's token
embeddings. A block mean of K nearly orthogonal embeddings is about 1/sqrt(K) as long as a
token embedding (0.45x for SmolLM2 at K = 4); norm matching feeds the LLM inputs of the
scale it was trained on.

Hidden width default (the paper's): ``h = int(a * K) * d`` with a = 2.0 for K <= 3 and
a = 1.5 for K >= 4.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import check_k

INITS = ("mean", "paper", "random")


def default_hidden(k: int, dim: int) -> int:
    """The paper's hidden width ``int(a * K) * d`` (a = 2.0 for K <= 3, else 1.5)."""
    a = 2.0 if check_k(k) <= 3 else 1.5
    return int(a * k) * dim


class MergeEncoder(nn.Module):
    """Merge blocks of K embeddings into one embedding each.

    Args:
        k: block size (>= 1).
        dim: embedding size d of the language model.
        hidden: MLP hidden width h (default: :func:`default_hidden`).
        init: ``"mean"``, ``"paper"`` or ``"random"`` (see the module docstring).

    Shapes: ``forward(blocks)`` takes (..., K, d) and returns (..., d).

    >>> enc = MergeEncoder(k=4, dim=8)
    >>> x = torch.randn(3, 4, 8)
    >>> torch.allclose(enc(x), x.mean(-2))
    True
    """

    def __init__(self, k: int, dim: int, hidden: int | None = None, init: str = "mean",
                 norm: bool = False):
        super().__init__()
        check_k(k)
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.k, self.dim, self.init, self.norm = k, dim, init, bool(norm)
        self.hidden = default_hidden(k, dim) if hidden is None else int(hidden)
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.residual = init != "random"
        self.mlp = nn.Sequential(
            nn.Linear(k * dim, self.hidden),
            nn.ReLU(),
            nn.Linear(self.hidden, k * dim),
            nn.ReLU(),
            nn.Linear(k * dim, dim),
        )
        if init == "mean":
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        if blocks.shape[-2:] != (self.k, self.dim):
            raise ValueError(
                f"expected blocks of shape (..., {self.k}, {self.dim}), got {tuple(blocks.shape)}"
            )
        out = self.mlp(blocks.flatten(-2))
        if self.residual:
            out = out + blocks.mean(-2)
        if self.norm:
            target = blocks.norm(dim=-1).mean(-1, keepdim=True)
            out = out * (target / out.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        return out

    def extra_repr(self) -> str:
        return f"k={self.k}, dim={self.dim}, hidden={self.hidden}, init={self.init!r}, norm={self.norm}"
