"""The commits task: prompt, perplexity metric, the explicit policy for long commits."""

import json
from pathlib import Path

import pytest

from ktm.tasks import TASKS, CommitsTask
from ktm.tasks.commits import commit_prompt

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "commits"


def _commit(i, old_len=10, new_len=10, repo=None):
    return {"commit": f"c{i}", "old_contents": "o" * old_len, "new_contents": "n" * new_len,
            "subject": f"fix {i} ", "repos": repo or f"org/r{i % 7}"}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_answer_and_metric(tmp_path):
    _write(tmp_path / "train.jsonl", [_commit(0)])
    _write(tmp_path / "dev.jsonl", [_commit(1)])
    task = CommitsTask(tmp_path)
    (e,) = task.examples("train")
    assert e.prompt == commit_prompt("o" * 10, "fix 0") and e.answer == "n" * 10
    assert e.prompt.endswith("Instructions: fix 0\nNew Content:") and task.metric == "perplexity"
    assert e.meta["repos"] == "org/r0" and "old_contents" not in e.meta


def test_long_commits_follow_the_policy_and_are_counted(tmp_path):
    rows = [_commit(0, 30, 10), _commit(1, 5, 5), _commit(2, 5, 40)]
    _write(tmp_path / "train.jsonl", rows)
    _write(tmp_path / "test.jsonl", [_commit(3)])
    skip = CommitsTask(tmp_path, max_chars=20, policy="skip")
    assert len(skip.examples("train")) == 1 and skip.report["train"] == {"kept": 1, "truncated": 0, "skipped": 2}
    cut = CommitsTask(tmp_path, max_chars=20, policy="truncate")
    got = cut.examples("train")
    assert cut.report["train"] == {"kept": 1, "truncated": 1, "skipped": 1}  # a too-long new file is skipped
    assert "Old Content: " + "o" * 10 + "\n" in got[0].prompt  # 30 old characters cut to 20 - 10
    with pytest.raises(ValueError, match="no test commit fits the budget"):
        CommitsTask(tmp_path, max_chars=5).examples("test")


def test_one_file_is_split_by_repository(tmp_path):
    task = CommitsTask(_write(tmp_path / "all.jsonl", [_commit(i) for i in range(70)]), test_fraction=0.3)
    train, test = task.examples("train"), task.examples("test")
    assert len(train) + len(test) == 70 and test
    assert not {e.meta["repos"] for e in train} & {e.meta["repos"] for e in test}


def test_bad_lines_and_options(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps(_commit(0)) + "\n" + json.dumps({"subject": "s"}) + "\n")
    with pytest.raises(ValueError, match=r"x.jsonl:2: expected string fields .* \['old_contents', 'new_contents'\]"):
        CommitsTask(tmp_path / "x.jsonl").examples("train")
    with pytest.raises(ValueError, match="policy"):
        CommitsTask(tmp_path / "x.jsonl", policy="drop")
    from ktm.cli import _tasks, build_parser

    assert TASKS["commits"] is CommitsTask
    args = build_parser().parse_args(["train", "--out", "o", "--task", "commits", "--commits", str(tmp_path / "x.jsonl"),
                                      "--commit-chars", "100", "--long-commits", "truncate"])
    (task,) = _tasks(args)
    assert (task.max_chars, task.policy) == (100, "truncate")
    with pytest.raises(ValueError, match="needs --commits"):
        _tasks(build_parser().parse_args(["train", "--out", "o", "--task", "commits"]))


@pytest.mark.skipif(not SHARED.is_dir(), reason="the project's shared commit data is not beside this checkout")
def test_the_shared_commits_load():
    task = CommitsTask(SHARED)
    assert (len(task.examples("train")), len(task.examples("test"))) == (1724, 200)
