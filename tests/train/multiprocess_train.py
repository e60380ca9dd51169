"""Train a tiny run with ``ktm.train.phases.train_run`` and save every process's final weights.

Run by ``tests/train/test_multiprocess.py``, alone or under ``accelerate launch --multi_gpu
--num_processes N`` (``ACCELERATE_USE_CPU=1`` on a machine without GPUs: gloo on CPU).
Each process writes ``OUT/weights-rank<R>.safetensors`` (LoRA + encoder state), so a test
can check that the processes end with identical weights.

    python tests/train/multiprocess_train.py BASE_DIR DATA_DIR OUT_DIR BATCH_SIZE [GRAD_ACCUM]
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STEPS = 3


def train_and_save(base: str, data: str, out: str, batch_size: int, grad_accum: int = 1) -> str:
    """Train ``STEPS`` steps of K = 2 (no dropout) on the jsonl task in ``data``; returns the
    weights file this process wrote."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from ktm.config import ModelConfig, TrainConfig
    from ktm.train.phases import train_run
    from ktm.tasks import JsonlTask

    torch.set_num_threads(1)
    model_cfg = ModelConfig(k=2, lora_dropout=0.0)
    train_cfg = TrainConfig(steps=STEPS, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2,
                            eval_examples=2, seed=0)
    run = train_run(model_cfg, train_cfg, JsonlTask(data), out, base=base, device="cpu", dtype="float32",
                    log=lambda line: None)
    state = {f"lora.{k}": v for k, v in get_peft_model_state_dict(run.model.lm).items()}
    state.update({f"encoder.{k}": v for k, v in run.model.encoder.state_dict().items()})
    rank = run.trainer.accelerator.process_index
    path = os.path.join(out, f"weights-rank{rank}.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, path)
    assert run.path is not None and run.trainer.step == STEPS
    return path


if __name__ == "__main__":
    base_dir, data_dir, out_dir, b = sys.argv[1:5]
    train_and_save(base_dir, data_dir, out_dir, int(b), int(sys.argv[5]) if len(sys.argv) > 5 else 1)
