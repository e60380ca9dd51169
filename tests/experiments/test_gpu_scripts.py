"""benchmarks/gpu: the step planner, the commands it builds, and the model-folder writer."""

import argparse
import json

import pytest
from conftest import load_benchmark, tiny_llama


@pytest.fixture(scope="module")
def runs():
    return load_benchmark("gpu/tree_runs")


def test_plan_fits_the_budget(runs):
    plan = runs.plan_steps(300, plain_s=0.5, teacher_s=0.6, stages=2)
    usable = 300 * (1 - runs.EVAL_OVERHEAD)
    assert plan["fast"] * 2 * 0.5 <= usable < (plan["fast"] + 1) * 2 * 0.5
    # a chain: teacher (plain) + K = 2 and K = 4 (aligned) per stage, with the chain's margin
    assert plan["hierarchical"] * 2 * (0.5 + 2 * 0.6) <= runs.CHAIN_SLACK * usable
    # an aligned step is never cheaper than a plain one
    assert runs.plan_steps(300, 0.5, 0.1, 2) == runs.plan_steps(300, 0.5, 0.5, 2)
    assert runs.eval_every(187) == 45 and runs.eval_every(10) == 5


def test_commands(runs):
    args = argparse.Namespace(stages=["small", "xsmall"], batch_size=64, eval_examples=196, device="cuda",
                              dtype="float32", model="m")
    fast = runs.command(args, "k4-fast", 1, 100, "out/x")
    assert fast[fast.index("--recipe") + 1] == "fast" and fast[fast.index("--k") + 1] == "4"
    assert fast[fast.index("--stage") + 1:fast.index("--stage") + 3] == ["small", "xsmall"]
    assert "--teacher-steps" not in fast and fast[fast.index("--seed") + 1] == "1"
    hier = runs.command(args, "k4-hier", 0, 40, "out/y")
    assert hier[hier.index("--teacher-steps") + 1] == hier[hier.index("--grow-steps") + 1] == "40"


def test_histories_of_a_chain(runs, tmp_path):
    for sub in ["", "teacher", "grow-k2"]:
        (tmp_path / sub).mkdir(exist_ok=True)
        (tmp_path / sub / "history.json").write_text(json.dumps({"history": [{"step": len(sub)}]}))
    assert runs.histories(tmp_path) == {"main": [{"step": 0}], "teacher": [{"step": 7}], "grow-k2": [{"step": 7}]}


def test_model_folder_writes_a_loadable_random_model(tokenizer, tmp_path):
    from ktm.loading import load_base

    shape = tmp_path / "shape"
    tiny_llama(len(tokenizer)).config.save_pretrained(shape)
    tokenizer.save_pretrained(shape)
    load_benchmark("gpu/model_folder").main([str(shape), str(tmp_path / "out"), "--dtype", "float32"])
    model, tok, _ = load_base(str(tmp_path / "out"))
    assert model.config.hidden_size == 32 and len(tok) == len(tokenizer)
