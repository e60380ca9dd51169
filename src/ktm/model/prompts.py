"""Prompts -> what the LLM reads: token ids, kept tokens, merged embeddings and their lengths.

One :class:`PromptMerger` holds what merging needs (tokenizer, input-embedding table, merge
encoder, the model's settings and its position limit) and nothing of the LLM's layers, so the
same code serves :class:`~ktm.model.KTokenMerging` and the client-side encoder of
:mod:`ktm.serve.serving`, which loads only the table and the encoder.

For a prompt of n tokens the LLM reads ``ceil(n / K)`` merged embeddings, (M, d); with kept
spans (:mod:`ktm.model.segments`) each merged run gives ``ceil(run / K)`` and each kept token
its own embedding. A prompt the model cannot read raises a :class:`PromptError` that names its
position in the batch (``index``), so that callers can name their own input instead.

Example::

    merger = model.merger
    ids, keep = merger.tokenize_prompts(["Review: great shoes, Label:"])
    merged = merger.merge_ids(ids, keep)            # [(ceil(n / K), d)]
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .blocks import block_slots, fill_blocks, num_blocks, segment_layout, segmented_length
from .methods import TOKEN_METHODS, select_tokens
from .segments import check_segments, keep_mask, kept_ranges, segments_of


class PromptError(ValueError):
    """A prompt the model cannot read; ``index`` is its position in the batch and ``detail``
    the reason, without the "prompt i" that the message starts with."""

    def __init__(self, index: int, detail: str):
        self.index, self.detail = index, detail
        super().__init__(f"prompt {index} {detail}")


class EmptyPrompt(PromptError):
    """A prompt with no tokens: nothing to merge."""

    def __init__(self, index: int):
        super().__init__(index, "is empty: nothing to merge")


class PromptTooLong(PromptError):
    """A prompt whose merged length plus ``extra`` answer or new tokens exceeds the ``limit``
    positions the model allows (``tokens``: its length in tokens, ``merged``: what it merges to;
    ``contextual``: the contextual layers, which read all its tokens, are what overflow)."""

    def __init__(self, index: int, tokens: int, merged: int, extra: int, limit: int, contextual: bool = False):
        self.tokens, self.merged, self.extra, self.limit = tokens, merged, extra, limit
        if contextual:
            detail = (f"is too long for contextual merging: its first layers read all {tokens} tokens > "
                      f"{limit} positions the model allows")
        elif extra:
            detail = (f"is too long for the model: {tokens} tokens merge to {merged} embeddings, + {extra} "
                      f"answer/new tokens = {merged + extra} > {limit} positions the model allows")
        else:
            detail = (f"is too long for the model: {tokens} tokens merge to {merged} embeddings > {limit} "
                      f"positions the model allows")
        super().__init__(index, detail)


def fill_partial(blocks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """:func:`~ktm.model.blocks.fill_blocks` applied to the partial blocks only (at most one
    per prompt run), the full ones left as they are: the same result without a pass over all."""
    rows = (~valid.all(1)).nonzero().squeeze(1)
    if rows.numel() == 0:
        return blocks
    filled = fill_blocks(blocks[rows], valid[rows])
    return blocks.index_put((rows,), filled) if blocks.requires_grad else blocks.index_put_((rows,), filled)


class PromptMerger:
    """Tokenises prompts and merges them K tokens at a time.

    ``embedding``: the LLM's input-embedding table (V, d) as an ``nn.Embedding`` (its device is
    where merging runs); ``encoder``: the merge encoder (None for a token-space ``method``);
    ``config``: a :class:`~ktm.config.ModelConfig`; ``max_length``: positions the model allows
    (None: no limit); ``contextual``: for ``config.context_layers``, the function that turns
    the flat token embeddings (sum n_i, d) of prompts of given lengths into what the LLM's
    first layers make of them.
    """

    def __init__(self, tokenizer, embedding: nn.Embedding, encoder: nn.Module | None, config,
                 max_length: int | None = None, contextual: Callable | None = None):
        self.tokenizer, self.embedding, self.encoder, self.config = tokenizer, embedding, encoder, config
        self.max_length, self.contextual = max_length, contextual

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def flat_ids(self, ids) -> tuple[torch.Tensor, list[int]]:
        """All prompts' ids laid end to end, (sum n_i,) long on the merger's device, and the
        lengths n_i. ``ids``: lists of ints (read by numpy, no per-token Python), 1-D integer
        tensors or arrays (concatenated), or one (B, L) tensor (B prompts of L tokens)."""
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            return ids.reshape(-1).to(self.device, torch.long), [ids.shape[1]] * ids.shape[0]
        lengths = [len(x) for x in ids]
        if ids and all(isinstance(x, (torch.Tensor, np.ndarray)) for x in ids):
            parts = [torch.as_tensor(x).reshape(-1) for x in ids]
            return torch.cat(parts).to(self.device, torch.long), lengths
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=sum(lengths))
        return torch.from_numpy(flat).to(self.device), lengths

    def embed_each(self, ids) -> list[torch.Tensor]:
        """The token embeddings of each id list, (n_i, d), from one lookup."""
        flat, lengths = self.flat_ids(ids)
        return list(self.embedding(flat).split(lengths))

    def tokenize(self, texts: list[str], what: str = "prompt") -> list[list[int]]:
        """Token ids of each text, without special tokens; rejects empty prompts."""
        if isinstance(texts, str):
            raise TypeError(f"expected a list of {what}s, got a single string")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"{what} {i} is a {type(t).__name__}, not a string")
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
        if what == "prompt":
            for i, x in enumerate(ids):
                if len(x) == 0:
                    raise EmptyPrompt(i)
        return ids

    def tokenize_prompts(self, prompts: list) -> tuple[list[list[int]], list[list[bool]] | None]:
        """Token ids of each prompt and which tokens are kept (None: none is).

        A prompt is a string, split by ``config.keep`` when it is set, or a list of
        ``("merge" | "keep", text)`` segments (:mod:`ktm.model.segments`), taken as given. The
        segments' texts are joined and tokenised whole, so the ids are those of the plain
        prompt; a token overlapping a kept span is kept (needs a fast tokenizer; a slow one
        tokenises each segment on its own).
        """
        if isinstance(prompts, str):
            raise TypeError("expected a list of prompts, got a single string")
        segs = [segments_of(p, self.config.keep) if isinstance(p, str) else check_segments(p) for p in prompts]
        texts = ["".join(t for _, t in s) for s in segs]
        ranges = [kept_ranges(s) for s in segs]
        ids = self.tokenize(texts)  # checks types and empty prompts
        if not any(ranges):
            return ids, None
        if not getattr(self.tokenizer, "is_fast", False):  # no offsets: each segment on its own
            parts = [[self.tokenize([t], "answer")[0] for _, t in s] for s in segs]
            return ([sum(p, []) for p in parts],
                    [[kind == "keep" for (kind, _), x in zip(s, p) for _ in x] for s, p in zip(segs, parts)])
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return ids, [keep_mask(o, r) for o, r in zip(enc["offset_mapping"], ranges)]

    def merge_ids(self, ids, keep: list[list[bool]] | None = None) -> list[torch.Tensor]:
        """Merged embeddings of each prompt: list of (ceil(n_i / K), d) tensors.

        ``ids``: each prompt's token ids, as lists, 1-D tensors or one (B, L) tensor
        (:meth:`flat_ids`); the block layout is built by tensor arithmetic, without a Python
        step per token.

        All prompts' blocks go through the encoder as one flat batch; each prompt's blocks
        start at its own first token (no batch padding is ever merged). With a token-space
        ``config.method`` (a baseline, see :mod:`ktm.model.methods`) the embeddings of the
        ``ceil(n_i / K)`` kept tokens are returned instead.

        ``keep`` (segmented prompts, :mod:`ktm.model.segments`): per prompt, whether each token is
        kept. Kept tokens are read as their own embeddings, unchanged, and each run of merged
        tokens is merged K at a time from its own first token
        (:func:`ktm.model.blocks.segment_layout`); prompt i then gives (segmented_length, d).
        """
        if keep is not None and not any(any(x) for x in keep):
            keep = None  # nothing kept: exactly the plain path
        if self.config.method in TOKEN_METHODS:  # a token-space baseline: kept tokens, read plainly
            if keep is not None:
                raise ValueError(f"method {self.config.method!r} selects tokens itself: kept spans need "
                                 f"method 'merge' or 'mean'")
            return self.embed_each(select_tokens(ids, self.k, self.config.method))
        flat, lengths = self.flat_ids(ids)
        if keep is None:
            (index, valid, per), source = block_slots(lengths, self.k), None
        else:
            index, valid, source, per = segment_layout(keep, self.k)
        index, valid = index.to(self.device), valid.to(self.device)
        if self.config.context_layers or source is not None:
            emb = tokens = self.embedding(flat)
            if self.config.context_layers:  # contextual merging: merge what the first layers made of them
                emb = self.contextual(emb, lengths)
            blocks = emb[index]
        else:  # one lookup straight into the (NB, K, d) block layout
            blocks = self.embedding(flat[index])
        blocks = fill_partial(blocks, valid)
        enc_dtype = next(self.encoder.parameters()).dtype
        merged = self.encoder(blocks.to(enc_dtype), valid).to(blocks.dtype)
        if source is not None:  # kept tokens between the merged blocks, as they are
            merged = torch.cat([merged, tokens])[source.to(self.device)]
        return list(merged.split(per))

    def read_length(self, ids: list[int], keep: list[bool] | None = None) -> int:
        """How many embeddings the LLM reads for one prompt's ids (and kept tokens)."""
        if self.config.method in TOKEN_METHODS or keep is None:
            return num_blocks(len(ids), self.k)
        return segmented_length(keep, self.k)

    def merged_lengths(self, prompts: list) -> list[int]:
        """How many embeddings the LLM reads for each prompt: ceil(tokens / K), or with kept
        spans ceil(n / K) per merged run plus the kept tokens."""
        ids, keep = self.tokenize_prompts(prompts)
        return [self.read_length(x, None if keep is None else keep[i]) for i, x in enumerate(ids)]

    def check_length(self, ids: list[list[int]], extra: int | list[int] = 0,
                     keep: list[list[bool]] | None = None) -> None:
        """Raise :class:`PromptTooLong` for the first prompt that, merged, plus ``extra`` answer
        or new tokens (one number, or one per prompt), needs more positions than the model
        allows; with contextual merging, also for one whose tokens the first layers cannot read."""
        if self.max_length is None:
            return
        for i, x in enumerate(ids):
            extra_i = extra[i] if isinstance(extra, (list, tuple)) else extra
            merged = self.read_length(x, None if keep is None else keep[i])
            if self.config.context_layers and len(x) > self.max_length:
                raise PromptTooLong(i, len(x), merged, extra_i, self.max_length, contextual=True)
            if merged + extra_i > self.max_length:
                raise PromptTooLong(i, len(x), merged, extra_i, self.max_length)
