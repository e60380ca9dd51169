"""Block, padding, mask and label arithmetic: small pure functions, no model inside.

Conventions (B = batch, K = block size, d = hidden size):

* A prompt of ``n`` tokens is cut into ``ceil(n / K)`` contiguous blocks that start at the
  prompt's *own* first token, never after batch padding. Blocks of different prompts are
  gathered into one flat ``(num_blocks_total, K)`` index table, so a prompt's blocks do not
  depend on its batch mates.
* **Fill rule for the partial last block**: the empty slots are filled with the mean of the
  block's real token embeddings. The block's mean over K slots is then exactly the mean of
  its real tokens, so a mean-initialised encoder returns that mean, and the rule looks
  only at the prompt itself.
* Sequences the LLM reads are padded to a common length with an attention mask of 0 on
  padding and position ids that count real positions only (``cumsum(mask) - 1``), so
  padding never changes a real position's output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import check_k  # noqa: F401  (K is checked where it is configured; blocks re-exports it)


def num_blocks(n: int, k: int) -> int:
    """Number of merged embeddings for a prompt of ``n`` tokens: ``ceil(n / k)``.

    >>> num_blocks(10, 4)
    3
    """
    check_k(k)
    if n < 0:
        raise ValueError(f"prompt length must be >= 0, got {n}")
    return -(-n // k)


def block_slots(lengths: Sequence[int], k: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Where each block slot reads its token from, for prompts laid end to end.

    Args:
        lengths: token count of each prompt (each >= 1).
        k: block size.

    Returns:
        ``index`` (NB, K) long: position in the concatenation of all prompts' tokens
        (0 for empty slots), ``valid`` (NB, K) bool: slot holds a real token, and
        ``blocks_per_prompt``: list of ``ceil(n_i / K)``. NB = sum of blocks_per_prompt.

    >>> idx, valid, per = block_slots([3, 2], 2)
    >>> idx.tolist(), valid.tolist(), per
    ([[0, 1], [2, 0], [3, 4]], [[True, True], [True, False], [True, True]], [2, 1])
    """
    check_k(k)
    per = [num_blocks(n, k) for n in lengths]
    if any(n < 1 for n in lengths):
        raise ValueError("every prompt needs at least one token")
    starts = torch.tensor([0, *lengths], dtype=torch.long).cumsum(0)[:-1]
    index, valid = span_slots(starts, lengths, k)
    return index, valid, per


