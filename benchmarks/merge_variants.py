"""Probe of how merged prompts are laid out (docs/RECIPES.md, 2026-11-25).

    python benchmarks/merge_variants.py probe --k 1 2 4 --layout fixed lines tail12 \
        [--checkpoint runs/k1/model=K1-trained ...] --out docs/recipes/probe

``probe`` asks whether the *untrained* model already computes the answer (of the tree
task, or with ``--task amazon --reviews DIR`` the sentiment of a review): it reads each
prompt (merged with a mean encoder, no LoRA update), takes the hidden state of the last
prompt position at several layers, and fits a logistic-regression probe on training
questions. Held-out probe accuracy well above the majority class means the base model's
own circuits find the answer in that input; K = 1 learns the tree task fast because they
do. It also reports the norm of the hidden state at the first position, the attention
sink, against the other positions: merging the first block must not remove the sink.
Prints a table (layout x layer) and writes OUT.md / OUT.json with ``--out``.

Block layouts (:func:`segment_lengths`, :func:`merge_in_pieces`):

* ``fixed``: the paper's blocks of K from the prompt's first token;
* ``lines``: blocks never cross a line or field: the prompt is cut after every token that
  contains a newline or a comma, and each piece is merged into blocks of K from its own
  start;
* ``tailN``: the last N prompt tokens are not merged (the question and answer cue).

The training experiments this script used to run (``train --variant lines / tailN /
attention-pool / mixed-k``, each patching one model instance) all ended at the majority
class; their results and commands stay in docs/RECIPES.md, and their code is in the
project's history (``git show 1aa47f5:benchmarks/merge_variants.py``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from itertools import accumulate
from pathlib import Path

import torch

SEPARATORS = ("\n", ",")
LAYERS = (4, 8, 12, 16, 20, 24, 30)
SINK_LAYER = 20  # where SmolLM2's attention sink is clearest (hidden-state norm ~100x the rest)


# ---------------------------------------------------------------- block layouts
def segment_lengths(pieces: list[str], layout: str) -> list[int]:
    """Cut one prompt (its tokens' texts) into pieces that are merged separately.

    ``fixed``: one piece (the paper's layout). ``lines``: cut after every token that
    contains a newline or a comma. ``tailN``: the last N tokens each on their own (not
    merged), the rest one piece.

    >>> segment_lengths(["Tree", ":", " AB", "\\n", "+", "CD", ","], "lines")
    [4, 3]
    >>> segment_lengths(["a", "b", "c", "d", "e"], "tail2"), segment_lengths(["a", "b"], "fixed")
    ([3, 1, 1], [2])
    """
    n = len(pieces)
    if layout == "fixed":
        return [n]
    if layout == "lines":
        out, run = [], 0
        for text in pieces:
            run += 1
            if any(s in text for s in SEPARATORS):
                out.append(run)
                run = 0
        return out + ([run] if run else [])
    if layout.startswith("tail") and layout[4:].isdigit():
        tail = min(int(layout[4:]), n - 1)
        return [n - tail] + [1] * tail
    raise ValueError(f"unknown layout {layout!r}: fixed, lines or tailN")


def merge_in_pieces(model, ids: list[list[int]], layout: str) -> list[torch.Tensor]:
    """Each prompt's merged embeddings when it is merged piece by piece
    (:func:`segment_lengths`): every piece goes through ``model.merge_ids`` as if it were a
    prompt of its own, so its blocks start at its first token; the pieces are joined."""
    if layout == "fixed":
        return model.merge_ids(ids)
    pieces, counts = [], []
    for x in ids:
        ends = list(accumulate(segment_lengths([model.tokenizer.decode([t]) for t in x], layout)))
        pieces += [x[a:b] for a, b in zip([0, *ends[:-1]], ends)]
        counts.append(len(ends))
    merged = model.merge_ids(pieces)
    out, i = [], 0
    for n in counts:
        out.append(torch.cat(merged[i:i + n]))
        i += n
    return out


# ---------------------------------------------------------------- probe
def last_states(model, prompts: list[str], layers=LAYERS, layout: str = "fixed",
                batch: int = 64) -> tuple[torch.Tensor, dict]:
    """(N, len(layers), d) hidden states at each prompt's last merged position (the prompts
    merged with ``layout``), and the ``{"sink_norm", "other_norm", "merged_length"}``: the
    mean norm of the states at the first position (the attention sink) and at the others,
    at layer :data:`SINK_LAYER` (or the last), and the mean merged prompt length."""
    from ktm.model.blocks import pad_sequences

    out, sink, rest, lengths = [], [], [], []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            ids = model.tokenize(prompts[i:i + batch])
            embeds, mask = pad_sequences(merge_in_pieces(model, ids, layout), side="right")
            hs = model.decode(embeds, mask, all_layers=True).hidden_states
            last = mask.sum(1) - 1
            rows = torch.arange(len(last))
            out.append(torch.stack([hs[min(L, len(hs) - 1)][rows, last] for L in layers], 1).float())
            norms = hs[min(SINK_LAYER, len(hs) - 1)].norm(dim=-1).float()
            sink.append(norms[:, 0])
            rest.append(norms[:, 1:][mask[:, 1:].bool()])
            lengths.append(mask.sum(1).float())
    return torch.cat(out), {"sink_norm": float(torch.cat(sink).mean()), "other_norm": float(torch.cat(rest).mean()),
                            "merged_length": float(torch.cat(lengths).mean())}


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor,
                   l2: float = 1e-2) -> float:
    """Held-out accuracy of an L2-regularised logistic regression (standardised features)."""
    mu, sd = x.mean(0), x.std(0) + 1e-4
    x, xt = (x - mu) / sd, (xt - mu) / sd
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xt @ w + b > 0).float() == yt).float().mean())


def cmd_probe(args) -> int:
    from ktm import KTokenMerging
    from ktm.tasks import AmazonTask, TreeTask

    if args.task == "amazon":
        if not args.reviews:
            raise SystemExit("--task amazon needs --reviews FOLDER (e.g. ../shared/data/amazon)")
        task, positive = AmazonTask(args.reviews, max_chars=args.review_chars), "positive"
    else:
        task, positive = TreeTask(args.stage, num_trees=args.num_trees, seed=args.data_seed), "true"
    train = task.examples("train")
    random.Random(args.seed).shuffle(train)
    train, test = train[:args.train_examples], task.examples("test")[:args.test_examples or None]
    y = torch.tensor([e.answer == positive for e in train]).float()
    yt = torch.tensor([e.answer == positive for e in test]).float()
    majority = max(float(yt.mean()), 1 - float(yt.mean()))
    rows = []

    def probe(model, k, layout, label=None):
        feats, _ = last_states(model, [e.prompt for e in train], layers, layout)
        feats_t, stats = last_states(model, [e.prompt for e in test], layers, layout)
        accs = [probe_accuracy(feats[:, i], y, feats_t[:, i], yt) for i in range(len(layers))]
        row = {"k": k, "layout": layout, "model": label or "untrained",
               "accuracy_by_layer": dict(zip(map(str, layers), accs)), "best": max(accs), **stats}
        rows.append(row)
        print(f"K={k} {layout} {row['model']}: best {100 * row['best']:.1f}% " +
              " ".join(f"L{L}:{100 * a:.1f}" for L, a in zip(layers, accs)), flush=True)

    # one untrained model; K, encoder and layout are swapped in turn (LoRA stays at zero)
    model = KTokenMerging.from_base(args.model, k=1, seed=args.seed).eval()
    depth = model.llm_config.num_hidden_layers
    layers = [L for L in LAYERS if L <= depth] or [depth]
    for k in args.k:
        for layout in args.layout:
            if k == 1 and layout != "fixed":
                continue  # pieces of single tokens: the same as fixed
            probe(model.with_k(k), k, layout)
    for spec in args.checkpoint:  # trained models, each with its own K and the paper's layout
        path, _, label = spec.partition("=")
        trained = KTokenMerging.from_pretrained(path, base=args.model).eval()
        probe(trained, trained.k, "fixed", label or Path(path).parent.name)
    head = ("| K | layout | model | merged length | " + " | ".join(f"layer {L}" for L in layers) +
            f" | best | norm at position 0 / elsewhere (layer {SINK_LAYER}) |")
    lines = [head, "|" + " --- |" * (len(layers) + 6)]
    for r in rows:
        accs = " | ".join(f"{100 * a:.1f}" for a in r["accuracy_by_layer"].values())
        lines.append(f"| {r['k']} | {r['layout']} | {r['model']} | {r['merged_length']:.1f} | {accs} | "
                     f"{100 * r['best']:.1f} | {r['sink_norm']:.0f} / {r['other_norm']:.0f} |")
    lines.append(f"\nProbe accuracy in % on {len(test)} held-out {args.task} examples (majority class "
                 f"{100 * majority:.1f}%), trained on {len(train)}.")
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(f"Command: `python {' '.join(sys.argv)}`\n\n{table}\n")
        out.with_suffix(".json").write_text(json.dumps({"majority_rate": majority, "rows": rows}, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    probe = sub.add_parser("probe", help="linear probe of the untrained model per K and block layout")
    probe.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M)")
    probe.add_argument("--task", choices=["tree", "amazon"], default="tree",
                       help="binary task whose answer is probed (tree: true/false; amazon: positive/negative)")
    probe.add_argument("--reviews", default=None, help="amazon: folder with train.jsonl and dev.jsonl")
    probe.add_argument("--review-chars", type=int, default=0, help="amazon: cut each review to this many characters")
    probe.add_argument("--stage", default="small")
    probe.add_argument("--num-trees", type=int, default=2000)
    probe.add_argument("--data-seed", type=int, default=0)
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument("--out", default=None)
    probe.add_argument("--k", type=int, nargs="*", default=[1, 2, 4], help="untrained models to probe")
    probe.add_argument("--layout", nargs="+", default=["fixed"], help="fixed, lines, tailN")
    probe.add_argument("--train-examples", type=int, default=1500)
    probe.add_argument("--test-examples", type=int, default=0, help="0: all held-out questions")
    probe.add_argument("--checkpoint", nargs="*", default=[], metavar="DIR[=LABEL]",
                       help="also probe these trained ktm models (their own K)")
    return cmd_probe(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
