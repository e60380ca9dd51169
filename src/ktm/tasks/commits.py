"""Code edits from real commits (CommitPackFT's schema), the paper's second real benchmark.

The prompt asks to update the old file as the commit message says, and the answer is the
new file; the metric is the per-token perplexity of the new file (end token included)::

    Update the old code as the instructions say.
    Old Content: {old_contents}
    Instructions: {subject}
    New Content:

Commits are read from local JSONL files with the fields ``old_contents``, ``new_contents``
and ``subject`` (others kept as metadata): a folder with ``train.jsonl`` and ``test.jsonl``
(or ``dev.jsonl``), such as this project's ``shared/data/commits``, or one file, split here
by repository (``repos``) so that no repository is in both splits. The paper's Hugging
Face dataset is read from one language's raw file (:func:`hub_commits`) and split as the
release does: 5,600 commits held out, by whole repositories here.

A commit longer than ``max_chars`` (old + new contents) follows an explicit policy:
``skip`` it, or ``truncate`` the old contents to fit (a new file longer than the budget
is skipped either way, since its perplexity is the metric). What was skipped or cut is
counted in :attr:`CommitsTask.report`, never a crash.

Example::

    >>> commit_prompt("x = 1\\n", "Use 2")
    'Update the old code as the instructions say.\\nOld Content: x = 1\\n\\nInstructions: Use 2\\nNew Content:'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .base import Example, FileTask, check_fields, iter_json_objects, split_by_count
from .hub import check_name, hub_file

FIELDS = ("old_contents", "new_contents", "subject")
POLICIES = ("skip", "truncate")
#: the paper's dataset on the Hugging Face Hub, and its release's held-out size
HUB_ID, LANGUAGE, TEST_SIZE = "bigcode/commitpackft", "python", 5_600
#: one line of the dataset's raw files (``data/<language>/data.jsonl``): all strings
RAW_FIELDS = dict.fromkeys(("commit", "old_file", "new_file", "old_contents", "new_contents", "subject",
                            "message", "lang", "license", "repos"), str)


def commit_prompt(old: str, subject: str) -> str:
    """The prompt for one commit (the instruction wording is ktm's; the paper's fields)."""
    return f"Update the old code as the instructions say.\nOld Content: {old}\nInstructions: {subject}\nNew Content:"


def fit_commit(old: str, new: str, max_chars: int, policy: str) -> tuple[str | None, str]:
    """``(old contents to use or None to skip, what happened)`` for a budget of ``max_chars``
    characters of old + new contents (0: no budget).

    >>> fit_commit("abcdef", "xy", 5, "truncate"), fit_commit("abcdef", "xy", 5, "skip")
    (('abc', 'truncated'), (None, 'skipped'))
    >>> fit_commit("ab", "xy", 5, "skip"), fit_commit("ab", "xyzuvw", 5, "truncate")
    (('ab', 'kept'), (None, 'skipped'))
    """
    if policy not in POLICIES:
        raise ValueError(f"the long-commit policy must be one of {POLICIES}, got {policy!r}")
    if not max_chars or len(old) + len(new) <= max_chars:
        return old, "kept"
    if policy == "skip" or len(new) >= max_chars:
        return None, "skipped"
    return old[:max_chars - len(new)], "truncated"


def commit_example(where: str, row: dict, max_chars: int = 0, policy: str = "skip") -> tuple[Example | None, str]:
    """One commit (read at ``where``) as an example, or None when the policy skips it, and
    what happened (``kept``, ``truncated``, ``skipped``; see :func:`fit_commit`)."""
    bad = [f for f in FIELDS if not isinstance(row.get(f), str)]
    if bad:
        raise ValueError(f"{where}: expected string fields {list(FIELDS)}; missing or not a string: {bad}")
    old, what = fit_commit(row["old_contents"], row["new_contents"], max_chars, policy)
    if old is None:
        return None, what
    meta = {k: v for k, v in row.items() if k not in ("old_contents", "new_contents")}
    return Example(commit_prompt(old, row["subject"].strip()), row["new_contents"], meta, source=where), what


def fit_all(rows, max_chars: int = 0, policy: str = "skip") -> tuple[list[Example], dict]:
    """The examples of ``(file:line, row)`` pairs under the long-commit policy, and
    ``{"kept", "truncated", "skipped"}`` counts."""
    out, counts = [], {"kept": 0, "truncated": 0, "skipped": 0}
    for where, row in rows:
        example, what = commit_example(where, row, max_chars, policy)
        counts[what] += 1
        if example is not None:
            out.append(example)
    return out, counts


def read_commits(path: Path, max_chars: int = 0, policy: str = "skip") -> tuple[list[Example], dict]:
    """The commits of a JSONL file as examples, and ``{"kept", "truncated", "skipped"}``
    counts. Bad lines raise ``ValueError`` naming ``file:line``."""
    return fit_all(iter_json_objects(path), max_chars, policy)


def raw_commits(path: Path):
    """``(file:line, row)`` for each line of a raw CommitPackFT file; a line that lacks a
    field of :data:`RAW_FIELDS` or holds another type raises ``ValueError`` naming file,
    line and field."""
    for where, row in iter_json_objects(path):
        check_fields(where, row, RAW_FIELDS)
        yield where, row


def hub_commits(source: str = HUB_ID, language: str = LANGUAGE, *, test_size: int = TEST_SIZE, seed: int = 0,
                max_chars: int = 6000, policy: str = "skip",
                download=None) -> tuple[dict[str, list[Example]], dict, str]:
    """The release's splits of one language of CommitPackFT, the long-commit counts per split,
    and a line saying what was held out.

    The dataset's loader is a script, which ``datasets`` >= 4 no longer runs, so its raw file
    is read instead. Assumed layout (the file the loader script reads for a language):
    ``data/<language>/data.jsonl`` with a lower-case language (``python``), one commit per
    line with the string fields of :data:`RAW_FIELDS`. ``test_size`` commits are held out
    by whole repositories (``repos``, as the local loader splits), all others are for
    training; the long-commit policy then applies to both splits and is counted, so a split
    may hold fewer commits than that. ``download`` is ``hf_hub_download`` or a stand-in.

    Example (downloads the language's file once, then reads the cache)::

        splits, report, note = hub_commits(language="python", max_chars=6000, policy="skip")
    """
    fit_commit("", "", 0, policy)  # rejects an unknown policy before the download
    path = hub_file(source, f"data/{check_name(language, 'the language')}/data.jsonl", download)
    rows = split_by_count(lambda: raw_commits(path), lambda r: r[1]["repos"], test_size, 1.0, seed)
    splits, report = {}, {}
    for split in ("train", "test"):
        splits[split], report[split] = fit_all(rows[split], max_chars, policy)
    repos = len({row["repos"] for _, row in rows["test"]})
    return splits, report, f"{language}: {len(rows['test'])} commits of {repos} repositories held out"


class CommitsTask(FileTask):
    """Commit edits scored by the perplexity of the new file (see the module's docstring).

    Args:
        source: a folder with train.jsonl and test.jsonl (or dev.jsonl), or one .jsonl file.
        max_chars: budget of old + new contents per commit (0: none).
        policy: ``"skip"`` or ``"truncate"`` for commits over the budget.
        test_fraction: share of repositories held out when ``source`` is one file.
    """

    name = "commits"
    metric = "perplexity"
    cue_words = 2  # "New Content:"
    what = "commit"

    @dataclass(frozen=True)
    class Options:
        commits: str | None = field(default=None, metadata={
            "help": "commits task: folder with train.jsonl and test.jsonl (or dev.jsonl), or one .jsonl "
                    "file in CommitPackFT's schema (split here by repository)"})
        commit_chars: int = field(default=6000, metadata={
            "help": "commits task: budget of old + new contents per commit, in characters (0: none)"})
        long_commits: Literal["skip", "truncate"] = field(default="skip", metadata={
            "help": "commits task: what to do with a commit over the budget: skip it, or truncate its old contents"})

    @classmethod
    def from_options(cls, options: "CommitsTask.Options") -> list["CommitsTask"]:
        if not options.commits:
            raise ValueError("the commits task needs --commits (a folder with train.jsonl and test.jsonl "
                             "or dev.jsonl, or one .jsonl file of commits)")
        return [cls(options.commits, max_chars=options.commit_chars, policy=options.long_commits)]

    def __init__(self, source: str | Path, max_chars: int = 6000, policy: str = "skip", test_fraction: float = 0.1):
        super().__init__(source, test_fraction)
        if max_chars < 0 or policy not in POLICIES:
            raise ValueError(f"need max_chars >= 0 and policy in {POLICIES}; got {max_chars}, {policy!r}")
        self.max_chars, self.policy = max_chars, policy
        #: per split ("all" for one file): how many commits were kept, truncated or skipped
        self.report: dict[str, dict] = {}

    def read(self, file: Path, split: str) -> list[Example]:
        examples, self.report[split] = read_commits(file, self.max_chars, self.policy)
        return examples

    def split_key(self, example: Example) -> str:
        return example.meta.get("repos") or example.meta.get("commit") or example.prompt

    def examples(self, split: str) -> list[Example]:
        examples = super().examples(split)
        if not examples:
            raise ValueError(f"{self.label}: no {split} commit fits the budget of {self.max_chars} characters "
                             f"({self.report.get(split) or self.report.get('all')}); raise --commit-chars or "
                             f"use --long-commits truncate")
        return examples
