"""What each training step reads: the learning-rate factor of a step, the examples of a step
(class-balanced when labels are given) and the share of them each process trains on."""

from __future__ import annotations

import math
import random
from collections import defaultdict

from ..config import TrainConfig
from ..tasks.base import Example, Task


def lr_factor(step: int, cfg: TrainConfig, start: int = 0, span: int | None = None,
              restart: int | None = None) -> float:
    """Multiplier of the base learning rate at 0-based global ``step``: linear warm-up over
    the first ``cfg.warmup_steps`` steps of the run, then constant, or a cosine decay to 10%
    over the cycle of ``span`` steps that begins at ``start`` (default: the whole run,
    ``cfg.steps``; a curriculum makes each round a cycle of its own). With ``cfg.cooldown``, the
    last that many steps before ``cfg.steps`` also scale it down linearly towards 0.

    >>> cfg = TrainConfig(steps=10, warmup_steps=0, decay="cosine")
    >>> [round(lr_factor(s, cfg, start=10, span=10), 2) for s in (10, 15, 20)]
    [1.0, 0.55, 0.1]
    >>> [lr_factor(s, TrainConfig(steps=10, cooldown=4)) for s in (5, 6, 7, 9)]
    [1.0, 0.8, 0.6, 0.2]
    """
    return _schedule_factor(step, cfg, start, span, restart) * _cooldown_factor(step, cfg)


def _cooldown_factor(step: int, cfg: TrainConfig) -> float:
    """The linear cool-down's share of the rate at ``step``: 1 before the last ``cfg.cooldown`` steps."""
    left = cfg.steps - step  # steps left, this one included
    return 1.0 if not cfg.cooldown or left > cfg.cooldown else max(0.0, left / (cfg.cooldown + 1))


def _schedule_factor(step: int, cfg: TrainConfig, start: int, span: int | None, restart: int | None) -> float:
    """Warm-up (again after a restart), then constant or cosine: :func:`lr_factor` without the cool-down."""
    if restart is not None and cfg.warmup_steps and step - restart < cfg.warmup_steps:
        # a run continued from weights alone (fresh AdamW moments) warms up again from ``restart``
        return min(1.0, (step - restart + 1) / cfg.warmup_steps) * _schedule_factor(step, cfg, start, span, None)
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay == "cosine":
        end = start + (span if span is not None else cfg.steps)
        begin = max(start, cfg.warmup_steps)
        t = min(1.0, max(0.0, (step - begin) / max(1, end - begin)))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def group_lr_factors(step: int, cfg: TrainConfig, start: int = 0, span: int | None = None,
                     restart: int | None = None) -> dict[str, float]:
    """:func:`lr_factor` per parameter group (``lora``, ``encoder``). During ``cfg.merger_warmup``
    only the encoder learns (LoRA's factor is 0, the encoder's scaled to ``cfg.merger_warmup_lr``);
    LoRA then warms up over ``cfg.warmup_steps`` as a run continued at that step would.

    >>> cfg = TrainConfig(steps=10, lr=1e-3, warmup_steps=2, merger_warmup=3, merger_warmup_lr=4e-3)
    >>> [group_lr_factors(s, cfg) for s in (0, 2, 3, 4, 5)]  # doctest: +NORMALIZE_WHITESPACE
    [{'lora': 0.0, 'encoder': 2.0}, {'lora': 0.0, 'encoder': 4.0}, {'lora': 0.5, 'encoder': 1.0},
     {'lora': 1.0, 'encoder': 1.0}, {'lora': 1.0, 'encoder': 1.0}]
    """
    factor = lr_factor(step, cfg, start, span, restart)
    if not cfg.merger_warmup:
        return {"lora": factor, "encoder": factor}
    if step < cfg.merger_warmup:
        boost = cfg.merger_warmup_lr / (cfg.encoder_lr or cfg.lr) if cfg.merger_warmup_lr else 1.0
        return {"lora": 0.0, "encoder": factor * boost}
    after = cfg.merger_warmup if restart is None else max(restart, cfg.merger_warmup)
    return {"lora": lr_factor(step, cfg, start, span, restart=after), "encoder": factor}


def batch_indices(examples: list[Example], step: int, cfg: TrainConfig, labels: list[str] | None,
                  normalise=Task.normalise, size: int | None = None) -> list[int]:
    """The example indices of global ``step``'s batch: a pure function of (seed, step).

    ``size``: how many (default ``cfg.batch_size``; the trainer asks for the global batch,
    ``cfg.batch_size`` x the number of processes). With ``cfg.balance`` and ``labels``, each
    example's class is drawn uniformly first.
    """
    size = cfg.batch_size if size is None else size
    rng = random.Random(cfg.seed * 1_000_003 + step)
    if cfg.balance and labels:
        by_label = defaultdict(list)
        for i, e in enumerate(examples):
            by_label[normalise(e.answer)].append(i)
        pools = [by_label[label] for label in labels if by_label[label]]
        return [rng.choice(rng.choice(pools)) for _ in range(size)]
    if size <= len(examples):
        return rng.sample(range(len(examples)), size)
    return [rng.randrange(len(examples)) for _ in range(size)]


def process_share(indices: list[int], world: int, rank: int) -> list[int]:
    """Process ``rank``'s share of a global batch (``world`` equal, contiguous parts), so
    that N processes with batch B train on exactly the examples of one process with N x B.

    >>> process_share([5, 1, 7, 3], world=2, rank=1)
    [7, 3]
    """
    if len(indices) % world:
        raise ValueError(f"a global batch of {len(indices)} does not split into {world} equal shares")
    per = len(indices) // world
    return indices[rank * per:(rank + 1) * per]
