"""CLI smoke tests on a tiny model folder (offline)."""

import json

import pytest

from ktm.cli import build_parser, main




def _tree_run_args(tmp_path, base_dir, *extra) -> list[str]:
    """Training options for a 2-step run on 40 small trees written to ``tmp_path/data``."""
    data = tmp_path / "data"
    if not data.exists():
        main(["data", "tree", "--num-trees", "40", "--out", str(data)])
    return ["--task", "jsonl", "--data", str(data), "--model", base_dir, "--device", "cpu",
            "--dtype", "float32", "--steps", "2", "--batch-size", "4", "--eval-examples", "4", *extra]


@pytest.mark.parametrize("cmd", [[], ["data", "tree"], ["train"], ["eval"], ["generate"], ["demo"],
                                 ["bench", "speed"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: ktm" in capsys.readouterr().out


def test_train_flags_mirror_the_config_fields():
    h = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in ["--k", "--lora-r", "--encoder-init", "--lr", "--encoder-lr", "--grad-accum",
                 "--eval-every", "--save-every", "--balance", "--recipe", "--resume"]:
        assert flag in h


def test_data_tree_writes_jsonl(tmp_path, capsys):
    assert main(["data", "tree", "--stage", "small", "--num-trees", "100", "--seed", "1",
                 "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert {"prompt", "answer", "tree_id"} <= rows[0].keys()
    assert not {r["tree_id"] for r in rows} & {r["tree_id"] for r in test}
    assert "wrote" in capsys.readouterr().out


def test_train_eval_generate_resume(tmp_path, base_dir, capsys):
    data = tmp_path / "data"
    main(["data", "tree", "--num-trees", "60", "--out", str(data)])
    run = tmp_path / "run"
    common = ["--task", "jsonl", "--data", str(data), "--model", base_dir, "--device", "cpu",
              "--dtype", "float32"]
    assert main(["train", *common, "--k", "4", "--steps", "3", "--batch-size", "4",
                 "--eval-examples", "8", "--out", str(run)]) == 0
    hist = json.loads((run / "history.json").read_text())["history"]
    assert hist[-1]["step"] == 3 and hist[-1]["k"] == 4
    capsys.readouterr()
    assert main(["train", *common, "--k", "4", "--steps", "5", "--out", str(run)]) == 2
    assert "already holds a checkpoint: pass --resume" in capsys.readouterr().err
    assert main(["train", *common, "--k", "4", "--steps", "5", "--batch-size", "4",
                 "--eval-examples", "8", "--out", str(run), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 3" in out
    assert json.loads((run / "history.json").read_text())["history"][-1]["step"] == 5

    res = tmp_path / "res.json"
    assert main(["eval", "--checkpoint", str(run / "model"), *common, "--max-examples", "5",
                 "--json", str(res)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "majority class" in out and "merged embeddings (K = 4" in out
    r = json.loads(res.read_text())["results"][0]
    assert r["n"] == 5 and 0 <= r["value"] <= 1 and r["merged_length"] < r["prompt_tokens"]

    assert main(["generate", "--checkpoint", str(run / "model"), "--max-new-tokens", "3", "--json",
                 "abc", "defgh"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["merged_length"] for x in lines] == [1, 2]


def test_perplexity_task_from_jsonl(tmp_path, base_dir, capsys):
    (tmp_path / "d").mkdir()
    rows = [{"prompt": f"copy {w}", "answer": w} for w in ["alpha", "beta", "gamma", "delta"]]
    for split in ("train", "test"):
        (tmp_path / "d" / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    common = ["--task", "jsonl", "--data", str(tmp_path / "d"), "--metric", "perplexity",
              "--model", base_dir, "--device", "cpu"]
    assert main(["train", *common, "--k", "2", "--steps", "2", "--batch-size", "2",
                 "--out", str(tmp_path / "run")]) == 0
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "model"), *common]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_errors_are_reported_not_raised(tmp_path, base_dir, capsys):
    assert main(["data", "tree", "--stage", "huge", "--out", str(tmp_path)]) == 2
    assert "stage" in capsys.readouterr().err
    assert main(["train", "--task", "jsonl", "--out", str(tmp_path / "r"), "--model", base_dir]) == 2
    assert "the jsonl task needs --data FOLDER" in capsys.readouterr().err
    assert main(["train", "--k", "0", "--out", str(tmp_path / "r"), "--model", base_dir]) == 2
    assert "K must be >= 1" in capsys.readouterr().err


def test_train_with_a_teacher_and_an_adapter_from_another_k(tmp_path, base_dir, capsys):
    common = _tree_run_args(tmp_path, base_dir)
    assert main(["train", *common, "--k", "1", "--out", str(tmp_path / "k1")]) == 0
    teacher = str(tmp_path / "k1" / "model")
    assert main(["train", *common, "--k", "2", "--teacher", teacher, "--init-adapter-from", teacher,
                 "--align", "1", "--distill", "0.5", "--reconstruct", "0.5", "--recipe", "dense",
                 "--out", str(tmp_path / "k2")]) == 0
    row = json.loads((tmp_path / "k2" / "history.json").read_text())["history"][-1]
    assert row["k"] == 2 and row["train_align_loss"] > 0 and row["train_distill_loss"] > 0
    cfg = json.loads((tmp_path / "k2" / "run_config.json").read_text())
    assert cfg["train"]["teacher"] == teacher and cfg["model"]["encoder_norm"] is True
    capsys.readouterr()
    assert main(["train", *common, "--k", "2", "--teacher", str(tmp_path / "k2" / "model"), "--align", "1",
                 "--overwrite", "--out", str(tmp_path / "k2b")]) != 0
    assert "a teacher must read plain prompts (K = 1)" in capsys.readouterr().err


def test_train_hierarchical_k4_grown_from_k2(tmp_path, base_dir, capsys):
    common = _tree_run_args(tmp_path, base_dir)
    assert main(["train", *common, "--k", "2", "--out", str(tmp_path / "k2")]) == 0
    assert main(["train", *common, "--k", "4", "--encoder-stages", "2", "2", "--grow-from",
                 str(tmp_path / "k2" / "model"), "--out", str(tmp_path / "k4")]) == 0
    cfg = json.loads((tmp_path / "k4" / "model" / "ktm_config.json").read_text())
    assert cfg["model"]["k"] == 4 and cfg["model"]["encoder_stages"] == [2, 2]
    capsys.readouterr()
    assert main(["train", *common, "--k", "4", "--grow-from", str(tmp_path / "k2" / "model"),
                 "--out", str(tmp_path / "k4b")]) != 0
    assert "must start with them" in capsys.readouterr().err


def test_teacher_auto_trains_a_k1_teacher_first_and_reuses_it(tmp_path, base_dir, capsys):
    common = _tree_run_args(tmp_path, base_dir, "--recipe", "teacher", "--teacher-steps", "3")
    out = tmp_path / "k2"
    assert main(["train", *common, "--k", "2", "--out", str(out)]) == 0
    teacher = out / "teacher" / "model"
    assert json.loads((teacher / "ktm_config.json").read_text())["model"]["k"] == 1
    assert json.loads((out / "teacher" / "history.json").read_text())["history"][-1]["step"] == 3
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["recipe"] == "teacher" and cfg["train"]["teacher"] == str(teacher)
    row = json.loads((out / "history.json").read_text())["history"][-1]
    assert row["train_align_loss"] > 0 and row["train_distill_loss"] > 0
    capsys.readouterr()
    assert main(["train", *common, "--k", "2", "--steps", "3", "--resume", "--out", str(out)]) == 0
    assert "teacher: reusing" in capsys.readouterr().out
    assert main(["train", *common, "--k", "1", "--out", str(tmp_path / "k1")]) != 0
    assert "this run has K = 1" in capsys.readouterr().err


@pytest.mark.parametrize("recipe,k", [("teacher", 2), ("hierarchical", 4)])
def test_demo_with_a_teacher_recipe_trains_the_teacher_first(tmp_path, base_dir, monkeypatch, recipe, k):
    import dataclasses

    from ktm.train import recipes
    from ktm.experiments.demo import run_demo

    quick = dataclasses.replace(recipes.RECIPES[recipe], train={**recipes.RECIPES[recipe].train, "teacher_steps": 2})
    monkeypatch.setitem(recipes.RECIPES, recipe, quick)
    lines = []
    out = tmp_path / "demo"
    summary = run_demo(steps=2, k=k, out=str(out), num_trees=40, recipe=recipe, eval_examples=4,
                       model=base_dir, device="cpu", log=lines.append)
    assert summary["recipe"] == recipe and summary["k"] == k
    assert (out / "teacher" / "model" / "ktm_config.json").is_file()
    if recipe == "hierarchical":
        assert (out / "grow-k2" / "model" / "ktm_config.json").is_file()
        assert json.loads((out / "model" / "ktm_config.json").read_text())["model"]["encoder_stages"] == [2, 2]
    assert "train_align_loss" in summary["history"][-1]
    assert any("teacher: training K = 1" in line for line in lines)
    with pytest.raises(ValueError, match="this run has K = 1"):
        run_demo(steps=2, k=1, out=str(tmp_path / "d1"), num_trees=40, recipe=recipe, eval_examples=4,
                 model=base_dir, device="cpu", log=lines.append)


def test_hierarchical_recipe_grows_k8_from_k4_from_k2(tmp_path, base_dir, capsys):
    out = tmp_path / "k8"
    args = ["train", *_tree_run_args(tmp_path, base_dir, "--recipe", "hierarchical", "--teacher-steps", "2",
                                      "--grow-steps", "3", "--k", "8", "--out", str(out))]
    assert main(args) == 0
    for folder, k, stages, steps in [("teacher", 1, None, 2), ("grow-k2", 2, None, 3), ("grow-k4", 4, [2, 2], 3),
                                     (".", 8, [2, 2, 2], 2)]:
        cfg = json.loads((out / folder / "model" / "ktm_config.json").read_text())["model"]
        assert (cfg["k"], cfg["encoder_stages"]) == (k, stages), folder
        assert json.loads((out / folder / "history.json").read_text())["history"][-1]["step"] == steps, folder
    run = json.loads((out / "run_config.json").read_text())
    assert run["train"]["grow_from"] == str(out / "grow-k4" / "model")
    assert run["model"]["encoder_stages"] == [2, 2, 2]
    capsys.readouterr()
    assert main(args + ["--resume", "--steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "teacher: reusing" in printed and "grow: reusing the K = 4 model" in printed


def test_each_task_declares_its_options():
    """--task choices and the task flags come from ktm.tasks.TASKS and each task's Options."""
    import dataclasses

    from ktm.cli.options import tasks_from
    from ktm.tasks import TASKS, JsonlTask, TreeTask

    p = build_parser()
    train = p._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train._actions}
    assert all(f.name in dests for cls in TASKS.values() for f in dataclasses.fields(cls.Options))
    assert next(a for a in train._actions if a.dest == "task").choices == sorted(TASKS)
    args = p.parse_args(["train", "--out", "x", "--stage", "small", "xsmall", "--num-trees", "30"])
    tasks = tasks_from(args)
    assert [t.label for t in tasks] == ["tree small", "tree xsmall"] and all(isinstance(t, TreeTask) for t in tasks)
    assert tasks[0].num_trees == 30
    with pytest.raises(SystemExit):
        p.parse_args(["train", "--out", "x", "--task", "jsonl", "--metric", "bleu"])
    assert JsonlTask.Options().metric == "accuracy"



# ---------------------------------------------------------------- generate: one output line per input line
@pytest.fixture(scope="module")
def gen_ckpt(base_dir, tmp_path_factory):
    """A K = 2 model of the tiny base, saved as ``ktm generate --checkpoint`` reads it."""
    from ktm import KTokenMerging

    d = tmp_path_factory.mktemp("gen") / "model"
    KTokenMerging.from_base(base_dir, k=2, device="cpu", dtype="float32", seed=0,
                            lora_dropout=0.0).save_pretrained(d)
    return str(d)


class _Stdin:
    """stdin that records, for each line read, how many batches had been answered by then."""

    def __init__(self, lines, calls):
        self.lines, self.calls, self.seen = list(lines), calls, []

    def __iter__(self):
        for line in self.lines:
            self.seen.append(len(self.calls))
            yield line


class _Stdout(__import__("io").StringIO):
    def __init__(self):
        super().__init__()
        self.flushed = []  # the text written at each flush

    def flush(self):
        self.flushed.append(self.getvalue())
        super().flush()


def _fake_generate(calls):
    def generate(self, prompts, max_new_tokens=16, **kw):
        assert all(p.strip() for p in prompts)  # blank prompts never reach the model
        calls.append(list(prompts))
        return [f"a\\{p}\nsecond line\r" for p in prompts]
    return generate


def test_generate_text_mode_stays_line_aligned_and_streams_in_batches(gen_ckpt, monkeypatch):
    import sys

    from ktm import KTokenMerging

    calls = []
    monkeypatch.setattr(KTokenMerging, "generate", _fake_generate(calls))
    lines = ["one\n", "\n", "two\r\n", "   \n", "three\n", "four\n", "five"]  # last line without \n
    stdin, stdout = _Stdin(lines, calls), _Stdout()
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["generate", "--checkpoint", gen_ckpt, "--batch-size", "3"]) == 0
    out = stdout.getvalue().split("\n")[:-1]
    assert out == ["a\\\\one\\nsecond line\\r", "", "a\\\\two\\nsecond line\\r", "", "a\\\\three\\nsecond line\\r",
                   "a\\\\four\\nsecond line\\r", "a\\\\five\\nsecond line\\r"]
    assert calls == [["one", "two"], ["three", "four"], ["five"]]  # batches of 3 lines, blank ones skipped
    # stdin is read as the answers go out: line 4 only after the first batch was answered
    assert stdin.seen == [0, 0, 0, 1, 1, 1, 2]
    assert {3, 6, 7} <= {text.count("\n") for text in stdout.flushed}  # flushed after each batch


def test_generate_json_mode_keeps_blank_lines_aligned(gen_ckpt, monkeypatch, capsys):
    import io
    import sys

    from ktm import KTokenMerging

    monkeypatch.setattr(KTokenMerging, "generate", _fake_generate([]))
    monkeypatch.setattr(sys, "stdin", io.StringIO("abc\n\ndefgh\n"))
    assert main(["generate", "--checkpoint", gen_ckpt, "--json", "--batch-size", "2"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.split("\n")[:-1]]
    assert [(r["prompt"], r["merged_length"]) for r in rows] == [("abc", 2), ("", 0), ("defgh", 3)]
    assert rows[0]["output"] == "a\\abc\nsecond line\r" and rows[1]["output"] == ""


def test_generate_answers_each_stdin_line_as_the_model_does_alone(gen_ckpt, monkeypatch, capsys):
    import io
    import sys

    from ktm import KTokenMerging
    from ktm.cli.generate import escape_line

    prompts = ["Tree: a-b, b-c. Answer: ", "x", "", "hello world\tand tabs", "0123456789" * 5]
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(p + "\n" for p in prompts)))
    assert main(["generate", "--checkpoint", gen_ckpt, "--max-new-tokens", "6", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out.split("\n")[:-1]
    model = KTokenMerging.from_pretrained(gen_ckpt)
    assert out == [escape_line(model.generate([p], 6)[0]) if p else "" for p in prompts]
    assert main(["generate", "--checkpoint", gen_ckpt, "--max-new-tokens", "6", *prompts[:2]]) == 0
    assert capsys.readouterr().out.split("\n")[:-1] == out[:2]  # prompt arguments still work


def test_generate_names_the_input_line_of_a_prompt_too_long(gen_ckpt, monkeypatch, capsys):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO("ab\ncd\nef\n" + "x" * 1100 + "\n"))
    assert main(["generate", "--checkpoint", gen_ckpt, "--max-new-tokens", "2", "--batch-size", "2"]) == 2
    captured = capsys.readouterr()
    assert len(captured.out.split("\n")[:-1]) == 2  # the first batch was answered
    assert "ktm: error: input line 4: the prompt is too long for the model: 1100 tokens" in captured.err
    assert "the answers of the batches before it were written" in captured.err


def test_escape_line_keeps_any_answer_on_one_line():
    from ktm.cli.generate import escape_line

    text = "a\\b\nc\rd\x0be\x85f\u2028g\th"
    assert escape_line(text) == "a\\\\b\\nc\\rd\\x0be\\x85f\\u2028g\th"
    assert len(escape_line(text).splitlines()) == 1
    assert escape_line(text).encode().decode("unicode_escape") == text
