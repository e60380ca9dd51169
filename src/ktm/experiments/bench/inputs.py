"""Inputs: token windows and texts of exact lengths cut from a corpus, tree questions."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path


def corpus_text(path: str | os.PathLike | None = None) -> str:
    """Text the synthetic prompts are cut from.

    ``path``: a ``.jsonl`` file (each record's ``old_contents``, ``text`` or ``prompt``
    field, e.g. the commit data) or any text file. Default: ktm's own source code.
    """
    if path is None:
        files = sorted(Path(__file__).parents[2].rglob("*.py"))
        return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    path = Path(path)
    if path.suffix == ".jsonl":
        parts = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                field = next((f for f in ("old_contents", "text", "prompt") if f in rec), None)
                if field is None:
                    raise ValueError(f"{path}: records need an 'old_contents', 'text' or 'prompt' field")
                parts.append(rec[field])
        return "\n\n".join(parts)
    return path.read_text(encoding="utf-8")


def token_stream(tokenizer, text: str, min_tokens: int = 0) -> list[int]:
    """The text's token ids (no special tokens), repeated until at least ``min_tokens``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the corpus text has no tokens")
    reps = max(1, -(-min_tokens // len(ids)))
    return ids * reps


def window(stream: Sequence[int], start: int, length: int) -> list[int]:
    """``length`` ids of ``stream`` from ``start``, wrapping around at the end.

    >>> window([1, 2, 3], 2, 4)
    [3, 1, 2, 3]
    """
    n = len(stream)
    return [stream[(start + i) % n] for i in range(length)]


def id_prompts(stream: Sequence[int], length: int, count: int, start: int = 0) -> list[list[int]]:
    """``count`` different prompts of exactly ``length`` token ids (consecutive windows)."""
    return [window(stream, start + i * length, length) for i in range(count)]


def texts_of_length(tokenizer, stream: Sequence[int], length: int, count: int, start: int = 0) -> list[str]:
    """``count`` texts that tokenize to ``length`` tokens (as near as the tokenizer allows).

    Decoding a window of ids and tokenizing it again can merge or split tokens at the cut,
    so a few nearby cut points are tried.
    """
    out = []
    for i in range(count):
        ids = window(stream, start + i * (length + 16), length + 16)
        best, best_gap = None, None
        for n in (length, length - 1, length + 1, length - 2, length + 2, length + 3, length + 4):
            if n < 1:
                continue
            text = tokenizer.decode(ids[:n])
            got = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if text.strip() and (best_gap is None or abs(got - length) < best_gap):
                best, best_gap = text, abs(got - length)
            if got == length and text.strip():
                break
        if best is None:
            raise ValueError(f"could not cut a text of {length} tokens from the corpus")
        out.append(best)
    return out


def tree_examples(count: int, stage: str = "small", seed: int = 0) -> tuple[list[str], list[str]]:
    """``count`` Textualized Tree questions ``(prompts, answers)`` of ``stage``."""
    import random

    from ...tasks.tree import generate_tree, tree_questions

    rng = random.Random(seed)
    prompts, answers = [], []
    while len(prompts) < count:
        qs = tree_questions(generate_tree(stage, rng), len(prompts))
        q = qs[rng.randrange(len(qs))]
        prompts.append(q.prompt)
        answers.append(q.answer)
    return prompts, answers


def portable_path(path: str | os.PathLike) -> str:
    """A path fit for saved results: as given when relative, relative to the working folder
    when inside it, else the file name alone (no machine's folder layout in the docs).

    >>> portable_path("data/dev.jsonl"), portable_path("/somewhere/else/dev.jsonl")
    ('data/dev.jsonl', 'dev.jsonl')
    """
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return p.name
