"""Slow learning checks on the embedded model (excluded by default: `scripts/test.sh -m slow`)."""

import pytest

from ktm import KTokenMerging
from ktm.config import TrainConfig
from ktm.train.evaluate import evaluate
from ktm.tasks import TreeTask

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_uncompressed_baseline_learns_the_small_tree_stage(tmp_path):
    """K = 1 (same code path as K > 1) goes well past the majority class in 200 CPU steps."""
    task = TreeTask("small", num_trees=2000, seed=0)
    m = KTokenMerging.from_base(None, k=1, seed=0, lora_r=8, device="cpu", dtype="float32")
    from ktm.train.trainer import Trainer

    Trainer(m, TrainConfig(steps=200, batch_size=16, lr=1e-3, warmup_steps=20), output_dir=tmp_path,
            progress=False).fit(task)
    res = evaluate(m, task, progress=False)
    assert res["value"] >= res["majority_rate"] + 0.15, res
