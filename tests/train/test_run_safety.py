"""Nothing finished is lost: bad data is caught before training, folders are locked,
written whole with normal permissions, and recovered after a kill."""

import json
import os
import stat

import pytest

from conftest import save_tiny_base
from ktm.checkpoint import clean_stale, recover_dir, write_dir
from ktm.config import ModelConfig, TrainConfig
from ktm.train.phases import LOCK_NAME, run_lock, train_run
from ktm.tasks import JsonlTask
from ktm.tasks.base import read_jsonl


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny model folder that reads 128 positions: long prompts are easy to make."""
    return save_tiny_base(tmp_path_factory.mktemp("base"), max_positions=128)


def _data(folder, train_lines=None, test_lines=None):
    folder.mkdir(parents=True, exist_ok=True)
    good = [json.dumps({"prompt": f"seq {'ab' * (i % 3 + 1)}", "answer": "b"}) for i in range(12)]
    for split, lines in (("train", train_lines), ("test", test_lines)):
        if lines is not False:
            (folder / f"{split}.jsonl").write_bytes("\n".join(lines or good).encode() + b"\n"
                                                    if not isinstance(lines, bytes) else lines)
    return JsonlTask(folder)


def _run(task, out, base_dir, **train):
    cfg = TrainConfig(**{**dict(steps=2, batch_size=2, eval_examples=4, eval_every=0), **train})
    return train_run(ModelConfig(k=2, lora_r=2), cfg, task, out, base=base_dir, device="cpu",
                     log=lambda line: None)


@pytest.mark.parametrize("content,message", [
    (b'{"prompt": "a", "answer": "b"}\n[1, 2]\n', r"x.jsonl:2: expected a JSON object, got a JSON list"),
    (b'{"prompt": "a", "answer": "b"}\n{"prompt": "\xff\xfe"}\n', r"x.jsonl:2: not UTF-8 text"),
    (b'{"prompt": "a", "answer": "b"\n', r"x.jsonl:1: not valid JSON"),
    (b'\n{"prompt": "a"}\n', r"x.jsonl:2: the object has no 'answer'"),
    (b'{"prompt": 3, "answer": "b"}\n', r"x.jsonl:1: 'prompt' and 'answer' must be strings"),
])
def test_bad_jsonl_lines_name_file_and_line(tmp_path, content, message):
    (tmp_path / "x.jsonl").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_jsonl(tmp_path / "x.jsonl")


@pytest.mark.parametrize("bad,message", [
    (json.dumps({"prompt": "   ", "answer": "b"}), "train.jsonl:5: the prompt is empty"),
    (json.dumps({"prompt": "x" * 400, "answer": "b"}), r"train.jsonl:5: the prompt's 400 tokens merge to 200 .* > 128"),
    (json.dumps({"prompt": "y" * 2_000_000, "answer": "b"}), r"train.jsonl:5: the example has 2,000,001 characters"),
])
def test_a_bad_training_example_stops_the_run_before_its_first_step(tmp_path, base_dir, bad, message):
    lines = [json.dumps({"prompt": f"seq {i}", "answer": "b"}) for i in range(8)]
    lines.insert(4, bad)
    task = _data(tmp_path / "data", train_lines=lines)
    with pytest.raises(ValueError, match=message):
        _run(task, tmp_path / "run", base_dir)
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_a_missing_test_split_stops_the_run_before_its_first_step(tmp_path, base_dir):
    task = _data(tmp_path / "data", test_lines=False)
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        _run(task, tmp_path / "run", base_dir)
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_the_final_checkpoint_is_written_before_the_final_evaluation(tmp_path, base_dir, monkeypatch):
    import ktm.train.trainer as trainer_mod

    def broken(*a, **kw):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(trainer_mod, "evaluate", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        _run(_data(tmp_path / "data"), tmp_path / "run", base_dir)
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2  # the finished training is kept; --resume evaluates and saves the model


def test_a_second_run_on_the_same_folder_is_refused_and_a_stale_lock_taken_over(tmp_path, base_dir):
    import socket
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    # a live process holds the lock (an open-file lock; its file still empty, as just after creation)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=r"in use by another ktm run \(process \?\)"):
            _run(_data(tmp_path / "data"), out, base_dir)
    finally:
        holder.kill()
        holder.wait()
    (out / LOCK_NAME).write_text("999999999 otherhost\n")  # left by a killed run: nobody holds it
    _run(_data(tmp_path / "data"), out, base_dir)
    assert not (out / LOCK_NAME).exists()
    with run_lock(out):
        assert (out / LOCK_NAME).read_text() == f"{os.getpid()} {socket.gethostname()}\n"
        with pytest.raises(ValueError, match=rf"in use by another ktm run \(process {os.getpid()} on "
                                             rf"{socket.gethostname()}\)"):
            with run_lock(out):
                pass


#: hold an open-file lock on argv[1] without writing to it, then wait to be killed
HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
"""


def test_resume_after_a_kill_inside_the_rename_and_stale_folders_cleaned(tmp_path, base_dir):
    out = tmp_path / "run"
    task = _data(tmp_path / "data")
    _run(task, out, base_dir, save_every=1)
    # killed between "checkpoint -> .checkpoint.old" and ".tmp -> checkpoint"
    os.replace(out / "checkpoint", out / ".checkpoint.old")
    (out / ".checkpoint.a1b2c3").mkdir()  # a half-written folder of the killed write
    lines = []
    cfg = TrainConfig(steps=3, batch_size=2, eval_examples=4, eval_every=0)
    run = train_run(ModelConfig(k=2, lora_r=2), cfg, task, out, base=base_dir, device="cpu", resume=True,
                    log=lines.append)
    assert any("resumed from" in line and "at step 2" in line for line in lines)
    assert run.trainer.step == 3
    assert not [p.name for p in out.iterdir() if p.name.startswith(".checkpoint")]


def test_recover_and_clean_helpers(tmp_path):
    (tmp_path / ".ck.old").mkdir()
    assert recover_dir(tmp_path / "ck") and (tmp_path / "ck").is_dir()
    assert not recover_dir(tmp_path / "ck")  # nothing to do when the folder is there
    (tmp_path / ".ck.tmpxyz").mkdir()
    assert [p.name for p in clean_stale(tmp_path, "ck")] == [".ck.tmpxyz"]


def test_saved_folders_get_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        write_dir(tmp_path / "d", lambda tmp: (tmp / "f.json").write_text("{}"))
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "d" / "f.json").stat().st_mode) == 0o644


def test_resume_applies_and_records_a_changed_learning_rate(tmp_path, base_dir):
    out = tmp_path / "run"
    task = _data(tmp_path / "data")
    _run(task, out, base_dir, lr=1e-3)
    lines = []
    cfg = TrainConfig(steps=3, batch_size=2, eval_examples=4, eval_every=0, lr=5e-4)
    run = train_run(ModelConfig(k=2, lora_r=2), cfg, task, out, base=base_dir, device="cpu", resume=True,
                    log=lines.append)
    assert run.trainer.optimizer.param_groups[0]["base_lr"] == 5e-4
    assert any("lr 0.001 -> 0.0005" in line for line in lines)
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["extra"]["resumed"][0]["changed"]["lr"] == [1e-3, 5e-4]
