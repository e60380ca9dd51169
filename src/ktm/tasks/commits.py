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
by repository (``repos``) so that no repository is in both splits.

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

from .base import Example, FileTask, iter_json_objects

FIELDS = ("old_contents", "new_contents", "subject")
POLICIES = ("skip", "truncate")


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


def read_commits(path: Path, max_chars: int = 0, policy: str = "skip") -> tuple[list[Example], dict]:
    """The commits of a JSONL file as examples, and ``{"kept", "truncated", "skipped"}``
    counts. Bad lines raise ``ValueError`` naming ``file:line``."""
    out, counts = [], {"kept": 0, "truncated": 0, "skipped": 0}
    for where, row in iter_json_objects(path):
        bad = [f for f in FIELDS if not isinstance(row.get(f), str)]
        if bad:
            raise ValueError(f"{where}: expected string fields {list(FIELDS)}; missing or not a string: {bad}")
        old, what = fit_commit(row["old_contents"], row["new_contents"], max_chars, policy)
        counts[what] += 1
        if old is None:
            continue
        meta = {k: v for k, v in row.items() if k not in ("old_contents", "new_contents")}
        out.append(Example(commit_prompt(old, row["subject"].strip()), row["new_contents"], meta, source=where))
    return out, counts


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