def span_slots(starts: torch.Tensor, lengths: Sequence[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, valid)`` of :func:`block_slots` for spans of ``lengths`` tokens that start at
    ``starts`` (long tensor) in a flat token sequence: each span is cut into its own blocks."""
    per = [num_blocks(n, k) for n in lengths]
    lens = torch.tensor(list(lengths), dtype=torch.long)
    nb = torch.tensor(per, dtype=torch.long)
    prompt_of_block = torch.repeat_interleave(torch.arange(len(per)), nb)
    # block number inside its prompt: 0, 1, ... for each prompt
    first_block = torch.cat([torch.zeros(1, dtype=torch.long), nb.cumsum(0)[:-1]])
    block_in_prompt = torch.arange(int(nb.sum())) - first_block[prompt_of_block]
    offset = block_in_prompt[:, None] * k + torch.arange(k)[None, :]  # (NB, K) offset in prompt
    valid = offset < lens[prompt_of_block][:, None]
    index = torch.where(valid, starts[prompt_of_block][:, None] + offset, torch.zeros_like(offset))
    return index, valid


def keep_runs(keep: Sequence[bool]) -> list[tuple[bool, int]]:
    """Runs of equal values: ``(kept, length)`` in order.

    >>> keep_runs([False, False, True, False])
    [(False, 2), (True, 1), (False, 1)]
    """
    runs: list[tuple[bool, int]] = []
    for flag in keep:
        if runs and runs[-1][0] == bool(flag):
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((bool(flag), 1))
    return runs


def segmented_length(keep: Sequence[bool], k: int) -> int:
    """Positions the LLM reads for a prompt whose tokens are kept where ``keep`` is True:
    ``ceil(n / K)`` per merged run of n tokens, plus one per kept token.

    >>> segmented_length([False] * 5 + [True] * 2, 4)
    4
    """
    return sum(n if kept else num_blocks(n, k) for kept, n in keep_runs(keep))


def segment_layout(keeps: Sequence[Sequence[bool]], k: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Block layout of segmented prompts laid end to end (``keeps[i][t]``: token t of prompt
    i is kept, read as its own embedding, rather than merged).

    Each run of merged tokens is cut into its own blocks (a block never spans a kept token
    or a run's border); kept tokens pass through. Returns ``index`` (NB, K) and ``valid``
    (NB, K) of the merged blocks over the flat token sequence (as :func:`block_slots`),
    ``source`` (P,) long: for every position the LLM reads (all prompts, in order), ``j`` for
    merged block j or ``NB + t`` for flat token t, so ``cat([merged (NB, d), tokens (T, d)])
    [source]`` is the sequence; and the positions per prompt (:func:`segmented_length`).

    >>> index, valid, source, per = segment_layout([[False, False, False, True], [True, False]], 2)
    >>> index.tolist(), source.tolist(), per
    ([[0, 1], [2, 0], [5, 0]], [0, 1, 6, 7, 2], [3, 2])
    """
    check_k(k)
    starts, lengths, src, is_block, per, flat = [], [], [], [], [], 0
    for keep in keeps:
        if len(keep) < 1:
            raise ValueError("every prompt needs at least one token")
        for kept, n in keep_runs(keep):
            if kept:
                src += range(flat, flat + n)
                is_block += [False] * n
            else:
                first = sum(num_blocks(m, k) for m in lengths)
                src += range(first, first + num_blocks(n, k))
                is_block += [True] * num_blocks(n, k)
                starts.append(flat)
                lengths.append(n)
            flat += n
        per.append(segmented_length(keep, k))
    index, valid = span_slots(torch.tensor(starts, dtype=torch.long), lengths, k)
    source = torch.tensor(src, dtype=torch.long)
    source = torch.where(torch.tensor(is_block, dtype=torch.bool), source, source + index.shape[0])
    return index, valid, source, per


def fill_blocks(blocks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Apply the fill rule: empty slots take the mean of their block's real embeddings.

    Args:
        blocks: (NB, K, d) embeddings; values in empty slots are ignored.
        valid: (NB, K) bool.

    Returns: (NB, K, d) with empty slots replaced; a block without any valid slot becomes
    zeros (whatever its slots held, NaN included, and with zero gradient).
    """
    v = valid.unsqueeze(-1)
    real = torch.where(v, blocks, torch.zeros_like(blocks))
    count = v.to(blocks.dtype).sum(1, keepdim=True).clamp_min(1)
    return torch.where(v, blocks, real.sum(1, keepdim=True) / count)


def pad_sequences(
    seqs: Sequence[torch.Tensor], side: str = "left"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (n_i, d) tensors into (B, max n, d) with zeros as padding.

    Returns ``(padded, attention_mask)``; the mask is 1 on real positions.
    ``side`` is ``"left"`` (for generation: every prompt ends at the last column) or
    ``"right"`` (for training).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not seqs:
        raise ValueError("nothing to pad: empty batch")
    longest = max(s.shape[0] for s in seqs)
    out = seqs[0].new_zeros((len(seqs), longest, *seqs[0].shape[1:]))
    mask = torch.zeros(len(seqs), longest, dtype=torch.long, device=seqs[0].device)
    for i, s in enumerate(seqs):
        n = s.shape[0]
        sl = slice(longest - n, longest) if side == "left" else slice(0, n)
        out[i, sl] = s
        mask[i, sl] = 1
    return out, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only: (B, T) mask -> (B, T) long.

    Padding positions get 0 (they are masked out anyway).

    >>> position_ids(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])).tolist()
    [[0, 0, 0, 1, 2], [0, 1, 2, 3, 0]]
    """
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0) * attention_mask.long()


def answer_targets(
    prompt_lengths: Sequence[int], answer_lengths: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which positions of a right-padded [merged prompt][answer] batch predict which target.

    Row i holds ``m_i`` merged prompt embeddings followed by ``a_i`` answer tokens (the
    last of which is the end token). Answer token j (0-based) is predicted by the output
    at position ``m_i - 1 + j``: the last merged embedding predicts the first answer token;
    merged positions carry no targets.

    Returns ``(rows, cols, answer_index)`` long tensors of length sum(a_i): the batch row
    and the column whose logits are needed, and the index of the target inside the
    concatenation of all answers.

    >>> r, c, t = answer_targets([2, 1], [2, 3])
    >>> r.tolist(), c.tolist(), t.tolist()
    ([0, 0, 1, 1, 1], [1, 2, 0, 1, 2], [0, 1, 2, 3, 4])
    """
    if len(prompt_lengths) != len(answer_lengths):
        raise ValueError("one answer per prompt is needed")
    a = torch.tensor(list(answer_lengths), dtype=torch.long)
    m = torch.tensor(list(prompt_lengths), dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(a)), a)
    first = torch.cat([torch.zeros(1, dtype=torch.long), a.cumsum(0)[:-1]])
    j = torch.arange(int(a.sum())) - first[rows]
    cols = m[rows] - 1 + j
    return rows, cols, torch.arange(int(a.sum()))


def concat_right_padded(
    first: Sequence[torch.Tensor], second: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, ``first[i]`` (m_i, d) followed by ``second[i]`` (a_i, d), right-padded.

    Returns ``(embeds (B, T, d), attention_mask (B, T))``.
    """
    return pad_sequences([torch.cat([p, a], 0) for p, a in zip(first, second)], side="right")
