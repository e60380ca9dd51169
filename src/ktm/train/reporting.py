"""What a training run reports besides ``history.json``: accelerate's experiment trackers
(``--report-to tensorboard|wandb``) and the curve plot ``curves.png``.

Trackers get, on the main process, the losses of every step (``train/loss``,
``train/<term>_loss``, ``train/lr``) and every evaluation's numbers (``eval/<name>``), at the
global step. TensorBoard writes under ``OUT/logs/``.
"""

from __future__ import annotations

import numbers
from pathlib import Path

#: ``--report-to`` values and the accelerate tracker each starts (None: no tracker)
TRACKERS = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb"}
LOG_DIR = "logs"
#: the extra each tracker needs (checked before training starts, not at the first log)
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def tracker_options(report_to: str, output_dir: Path | None) -> dict:
    """The ``Accelerator`` keyword arguments for ``report_to``; raises ``ValueError`` for an
    unknown name or a tracker without an output folder, ``ModuleNotFoundError`` (one line:
    what to install) for a tracker whose package is missing."""
    import importlib.util

    if report_to not in TRACKERS:
        raise ValueError(f"report_to must be one of {sorted(TRACKERS)}, got {report_to!r}")
    if TRACKERS[report_to] is None:
        return {}
    module, extra = TRACKER_MODULES[report_to]
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"--report-to {report_to} needs the {module} package: pip install "
                                  f"'k-token-merging[{extra}]'", name=module)
    if output_dir is None:
        raise ValueError(f"--report-to {report_to} needs an output folder")
    from accelerate.utils import ProjectConfiguration

    return {"log_with": TRACKERS[report_to],
            "project_config": ProjectConfiguration(project_dir=str(output_dir),
                                                   logging_dir=str(Path(output_dir) / LOG_DIR))}


def numbers_of(row: dict, prefix: str) -> dict[str, float]:
    """The numeric entries of a history row (booleans and None left out), prefixed."""
    return {f"{prefix}{k}": float(v) for k, v in row.items()
            if isinstance(v, numbers.Number) and not isinstance(v, bool)}


def finish_trackers(accelerator) -> None:
    """Flush and close the trackers (not ``end_training``, which would also end the process
    group that the final save still waits on)."""
    for tracker in getattr(accelerator, "trackers", []):
        tracker.finish()


def plot_curves(history: list[dict], path: str | Path) -> Path | None:
    """``curves.png``: the held-out metric and the training loss against the step, one panel
    each (a curriculum's tasks as separate lines). None when the history is empty."""
    rows = [r for r in history if "step" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (metric_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for task in dict.fromkeys(r.get("task", "") for r in rows):
        mine = [r for r in rows if r.get("task", "") == task and r.get("value") is not None]
        metric_ax.plot([r["step"] for r in mine], [r["value"] for r in mine], marker="o", label=task or None)
        losses = [r for r in mine if r.get("train_loss") is not None]
        loss_ax.plot([r["step"] for r in losses], [r["train_loss"] for r in losses], marker="o", label=task or None)
    majority = [r["majority_rate"] for r in rows if r.get("majority_rate") is not None]
    if majority:
        metric_ax.axhline(majority[-1], color="grey", linestyle="--", label="majority class")
    metric_ax.set(xlabel="step", ylabel=rows[-1].get("metric", "metric"), title="held-out")
    loss_ax.set(xlabel="step", ylabel="loss (moving average)", title="training loss")
    for ax in (metric_ax, loss_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
