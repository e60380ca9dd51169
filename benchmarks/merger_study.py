"""Issue 15's measurement: how far a pretrained merger and contextual merging take K-Token
Merging, against K = 1 and keep-first, over several seeds (docs/RECIPES.md).

    python benchmarks/merger_study.py run --out runs/study-amazon --k 4 --seeds 0 1 2 \\
        --variants k1 keep-first scratch pre ctx2 pre-ctx2 \\
        --pretrained 4=runs/pre-k4/model --pretrained 4:2=runs/pre-k4-j2/model \\
        -- --task amazon --reviews ../shared/data/amazon --review-chars 200 --steps 60 --batch-size 8 \\
           --eval-every 20 --eval-examples 200 --device cpu --dtype float32
    python benchmarks/merger_study.py report runs/study-amazon runs/study-amazon-lr=lr3e-4 --out docs/recipes/study

``run`` trains one ``ktm train`` run per (variant, K, seed) in ``OUT/<variant>-k<K>-s<seed>``
with the options after ``--`` (the same for every cell) plus the variant's own:

* ``k1``: plain K = 1 (one cell per seed, whatever ``--k``);
* ``keep-first``: the first 1/K of the prompt's tokens, read plainly (``--method keep-first``);
* ``scratch``: K-Token Merging from the block mean (the recipe as given);
* ``ctxJ`` (``ctx1``, ``ctx2``, ...): contextual merging, ``--context-layers J``;
* ``pre``: started from the pretrained merger given as ``--pretrained K=PATH``;
* ``pre-ctxJ``: started from the pretrained contextual merger ``--pretrained K:J=PATH``.

Finished cells are kept, an interrupted one resumes from its checkpoint, so the command can be
rerun until done. Cells run one at a time, each as its own ``ktm train`` process, in the order
seed, then variant, so the first seed of every variant comes first. ``report`` reads the cells of
one or more study folders (and, given ``--pretrain-runs``, the pretraining runs' ``pretrain.json``) and writes
``NAME.json``, ``NAME.md`` (final numbers with mean, standard deviation and range over seeds;
the mean curve; wall time) and ``NAME.png`` (mean curves with the range over seeds shaded);
``report --k 2`` keeps the cells of K = 2 and the K = 1 reference only, ``report --seeds 0 1 2``
the cells of those seeds only. The report also pairs each merged variant with its references
seed by seed (the same seed draws the same batches and evaluation subset): the difference
against keep-first at the same K and against K = 1, per seed and as mean ± SD. A source may also be
an earlier report's ``NAME.json`` (``NAME.json:LABEL`` for its cells of one label), and sources
joined by ``+`` are reported as one setting, so cells trained on another machine, whose folders are
gone, are paired with new ones::

    python benchmarks/merger_study.py report "runs/long4+docs/recipes/power-amazon-400chars.json:400-chars=400-chars" \\
        runs/loco400=leave-Kitchen-out --out docs/recipes/power-amazon-400chars

``loco`` writes a leave-one-category-out split of a reviews folder (reviews that carry a
``category``, like ``../shared/data/amazon``): training on the other categories' training
reviews, testing on every review of the held-out category (its training and dev reviews;
none of them is trained on)::

    python benchmarks/merger_study.py loco --reviews ../shared/data/amazon \
        --hold-out Kitchen_and_Housewares --out runs/loco-kitchen
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANT = re.compile(r"^(k1|keep-first|scratch|pre|ctx(\d+)|pre-ctx(\d+))$")


def variant_args(variant: str, k: int, pretrained: dict[tuple[int, int], str]) -> list[str]:
    """The ``ktm train`` options of a variant at block size ``k``.

    >>> variant_args("ctx2", 4, {}), variant_args("pre", 4, {(4, 0): "p"})
    (['--k', '4', '--context-layers', '2'], ['--k', '4', '--init-from', 'p'])
    """
    m = VARIANT.match(variant)
    if not m:
        raise SystemExit(f"unknown variant {variant!r}: k1, keep-first, scratch, pre, ctxJ or pre-ctxJ")
    if variant == "k1":
        return ["--k", "1"]
    if variant == "keep-first":
        return ["--method", "keep-first", "--k", str(k)]
    if variant == "scratch":
        return ["--k", str(k)]
    if m.group(2):
        return ["--k", str(k), "--context-layers", m.group(2)]
    j = int(m.group(3) or 0)
    if (k, j) not in pretrained:
        raise SystemExit(f"variant {variant} at K = {k} needs --pretrained {k}{f':{j}' if j else ''}=PATH")
    return ["--k", str(k), "--init-from", pretrained[(k, j)]]


def cell_name(variant: str, k: int, seed: int) -> str:
    return f"{variant}-s{seed}" if variant == "k1" else f"{variant}-k{k}-s{seed}"


def parse_pretrained(specs: list[str]) -> dict[tuple[int, int], str]:
    """``K=PATH`` or ``K:J=PATH`` -> {(K, J): PATH}.

    >>> parse_pretrained(["4=a", "4:2=b"])
    {(4, 0): 'a', (4, 2): 'b'}
    """
    out = {}
    for spec in specs:
        key, sep, path = spec.partition("=")
        k, _, j = key.partition(":")
        if not sep or not k.isdigit() or (j and not j.isdigit()):
            raise SystemExit(f"--pretrained {spec!r}: expected K=PATH or K:J=PATH")
        out[(int(k), int(j or 0))] = path
    return out


def finished(cell: Path, steps: int | None) -> bool:
    history = cell / "history.json"
    if not (cell / "model").is_dir() or not history.is_file():
        return False
    rows = json.loads(history.read_text())["history"]
    return bool(rows) and (steps is None or rows[-1]["step"] >= steps)


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args[:-1] else None


def ktm_command() -> list[str]:
    exe = shutil.which("ktm")
    return [exe] if exe else [sys.executable, "-c", "import sys; from ktm.cli import main; sys.exit(main())"]


def run(args, common: list[str]) -> None:
    pretrained = parse_pretrained(args.pretrained)
    steps = option(common, "--steps")
    cells = []
    for seed in args.seeds:
        for variant in args.variants:
            for k in ([1] if variant == "k1" else args.k):
                name = cell_name(variant, k, seed)
                if name not in {c[0] for c in cells}:
                    cells.append((name, variant_args(variant, k, pretrained) + ["--seed", str(seed)]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (name, extra) in enumerate(cells, 1):
        cell = out / name
        if finished(cell, int(steps) if steps else None):
            print(f"[{i}/{len(cells)}] {name}: done, kept")
            continue
        state = ["--resume"] if (cell / "checkpoint").is_dir() else ["--overwrite"]
        cmd = [*ktm_command(), "train", *common, *extra, "--out", str(cell), *state]
        print(f"[{i}/{len(cells)}] {name}: {' '.join(cmd[len(ktm_command()):])}", flush=True)
        start = time.time()
        with open(out / f"{name}.log", "a") as log:
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
        if code:
            raise SystemExit(f"{name} failed (exit {code}); see {out / f'{name}.log'}")
        last = json.loads((cell / "history.json").read_text())["history"][-1]
        print(f"    {last.get('metric', 'value')} {last['value']:.4f} at step {last['step']}, "
              f"{(time.time() - start) / 60:.1f} min", flush=True)


# --------------------------------------------------------------------------- report

REPORT_SOURCE = re.compile(r"^(?P<path>.*\.json)(?::(?P<label>.+))?$")


def cells_from_report(path: Path, label: str | None) -> dict[str, list[dict]]:
    """The cells of an earlier report's ``NAME.json`` (those of one LABEL, or the unlabelled ones),
    rebuilt from what :func:`summarise` kept: each seed's evaluations and its last row's numbers.
    So cells whose folders are gone (another machine) can be reported beside new ones."""
    cells = json.loads(path.read_text())["cells"]
    suffix = f" ({label})" if label else ""
    chosen = {name[:len(name) - len(suffix)]: g for name, g in cells.items()
              if (name.endswith(suffix) if label else not name.endswith(")"))}
    if not chosen:
        labels = sorted({m.group(1) for name in cells if (m := re.search(r" \((.+)\)$", name))})
        raise SystemExit(f"{path}: no cells {f'labelled {label!r}' if label else 'without a label'}; "
                         f"its labels: {', '.join(labels) or 'none'}")
    groups = {}
    for group, g in chosen.items():
        groups[group] = []
        for i, seed in enumerate(g["seeds"]):
            history = [{"step": step, "value": g["curve"][str(step)]["values"][i]} for step in g["steps"]]
            last = history[-1]
            last.update(value=g["final"]["values"][i], metric=g["metric"], train_loss=g["train_loss"]["values"][i],
                        elapsed_s=60 * g["wall_min"]["values"][i])
            if g.get("macro_f1"):
                last["macro_f1"] = g["macro_f1"]["values"][i]
            if g.get("majority"):
                last["majority_rate"] = g["majority"]["values"][i]
            groups[group].append({"seed": seed, "history": history,
                                  "argv": g["commands"][i].removeprefix("ktm ").split()})
    return groups


def read_sources(spec: str) -> dict[str, list[dict]]:
    """The cells of ``SOURCE[+SOURCE...]``, each a study folder or an earlier report ``NAME.json[:LABEL]``;
    a (group, seed) found in two sources is taken from the first."""
    groups: dict[str, list[dict]] = {}
    for source in spec.split("+"):
        m = REPORT_SOURCE.match(source)
        part = cells_from_report(Path(m["path"]), m["label"]) if m else read_cells(Path(source))
        for group, cells in part.items():
            have = {c["seed"] for c in groups.get(group, [])}
            groups.setdefault(group, []).extend(c for c in cells if c["seed"] not in have)
    for cells in groups.values():
        cells.sort(key=lambda c: c["seed"])
    return groups


def read_cells(folder: Path) -> dict[str, list[dict]]:
    """{group: [cell, ...]} of the finished cells, where a group is a cell name without its seed."""
    groups: dict[str, list[dict]] = {}
    for cell in sorted(folder.iterdir()):
        m = re.match(r"^(.*)-s(\d+)$", cell.name)
        if not m or not finished(cell, None):  # a cell still training is left out
            continue
        history = json.loads((cell / "history.json").read_text())["history"]
        config = json.loads((cell / "run_config.json").read_text())
        if history:
            groups.setdefault(m.group(1), []).append({"seed": int(m.group(2)), "history": history,
                                                      "argv": config.get("argv", [])})
    return groups


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values), "values": values}


def split_group(group: str) -> tuple[str, int]:
    """``(variant, K)`` of a group name (``k1`` and names without ``-kN`` are K = 1).

    >>> split_group("pre-ctx2-k4"), split_group("k1"), split_group("keep-first-k2")
    (('pre-ctx2', 4), ('k1', 1), ('keep-first', 2))
    """
    m = re.match(r"^(.*?)(?:-k(\d+))?$", group)
    return m.group(1), int(m.group(2) or 1)


def order(group: str) -> tuple:
    """Sort key of a group name: the references first (k1, keep-first), then scratch, pre,
    contextual and pretrained-contextual variants, each by K.

    >>> sorted(["pre-k4", "ctx2-k4", "k1", "scratch-k2", "scratch-k4", "keep-first-k4"], key=order)
    ['k1', 'keep-first-k4', 'scratch-k2', 'scratch-k4', 'pre-k4', 'ctx2-k4']
    """
    name, k = split_group(group)
    rank = {"k1": 0, "keep-first": 1, "scratch": 2, "pre": 3}.get(name, 5 if name.startswith("pre-") else 4)
    return rank, name, k


def summarise(groups: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for group, cells in sorted(groups.items(), key=lambda item: order(item[0])):
        steps = sorted(set.intersection(*({r["step"] for r in c["history"]} for c in cells)))
        curve = {s: spread([next(r["value"] for r in c["history"] if r["step"] == s) for c in cells]) for s in steps}
        final = [c["history"][-1] for c in cells]
        out[group] = {
            "seeds": [c["seed"] for c in cells], "steps": steps, "curve": curve,
            "final": spread([r["value"] for r in final]),
            "macro_f1": spread([r["macro_f1"] for r in final]) if all("macro_f1" in r for r in final) else None,
            "train_loss": spread([r.get("train_loss") or 0.0 for r in final]),
            "wall_min": spread([r.get("elapsed_s", 0.0) / 60 for r in final]),
            "metric": final[0].get("metric", "value"),
            "majority": spread([r["majority_rate"] for r in final]) if all("majority_rate" in r for r in final)
            else None,
            "commands": ["ktm " + " ".join(c["argv"]) for c in cells],
        }
    return out


def pretrain_rows(runs: list[str]) -> list[dict]:
    rows = []
    for spec in runs:
        path, _, label = spec.partition("=")
        record = json.loads((Path(path) / "pretrain.json").read_text())
        config = json.loads((Path(path) / "run_config.json").read_text())
        last = record["history"][-1]
        rows.append({"label": label or Path(path).name, "step": last["step"], "perplexity": last["value"],
                     "plain_perplexity": record["plain_perplexity"],
                     "no_context_perplexity": record.get("no_context_perplexity"),
                     "wall_min": last.get("elapsed_s", 0.0) / 60, "k": config["model"]["k"],
                     "context_layers": config["model"]["context_layers"],
                     "curve": [(r["step"], r["value"]) for r in record["history"]],
                     "command": "ktm " + " ".join(config.get("argv", []))})
    return rows


def references(group: str) -> list[str]:
    """The groups a merged variant is paired with: keep-first at its K, then K = 1.

    >>> references("pre-k4"), references("keep-first-k2"), references("k1")
    (['keep-first-k4', 'k1'], ['k1'], [])
    """
    name, k = split_group(group)
    if k == 1:
        return []
    return ["k1"] if name == "keep-first" else [f"keep-first-k{k}", "k1"]


def paired(groups: dict[str, list[dict]]) -> list[dict]:
    """Per-seed differences of each group's final value against its references (seeds both have)."""
    finals = {g: {c["seed"]: c["history"][-1] for c in cells} for g, cells in groups.items()}
    rows = []
    for group in sorted(groups, key=order):
        for ref in references(group):
            seeds = sorted(set(finals[group]) & set(finals.get(ref, {})))
            if not seeds:
                continue
            diffs = [finals[group][s]["value"] - finals[ref][s]["value"] for s in seeds]
            row = {"variant": group, "against": ref, "seeds": seeds, "diffs": diffs, **spread(diffs),
                   "wins": sum(d > 0 for d in diffs)}
            if all("macro_f1" in finals[g][s] for g in (group, ref) for s in seeds):
                f1 = [finals[group][s]["macro_f1"] - finals[ref][s]["macro_f1"] for s in seeds]
                row["macro_f1"] = {"diffs": f1, **spread(f1), "wins": sum(d > 0 for d in f1)}
            rows.append(row)
    return rows


