"""Held-out perplexity of pretraining runs against tokens seen, from their zoo cards (docs/RECIPES.md).

    python benchmarks/zoo_curves.py CARD.json[=LABEL] ... --out docs/recipes/NAME

Each card (a shipped merger's ``zoo.json``) holds its run's evaluation history: the merged
model's continuation perplexity on the same held-out windows at every evaluation, and the
plain model's on them (``held_out.plain_perplexity``). Tokens seen are steps x batch x
(prompt + continuation tokens), so runs with other batch sizes line up. Writes NAME.png (the
ratio to plain against tokens, log scale), NAME.md (a table) and NAME.json (the numbers), and
prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curve(spec: str) -> dict:
    path, _, label = spec.partition("=")
    card = json.loads(Path(path).read_text())
    text, train = card["settings"]["text"], card["settings"]["train"]
    per_step = train.get("batch_size", 8) * (text["prompt_tokens"] + text["continuation_tokens"])
    plain = card["held_out"]["plain_perplexity"]
    rows = [{"step": r["step"], "tokens": r["step"] * per_step, "perplexity": r["value"],
             "ratio": r["value"] / plain} for r in card["history"] if r.get("metric") == "perplexity"]
    return {"label": label or Path(path).stem, "card": Path(path).name, "k": card["k"], "batch_size": per_step //
            (text["prompt_tokens"] + text["continuation_tokens"]), "plain_perplexity": plain,
            "machine": card.get("machine", ""), "rows": rows}


def table(curves: list[dict]) -> str:
    lines = ["| run | K | batch | step | tokens (M) | held-out perplexity | ratio to plain |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in curves:
        for r in c["rows"]:
            lines.append(f"| {c['label']} | {c['k']} | {c['batch_size']} | {r['step']} | {r['tokens'] / 1e6:.2f} | "
                         f"{r['perplexity']:.2f} | {r['ratio']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cards", nargs="+", help="zoo.json files, optionally =LABEL")
    p.add_argument("--out", required=True, help="output path without extension")
    p.add_argument("--title", default="Held-out continuation perplexity against tokens seen")
    args = p.parse_args(argv)
    curves = [curve(c) for c in args.cards]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = table(curves)
    out.with_suffix(".md").write_text(f"# {args.title}\n\n`python benchmarks/zoo_curves.py "
                                      f"{' '.join(args.cards)} --out {args.out}`\n\n{md}\n")
    out.with_suffix(".json").write_text(json.dumps(curves, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for c in curves:
        ax.plot([r["tokens"] / 1e6 for r in c["rows"]], [r["ratio"] for r in c["rows"]], marker="o", ms=3,
                label=c["label"])
    ax.set_xscale("log")
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("merged / plain perplexity (held-out)")
    ax.set_title(args.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
