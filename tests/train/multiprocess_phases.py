"""A phase chain, ``--overwrite``, ``--resume`` and a pareto grid in one folder, run by every
process of ``accelerate launch --num_processes 2`` (``tests/train/test_multiprocess.py``).
Each process writes ``OUT/done-rank<R>.json`` with the steps it saw.

    python tests/train/multiprocess_phases.py BASE_DIR DATA_DIR OUT_DIR
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(base: str, data: str, out: str) -> None:
    import torch

    from ktm.config import ModelConfig, TrainConfig
    from ktm.experiments.pareto import GridConfig, run_grid
    from ktm.tasks import JsonlTask
    from ktm.train.phases import train_run

    torch.set_num_threads(1)
    task, model_cfg = JsonlTask(data), ModelConfig(k=2, lora_r=2, lora_dropout=0.0)
    quiet = dict(base=base, device="cpu", dtype="float32", log=lambda line: None)
    chain = TrainConfig(steps=2, batch_size=2, eval_examples=2, teacher="auto", teacher_steps=2, distill=0.5)
    steps = [train_run(model_cfg, chain, task, f"{out}/chain", **quiet).trainer.step]
    # again over the same folder: the first process removes teacher/ and checkpoint/ while the
    # other waits, then both train them anew
    steps.append(train_run(model_cfg, chain, task, f"{out}/chain", overwrite=True, **quiet).trainer.step)
    longer = TrainConfig(**{**chain.__dict__, "steps": 3})
    steps.append(train_run(model_cfg, longer, task, f"{out}/chain", resume=True, **quiet).trainer.step)
    grid = GridConfig(task="jsonl", task_options={"data": data}, steps=2, batch_size=2, eval_examples=2, model=base,
                      dtype="float32")
    rows = run_grid(grid, ["merge"], [2], f"{out}/grid", device="cpu", timing_prompts=2, progress=False,
                    log=lambda line: None)
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(out, f"done-rank{rank}.json"), "w") as f:
        json.dump({"steps": steps, "cells": [r["cell"] for r in rows]}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