def paired_markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = ["| variant | against | per seed (points) | mean ± sd | ahead on | macro-F1 per seed | macro-F1 mean ± sd |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        each = ", ".join(f"s{s}: {100 * d:+.1f}" for s, d in zip(r["seeds"], r["diffs"]))
        f1 = r.get("macro_f1")
        f1_each = ", ".join(f"s{s}: {d:+.3f}" for s, d in zip(r["seeds"], f1["diffs"])) if f1 else ""
        f1_mean = f"{f1['mean']:+.3f} ± {f1['sd']:.3f}" if f1 else ""
        lines.append(f"| {r['variant']} | {r['against']} | {each} | {100 * r['mean']:+.1f} ± {100 * r['sd']:.1f} "
                     f"| {r['wins']} of {len(r['seeds'])} seeds | {f1_each} | {f1_mean} |")
    return ("\n\nPaired differences in held-out accuracy and macro-F1 (variant minus reference, same seed: same "
            "batches and evaluation subset):\n\n" + "\n".join(lines))


def loco(args) -> None:
    """Write OUT/train.jsonl (the other categories' training reviews) and OUT/test.jsonl (every
    review of the held-out category)."""
    src, out = Path(args.reviews), Path(args.out)
    rows = {split: [json.loads(line) for line in (src / f"{split}.jsonl").read_text().splitlines() if line.strip()]
            for split in ("train", "dev")}
    categories = sorted({r.get("category") for split in rows.values() for r in split} - {None})
    if args.hold_out not in categories:
        raise SystemExit(f"--hold-out {args.hold_out!r}: the reviews' categories are {', '.join(categories) or 'none'}")
    train = [r for r in rows["train"] if r.get("category") != args.hold_out]
    test = [r for split in ("train", "dev") for r in rows[split] if r.get("category") == args.hold_out]
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("test", test)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    print(f"{out}: train {len(train)} reviews of {', '.join(c for c in categories if c != args.hold_out)}; "
          f"test {len(test)} reviews of {args.hold_out}")


def pct(s: dict) -> str:
    return f"{100 * s['mean']:.1f} ± {100 * s['sd']:.1f} ({100 * s['min']:.1f}-{100 * s['max']:.1f})"


def markdown(summary: dict[str, dict], pre: list[dict]) -> str:
    steps = sorted({s for g in summary.values() for s in g["steps"]})
    head = ["variant", "seeds", *(f"step {s}" for s in steps), "final: mean ± sd (range)", "macro-F1",
            "majority class", "train loss", "wall (min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for group, g in summary.items():
        curve = [f"{100 * g['curve'][s]['mean']:.1f}" if s in g["curve"] else "" for s in steps]
        f1 = f"{g['macro_f1']['mean']:.3f}" if g["macro_f1"] else ""
        majority = f"{100 * g['majority']['mean']:.1f}" if g.get("majority") else ""
        lines.append("| " + " | ".join([group, ",".join(map(str, g["seeds"])), *curve, pct(g["final"]), f1, majority,
                                        f"{g['train_loss']['mean']:.3f}", f"{g['wall_min']['mean']:.1f}"]) + " |")
    text = "\n".join(lines)
    text += ("\n\nHeld-out accuracy in % (mean over seeds at each evaluation; the final one with its standard "
             "deviation and range); the majority class's rate on the seeds' evaluation subsets (mean), and the "
             "mean macro-F1, train loss and wall time (training and evaluations) at the last step.")
    if pre:
        text += ("\n\nPretraining runs (held-out continuation perplexity):\n\n"
                 "| run | K | context layers | steps | merged | base model, plain prompt | base model, no prompt | "
                 "wall (min) |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n")
        text += "\n".join(f"| {r['label']} | {r['k']} | {r['context_layers']} | {r['step']} | {r['perplexity']:.1f} "
                          f"| {r['plain_perplexity']:.1f} | "
                          f"{'' if r['no_context_perplexity'] is None else format(r['no_context_perplexity'], '.1f')}"
                          f" | {r['wall_min']:.1f} |" for r in pre)
    return text


def plot(summary: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    colours = plt.get_cmap("tab20" if len(summary) > 10 else "tab10")
    for i, (group, g) in enumerate(summary.items()):
        xs = g["steps"]
        mean = [100 * g["curve"][s]["mean"] for s in xs]
        line, = ax.plot(xs, mean, marker="o", color=colours(i), linestyle="--" if group.endswith(")") else "-",
                        label=f"{group} (n={len(g['seeds'])})")
        if len(g["seeds"]) > 1:
            ax.fill_between(xs, [100 * g["curve"][s]["min"] for s in xs], [100 * g["curve"][s]["max"] for s in xs],
                            color=line.get_color(), alpha=0.12)
    rates = {seed: rate for g in summary.values() if g.get("majority")  # one rate per seed's subset
             for seed, rate in zip(g["seeds"], g["majority"]["values"])}
    if rates:
        ax.axhline(100 * statistics.fmean(rates.values()), color="grey", linestyle=":", linewidth=1.5,
                   label="majority class (mean over seeds)")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out accuracy (%), mean over seeds; range shaded")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args) -> None:
    summary, pairs = {}, []
    for spec in args.folders:
        folder, _, label = spec.partition("=")
        groups = read_sources(folder)
        if args.k:  # K = 1 stays as the reference
            groups = {g: cells for g, cells in groups.items() if split_group(g)[1] in {1, *args.k}}
        if args.seeds is not None:  # the same seeds for every variant, when some have more
            groups = {g: kept for g, cells in groups.items() if (kept := [c for c in cells if c["seed"] in args.seeds])}
        part = summarise(groups)
        if not part:
            raise SystemExit(f"{folder}: no finished cells" + (f" at K = {', '.join(map(str, args.k))}" if args.k else "")
                             + (f" of seeds {', '.join(map(str, args.seeds))}" if args.seeds is not None else ""))
        summary.update({f"{group} ({label})" if label else group: g for group, g in part.items()})
        pairs += [{**r, "variant": f"{r['variant']} ({label})" if label else r["variant"]}
                  for r in paired(groups)]  # pairs within one folder: the same setting
    pre = pretrain_rows(args.pretrain_runs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = markdown(summary, pre) + paired_markdown(pairs)
    commands = "\n".join(f"- {group}: `{g['commands'][0]}`" + (" (and the other seeds)" if len(g["commands"]) > 1
                                                                else "") for group, g in summary.items())
    commands += "".join(f"\n- pretraining {r['label']}: `{r['command']}`" for r in pre)
    out.with_suffix(".md").write_text(md + "\n\nCommands (one per cell; `--seed` and `--out` change per cell):\n\n"
                                      + commands + "\n")
    out.with_suffix(".json").write_text(json.dumps({"cells": summary, "paired": pairs, "pretraining": pre}, indent=1))
    plot(summary, out.with_suffix(".png"), args.title)
    print(md)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    common: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, common = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train the missing cells (options for ktm train after --)")
    r.add_argument("--out", required=True)
    r.add_argument("--variants", nargs="+", required=True)
    r.add_argument("--k", nargs="+", type=int, default=[4])
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--pretrained", nargs="*", default=[], metavar="K[:J]=PATH")
    p = sub.add_parser("report", help="tables and plot of a study folder")
    p.add_argument("folders", nargs="+", metavar="SOURCE[+SOURCE...][=LABEL]",
                   help="study folders, or earlier reports NAME.json[:LABEL] (their cells of that label); "
                        "sources joined by + are one setting; a LABEL is added to the names of its variants")
    p.add_argument("--out", required=True, help="output path without extension")
    p.add_argument("--title", default="held-out accuracy")
    p.add_argument("--pretrain-runs", nargs="*", default=[], metavar="RUN[=LABEL]")
    p.add_argument("--k", nargs="+", type=int, default=None,
                   help="report only the cells of these K (and the K = 1 reference)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="report only the cells of these seeds (default: every finished cell)")
    lo = sub.add_parser("loco", help="a leave-one-category-out split of a reviews folder")
    lo.add_argument("--reviews", required=True, help="folder with train.jsonl and dev.jsonl whose rows have 'category'")
    lo.add_argument("--hold-out", required=True, help="the category to test on")
    lo.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.command == "loco":
        loco(args)
    elif args.command == "run":
        if any(a in common for a in ("--k", "--seed", "--out", "--init-from", "--context-layers", "--method")):
            raise SystemExit("--k, --seed, --out, --init-from, --context-layers and --method are set per cell")
        run(args, common)
    else:
        report(args)


if __name__ == "__main__":
    main()
