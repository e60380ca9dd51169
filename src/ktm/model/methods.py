"""The compression methods that ktm compares K-Token Merging with (``ModelConfig.method``).

Every method gives the LLM ``ceil(n / K)`` positions for an ``n``-token prompt, so that the
methods are compared at the same length reduction, with the same LoRA and budget:

* ``merge``: K-Token Merging, the encoder merges each block of K token embeddings;
* ``mean``: the block mean alone (the encoder stays exactly the mean: nothing trained);
* ``keep-first`` / ``keep-last``: the first / last ``ceil(n / K)`` tokens, read plainly;
* ``stride``: every K-th token (the first of each block);
* ``random-drop``: ``ceil(n / K)`` tokens kept at random (seeded by the prompt's tokens, so a
  prompt always keeps the same ones), in their order.

``plain`` (no compression) is ``merge`` at K = 1. The paper's ``merge-random-init`` ablation
is ``merge`` with ``encoder_init="random"`` (the MLP alone, randomly initialised). Prompt
compressors that rewrite the text (``llmlingua2``) are in :mod:`ktm.experiments.lingua`.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence

from .blocks import num_blocks

METHODS = ("merge", "mean", "keep-first", "keep-last", "stride", "random-drop")
TOKEN_METHODS = ("keep-first", "keep-last", "stride", "random-drop")


def kept_positions(n: int, k: int, method: str, seed: int = 0) -> list[int]:
    """Which of a prompt's ``n`` token positions a token-space method keeps (in order).

    >>> kept_positions(7, 3, "keep-first"), kept_positions(7, 3, "keep-last"), kept_positions(7, 3, "stride")
    ([0, 1, 2], [4, 5, 6], [0, 3, 6])
    >>> len(kept_positions(10, 4, "random-drop")) == 3
    True
    """
    keep = num_blocks(n, k)
    if method == "keep-first":
        return list(range(keep))
    if method == "keep-last":
        return list(range(n - keep, n))
    if method == "stride":
        return list(range(0, n, k))
    if method == "random-drop":
        return sorted(random.Random(seed).sample(range(n), keep))
    raise ValueError(f"{method!r} is not a token-space method; choose from {TOKEN_METHODS}")


def select_tokens(ids: Sequence[Sequence[int]], k: int, method: str) -> list[list[int]]:
    """The tokens each prompt keeps under a token-space method. ``random-drop`` seeds its
    choice with the prompt's own tokens, so a prompt keeps the same tokens in any batch."""
    out = []
    for x in ids:
        seed = zlib.crc32(" ".join(map(str, x)).encode()) if method == "random-drop" else 0
        out.append([x[i] for i in kept_positions(len(x), k, method, seed)])
    return out
