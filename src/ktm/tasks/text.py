"""Plain text as a task: each text cut into a prompt and its continuation (``ktm pretrain``).

No labels are needed. A text is tokenized with the base model's tokenizer and cut into
consecutive windows of ``prompt_tokens + continuation_tokens`` tokens: a window's first
``prompt_tokens`` tokens are the prompt (what the model reads merged) and the rest its
continuation (the answer). A text's last, shorter window keeps ``continuation_tokens``
tokens of continuation and is used when at least ``min_prompt_tokens`` remain for its
prompt, so short texts (a review) give one window with a shorter prompt.
``windows_per_text`` caps the windows taken from one text (0: all), so that a few long
files do not outweigh many short texts. Prompts and continuations are cut from the text at
the tokens' character offsets, so each reads back as (nearly) the same tokens.

The continuation stops mid-text: it is *not* followed by the end token
(``answer_end = False``), and the metric is the perplexity of the continuations.

Sources (one or several, read in order):

* a ``.jsonl`` file: one text per line, the first of ``text_fields`` that the line's object
  has (``text`` by default; ``--text-field text new_contents`` reads both
  ``shared/data/amazon`` reviews and ``shared/data/commits`` code);
* a ``.txt`` file: one text, of which only what its windows use is read (a prefix long
  enough for ``windows_per_text`` windows); with ``windows_per_text`` 0 it is read in pieces
  of about :data:`PIECE_CHARS` characters (cut at a line break), each a text named
  ``FILE:LINE``, so memory stays bounded whatever the file's size;
* a folder: its ``.jsonl`` and ``.txt`` files (sorted, not recursive), leaving out held-out
  splits (files named ``dev``, ``test``, ``valid`` or ``validation``) and symbolic links
  (which may lead out of the folder);
* a Hugging Face dataset id (``owner/name``): its ``train`` split, streamed with the
  ``datasets`` library (``pip install 'k-token-merging[datasets]'``), the first ``max_texts`` texts
  (:data:`HUB_TEXTS` when ``max_texts`` is 0).

Held out: ``test_fraction`` of the texts, chosen by a fixed hash of where each was read
(``file:line``); a text's windows stay in one split (windows are split instead when that
leaves a split empty, e.g. a single ``.txt`` file).

Example::

    >>> from ktm.loading import base_tokenizer                       # doctest: +SKIP
    >>> task = TextTask(["../shared/data/amazon/train.jsonl"], base_tokenizer())  # doctest: +SKIP
    >>> e = task.examples("train")[0]; e.prompt, e.answer            # doctest: +SKIP
"""

from __future__ import annotations

import codecs
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from .base import Example, LoadedTask, iter_json_objects, split_by_key
from .hub import is_hub_id

#: files of a folder that are held-out splits, never pretraining text
HELD_OUT_STEMS = ("dev", "test", "valid", "validation")
#: texts streamed from a Hugging Face dataset when ``max_texts`` is 0
HUB_TEXTS = 10_000
#: a ``.txt`` file read whole (windows_per_text = 0) is read in pieces of about this many characters
PIECE_CHARS = 1 << 20


def _opt(text: str, default, **kw):
    return field(default=default, metadata={"help": text, **kw})


