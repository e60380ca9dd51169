"""Users' own data: a folder (or two files) of ``{"prompt": ..., "answer": ...}`` lines."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .base import METRICS, Example, Task, read_jsonl


class JsonlTask(Task):
    """Examples from ``FOLDER/train.jsonl`` and ``FOLDER/test.jsonl``.

    Args:
        folder: folder holding ``train.jsonl`` and ``test.jsonl`` (either may be missing
            if that split is never asked for).
        metric: ``"accuracy"`` (short label answers) or ``"perplexity"`` (long answers).
        max_new_tokens: tokens generated per answer when scoring accuracy.
    """

    name = "jsonl"

    @dataclass(frozen=True)
    class Options:
        data: str | None = field(default=None, metadata={"help": "jsonl task: folder with train.jsonl and test.jsonl"})
        metric: Literal["accuracy", "perplexity"] = field(
            default="accuracy", metadata={"help": "jsonl task: how answers are scored"})
        max_new_tokens: int = field(default=8, metadata={"help": "jsonl accuracy task: tokens generated per answer"})

    @classmethod
    def from_options(cls, options: "JsonlTask.Options") -> list["JsonlTask"]:
        if not options.data:
            raise ValueError("the jsonl task needs --data FOLDER (with train.jsonl / test.jsonl)")
        return [cls(options.data, metric=options.metric, max_new_tokens=options.max_new_tokens)]

    @property
    def label(self) -> str:
        return f"jsonl {self.folder.name}"

    def __init__(self, folder: str | Path, metric: str = "accuracy", max_new_tokens: int = 8):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"data folder not found: {self.folder}")
        self.metric = metric
        self.max_new_tokens = max_new_tokens
        self._cache: dict[str, list[Example]] = {}

    def examples(self, split: str) -> list[Example]:
        if split not in self._cache:
            rows = read_jsonl(self.folder / f"{split}.jsonl")
            if not rows:
                raise ValueError(f"{self.folder / f'{split}.jsonl'} holds no examples")
            self._cache[split] = rows
        return self._cache[split]
