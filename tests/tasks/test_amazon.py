"""The amazon review task: the paper's prompt and label rule, splits by product, errors."""

import json
from pathlib import Path

import pytest

from ktm.train.evaluate import macro_f1
from ktm.tasks import TASKS, AmazonTask
from ktm.tasks.amazon import review_prompt, sentiment

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "amazon"


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_and_label_rule():
    assert review_prompt("fits well") == "Review: fits well, Label:"
    assert [sentiment(r) for r in (1, 2.0, 3, 3.4, 3.5, 4, 5)] == ["negative"] * 4 + ["positive"] * 3


def test_a_folder_gives_its_splits_and_cuts_texts(tmp_path):
    _write(tmp_path / "train.jsonl", [{"rating": 5.0, "text": " great  ", "title": "t"}, {"rating": 1, "text": "bad"}])
    _write(tmp_path / "dev.jsonl", [{"rating": 4.0, "text": "a long review text"}])
    task = AmazonTask(tmp_path, max_chars=6)
    train, test = task.examples("train"), task.examples("test")
    assert [(e.prompt, e.answer) for e in train] == [("Review: great, Label:", "positive"),
                                                     ("Review: bad, Label:", "negative")]
    assert test[0].prompt == "Review: a long, Label:" and test[0].meta["rating"] == 4.0
    assert train[0].meta == {"rating": 5.0, "title": "t"} and train[1].source.endswith("train.jsonl:2")


def test_one_file_is_split_by_product(tmp_path):
    rows = [{"rating": 1 + i % 5, "text": f"review {i}", "parent_asin": f"P{i % 40}"} for i in range(400)]
    task = AmazonTask(_write(tmp_path / "all.jsonl", rows), test_fraction=0.25)
    train, test = task.examples("train"), task.examples("test")
    assert len(train) + len(test) == 400 and 0 < len(test) < 200
    assert not {e.meta["parent_asin"] for e in train} & {e.meta["parent_asin"] for e in test}


@pytest.mark.parametrize("line,message", [
    ('{"rating": "five", "text": "x"}', "'rating' must be a number"),
    ('{"text": "x"}', "expected a numeric 'rating' and a string 'text'"),
    ('[1, 2]', "expected a JSON object, got a JSON list"),
    ('{"rating": 5', "not valid JSON"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    (tmp_path / "r.jsonl").write_text('{"rating": 5, "text": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=f"r.jsonl:2: .*{message}"):
        AmazonTask(tmp_path / "r.jsonl").examples("train")


def test_the_cli_builds_it_from_its_options(tmp_path):
    from ktm.cli import build_parser
    from ktm.cli.options import tasks_from

    assert TASKS["amazon"] is AmazonTask
    _write(tmp_path / "train.jsonl", [{"rating": 5, "text": "a"}])
    _write(tmp_path / "test.jsonl", [{"rating": 1, "text": "b"}])
    args = build_parser().parse_args(["train", "--out", "x", "--task", "amazon", "--reviews", str(tmp_path),
                                      "--review-chars", "100"])
    (task,) = tasks_from(args)
    assert task.label == f"amazon {tmp_path.name}" and task.max_chars == 100
    with pytest.raises(ValueError, match="needs --reviews"):
        tasks_from(build_parser().parse_args(["train", "--out", "x", "--task", "amazon"]))
    with pytest.raises(FileNotFoundError, match="no such review file or folder"):
        AmazonTask(tmp_path / "missing")


@pytest.mark.skipif(not SHARED.is_dir(), reason="the project's shared review data is not beside this checkout")
def test_the_shared_reviews_follow_the_rule():
    task = AmazonTask(SHARED)
    train, test = task.examples("train"), task.examples("test")
    assert (len(train), len(test)) == (12_000, 1_000)
    assert all(e.answer == e.meta["label"] for e in train + test)  # the files' own label, same rule


def test_macro_f1_sees_a_constant_answer():
    refs = ["positive"] * 90 + ["negative"] * 10
    assert macro_f1(refs, ["positive"] * 100) == pytest.approx((2 * 90 / 190) / 2)
    assert macro_f1(refs, refs) == 1.0
    with pytest.raises(ValueError):
        macro_f1(["a"], [])


def test_ktm_data_amazon_and_commits_write_both_splits(tmp_path, capsys):
    from ktm.cli import main
    from ktm.tasks.base import read_jsonl

    _write(tmp_path / "reviews.jsonl", [{"rating": 1 + i % 5, "text": f"review number {i}", "asin": f"A{i % 9}"}
                                        for i in range(60)])
    assert main(["data", "amazon", "--source", str(tmp_path / "reviews.jsonl"), "--out", str(tmp_path / "a"),
                 "--review-chars", "8"]) == 0
    train, test = read_jsonl(tmp_path / "a" / "train.jsonl"), read_jsonl(tmp_path / "a" / "test.jsonl")
    assert len(train) + len(test) == 60 and all(e.prompt == "Review: review n, Label:" for e in train)
    assert all(e.answer == ("positive" if e.meta["rating"] >= 3.5 else "negative") for e in train + test)
    commits = [{"old_contents": "o" * (5 + 40 * (i % 2)), "new_contents": "n", "subject": "s", "repos": f"r{i}"}
               for i in range(200)]
    _write(tmp_path / "commits.jsonl", commits)
    assert main(["data", "commits", "--source", str(tmp_path / "commits.jsonl"), "--out", str(tmp_path / "c"),
                 "--commit-chars", "20"]) == 0
    assert "'skipped': 100" in capsys.readouterr().out
    assert len(read_jsonl(tmp_path / "c" / "train.jsonl")) + len(read_jsonl(tmp_path / "c" / "test.jsonl")) == 100
