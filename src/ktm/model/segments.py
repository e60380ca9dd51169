"""Segmented prompts: spans that are merged K tokens at a time, and spans kept token-exact.

A prompt is a string (merged whole, the paper's method) or a list of segments
``[("merge", text), ("keep", text), ...]``: an instruction or question in a ``keep`` span is
read token by token while a long context in a ``merge`` span is merged (LLMLingua's most
asked control). The segments' texts are joined and tokenised as one string, so the tokens
are exactly those of the plain prompt; a token that overlaps a kept span is kept (a token
that straddles a border, such as ``" Label"``, goes to the kept side).

``ModelConfig.keep`` applies the same split to plain strings: a regular expression whose
matches are kept (``"cue"`` = the task's cue, :func:`task_keep_pattern`; tree: the final
``Parent: AA, Child: BB, Answer: ``, amazon: ``Label:``). The block arithmetic of what the
LLM then reads is :func:`ktm.model.blocks.segment_layout`.

Example::

    >>> segments_of("Review: great, Label:", r"\\S+\\s*\\Z")
    [('merge', 'Review: great, '), ('keep', 'Label:')]
    >>> kept_ranges([("merge", "ab"), ("keep", "cd")])
    [(2, 4)]
    >>> keep_mask([(0, 1), (1, 3), (3, 4)], [(2, 4)])
    [False, True, True]
"""

from __future__ import annotations

import re
from collections.abc import Sequence

MERGE, KEEP = "merge", "keep"
KINDS = (MERGE, KEEP)
#: ``ModelConfig.keep`` value that stands for the task's cue (resolved by ``ktm.train.phases.train_run``)
TASK_CUE = "cue"


def check_segments(prompt) -> list[tuple[str, str]]:
    """A prompt as a list of ``(kind, text)`` segments; a string is one ``merge`` segment.
    Raises ``TypeError`` / ``ValueError`` for anything else (unknown kind, non-string text)."""
    if isinstance(prompt, str):
        return [(MERGE, prompt)]
    if not isinstance(prompt, Sequence) or not prompt:
        raise TypeError(f"a prompt is a string or a non-empty list of (kind, text) segments, got {prompt!r:.60}")
    out = []
    for seg in prompt:
        if not (isinstance(seg, (tuple, list)) and len(seg) == 2 and isinstance(seg[1], str)):
            raise TypeError(f"a segment is a (kind, text) pair with kind in {KINDS}, got {seg!r:.60}")
        if seg[0] not in KINDS:
            raise ValueError(f"a segment's kind is one of {KINDS}, got {seg[0]!r}")
        out.append((seg[0], seg[1]))
    return out


def segments_of(text: str, pattern: str | None) -> list[tuple[str, str]]:
    """Split ``text`` into segments: every non-empty match of ``pattern`` is kept, the rest
    merged (empty pieces dropped; an empty text is one empty ``merge`` segment). ``pattern``
    None: the whole text is merged."""
    if not pattern:
        return [(MERGE, text)]
    out, at = [], 0
    for m in re.finditer(pattern, text):
        if m.end() > m.start():
            out += [(MERGE, text[at:m.start()])] if m.start() > at else []
            out.append((KEEP, m.group()))
            at = m.end()
    out += [(MERGE, text[at:])] if at < len(text) else []
    return out or [(MERGE, text)]


def kept_ranges(segments: list[tuple[str, str]]) -> list[tuple[int, int]]:
    """Character ranges ``[start, end)`` of the kept segments in the joined text."""
    out, at = [], 0
    for kind, text in segments:
        if kind == KEEP and text:
            out.append((at, at + len(text)))
        at += len(text)
    return out


def keep_mask(offsets: Sequence[tuple[int, int]], ranges: Sequence[tuple[int, int]]) -> list[bool]:
    """For tokens at character ``offsets`` ``(start, end)``: whether each overlaps a kept range
    (an empty token counts at its position)."""
    def kept(s, e):
        return any(s < b and max(e, s + 1) > a for a, b in ranges)

    return [kept(s, e) for s, e in offsets]


def cue_pattern(words: int) -> str:
    """The regular expression of a prompt's last ``words`` whitespace-separated words and the
    whitespace after them (a task's cue, ``Task.cue_words``).

    >>> import re; re.search(cue_pattern(2), "Old: x, New Content: ").group()
    'New Content: '
    """
    if words < 1:
        raise ValueError(f"a cue has at least one word, got {words}")
    return r"\S+" + r"\s+\S+" * (words - 1) + r"\s*\Z"


def task_keep_pattern(keep: str | None, task) -> str | None:
    """``ModelConfig.keep`` for a run on ``task``: ``"cue"`` becomes the task's cue pattern
    (its last ``cue_words`` words), anything else is returned as is."""
    return cue_pattern(task.cue_words) if keep == TASK_CUE else keep
