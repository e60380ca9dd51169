"""The commits task: prompt, perplexity metric, the explicit policy for long commits."""

import json
from pathlib import Path

import pytest

from ktm.tasks import TASKS, CommitsTask
from ktm.tasks.commits import commit_prompt

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "commits"


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
    from ktm.cli import build_parser
    from ktm.cli.options import tasks_from

    assert TASKS["commits"] is CommitsTask
    args = build_parser().parse_args(["train", "--out", "o", "--task", "commits", "--commits", str(tmp_path / "x.jsonl"),
                                      "--commit-chars", "100", "--long-commits", "truncate"])
    (task,) = tasks_from(args)
    assert (task.max_chars, task.policy) == (100, "truncate")
    with pytest.raises(ValueError, match="needs --commits"):
        tasks_from(build_parser().parse_args(["train", "--out", "o", "--task", "commits"]))


@pytest.mark.skipif(not SHARED.is_dir(), reason="the project's shared commit data is not beside this checkout")
def test_the_shared_commits_load():
    task = CommitsTask(SHARED)
    assert (len(task.examples("train")), len(task.examples("test"))) == (1724, 200)


def test_generation_scores_by_hand():
    from ktm.train.evaluate import generation_scores

    # chrF by hand: character n-grams of orders 1..6 match 5/6, 4/5, 3/4, 2/3, 1/2 and 0 (precision =
    # recall at each order, so F = precision); chrF = 100 x their mean
    one = generation_scores(["abcdeg"], ["abcdef"])
    assert one == {"exact_match": 0.0, "chrf": pytest.approx(100 * (5 / 6 + 4 / 5 + 3 / 4 + 2 / 3 + 1 / 2) / 6),
                   "generated": 1}
    # corpus chrF sums the n-gram counts of all pairs (not a mean of sentence scores): "xy" adds one matching
    # 1-gram and 2-gram, so order 1 matches 7/8 and order 2 5/6
    two = generation_scores(["abcdeg", "xy\n"], ["abcdef", "xy  "])
    assert two["exact_match"] == 0.5  # trailing whitespace is stripped
    assert two["chrf"] == pytest.approx(100 * (7 / 8 + 5 / 6 + 3 / 4 + 2 / 3 + 1 / 2) / 6)
    same = ["def f():\n    return 1\n", "x = 1"]
    assert generation_scores(same, same) == {"exact_match": 1.0, "chrf": 100.0, "generated": 2}
    assert generation_scores(["abc"], ["xyz"])["chrf"] == 0.0
    with pytest.raises(ValueError, match="equally many"):
        generation_scores(["a"], [])


def _small_commits(tmp_path):
    rows = [{"old_contents": f"x = {i}\n", "new_contents": f"x = {i + 1}\n", "subject": f"add one to {i}",
             "repos": "o/r"} for i in range(6)]
    _write(tmp_path / "train.jsonl", rows[:1])
    _write(tmp_path / "test.jsonl", rows)
    return CommitsTask(tmp_path)


def test_evaluate_generates_a_fixed_subset_and_scores_it(tmp_path, make_model, monkeypatch):
    import ktm.train.evaluate
    from ktm.train.evaluate import GENERATE_MARGIN, evaluate, generation_scores, subsample

    task, model = _small_commits(tmp_path), make_model(k=4)
    plain = evaluate(model, task, progress=False)
    assert "exact_match" not in plain and "generated" not in plain
    res = evaluate(model, task, generate_examples=4, batch_size=8, progress=False)
    assert res["value"] == pytest.approx(plain["value"]) and res["generated"] == 4
    chosen = subsample(task.examples("test"), 4, 0)  # the same fixed subset, scored by hand
    preds = model.generate([e.prompt for e in chosen], max_new_tokens=len("x = 2\n") + GENERATE_MARGIN)
    expected = generation_scores([e.answer for e in chosen], preds)
    assert (res["exact_match"], res["chrf"]) == pytest.approx((expected["exact_match"], expected["chrf"]))

    answers = {e.prompt: e.answer for e in task.examples("test")}
    calls = []

    def generate(prompts, max_new_tokens):  # right (with trailing spaces) for "add one to" 0, 2, 4
        calls.append(max_new_tokens)
        return [answers[p] + "  " if int(p.split("add one to ")[1][0]) % 2 == 0 else "x = 0" for p in prompts]

    monkeypatch.setattr(model, "generate", generate)
    monkeypatch.setattr(ktm.train.evaluate, "GENERATE_CAP", 3)
    res = evaluate(model, task, generate_examples=10, batch_size=4, progress=False)
    assert res["generated"] == 6 and res["exact_match"] == 0.5 and calls == [3, 3]  # capped, 2 batches
    with pytest.raises(ValueError, match="generate_examples must be >= 0"):
        evaluate(model, task, generate_examples=-1, progress=False)


def test_ktm_eval_option_and_result_lines():
    from ktm.cli import build_parser
    from ktm.cli.evaluate import format_result

    args = build_parser().parse_args(["eval", "--checkpoint", "c", "--task", "commits", "--generate-examples", "50"])
    assert args.generate_examples == 50
    res = {"metric": "perplexity", "value": 3.5, "answer_tokens": 900, "prompt_tokens": 40.0, "merged_length": 10.0,
           "k": 4, "exact_match": 0.25, "chrf": 61.234, "generated": 8}
    text = format_result(res)
    assert "exact match     0.2500  (8 generated, greedy)" in text and "chrF            61.23" in text
    assert "exact match" not in format_result({k: v for k, v in res.items() if k not in ("exact_match", "chrf",
                                                                                           "generated")})