@dataclass(frozen=True)
class TextOptions:
    """How ``ktm pretrain`` reads and cuts its text (each field is a ``--field-name`` flag)."""

    text: tuple[str, ...] = _opt("text sources: .jsonl / .txt files, folders of them, or a Hugging Face "
                                 "dataset id (needs the datasets extra; required, no default)", ())
    text_field: tuple[str, ...] = _opt("JSONL fields holding the text; each line uses the first it has",
                                       ("text",))
    prompt_tokens: int = _opt("tokens of each window that the model reads merged", 64)
    continuation_tokens: int = _opt("tokens after them that it must continue", 32)
    min_prompt_tokens: int = _opt("a text's shorter last window is used when its prompt has at least "
                                  "this many tokens", 16)
    windows_per_text: int = _opt("most windows taken from one text (0: all)", 4)
    max_texts: int = _opt(f"most texts read per source (0: all; {HUB_TEXTS} for a dataset id)", 0)
    test_fraction: float = _opt("share of the texts held out for the perplexity evaluations", 0.02)

    def __post_init__(self):
        from ..config import check_types

        check_types(self)
        for name in ("prompt_tokens", "continuation_tokens", "min_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_prompt_tokens > self.prompt_tokens:
            raise ValueError(f"min_prompt_tokens ({self.min_prompt_tokens}) must be <= prompt_tokens "
                             f"({self.prompt_tokens})")
        if self.windows_per_text < 0 or self.max_texts < 0:
            raise ValueError("windows_per_text and max_texts must be >= 0")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if not self.text_field:
            raise ValueError("give at least one text field")


def cut_windows(offsets: list[tuple[int, int]], opts: TextOptions) -> list[tuple[int, int, int]]:
    """Where a text of tokens at character ``offsets`` is cut: ``(start, split, end)`` character
    positions of each window's prompt ``text[start:split]`` and continuation ``text[split:end]``.

    A window ends at a token's end and the next starts there, so no character is lost.

    >>> offs = [(i, i + 1) for i in range(10)]           # ten one-character tokens
    >>> cut_windows(offs, TextOptions(prompt_tokens=3, continuation_tokens=2, min_prompt_tokens=2))
    [(0, 3, 5), (5, 8, 10)]
    >>> cut_windows(offs[:8], TextOptions(prompt_tokens=3, continuation_tokens=2, min_prompt_tokens=1))
    [(0, 3, 5), (5, 6, 8)]
    """
    p, c, n = opts.prompt_tokens, opts.continuation_tokens, len(offsets)
    out, first = [], 0
    while first < n and (not opts.windows_per_text or len(out) < opts.windows_per_text):
        size = min(p + c, n - first)
        prompt = size - c if size < p + c else p
        if prompt < opts.min_prompt_tokens:
            break
        last = first + size - 1
        start = offsets[first - 1][1] if first else 0
        out.append((start, offsets[first + prompt - 1][1], offsets[last][1]))
        first = last + 1
    return out


def source_files(source: Path) -> list[Path]:
    """The files a local text source names: itself, or a folder's .jsonl and .txt files (sorted, not
    recursive) but its held-out splits and symbolic links (which may lead out of the folder)."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"no such text file or folder: {source}")
    files = sorted(p for p in source.iterdir() if p.suffix in (".jsonl", ".txt") and p.is_file()
                   and not p.is_symlink() and p.stem.lower() not in HELD_OUT_STEMS)
    if not files:
        raise FileNotFoundError(f"{source} holds no .jsonl or .txt files (held-out splits "
                                f"{', '.join(HELD_OUT_STEMS)} are left out)")
    return files


def _jsonl_texts(path: Path, fields: tuple[str, ...]):
    for where, row in iter_json_objects(path):
        name = next((f for f in fields if f in row), None)
        if name is None or not isinstance(row[name], str):
            raise ValueError(f"{where}: no string field {' or '.join(map(repr, fields))}")
        yield where, row[name]


def _hub_texts(repo_id: str, fields: tuple[str, ...], limit: int):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{repo_id} reads as a Hugging Face dataset id, which needs the datasets "
                         f"library: pip install 'k-token-merging[datasets]' (or give a local file or folder)") from None
    # never run a dataset's loading script (datasets >= 4 dropped them, and the flag with them)
    no_scripts = {} if int(getattr(datasets, "__version__", "4").split(".")[0]) >= 4 else {"trust_remote_code": False}
    rows = datasets.load_dataset(repo_id, split="train", streaming=True, **no_scripts)
    for n, row in enumerate(itertools.islice(rows, limit)):
        name = next((f for f in fields if isinstance(row.get(f), str)), None)
        if name is None:
            raise ValueError(f"{repo_id} row {n}: no string field {' or '.join(map(repr, fields))}")
        yield f"{repo_id}:{n}", row[name]


def txt_pieces(path: Path, enough=None, piece: int = PIECE_CHARS):
    """``(where, text)`` pieces of a ``.txt`` file, read lazily and decoded as UTF-8 (a
    ``ValueError`` names the file and byte otherwise). ``enough(text)`` says whether a prefix
    holds all that is used: then that prefix (read in doubling chunks) is the one text, named
    ``path``. Without it the file comes in pieces of about ``piece`` characters, cut after a
    line break where there is one, named ``path:LINE`` from the second on."""
    decoder, offset, line, text = codecs.getincrementaldecoder("utf-8")(), 0, 1, ""
    size = 4096 if enough else piece
    with open(path, "rb") as f:
        while True:
            raw = f.read(size)
            try:
                text += decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text (byte {offset + max(e.start - len(decoder.getstate()[0]), 0)}: "
                                 f"{e.object[e.start:e.start + 1]!r})") from e
            offset += len(raw)
            if enough:
                if not raw or enough(text):
                    yield str(path), text
                    return
                size *= 2
                continue
            while len(text) >= piece or (not raw and text):
                cut = len(text) if len(text) < piece else text.rfind("\n", piece // 2, piece) + 1 or piece
                if text[:cut].strip():
                    yield (str(path) if line == 1 else f"{path}:{line}"), text[:cut]
                line += text.count("\n", 0, cut)
                text = text[cut:]
            if not raw:
                return


def read_texts(source: str | Path, opts: TextOptions, enough=None):
    """``(where, text)`` for every text of one source (see the module docstring); ``enough``:
    as in :func:`txt_pieces`, for ``.txt`` files."""
    if is_hub_id(source):
        yield from _hub_texts(str(source), opts.text_field, opts.max_texts or HUB_TEXTS)
        return
    for path in source_files(Path(source)):
        texts = _jsonl_texts(path, opts.text_field) if path.suffix == ".jsonl" else txt_pieces(path, enough)
        yield from itertools.islice(texts, opts.max_texts or None)


class TextTask(LoadedTask):
    """Texts cut into prompt and continuation windows; scored by perplexity.

    Args:
        sources: see the module docstring.
        tokenizer: the base model's tokenizer (a fast one: the cuts use character offsets).
        options: a :class:`TextOptions` (its ``text`` field is ignored here); keyword
            arguments override its fields.
    """

    name = "text"
    metric = "perplexity"
    answer_end = False
    Options = TextOptions

    def __init__(self, sources, tokenizer, options: TextOptions | None = None, **overrides):
        import dataclasses

        self.sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
        if not self.sources:
            raise ValueError("no text sources given")
        self.options = dataclasses.replace(options or TextOptions(), **overrides)
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("TextTask cuts texts at token offsets: it needs a fast (Rust) tokenizer")
        self.tokenizer = tokenizer
        self._splits: dict[str, list[Example]] | None = None

    @property
    def label(self) -> str:
        return "text " + " ".join("/".join(Path(str(s)).parts[-2:]) for s in self.sources)

    def windows(self, where: str, text: str) -> list[Example]:
        """One text's examples: its windows (:func:`cut_windows`)."""
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return [Example(text[a:b], text[b:c], {"text": where, "window": w}, source=f"{where}#{w}")
                for w, (a, b, c) in enumerate(cut_windows(offsets, self.options))
                if text[a:b].strip() and text[b:c]]

    def enough(self, text: str) -> bool:
        """Whether a prefix ``text`` of a longer text holds all the windows taken from it: more
        tokens than ``windows_per_text`` full windows (the last may be cut mid-token)."""
        opts = self.options
        need = opts.windows_per_text * (opts.prompt_tokens + opts.continuation_tokens) + 1
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) > need

    def _load(self) -> dict[str, list[Example]]:
        enough = self.enough if self.options.windows_per_text else None
        examples = [e for source in self.sources for where, text in read_texts(source, self.options, enough)
                    for e in self.windows(where, text)]
        if len(examples) < 2:
            raise ValueError(f"{', '.join(map(str, self.sources))}: {len(examples)} windows of "
                             f"{self.options.min_prompt_tokens}+ prompt tokens and "
                             f"{self.options.continuation_tokens} continuation tokens; need at least 2")
        frac = self.options.test_fraction
        splits = split_by_key(examples, lambda e: e.meta["text"], frac)
        if not splits["train"] or not splits["test"]:  # too few texts: split their windows
            splits = split_by_key(examples, lambda e: e.source, frac)
        if not splits["test"]:
            splits = {"train": examples[1:], "test": examples[:1]}
        if not splits["train"]:
            splits = {"train": examples[:-1], "test": examples[-1:]}
        return splits
