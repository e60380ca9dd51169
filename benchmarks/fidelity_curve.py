"""Fidelity against tokens seen for a pretraining run (``ktm pretrain`` / ``ktm zoo build``).

``snapshot`` watches a run folder and keeps a slim bf16 copy of its checkpoint every EVERY
steps (a few MB each), while the run goes on; ``measure`` scores each copy with
:func:`ktm.train.fidelity.fidelity` on held-out prose (and reviews) and writes a table, a JSON
file and a plot of perplexity ratio and top-1 agreement against tokens seen; snapshots already in
OUT's JSON file (same number of windows) are kept, so a growing run is measured incrementally::

    python benchmarks/fidelity_curve.py snapshot RUN --into SNAPS --every 100 &
    python benchmarks/fidelity_curve.py measure SNAPS --text ../shared/data/text/dev.jsonl \\
        --windows 100 --out docs/recipes/fidelity-k2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def snapshot(run: Path, into: Path, every: int, poll: float = 30.0, until: float | None = None) -> None:
    """Copy ``run/checkpoint`` to ``into/step-N`` (slim, bf16) whenever its step is a new multiple of
    ``every``; stops after ``until`` seconds (None: never)."""
    from ktm.train.zoo import write_slim

    start = time.time()
    while until is None or time.time() - start < until:
        state = run / "checkpoint" / "trainer_state.json"
        try:
            step = json.loads(state.read_text())["step"]
        except (OSError, ValueError, KeyError):
            step = None
        if step is not None and step % every == 0 and not (into / f"step-{step:06d}").exists():
            write_slim(run / "checkpoint", into / f"step-{step:06d}")
            print(f"snapshot: step {step}", flush=True)
        time.sleep(poll)


def previous_rows(out: Path, windows: int) -> list[dict]:
    """The rows of an earlier ``measure`` into ``out`` (its JSON file) with the same number of
    windows; none when there is no such file."""
    try:
        rows = json.loads(out.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return []
    return [r for r in rows if isinstance(r, dict) and r.get("windows") == windows and "snapshot" in r]


def measure(snaps: Path, text: str, reviews: str | None, windows: int, prompt: int, cont: int,
            batch: int, out: Path) -> list[dict]:
    from ktm import KTokenMerging
    from ktm.tasks.amazon import read_reviews
    from ktm.train.fidelity import fidelity, fidelity_line, prose_windows

    rows, model, wins, revs = [], None, None, None
    kept = {r["snapshot"]: r for r in previous_rows(out, windows)}
    for folder in sorted(p for p in snaps.iterdir() if p.name.startswith("step-")):
        if folder.name in kept:  # measured before on the same windows: kept, not measured again
            rows.append(kept[folder.name])
            continue
        if model is None:
            model = KTokenMerging.from_pretrained(folder)
            wins = prose_windows(text, model.tokenizer, prompt, cont, windows)
            revs = read_reviews(Path(reviews))[:windows] if reviews else None
        else:
            model.load_trained(folder)
        step = int(folder.name.split("-")[1])
        r = fidelity(model, wins, revs, batch_size=batch, progress=False)
        r.update(step=step, snapshot=folder.name)
        rows.append(r)
        print(f"step {step}: " + fidelity_line(r), flush=True)
    return rows


def plot(rows: list[dict], tokens_per_step: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["step"] * tokens_per_step / 1e6 for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(x, [r["perplexity_ratio"] for r in rows], marker="o")
    a.set(xlabel="tokens seen (M)", ylabel="perplexity merged / plain", title="continuation perplexity ratio")
    b.plot(x, [100 * r["top1_agreement"] for r in rows], marker="o")
    b.set(xlabel="tokens seen (M)", ylabel="%", title="top-1 agreement with the plain model")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("snapshot")
    s.add_argument("run", type=Path)
    s.add_argument("--into", type=Path, required=True)
    s.add_argument("--every", type=int, default=100)
    s.add_argument("--hours", type=float, default=None, help="stop after this long (default: never)")
    m = sub.add_parser("measure")
    m.add_argument("snaps", type=Path)
    m.add_argument("--text", default="../shared/data/text/dev.jsonl")
    m.add_argument("--reviews", default=None)
    m.add_argument("--windows", type=int, default=100)
    m.add_argument("--prompt-tokens", type=int, default=256)
    m.add_argument("--continuation-tokens", type=int, default=32)
    m.add_argument("--batch-size", type=int, default=8)
    m.add_argument("--tokens-per-step", type=int, default=8 * 288, help="batch x window (default 8 x 288)")
    m.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.command == "snapshot":
        snapshot(args.run, args.into, args.every, until=args.hours * 3600 if args.hours else None)
        return 0
    rows = measure(args.snaps, args.text, args.reviews, args.windows, args.prompt_tokens, args.continuation_tokens,
                   args.batch_size, args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r["tokens_seen"] = r["step"] * args.tokens_per_step
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    lines = ["| step | tokens seen | ppl merged | ppl plain | ratio | top-1 agreement | KL/token |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['step']} | {r['tokens_seen'] / 1e6:.2f} M | {r['merged_perplexity']:.2f} | "
              f"{r['plain_perplexity']:.2f} | {r['perplexity_ratio']:.3f} | {100 * r['top1_agreement']:.1f}% | "
              f"{r['kl_per_token']:.3f} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if rows:
        plot(rows, args.tokens_per_step, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
