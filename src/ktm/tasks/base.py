"""What a task is: examples, and how predictions are scored.

A task plugs into the one trainer and the one evaluator. It says how its examples load
(``examples(split)``) and which metric scores them:

* ``metric = "accuracy"``: the model generates an answer that is compared, normalised,
  with the reference; ``labels`` (the label words) give the majority-class baseline.
  Fits the Textualized Tree task and label-word classification (Amazon Reviews).
* ``metric = "perplexity"``: the reference answer's per-token perplexity under the model
  (no generation). Fits long generated answers (CommitPackFT).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

METRICS = ("accuracy", "perplexity")


@dataclass(frozen=True)
class Example:
    """One prompt and its reference answer; ``meta`` carries task fields (e.g. tree_id);
    ``source`` says where it was read (``file:line``), for error messages."""

    prompt: str
    answer: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    source: str = field(default="", compare=False, hash=False)

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "answer": self.answer, **self.meta}


@dataclass(frozen=True)
class NoOptions:
    """The options of a task that has none."""


class Task:
    """Base class: subclasses set ``name``/``metric`` and implement ``examples``.

    A task that the command line can build declares its options as a dataclass ``Options``
    (each field becomes a ``--field-name`` flag of ``ktm train`` / ``ktm eval``, with the
    field's ``help`` metadata) and builds itself, or a curriculum of itself, with
    :meth:`from_options`. Adding a task is adding one module and one entry in
    ``ktm.tasks.TASKS``.
    """

    name: str = "task"
    metric: str = "accuracy"
    #: at least this many new tokens are generated when scoring accuracy (the evaluator
    #: raises it to fit the longest reference answer and its end token)
    max_new_tokens: int = 8
    #: how many final words of a prompt are its cue (``Label:``), which a prompt compressor
    #: keeps verbatim (the ``llmlingua2`` baseline, :mod:`ktm.experiments.lingua`)
    cue_words: int = 1
    #: each answer is followed by the end token, a target of the loss and of perplexity; False
    #: for answers that are texts cut mid-way (:class:`ktm.tasks.text.TextTask`)
    answer_end: bool = True
    Options = NoOptions

    @classmethod
    def from_options(cls, options) -> list["Task"]:
        """The tasks to train on in order (several for a curriculum) from ``Options``."""
        return [cls()]

    @property
    def label(self) -> str:
        """A short name for reports (``tree small``, ``jsonl reviews``)."""
        return self.name

    def examples(self, split: str) -> list[Example]:
        """Examples of ``split`` (``"train"`` or ``"test"``)."""
        raise NotImplementedError

    @staticmethod
    def normalise(text: str) -> str:
        """How a generated answer is compared with the reference (accuracy tasks)."""
        return text.strip().lower()

    def labels(self, examples: Sequence[Example]) -> list[str]:
        """The label words present in ``examples`` (accuracy tasks)."""
        return sorted({self.normalise(e.answer) for e in examples})


class LoadedTask(Task):
    """A task whose two splits are read once, on first use, by :meth:`_load`
    (``{"train": [...], "test": [...]}``)."""

    _splits: dict[str, list[Example]] | None = None

    def examples(self, split: str) -> list[Example]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if self._splits is None:
            self._splits = self._load()
        return self._splits[split]

    def _load(self) -> dict[str, list[Example]]:
        raise NotImplementedError


class FileTask(LoadedTask):
    """A task read from local JSONL: a folder with ``train.jsonl`` and ``test.jsonl`` (or
    ``dev.jsonl``), used as split, or one file, split here by :meth:`split_key` (a product,
    a repository) so that examples with the same key stay in one split. Subclasses implement
    :meth:`read` (one file's examples) and :meth:`split_key`."""

    what = "examples"

    def __init__(self, source: str | Path, test_fraction: float = 0.1):
        self.source = Path(source)
        if not self.source.exists():
            raise FileNotFoundError(f"no such {self.what} file or folder: {self.source}")
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.test_fraction = test_fraction
        self._splits: dict[str, list[Example]] | None = None

    @property
    def label(self) -> str:
        return f"{self.name} {self.source.name}"

    def read(self, file: Path, split: str) -> list[Example]:
        raise NotImplementedError

    def split_key(self, example: Example) -> str:
        raise NotImplementedError


    def _load(self) -> dict[str, list[Example]]:
        if not self.source.is_dir():
            return split_by_key(self.read(self.source, "all"), self.split_key, self.test_fraction)
        test = next((self.source / n for n in ("test.jsonl", "dev.jsonl") if (self.source / n).is_file()), None)
        if test is None or not (self.source / "train.jsonl").is_file():
            raise FileNotFoundError(f"{self.source} needs train.jsonl and test.jsonl (or dev.jsonl)")
        return {"train": self.read(self.source / "train.jsonl", "train"), "test": self.read(test, "test")}


class ExamplesTask(Task):
    """A task scored like ``task`` but on the given examples (a training subset, or
    prompts compressed by another method)."""

    def __init__(self, task: Task, train: list[Example], test: list[Example], label: str = ""):
        self.base, self._data = task, {"train": train, "test": test}
        self.name, self.metric, self.max_new_tokens = task.name, task.metric, task.max_new_tokens
        self.cue_words, self.answer_end = task.cue_words, task.answer_end
        self._label = label or task.label

    @property
    def label(self) -> str:
        return self._label

    def examples(self, split: str) -> list[Example]:
        if split not in self._data:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return self._data[split]

    def normalise(self, text: str) -> str:
        return self.base.normalise(text)

    def labels(self, examples):
        return self.base.labels(examples)


def majority_rate(examples: Sequence[Example], normalise=Task.normalise) -> tuple[str, float]:
    """The most frequent answer and its share of ``examples``."""
    if not examples:
        raise ValueError("no examples")
    label, n = Counter(normalise(e.answer) for e in examples).most_common(1)[0]
    return label, n / len(examples)


def iter_json_objects(path: str | Path):
    """``(file:line, object)`` for every non-blank line of a JSONL file. A line that is not
    UTF-8, not JSON or not a JSON object raises ``ValueError`` naming ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such JSONL file: {path}")
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from e
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
            except ValueError as e:  # e.g. an integer of more than 4,300 digits
                raise ValueError(f"{where}: not usable JSON ({e})") from e
            except RecursionError:
                raise ValueError(f"{where}: the JSON is nested too deeply to read") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got a JSON {type(row).__name__}")
            yield where, row


def read_jsonl(path: str | Path) -> list[Example]:
    """Read ``{"prompt": ..., "answer": ..., ...}`` lines; other fields go to ``meta``.

    Any line that is not UTF-8, not JSON, not an object, or lacks a string ``prompt`` and
    ``answer`` raises ``ValueError`` naming ``file:line``; blank lines are skipped.
    """
    out = []
    for where, row in iter_json_objects(path):
        missing = [k for k in ("prompt", "answer") if k not in row]
        if missing:
            raise ValueError(f"{where}: the object has no {' or '.join(repr(k) for k in missing)}")
        prompt, answer = row.pop("prompt"), row.pop("answer")
        if not isinstance(prompt, str) or not isinstance(answer, str):
            raise ValueError(f"{where}: 'prompt' and 'answer' must be strings")
        out.append(Example(prompt, answer, row, source=where))
    return out


def split_by_key(examples: Sequence[Example], key, test_fraction: float) -> dict[str, list[Example]]:
    """``{"train": [...], "test": [...]}``: an example is in test when a fixed hash of
    ``key(example)`` (e.g. its product or repository) falls below ``test_fraction``, so
    examples with the same key stay together and the split does not depend on file order."""
    import hashlib

    out: dict[str, list[Example]] = {"train": [], "test": []}
    for e in examples:
        h = int.from_bytes(hashlib.sha256(str(key(e)).encode()).digest()[:8], "big")
        out["test" if h / 2**64 < test_fraction else "train"].append(e)
    return out


def write_jsonl(path: str | Path, examples: Sequence[Example]) -> None:
    """Write examples atomically (temporary file + rename)."""
    from ..checkpoint import write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, "".join(json.dumps(e.to_json(), ensure_ascii=False) + "\n" for e in examples))


def check_fields(where: str, row: dict, schema: dict) -> None:
    """Raise ``ValueError`` naming ``where`` (``file:line``) and the field when ``row`` lacks a
    field of ``schema`` (field -> type) or holds another type. A ``float`` field accepts
    integers; ``bool`` is never taken for a number.

    >>> check_fields("f:1", {"rating": 5, "text": "ok"}, {"rating": float, "text": str})
    >>> check_fields("f:2", {"rating": True}, {"rating": float})
    Traceback (most recent call last):
    ValueError: f:2: field 'rating' must be float, got bool True
    """
    for name, kind in schema.items():
        if name not in row:
            raise ValueError(f"{where}: field {name!r} is missing")
        value = row[name]
        kinds = (int, float) if kind is float else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and kind is not bool):
            raise ValueError(f"{where}: field {name!r} must be {kind.__name__}, got {type(value).__name__} "
                             f"{str(value)[:40]}")


def _key_order(key: str, seed: int) -> bytes:
    import hashlib

    return hashlib.sha256(f"{seed}:{key}".encode()).digest()


def split_by_count(rows, key, test_size: int, train_fraction: float = 1.0, seed: int = 0) -> dict[str, list]:
    """A release's split of a large file: ``test_size`` held out by whole groups, and a random
    ``train_fraction`` of the rest for training.

    Args:
        rows: a function returning a fresh iterator over the rows (called twice: once to count
            the groups, once to pick the rows, so the file is never held whole in memory).
        key: the group of a row (a product, a repository); no group is in both splits.
        test_size: rows to hold out. Groups are taken whole in a fixed hash order (seeded),
            passing over any group that would overshoot, so the test split holds exactly
            ``test_size`` rows unless no remaining group fits.
        train_fraction: share of the other rows sampled (seeded) for training, in (0, 1].

    Returns ``{"train": rows, "test": rows}`` in file order.
    """
    if test_size < 1 or not 0 < train_fraction <= 1:
        raise ValueError(f"need test_size >= 1 and train_fraction in (0, 1]; got {test_size}, {train_fraction}")
    counts = Counter(key(row) for row in rows())
    total = sum(counts.values())
    if total <= test_size:
        raise ValueError(f"the source holds {total} examples, not more than the {test_size} to hold out")
    test_keys, room = set(), test_size
    for k in sorted(counts, key=lambda k: _key_order(k, seed)):
        if room == 0:
            break
        if counts[k] <= room:
            test_keys.add(k)
            room -= counts[k]
    rest = total - (test_size - room)
    n_train = round(train_fraction * rest)
    if n_train < 1:
        raise ValueError(f"a training fraction of {train_fraction} of the {rest} other examples is none")
    import random

    chosen = set(range(rest)) if n_train == rest else set(random.Random(seed).sample(range(rest), n_train))
    out: dict[str, list] = {"train": [], "test": []}
    i = 0
    for row in rows():
        if key(row) in test_keys:
            out["test"].append(row)
        else:
            if i in chosen:
                out["train"].append(row)
            i += 1
    return out
