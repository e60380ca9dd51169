"""Experiment hygiene of ``ktm train``: ``--config`` files, ``run_config.json`` that reruns a
run, ``--report-to tensorboard``, ``curves.png`` and the random states a resume restores."""

import json

import pytest
import torch

from ktm.cli.config_file import expand_config
from ktm.cli.main import build_parser, main, user_error
from ktm.train import reporting
from ktm.train.state import restore_rng, rng_states


def run_args(tmp_path, base_dir) -> list[str]:
    data = tmp_path / "data"
    if not data.exists():
        main(["data", "tree", "--num-trees", "40", "--out", str(data)])
    return ["--task", "jsonl", "--data", str(data), "--model", base_dir, "--device", "cpu", "--dtype", "float32",
            "--k", "2", "--steps", "2", "--batch-size", "4", "--eval-examples", "4", "--eval-every", "1"]


def test_a_run_config_reruns_the_run_and_tensorboard_gets_its_numbers(tmp_path, base_dir, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first, again = tmp_path / "a", tmp_path / "b"
    assert main(["train", *run_args(tmp_path, base_dir), "--lora-r", "4", "--report-to", "tensorboard",
                 "--out", str(first)]) == 0
    # TensorBoard: each step's loss and each evaluation, at the global step
    events = [p for p in (first / "logs").rglob("events.out.tfevents.*")]
    acc = EventAccumulator(str(events[0].parent)).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/task_loss", "train/lr", "eval/value"} <= tags
    assert [e.step for e in acc.Scalars("eval/value")] == [1, 2]
    assert (first / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "curves.png" in capsys.readouterr().out
    # the same run again from its run_config.json, into another folder, without the tracker
    assert main(["train", "--config", str(first / "run_config.json"), "--out", str(again),
                 "--report-to", "none"]) == 0
    a, b = (json.loads((d / "run_config.json").read_text()) for d in (first, again))
    assert a["model"] == b["model"] and a["train"] == b["train"] and b["model"]["lora_r"] == 4
    values = [[(r["step"], r["value"], r["train_loss"]) for r in json.loads((d / "history.json").read_text())["history"]]
              for d in (first, again)]
    assert values[0] == values[1]
    assert not (again / "logs").exists()


def test_a_yaml_config_with_sections_and_the_command_line_winning(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "task: tree\nstage: [small, xsmall]\nmodel: {k: 4, lora-r: 8, encoder_norm: true}\n"
        "train: {steps: 30, lr: 3.0e-4, balance: true}\nout: runs/x\n")
    parser = build_parser()
    argv = expand_config(parser, ["train", "--config", str(tmp_path / "run.yaml"), "--steps", "5"])
    args = parser.parse_args(argv)
    assert (args.task, args.stage, args.k, args.lora_r, args.lr, args.out) == ("tree", ["small", "xsmall"], 4, 8,
                                                                                3e-4, "runs/x")
    assert args.encoder_norm is True and args.balance is True and args.steps == 5  # the flag wins
    (tmp_path / "run.json").write_text(json.dumps({"steps": 3, "out": "o", "methods": ["plain", "merge"]}))
    args = parser.parse_args(expand_config(parser, ["pareto", f"--config={tmp_path / 'run.json'}"]))
    assert args.methods == ["plain", "merge"] and args.steps == 3


def test_a_bad_config_file_ends_in_one_line(tmp_path, capsys):
    (tmp_path / "bad.json").write_text(json.dumps({"stepz": 3}))
    (tmp_path / "broken.yaml").write_text("steps: [3\n")
    for name, words in (("bad.json", "unknown options ['stepz']"), ("broken.yaml", "is not valid yaml"),
                        ("absent.json", "no such file")):
        assert main(["train", "--config", str(tmp_path / name), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err


def test_a_missing_tracker_says_what_to_install(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(ModuleNotFoundError) as e:
        reporting.tracker_options("wandb", tmp_path)
    assert user_error(e.value) == "--report-to wandb needs the wandb package: pip install 'k-token-merging[wandb]'"
    with pytest.raises(ValueError, match="report_to must be one of"):
        reporting.tracker_options("mlflow", tmp_path)


def test_resume_restores_the_cuda_random_state_where_there_is_one(monkeypatch):
    from types import SimpleNamespace

    saved, restored = torch.tensor([1, 2, 3], dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [saved])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(states))
    states = rng_states(SimpleNamespace(num_processes=1))
    assert set(states) == {"rng.cpu", "rng.cpu.0", "rng.cuda.0.0"} and torch.equal(states["rng.cuda.0.0"], saved)
    cpu = torch.get_rng_state()
    torch.rand(3)
    restore_rng(states, 0)
    assert torch.equal(torch.get_rng_state(), cpu) and len(restored) == 1 and torch.equal(restored[0][0], saved)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    restore_rng(states, 0)  # a checkpoint from a GPU resumed on a CPU: the CPU state alone
    assert len(restored) == 1


def test_curves_png_from_a_curriculum_history(tmp_path):
    history = [{"step": s, "task": t, "metric": "accuracy", "value": v, "train_loss": 1 / s, "majority_rate": 0.5}
               for s, t, v in ((1, "small", 0.4), (2, "small", 0.6), (3, "medium", 0.5))]
    assert reporting.plot_curves(history, tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert reporting.plot_curves([], tmp_path / "none.png") is None


class Recorded(Exception):
    pass


@pytest.mark.parametrize("metric", ["accuracy", "perplexity"])
def test_evaluation_split_across_processes_equals_one_process(tmp_path, make_model, metric):
    """Two processes played in turn: the second's share is recorded, then the first gathers
    both, as accelerate's gather_object would; the result is the one-process result."""
    from ktm.tasks.jsonl import JsonlTask
    from ktm.train.evaluate import evaluate

    rows = [{"prompt": f"item {i}: " + "ab" * (i % 7 + 1), "answer": "yes" if i % 3 else "no"} for i in range(11)]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task, model = JsonlTask(tmp_path, metric=metric), make_model(k=2)
    whole = evaluate(model, task, batch_size=4, progress=False)
    second = []

    def record(part):  # the second process's share; it would wait here for the first
        second.extend(part)
        raise Recorded

    with pytest.raises(Recorded):
        evaluate(model, task, batch_size=4, progress=False, shard=(1, 2), gather=record)
    scored = []
    sharded = evaluate(model, task, batch_size=4, progress=False, shard=(0, 2),
                       gather=lambda part: scored.append(len(part)) or part + second)
    assert sharded == pytest.approx(whole) if metric == "perplexity" else sharded == whole
    assert scored == ([6] if metric == "accuracy" else [1])  # its own share: 6 of 11 answers, or one sum


def test_the_users_accelerate_mixed_precision_is_respected(monkeypatch, make_model):
    """``--mixed-precision auto`` takes what ``accelerate launch`` / ``accelerate config`` chose
    (ACCELERATE_MIXED_PRECISION); an explicit setting wins over it; with neither, a CPU run has no autocast."""
    from ktm.train.trainer import mixed_precision

    model = make_model(k=2)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert mixed_precision("auto", model) == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert mixed_precision("auto", model) == "bf16"
    assert mixed_precision("no", model) == "no" and mixed_precision("fp16", model) == "fp16"
