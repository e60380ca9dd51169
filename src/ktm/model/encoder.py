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

``layernorm=True`` puts a learned LayerNorm on each merged embedding: centred and scaled to
unit variance over its d numbers, then to the mean norm of its block's token embeddings (as
``norm``), then an elementwise gain (starting at 1) and bias (starting at 0). At
initialisation it is norm matching of the centred output; unlike the block-mean start, the
output then no longer equals the block mean. ``norm`` and ``layernorm`` exclude each other.

Hidden width default (the paper's): ``h = int(a * K) * d`` with a = 2.0 for K <= 3 and
a = 1.5 for K >= 4.

**Hierarchical merging** (:class:`StackedEncoder`, ``ModelConfig.encoder_stages``): K is
factored into stages, e.g. K = 4 as (2, 2). The first stage merges adjacent token pairs,
the second merges adjacent pairs of those outputs. Mean-initialised stages compose to the
exact K-block mean on full blocks (partial blocks: see below), and a trained K = 2 encoder can become the first stage of a K = 4 one
(``KTokenMerging.grow_from``): the paper's "recursive or hierarchical encoding".
The fill rule is applied again at each stage, so a stage sees a partial last block exactly
as a model of that stage's size would: a trained K = 2 encoder as first stage turns the
tokens of a K = 4 block into the same pair embeddings as in the K = 2 model. (For a
partial block this makes the mean-initialised stack a weighted mean of its tokens, e.g.
a/4 + b/4 + c/2 for three tokens in stages (2, 2).)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import INITS, ModelConfig, check_k
from .blocks import fill_blocks


#: Largest encoder :func:`build_encoder` builds, in bytes of float32 parameters. The paper's
#: width grows as K^2 (K = 64 on the 576-wide SmolLM2 would need about 15 GiB); above this a
#: smaller ``encoder_hidden`` must be given.
MAX_ENCODER_BYTES = 4 * 2**30


def default_hidden(k: int, dim: int) -> int:
    """The paper's hidden width ``int(a * K) * d`` (a = 2.0 for K <= 3, else 1.5)."""
    a = 2.0 if check_k(k) <= 3 else 1.5
    return int(a * k) * dim


def encoder_parameters(k: int, dim: int, hidden: int | None = None, stages=None) -> int:
    """Parameter count of the encoder :func:`build_encoder` would build (nothing allocated)."""
    total = 0
    for s in (tuple(stages) if stages else (k,)):
        h = default_hidden(s, dim) if hidden is None else int(hidden)
        total += (s * dim * h + h) + (h * s * dim + s * dim) + (s * dim * dim + dim)
    return total


def check_encoder_size(k: int, dim: int, hidden: int | None = None, stages=None,
                       limit: int | None = None) -> int:
    """Raise ValueError if the encoder would exceed ``limit`` bytes of float32 parameters
    (default :data:`MAX_ENCODER_BYTES`); returns its parameter count."""
    limit = MAX_ENCODER_BYTES if limit is None else limit
    n = encoder_parameters(k, dim, hidden, stages)
    if 4 * n <= limit:
        return n
    widest = max(tuple(stages) if stages else (k,))
    fixed = widest * dim + widest * dim * dim + dim  # the parameters that do not scale with h
    fit = (limit // 4 // len(tuple(stages) if stages else (k,)) - fixed) // (2 * widest * dim + 1)
    width = "the paper's width int(a*K)*d" if hidden is None else f"encoder_hidden = {hidden}"
    advice = (f"pass a smaller encoder_hidden (--encoder-hidden), at most about {fit} here"
              if fit >= 1 else "use a smaller K, or encoder_stages (--encoder-stages) of smaller blocks")
    raise ValueError(
        f"the merge encoder for K = {k} on d = {dim} with {width} would have "
        f"{n / 1e9:.2f} billion parameters ({4 * n / 2**30:.1f} GiB in float32), more than the "
        f"{limit / 2**30:g} GiB limit (ktm.model.encoder.MAX_ENCODER_BYTES): {advice}"
    )


class MergeEncoder(nn.Module):
    """Merge blocks of K embeddings into one embedding each.

    Args:
        k: block size (>= 1).
        dim: embedding size d of the language model.
        hidden: MLP hidden width h (default: :func:`default_hidden`).
        init: ``"mean"``, ``"paper"`` or ``"random"`` (see the module docstring).

    Shapes: ``forward(blocks)`` takes (..., K, d) and returns (..., d). Partial blocks
    must already be filled (:func:`ktm.model.blocks.fill_blocks`); ``valid`` is accepted for the
    same interface as :class:`StackedEncoder` and not needed.

    >>> enc = MergeEncoder(k=4, dim=8)
    >>> x = torch.randn(3, 4, 8)
    >>> torch.allclose(enc(x), x.mean(-2))
    True
    """

    def __init__(self, k: int, dim: int, hidden: int | None = None, init: str = "mean",
                 norm: bool = False, layernorm: bool = False):
        super().__init__()
        check_k(k)
        if norm and layernorm:
            raise ValueError("norm and layernorm both normalise the merged embedding: choose one")
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
        self.layernorm = bool(layernorm)
        if self.layernorm:
            self.ln_gain = nn.Parameter(torch.ones(dim))
            self.ln_bias = nn.Parameter(torch.zeros(dim))

    def forward(self, blocks: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if blocks.shape[-2:] != (self.k, self.dim):
            raise ValueError(
                f"expected blocks of shape (..., {self.k}, {self.dim}), got {tuple(blocks.shape)}"
            )
        out = self.mlp(blocks.flatten(-2))
        if self.residual:
            out = out + blocks.mean(-2)
        if self.norm or self.layernorm:
            target = blocks.norm(dim=-1).mean(-1, keepdim=True)
        if self.norm:
            out = out * (target / out.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        if self.layernorm:
            unit = nn.functional.layer_norm(out, (self.dim,))  # norm sqrt(d)
            out = unit * (target / math.sqrt(self.dim)) * self.ln_gain + self.ln_bias
        return out

    def extra_repr(self) -> str:
        return (f"k={self.k}, dim={self.dim}, hidden={self.hidden}, init={self.init!r}, norm={self.norm}, "
                f"layernorm={self.layernorm}")


class StackedEncoder(nn.Module):
    """Hierarchical merge: K = k_1 * k_2 * ... tokens in stages of :class:`MergeEncoder`.

    Stage 1 merges each run of ``k_1`` adjacent token embeddings, stage 2 each run of
    ``k_2`` adjacent stage-1 outputs, and so on. Same interface as :class:`MergeEncoder`
    (``k``, ``dim``, ``forward`` on (..., K, d)); ``hidden`` (if given) is every stage's
    MLP width, else each stage uses the paper's default for its own k. ``valid`` (..., K)
    marks the real tokens of partial blocks; each stage then fills its own empty slots.

    >>> enc = StackedEncoder((2, 2), dim=8)
    >>> x = torch.randn(3, 4, 8)
    >>> torch.allclose(enc(x), x.mean(-2), atol=1e-6)
    True
    """

    def __init__(self, stages, dim: int, hidden: int | None = None, init: str = "mean",
                 norm: bool = False, layernorm: bool = False):
        super().__init__()
        stages = tuple(stages)
        if len(stages) < 1:
            raise ValueError("a stacked encoder needs at least one stage")
        for s in stages:
            check_k(s)
        self.stages_k = stages
        self.k, self.dim, self.init, self.norm = math.prod(stages), dim, init, bool(norm)
        self.layernorm = bool(layernorm)
        self.stages = nn.ModuleList(MergeEncoder(s, dim, hidden, init, norm, layernorm) for s in stages)
        self.hidden = [st.hidden for st in self.stages]

    def forward(self, blocks: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if blocks.shape[-2:] != (self.k, self.dim):
            raise ValueError(
                f"expected blocks of shape (..., {self.k}, {self.dim}), got {tuple(blocks.shape)}"
            )
        x, v = blocks, valid
        for stage in self.stages:
            x = x.unflatten(-2, (-1, stage.k))  # (..., runs, k, d)
            if v is not None:
                v = v.unflatten(-1, (-1, stage.k))
                x = fill_blocks(x.reshape(-1, stage.k, self.dim), v.reshape(-1, stage.k)).view_as(x)
                v = v.any(-1)
            x = stage(x)
        return x.squeeze(-2)

    def extra_repr(self) -> str:
        return (f"stages={self.stages_k}, dim={self.dim}, init={self.init!r}, norm={self.norm}, "
                f"layernorm={self.layernorm}")


def build_encoder(k: int, dim: int, hidden: int | None = None, init: str = "mean",
                  norm: bool = False, stages=None, layernorm: bool = False) -> nn.Module:
    """The encoder a :class:`ktm.config.ModelConfig` describes: one :class:`MergeEncoder`,
    or a :class:`StackedEncoder` when ``stages`` (whose product must be ``k``) has more
    than one entry. Raises ValueError, before allocating anything, when the encoder would
    exceed :data:`MAX_ENCODER_BYTES` of float32 parameters (see :func:`check_encoder_size`)."""
    check_k(k)
    if stages is None or len(stages) == 1:
        if stages is not None and tuple(stages) != (k,):
            raise ValueError(f"encoder stages {tuple(stages)} do not multiply to K = {k}")
        check_encoder_size(k, dim, hidden)
        return MergeEncoder(k, dim, hidden, init, norm, layernorm)
    if math.prod(stages) != k:
        raise ValueError(f"encoder stages {tuple(stages)} multiply to {math.prod(stages)}, not K = {k}")
    check_encoder_size(k, dim, hidden, stages)
    return StackedEncoder(stages, dim, hidden, init, norm, layernorm)


def encoder_from_config(config: ModelConfig, dim: int) -> nn.Module:
    """:func:`build_encoder` for the encoder fields of a :class:`ktm.config.ModelConfig`
    (``k``, ``encoder_hidden``, ``encoder_init``, ``encoder_norm``, ``encoder_stages``,
    ``encoder_layernorm``) on an embedding width ``dim``: the one place a model, a resized
    model and a serving client turn a config into an encoder."""
    return build_encoder(config.k, dim, config.encoder_hidden, config.encoder_init, config.encoder_norm,
                         config.encoder_stages, config.encoder_layernorm)


def encoder_stages(encoder: nn.Module) -> tuple[int, ...]:
    """The stage sizes of an encoder: ``(K,)`` for a single :class:`MergeEncoder`."""
    return tuple(encoder.stages_k) if isinstance(encoder, StackedEncoder) else (encoder.k,)
