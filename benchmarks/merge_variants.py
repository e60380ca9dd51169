"""Experiments on how merged prompts are laid out and learned (docs/RECIPES.md, 2026-11-25).

Two subcommands, on the Textualized Tree and the embedded SmolLM2-135M by default:

    python benchmarks/merge_variants.py probe --k 1 2 4 --layout fixed lines tail12 \
        [--checkpoint runs/k1/model=K1-trained ...] --out docs/recipes/probe
    python benchmarks/merge_variants.py train --k 4 --variant lines --out runs/variants/k4-lines

``probe`` asks whether the *untrained* model already computes the answer: it reads each
prompt (merged with a mean encoder, no LoRA update), takes the hidden state of the last
prompt position at several layers, and fits a logistic-regression probe on training
questions. Held-out probe accuracy well above the majority class means the base model's
own circuits find the answer in that input; K = 1 learns the tree task fast because they
do. It also reports the norm of the hidden state at the first position, the attention
sink, against the other positions: merging the first block must not remove the sink.
Prints a table (layout x layer) and writes OUT.md / OUT.json with ``--out``.

``train`` runs the ``fast`` recipe with one change, through ktm's own trainer (history in
``OUT/history.json``, settings in ``OUT/run_config.json``; plot with
``benchmarks/recipe_curves.py``). The variants:

* ``lines``: blocks never cross a line or field: the prompt is first cut after every
  token that contains a newline or a comma, and each piece is merged into blocks of K
  from its own start. Each tree node (its ``+`` depth marks and name) and each question
  field (``Parent: XY,``) then has blocks of its own; prompts get slightly longer.
* ``tailN``: the last N prompt tokens are not merged (the question and answer cue).
* ``attention-pool``: the encoder's mean becomes a learned softmax-weighted mean,
  ``sum_i softmax(v . x_i + b_i) x_i`` (+ the usual MLP), exactly the mean at the start, so
  that it can learn to keep the names and drop the punctuation.
* ``mixed-k``: half of every batch is read plain (K = 1) and half merged, with one LoRA:
  the plain half learns the task in ~150 steps; does the merged half follow?

These are experiments, not library features: each patches one model instance here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import types
from itertools import accumulate
from pathlib import Path

import torch
from torch import nn

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


def use_layout(model, layout: str):
    """Make ``model`` merge each prompt piece by piece (:func:`segment_lengths`): every
    piece goes through the model's own ``merge_ids`` as if it were a prompt of its own, so
    its blocks start at its first token, and the pieces' merged embeddings are joined.
    Returns ``model``."""
    if layout == "fixed":
        model.__dict__.pop("merge_ids", None)  # back to the model's own method
        return model
    own = type(model).merge_ids

    def merge_ids(self, ids):
        pieces, counts = [], []
        for x in ids:
            ends = list(accumulate(segment_lengths([self.tokenizer.decode([t]) for t in x], layout)))
            pieces += [x[a:b] for a, b in zip([0, *ends[:-1]], ends)]
            counts.append(len(ends))
        merged = own(self, pieces)
        out, i = [], 0
        for n in counts:
            out.append(torch.cat(merged[i:i + n]))
            i += n
        return out

    model.merge_ids = types.MethodType(merge_ids, model)
    return model


class AttentionPool(nn.Module):
    """``sum_i softmax(v . x_i + b_i) x_i + MLP(x)`` around a MergeEncoder's MLP; v = b = 0
    at the start, so it begins as the exact mean."""

    def __init__(self, encoder):
        super().__init__()
        self.inner = encoder
        self.k, self.dim, self.hidden, self.init = encoder.k, encoder.dim, encoder.hidden, "attention-pool"
        self.v = nn.Parameter(torch.zeros(encoder.dim))
        self.b = nn.Parameter(torch.zeros(encoder.k))

    def forward(self, blocks, valid=None):
        w = torch.softmax(blocks @ self.v.to(blocks.dtype) + self.b.to(blocks.dtype), -1)
        return (w[..., None] * blocks).sum(-2) + self.inner.mlp(blocks.flatten(-2))


def use_mixed_k(model, plain_fraction: float = 0.5) -> None:
    """Read the first ``plain_fraction`` of every training batch plain (K = 1), the rest
    merged; the loss is the mean of the two halves' losses. ``parts['task']`` is the merged
    half's loss (comparable with other runs), ``parts['plain']`` the plain half's."""
    from ktm.encoder import build_encoder
    from ktm.model import KTokenMerging

    identity = build_encoder(1, model.encoder.dim, None, "mean", False, None)

    def forward(self, prompts, answers, **aux):
        if not self.training:
            return KTokenMerging.forward(self, prompts, answers, **aux)
        h = max(1, int(len(prompts) * plain_fraction))
        k, encoder = self.config.k, self.encoder
        self.config.k, self.encoder = 1, identity
        try:
            plain = KTokenMerging.forward(self, prompts[:h], answers[:h])
        finally:
            self.config.k, self.encoder = k, encoder
        merged = KTokenMerging.forward(self, prompts[h:], answers[h:], **aux)
        # the merged half carries what the auxiliary losses need
        return dataclasses.replace(merged, loss=(plain.loss + merged.loss) / 2,
                                   parts={**merged.parts, "plain": plain.loss.detach()})

    model.forward = types.MethodType(forward, model)


# ---------------------------------------------------------------- probe
def last_states(model, prompts: list[str], layers=LAYERS, batch: int = 64) -> tuple[torch.Tensor, dict]:
    """(N, len(layers), d) hidden states at each prompt's last merged position, and the
    ``{"sink_norm", "other_norm", "merged_length"}``: the mean norm of the states at the
    first position (the attention sink) and at the others, at layer :data:`SINK_LAYER` (or
    the last), and the mean merged prompt length."""
    out, sink, rest, lengths = [], [], [], []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            embeds, mask = model.merge_prompts(prompts[i:i + batch], side="right")
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
        loss = nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xt @ w + b > 0).float() == yt).float().mean())


def cmd_probe(args) -> int:
    from ktm import KTokenMerging
    from ktm.tasks import TreeTask

    task = TreeTask(args.stage, num_trees=args.num_trees, seed=args.data_seed)
    train = task.examples("train")
    random.Random(args.seed).shuffle(train)
    train, test = train[:args.train_examples], task.examples("test")[:args.test_examples or None]
    y = torch.tensor([e.answer == "true" for e in train]).float()
    yt = torch.tensor([e.answer == "true" for e in test]).float()
    majority = max(float(yt.mean()), 1 - float(yt.mean()))
    rows = []

    def probe(model, k, layout, label=None):
        feats, _ = last_states(model, [e.prompt for e in train], layers)
        feats_t, stats = last_states(model, [e.prompt for e in test], layers)
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
            probe(use_layout(model.with_k(k), layout), k, layout)
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
    lines.append(f"\nProbe accuracy in % on {len(test)} held-out questions (majority class "
                 f"{100 * majority:.1f}%), trained on {len(train)}.")
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(f"Command: `python {' '.join(sys.argv)}`\n\n{table}\n")
        out.with_suffix(".json").write_text(json.dumps({"majority_rate": majority, "rows": rows}, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------- train
def cmd_train(args) -> int:
    from ktm import KTokenMerging
    from ktm.config import save_json, to_dict
    from ktm.recipes import get_recipe
    from ktm.tasks import TreeTask
    from ktm.trainer import Trainer

    recipe = get_recipe("fast")
    model_cfg = recipe.model_config(k=args.k)
    train_cfg = recipe.train_config(steps=args.steps, batch_size=args.batch_size, eval_every=args.eval_every,
                                    eval_examples=args.eval_examples, seed=args.seed)
    model = KTokenMerging.from_base(args.model, seed=args.seed, **vars(model_cfg))
    if args.variant == "attention-pool":
        model.encoder = AttentionPool(model.encoder)
    elif args.variant == "mixed-k":
        use_mixed_k(model, args.plain_fraction)
    else:
        use_layout(model, args.variant)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "run_config.json", {"recipe": f"fast + {args.variant}", "model": to_dict(model_cfg),
                                        "train": to_dict(train_cfg),
                                        "argv": ["benchmarks/merge_variants.py", *sys.argv[1:]]})
    # no checkpoints: the variants' encoders and forward passes are patched, so the history
    # is written after every evaluation instead (the trainer logs one line per evaluation)
    trainer = Trainer(model, train_cfg, output_dir=None)
    log = trainer.log

    def log_and_save(line):
        log(line)
        save_json(out / "history.json", {"history": trainer.history})

    trainer.log = log_and_save
    trainer.fit(TreeTask(args.stage, num_trees=args.num_trees, seed=args.data_seed))
    last = trainer.history[-1]
    print(f"final accuracy {last['value']:.4f} (majority {last['majority_rate']:.4f}); history in {out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("probe", "train"):
        s = sub.add_parser(name)
        s.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M)")
        s.add_argument("--stage", default="small")
        s.add_argument("--num-trees", type=int, default=2000)
        s.add_argument("--data-seed", type=int, default=0)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--out", default=None)
    probe = sub.choices["probe"]
    probe.add_argument("--k", type=int, nargs="*", default=[1, 2, 4], help="untrained models to probe")
    probe.add_argument("--layout", nargs="+", default=["fixed"], help="fixed, lines, tailN")
    probe.add_argument("--train-examples", type=int, default=1500)
    probe.add_argument("--test-examples", type=int, default=0, help="0: all held-out questions")
    probe.add_argument("--checkpoint", nargs="*", default=[], metavar="DIR[=LABEL]",
                       help="also probe these trained ktm models (their own K)")
    train = sub.choices["train"]
    train.add_argument("--k", type=int, default=4)
    train.add_argument("--variant", required=True, help="lines, tailN, attention-pool or mixed-k")
    train.add_argument("--plain-fraction", type=float, default=0.5, help="mixed-k: rows read plain")
    train.add_argument("--steps", type=int, default=250)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--eval-every", type=int, default=50)
    train.add_argument("--eval-examples", type=int, default=196)
    args = p.parse_args(argv)
    if args.command == "train" and not args.out:
        p.error("train needs --out")
    return cmd_probe(args) if args.command == "probe" else cmd_train(args)


if __name__ == "__main__":
    raise SystemExit(main())
