"""Timing: repeated runs, round-robin, and the summary statistics of their times."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence

import torch


def median(xs: Sequence[float]) -> float:
    """Median of a non-empty list of numbers."""
    if not xs:
        raise ValueError("median of an empty list")
    return float(statistics.median(xs))


def summary(xs: Sequence[float]) -> dict:
    """``{"median", "min", "max", "q1", "q3", "spread", "n", "runs"}`` of repeated timings.

    ``spread`` is (max - min) / median: the relative width of all runs (0 for one run).

    >>> s = summary([1.0, 2.0, 4.0])
    >>> s["median"], s["min"], s["max"], s["spread"]
    (2.0, 1.0, 4.0, 1.5)
    """
    xs = [float(x) for x in xs]
    med = median(xs)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median": med, "min": min(xs), "max": max(xs), "q1": q1, "q3": q3,
            "spread": (max(xs) - min(xs)) / med if med > 0 else 0.0, "n": len(xs), "runs": xs}


def speedup(baseline_s: float, other_s: float) -> float:
    """How many times faster ``other`` is than ``baseline``: baseline / other."""
    if other_s <= 0:
        raise ValueError(f"a time must be > 0, got {other_s}")
    return baseline_s / other_s


def fraction_of_ideal(achieved: float, ideal: float) -> float:
    """Share of the ideal speedup that was achieved: 1.0 = all of it.

    Both are ratios over K=1, so 1.0 at K=1 by definition. Values above 1 happen when the
    measured ktm speedup beats the plain forward's ratio (noise, or a cheaper K=1 encoder).
    """
    if ideal <= 0:
        raise ValueError(f"the ideal ratio must be > 0, got {ideal}")
    return achieved / ideal


def encoder_share(merge_s: float, total_s: float) -> float:
    """Fraction of an end-to-end prefill spent merging (``merge_ids``)."""
    if total_s <= 0:
        raise ValueError(f"a time must be > 0, got {total_s}")
    return merge_s / total_s


def rate(count: float, seconds: float) -> float:
    """Items per second."""
    if seconds <= 0:
        raise ValueError(f"a time must be > 0, got {seconds}")
    return count / seconds


def sync_device(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns: dict[str, Callable[[], object]], *, warmup: int = 1, repeats: int = 3,
            device="cpu", inference: bool = True) -> dict[str, list[float]]:
    """Seconds per call of each function: ``warmup`` untimed calls, then ``repeats`` timed
    rounds in which every function runs once, in order (round-robin).

    Under ``torch.inference_mode`` unless ``inference=False``; CUDA is synchronised around
    every timed call.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times: dict[str, list[float]] = {name: [] for name in fns}
    ctx = torch.inference_mode() if inference else contextlib.nullcontext()
    with ctx:
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        sync_device(device)
        for _ in range(repeats):
            for name, fn in fns.items():
                sync_device(device)
                t0 = time.perf_counter()
                fn()
                sync_device(device)
                times[name].append(time.perf_counter() - t0)
    return times
