"""What a checkpoint holds besides the model: the optimiser's tensors and every process's random
states, so that ``--resume`` continues as the uninterrupted run would."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

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


COMPUTE_KEYS = ("elapsed_s", "cpu_thread_s", "gpu_s")


def compute_of(row: dict) -> dict:
    """``elapsed_s`` (wall seconds of training), ``cpu_thread_s`` and ``gpu_s`` of a history row or
    checkpoint state. Rows written before ktm counted the last two have only the wall time: it
    counts as CPU time on one thread (how every long run before then ran: ``--threads 1``)."""
    wall = float(row.get("elapsed_s") or 0.0)
    if any(k in row for k in COMPUTE_KEYS[1:]):
        return {"elapsed_s": wall, **{k: float(row.get(k) or 0.0) for k in COMPUTE_KEYS[1:]}}
    return {"elapsed_s": wall, "cpu_thread_s": wall, "gpu_s": 0.0}


@dataclass
class ComputeClock:
    """What a run has used across resumed pieces: ``elapsed_s``, wall seconds of training;
    ``cpu_thread_s``, wall seconds times PyTorch's CPU threads of each piece; and ``gpu_s``, wall
    seconds on a CUDA device. (The wall time alone times the threads of whatever process
    publishes a run is wrong for a run held to fewer threads, so each piece counts its own.)"""

    saved: dict = field(default_factory=dict)  # the resumed checkpoint's (compute_of its state)
    piece: tuple | None = None  # (perf_counter, compute before, cuda) of the current fit call

    def before(self, history: list[dict]) -> dict:
        """The compute used before the current piece: the larger of ``history``'s last row and
        the resumed checkpoint's."""
        last = compute_of(history[-1]) if history else {}
        return {k: max(last.get(k, 0.0), self.saved.get(k, 0.0)) for k in COMPUTE_KEYS}

    def start(self, now: float, history: list[dict], cuda: bool) -> None:
        self.piece = (now, self.before(history), cuda)

    def seconds(self, history: list[dict], now: float | None = None) -> dict:
        """The compute used up to ``now`` (default: this moment); before any piece, the resumed run's."""
        if self.piece is None:
            return self.before(history)
        start, before, cuda = self.piece
        wall = (time.perf_counter() if now is None else now) - start
        spent = {"elapsed_s": wall, **({"gpu_s": wall} if cuda else {"cpu_thread_s": wall * torch.get_num_threads()})}
        return {k: round(before[k] + spent.get(k, 0.0), 1) for k in COMPUTE_KEYS}
