"""Plot and tabulate the accuracy curves of `ktm train` runs (docs/RECIPES.md).

    python benchmarks/recipe_curves.py RUN_DIR[=LABEL] ... --out docs/recipes/NAME

Reads each run's history.json and run_config.json (for a phase of a chained run, such as
OUT/teacher or OUT/grow-k2, the chain's run_config.json one folder up) and writes NAME.png
(held-out accuracy against training step, with the majority-class rate), NAME.md (a table:
accuracy at each evaluation, final task loss, wall time) and NAME.json (the numbers).
Prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_run(spec: str) -> dict:
    path, _, label = spec.partition("=")
    run = Path(path)
    history = json.loads((run / "history.json").read_text())["history"]
    # a phase of a chained run (OUT/teacher, OUT/grow-k2) has no run_config.json of its own:
    # the command that trained it is the chain's, one folder up
    config_file = next((f for f in (run / "run_config.json", run.parent / "run_config.json") if f.is_file()), None)
    if config_file is None:
        raise SystemExit(f"{run}: no run_config.json here or in the folder above")
    config = json.loads(config_file.read_text())
    if not history:
        raise SystemExit(f"{run}: empty history")
    return {"run": str(run), "label": label or run.name, "history": history,
            "argv": config.get("argv", []), "recipe": config.get("recipe")}


def command_line(argv: list[str]) -> str:
    """The command a run_config's argv came from: ``ktm ...``, or ``python SCRIPT.py ...``
    for a benchmark script (its argv starts with the script's path).

    >>> command_line(["train", "--k", "4"]), command_line(["benchmarks/x.py", "train"])
    ('ktm train --k 4', 'python benchmarks/x.py train')
    """
    if argv and argv[0].endswith(".py"):
        return "python " + " ".join(argv)
    return "ktm " + " ".join(argv)


def wall_minutes(history: list[dict]) -> float | None:
    """Total wall time of a run in minutes. Histories written before ``elapsed_s`` counted on
    across resumes restart it at 0 after a resume; those segments are added up."""
    total, offset, last = None, 0.0, 0.0
    for row in history:
        e = row.get("elapsed_s")
        if e is None:
            continue
        if e < last:
            offset += last
        last = e
        total = offset + e
    return None if total is None else total / 60


def table(runs: list[dict]) -> str:
    steps = sorted({r["step"] for run in runs for r in run["history"]})
    head = ["run", *(f"step {s}" for s in steps), "final task loss", "wall (min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for run in runs:
        by_step = {r["step"]: r for r in run["history"]}
        cells = [f"{100 * by_step[s]['value']:.1f}" if s in by_step else "" for s in steps]
        last = run["history"][-1]
        loss = last.get("train_loss")
        wall = wall_minutes(run["history"])
        lines.append("| " + " | ".join([run["label"], *cells, f"{loss:.3f}" if loss is not None else "",
                                        f"{wall:.1f}" if wall else ""]) + " |")
    rates = majority_rates(runs)
    if len(rates) == 1:
        lines.append(f"\nMajority class: {100 * rates[0]:.1f}%. Accuracy in % on the held-out questions.")
    elif rates:
        lines.append(f"\nMajority class: {100 * rates[0]:.1f}% to {100 * rates[-1]:.1f}% (it depends on the stage "
                     "and on the evaluation subset). Accuracy in % on the held-out questions.")
    return "\n".join(lines)


def majority_rates(runs: list[dict]) -> list[float]:
    """The distinct majority-class rates of all evaluations, sorted."""
    return sorted({round(r["majority_rate"], 6) for run in runs for r in run["history"] if r.get("majority_rate") is not None})


def batch_sizes(runs: list[dict]) -> list[int]:
    """The ``--batch-size`` of each run's command line (16 when not given, ktm's default), sorted."""
    sizes = set()
    for run in runs:
        argv = run.get("argv") or []
        sizes.add(int(argv[argv.index("--batch-size") + 1]) if "--batch-size" in argv[:-1] else 16)
    return sorted(sizes)


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in runs:
        h = run["history"]
        ax.plot([r["step"] for r in h], [100 * r["value"] for r in h], marker="o", label=run["label"])
    rates = majority_rates(runs)
    if len(rates) == 1:
        ax.axhline(100 * rates[0], color="grey", linestyle="--", linewidth=1, label="majority class")
    sizes = batch_sizes(runs)
    ax.set_xlabel(f"training step (batch {', '.join(map(str, sizes))})")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folder (from ktm train --out), optionally =LABEL")
    ap.add_argument("--out", required=True, help="output path without extension")
    ap.add_argument("--title", default="Textualized Tree, held-out accuracy")
    args = ap.parse_args(argv)
    runs = [load_run(s) for s in args.runs]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = table(runs)
    out.with_suffix(".md").write_text(md + "\n\nCommands:\n\n" + "\n".join(
        f"- {r['label']}: `{command_line(r['argv'])}`" for r in runs) + "\n")
    out.with_suffix(".json").write_text(json.dumps(runs, indent=1))
    plot(runs, out.with_suffix(".png"), args.title)
    print(md)


if __name__ == "__main__":
    main()
