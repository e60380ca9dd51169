"""Users' own data: a folder (or two files) of ``{"prompt": ..., "answer": ...}`` lines."""

from __future__ import annotations

from pathlib import Path

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

    def __init__(self, folder: str | Path, metric: str = "accuracy", max_new_tokens: int = 8):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
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
