"""Faults found by the third review (issue 28), each produced on the real code path: the
evaluator's budget, base-model identity, kills inside saves, resumed settings, locks."""

import json
from pathlib import Path

import pytest

from conftest import save_tiny_base
from ktm.config import ModelConfig, TrainConfig
from ktm.tasks import JsonlTask
from ktm.train.phases import train_run


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny model folder that reads 128 positions: long prompts are easy to make."""
    return save_tiny_base(tmp_path_factory.mktemp("base"), max_positions=128)


def _task(folder, test_lines=None):
    folder.mkdir(parents=True, exist_ok=True)
    good = [json.dumps({"prompt": f"seq {'ab' * (i % 3 + 1)}", "answer": "b"}) for i in range(12)]
    (folder / "train.jsonl").write_text("\n".join(good) + "\n")
    (folder / "test.jsonl").write_text("\n".join(test_lines or good) + "\n")
    return JsonlTask(folder)


def _run(task, out, base_dir, resume=False, log=None, **train):
    cfg = TrainConfig(**{**dict(steps=2, batch_size=2, eval_examples=4, eval_every=0), **train})
    return train_run(ModelConfig(k=2, lora_r=2), cfg, task, out, base=base_dir, device="cpu", resume=resume,
                     log=log or (lambda line: None))


def test_a_test_prompt_without_room_for_the_evaluators_tokens_stops_the_run_before_training(tmp_path, base_dir):
    # 250 characters merge to 125 embeddings: room for the 1-token answer (126 <= 128), not
    # for the 8 tokens the evaluator generates (133 > 128)
    lines = [json.dumps({"prompt": f"seq {i}", "answer": "b"}) for i in range(6)]
    lines.insert(2, json.dumps({"prompt": "x" * 250, "answer": "b"}))
    with pytest.raises(ValueError, match=r"test.jsonl:3: the prompt's 250 tokens merge to 125 embeddings, "
                                         r"\+ 8 tokens the evaluator generates = 133 > 128"):
        _run(_task(tmp_path / "data", test_lines=lines), tmp_path / "run", base_dir)
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_an_export_or_a_changed_copy_of_the_base_is_refused_and_export_keeps_the_base(tmp_path, base_dir):
    import shutil

    from ktm import KTokenMerging
    from ktm.checkpoint import CheckpointError
    from ktm.serve.export import ExportError, export_model

    _run(_task(tmp_path / "data"), tmp_path / "run", base_dir, lr=1e-2)
    ckpt = tmp_path / "run" / "model"
    export_model(ckpt, tmp_path / "exp")
    with pytest.raises(ValueError, match=r"exp is a ktm export \(ktm_serving.json\): .* \(the LoRA would apply twice\)"):
        KTokenMerging.from_pretrained(ckpt, base=tmp_path / "exp", device="cpu")
    # the same merged weights without the marker: the embedding table is the base's, the rest is not
    shutil.copytree(tmp_path / "exp", tmp_path / "plain", ignore=shutil.ignore_patterns("ktm_*"))
    with pytest.raises(CheckpointError, match=r"has other weights \(weights fingerprint .*\) though the same "
                                              r"embedding table"):
        KTokenMerging.from_pretrained(ckpt, base=tmp_path / "plain", device="cpu")
    copy = shutil.copytree(base_dir, tmp_path / "base-copy")  # the same weights elsewhere load
    KTokenMerging.from_pretrained(ckpt, base=copy, device="cpu")
    with pytest.raises(ExportError, match=r"is the base model .* that .* was trained on: exporting there would "
                                          r"replace it"):
        export_model(ckpt, base_dir, overwrite=True)
    assert not (Path(base_dir) / "ktm_serving.json").exists()


#: train 2 steps with a checkpoint at each, SIGKILLed inside the second checkpoint's model write
KILLED_IN_SAVE = """
import os, signal, sys
sys.path.insert(0, sys.argv[3])
import ktm.model.io as io
from ktm.config import ModelConfig, TrainConfig
from ktm.tasks import JsonlTask
from ktm.train.phases import train_run

real, calls = io.save_file, []
def save_then_die(*args, **kw):
    calls.append(1)
    if len(calls) == 2:  # the encoder file of the step-2 checkpoint: the process dies right here
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kw)
io.save_file = save_then_die
train_run(ModelConfig(k=2, lora_r=2), TrainConfig(steps=2, batch_size=2, eval_examples=4, eval_every=0, save_every=1),
          JsonlTask(sys.argv[2]), sys.argv[1], base=sys.argv[4], device="cpu", log=lambda line: None)
"""


def test_a_checkpoint_save_killed_leaves_nothing_after_resume(tmp_path, base_dir):
    import signal
    import subprocess
    import sys

    task, out = _task(tmp_path / "data"), tmp_path / "run"
    src = str(Path(__file__).resolve().parents[1] / "src")
    proc = subprocess.run([sys.executable, "-c", KILLED_IN_SAVE, str(out), str(tmp_path / "data"), src, str(base_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in out.iterdir() if p.name.startswith(".checkpoint.")]  # the killed write's folder
    run = _run(task, out, base_dir, resume=True, save_every=1)
    assert run.trainer.step == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "history.json", "model", "run_config.json"]


def test_resume_applies_a_changed_weight_decay_to_the_optimiser(tmp_path, base_dir):
    task, out = _task(tmp_path / "data"), tmp_path / "run"
    _run(task, out, base_dir, weight_decay=0.0)
    lines = []
    run = _run(task, out, base_dir, resume=True, log=lines.append, steps=3, weight_decay=0.5)
    assert any("weight_decay 0.0 -> 0.5" in line for line in lines)
    assert [g["weight_decay"] for g in run.trainer.optimizer.param_groups] == [0.5, 0.5]
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert [g["weight_decay"] for g in state["param_groups"]] == [0.5, 0.5]
    assert state["extra"]["resumed"][-1]["changed"]["weight_decay"] == [0.0, 0.5]
