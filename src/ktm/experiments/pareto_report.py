"""The report of a ``ktm pareto`` grid: JSON, CSV, a Markdown table and a plot.

:func:`score_rows` adds to each cell's row its normalised performance against ``plain``,
its P-LF1 and whether it is on the Pareto frontier of (length reduction, performance)
(:mod:`ktm.experiments.frontier`); :func:`write_report` writes ``pareto.json``, ``pareto.csv``,
``pareto.md`` and ``pareto.png``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..checkpoint import write_file, write_text
from ..config import save_json
from .frontier import HIGHER_IS_BETTER, above_majority, normalised_performance, p_lf1, pareto_front

P_LF1_DEFINITION = ("P-LF1 = 2 P R / (P + R), the harmonic mean of P, the performance normalised by plain's "
                    "(accuracy / plain's accuracy; plain's perplexity / perplexity), and R, the length "
                    "reduction 1 - LLM positions / prompt tokens over the scored test prompts. For accuracy "
                    "tasks, P-LF1 over majority uses instead P = (accuracy - majority rate) / (plain's accuracy "
                    "- majority rate), at least 0, so a model that always answers the majority class scores 0")
CSV_FIELDS = ("cell", "method", "k", "metric", "value", "macro_f1", "majority_rate", "exact_match", "chrf",
              "prompt_tokens", "llm_positions", "length_reduction", "normalised_performance", "p_lf1",
              "above_majority", "p_lf1_over_majority", "on_frontier", "prefill_ratio", "prefill_speedup", "train_seconds", "steps", "n")


def score_rows(rows: list[dict]) -> list[dict]:
    """Copies of ``rows`` with ``normalised_performance`` and ``p_lf1`` (None while the
    ``plain`` cell is missing or scored 0) and ``on_frontier``."""
    plain = next((r for r in rows if r["method"] == "plain"), None)
    out = []
    for r in rows:
        r = dict(r)
        r.update(normalised_performance=None, p_lf1=None)
        reduction = max(0.0, r["length_reduction"])
        if plain is not None and plain["value"] > 0:  # plain at 0% accuracy normalises nothing
            perf = normalised_performance(r["value"], plain["value"], r["metric"])
            r.update(normalised_performance=perf, p_lf1=p_lf1(perf, reduction))
        if plain is not None and "majority_rate" in r:
            gain = above_majority(r["value"], plain["value"], r["majority_rate"])
            r.update(above_majority=gain, p_lf1_over_majority=None if gain is None else p_lf1(gain, reduction))
        out.append(r)
    sign = 1 if not out or HIGHER_IS_BETTER[out[0]["metric"]] else -1
    front = pareto_front([(r["length_reduction"], sign * r["value"]) for r in out])
    for r, on in zip(out, front):
        r["on_frontier"] = on
    return out


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown_table(rows: list[dict]) -> str:
    """One line per cell; the frontier's cells are marked."""
    metric = rows[0]["metric"] if rows else "value"
    has_f1 = any("macro_f1" in r for r in rows)
    has_gen = any("chrf" in r for r in rows)
    head = (["method", "K", "LLM positions / prompt tokens", "length reduction", metric]
            + (["macro-F1"] if has_f1 else []) + (["exact match", "chrF"] if has_gen else [])
            + ["normalised perf.", "P-LF1"] + (["P-LF1 over majority"] if has_f1 else [])
            + ["prefill speed vs plain", "train time", "frontier"])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["method"], str(r["k"]), f"{r['llm_positions']:.1f} / {r['prompt_tokens']:.1f}",
                 f"{r['length_reduction']:.1%}", _fmt(r["value"], ".3f" if metric == "perplexity" else ".1%")]
        cells += [_fmt(r.get("macro_f1"), ".3f")] if has_f1 else []
        cells += [_fmt(r.get("exact_match"), ".1%"), _fmt(r.get("chrf"), ".1f")] if has_gen else []
        cells += [_fmt(r.get("normalised_performance"), ".3f"), _fmt(r.get("p_lf1"), ".3f")]
        cells += [_fmt(r.get("p_lf1_over_majority"), ".3f")] if has_f1 else []
        cells += [f"{r['prefill_speedup']:.2f}x", f"{(r.get('train_seconds') or 0) / 60:.1f} min",
                  "yes" if r["on_frontier"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k) for k in CSV_FIELDS})
    return buf.getvalue()


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Performance against length reduction: each method's points joined in K order, the
    frontier as a dashed line, plain as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = rows[0]["metric"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["k"])
        xs, ys = [r["length_reduction"] for r in pts], [r["value"] for r in pts]
        style = dict(marker="*", markersize=14, linestyle="none") if method == "plain" else dict(marker="o")
        ax.plot(xs, ys, label=method, **style)
        for r in pts:
            if method != "plain":
                ax.annotate(f"K={r['k']}", (r["length_reduction"], r["value"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
    front = sorted((r for r in rows if r["on_frontier"]), key=lambda r: r["length_reduction"])
    ax.plot([r["length_reduction"] for r in front], [r["value"] for r in front], "k--", lw=1, alpha=0.6,
            label="Pareto frontier")
    if "majority_rate" in rows[0]:
        ax.axhline(rows[0]["majority_rate"], color="grey", lw=0.8, ls=":", label="majority class")
    if not HIGHER_IS_BETTER[metric]:
        ax.set_yscale("log")
        ax.invert_yaxis()
    ax.set_xlabel("length reduction (1 - LLM positions / prompt tokens)")
    ax.set_ylabel(metric + ("" if HIGHER_IS_BETTER[metric] else " (lower is better, axis inverted)"))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[dict], out, grid) -> list[dict]:
    """Write the four report files into ``out``; returns the scored rows."""
    out = Path(out)
    scored = score_rows(rows)
    key = grid.key()
    title = (f"{key['task']}: {key['steps']} steps x {key['batch_size']}, recipe {key['recipe']}, "
             f"{scored[0]['n'] if scored and 'n' in scored[0] else '?'} test examples")
    save_json(out / "pareto.json", {"grid": key, "p_lf1": P_LF1_DEFINITION, "cells": scored})
    write_text(out / "pareto.csv", write_csv(scored))
    write_text(out / "pareto.md", f"# {title}\n\n{markdown_table(scored)}\n\n{P_LF1_DEFINITION}.\n"
                                   f"Prefill speed: the median prefill time of plain reading over the cell's, "
                                   f"same prompts, one process.\n")
    if scored:
        write_file(out / "pareto.png", lambda tmp: plot(scored, tmp, title))
    return scored

