"""Data-parallel training proven on CPU: ``accelerate launch --multi_gpu --num_processes 2``
(gloo) with a tiny model.

Both processes must end with identical weights (bit for bit), and those must equal a
single-process run with the same global batch (2 x 2 examples per step). The single run
takes the 4 examples at once, and once as 2 micro-batches of 2 (``grad_accum=2``): the
trainer weights each micro-batch's loss by its share of the global batch's answer tokens,
so the answers' different lengths do not change the gradient.

Tolerance. The runs do the same float32 arithmetic up to summation order (gradients
all-reduced across processes or accumulated over micro-batches, batches of 2 and 4 rows
padded differently), so gradients agree to ~1e-7 relative. AdamW then divides each gradient
entry by its running magnitude: an entry whose gradient is near zero (below AdamW's eps
1e-8, e.g. behind a ReLU that is barely active) moves by a rounding-dependent fraction of
the learning rate. After 3 steps at lr 1e-2 on a 2-layer, 32-wide Llama nearly every weight
agrees to 1e-6 (measured: 3 entries of ~26k above it, at most 2.1e-5), so the test asks for
at most 0.1% of entries above 1e-6 and none above lr / 100 = 1e-4. A run on other examples
(the sharding this replaced drew a separate batch per process) differs by ~lr.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_tiny_base

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from multiprocess_train import train_and_save  # noqa: E402

TOL_MAX, TOL_ENTRY, TOL_SHARE = 1e-4, 1e-6, 1e-3


def _data(folder: Path) -> str:
    """A tiny jsonl task whose prompts and answers differ in length."""
    import random

    rng = random.Random(0)
    answers = ["yes", "no", "maybe"]
    folder.mkdir()
    for split, n in (("train", 40), ("test", 2)):
        rows = [{"prompt": "Q: " + "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(3, 17))) + " A:",
                 "answer": rng.choice(answers)} for _ in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(base, data, out, batch_size, script="multiprocess_train.py"):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           str(HERE / script), base, data, str(out)] + ([str(batch_size)] if batch_size else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _diff(a: dict, b: dict) -> tuple[float, float]:
    """(largest absolute difference, share of entries differing by more than TOL_ENTRY)."""
    assert a.keys() == b.keys()
    d = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    return d.max().item(), (d > TOL_ENTRY).float().mean().item()


def test_two_processes_equal_one_process_with_the_global_batch(tmp_path):
    base, data = save_tiny_base(tmp_path / "base"), _data(tmp_path / "data")
    _launch(base, data, tmp_path / "two", batch_size=2)
    r0 = load_file(str(tmp_path / "two" / "weights-rank0.safetensors"))
    r1 = load_file(str(tmp_path / "two" / "weights-rank1.safetensors"))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)  # bit for bit
    assert (tmp_path / "two" / "model" / "ktm_config.json").is_file()  # the first process saved it

    one = load_file(train_and_save(base, data, str(tmp_path / "one"), batch_size=4))
    accum = load_file(train_and_save(base, data, str(tmp_path / "accum"), batch_size=4, grad_accum=2))
    for other in (r0, accum):
        largest, share = _diff(other, one)
        assert largest < TOL_MAX and share < TOL_SHARE, (largest, share)
    other_batch = load_file(train_and_save(base, data, str(tmp_path / "other"), batch_size=2))
    assert _diff(other_batch, one)[0] > 1e-3  # training on other examples is far away


def test_two_processes_run_a_phase_chain_overwrite_resume_and_a_grid_in_one_folder(tmp_path):
    # rank 0 alone locks, recovers and cleans (teacher/, checkpoint/, the grid's cells) while
    # rank 1 waits; a lock taken in every rank made the grid fail ("in use by another ktm run")
    base, data = save_tiny_base(tmp_path / "base"), _data(tmp_path / "data")
    out = tmp_path / "two"
    out.mkdir()
    _launch(base, data, out, 0, script="multiprocess_phases.py")
    for rank in (0, 1):
        done = json.loads((out / f"done-rank{rank}.json").read_text())
        assert done == {"steps": [2, 2, 3], "cells": ["plain", "merge-k2"]}
    assert (out / "chain" / "teacher" / "model").is_dir() and not (out / "chain" / ".lock").exists()
    # the checkpoint holds every process's random state, which --resume gives back to each
    saved = load_file(str(out / "chain" / "checkpoint" / "optimizer.safetensors"))
    assert {"rng.cpu", "rng.cpu.0", "rng.cpu.1"} <= saved.keys()


def test_process_shares_make_up_the_one_process_batch():
    from ktm.config import TrainConfig
    from ktm.tasks import Example
    from ktm.train.trainer import batch_indices, process_share

    examples = [Example(f"p{i}", "a") for i in range(50)]
    for balance, labels in ((False, None), (True, ["a"])):
        small, big = TrainConfig(batch_size=3, balance=balance), TrainConfig(batch_size=6, balance=balance)
        for step in range(4):
            whole = batch_indices(examples, step, small, labels, size=6)
            assert whole == batch_indices(examples, step, big, labels)  # = one process, batch 6
            assert process_share(whole, 2, 0) + process_share(whole, 2, 1) == whole
            assert batch_indices(examples, step, small, labels, size=3) == batch_indices(examples, step, small, labels)
