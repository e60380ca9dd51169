"""What a checkpoint holds besides the model: the optimiser's tensors and every process's random
states, so that ``--resume`` continues as the uninterrupted run would."""

from __future__ import annotations

from collections import defaultdict

import torch

from ..checkpoint import CheckpointError


def rng_states(accelerator) -> dict[str, torch.Tensor]:
    """The CPU and CUDA random states of every process, as tensors ``rng.cpu.R`` and
    ``rng.cuda.R.D`` (rank R, device D); ``rng.cpu`` is rank 0's (older checkpoints have only it)."""
    from accelerate.utils import gather_object

    mine = {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    every = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
    out = {"rng.cpu": every[0]["cpu"].clone()}  # its own storage: safetensors refuses shared ones
    for rank, state in enumerate(every):
        out[f"rng.cpu.{rank}"] = state["cpu"]
        out.update({f"rng.cuda.{rank}.{d}": t for d, t in enumerate(state["cuda"])})
    return out


def restore_rng(tensors: dict[str, torch.Tensor], rank: int) -> None:
    """Put back this process's random states saved by :func:`rng_states`."""
    torch.set_rng_state(tensors.get(f"rng.cpu.{rank}", tensors["rng.cpu"]))
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith(f"rng.cuda.{rank}.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def optimizer_tensors(opt, with_state: bool = True) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The optimiser's state as flat tensors ``state.<param>.<name>`` and its parameter groups."""
    sd = opt.state_dict()
    tensors = {}
    for pid, st in (sd["state"].items() if with_state else ()):
        for name, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{pid}.{name}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def load_optimizer(opt, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """Put back what :func:`optimizer_tensors` saved; a checkpoint for other parameters is refused."""
    state: dict[int, dict] = defaultdict(dict)
    for key, value in tensors.items():
        if key.startswith("state."):
            _, pid, name = key.split(".", 2)
            state[int(pid)][name] = value
    current = opt.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in current]:
        raise CheckpointError("the checkpoint's optimiser state does not fit this model's parameters")
    opt.load_state_dict({"state": dict(state), "param_groups": groups})
