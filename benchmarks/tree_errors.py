"""Accuracy of trained models on the Textualized Tree, by how the two asked nodes relate.

    python benchmarks/tree_errors.py runs/k1/model=K1 runs/k4/model=K4 [--stage small]
        [--examples 196] [--seed 0] [--out docs/recipes/errors]

Each question asks whether Parent is the direct parent of Child. The answer is `true` only
for the relation `parent`; every other relation (the reverse edge, siblings, grandparent,
grandchild, more distant pairs) is a `false`. A model at the majority class gets every
`parent` question wrong and every other one right; a model that has learned part of the
task shows which relations it has learned. The held-out questions are the same subset
that `ktm train --eval-examples N --seed S` scores (the same subsample and seed).
Prints a table (one row per relation, one column per model) and, with ``--out``, writes
it as ``OUT.md`` and the numbers as ``OUT.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

RELATIONS = ("parent", "child", "sibling", "grandparent", "grandchild", "other")


def relation(parents: tuple[int, ...], p: int, c: int) -> str:
    """How node ``p`` relates to node ``c`` in a tree given by its parent indices.

    >>> relation((-1, 0, 0), 0, 1), relation((-1, 0, 0), 1, 0), relation((-1, 0, 0), 1, 2)
    ('parent', 'child', 'sibling')
    >>> relation((-1, 0, 1), 0, 2), relation((-1, 0, 1), 2, 0), relation((-1, 0, 1, 0), 2, 3)
    ('grandparent', 'grandchild', 'other')
    """
    if parents[c] == p:
        return "parent"
    if parents[p] == c:
        return "child"
    if parents[p] == parents[c]:
        return "sibling"
    if parents[c] >= 0 and parents[parents[c]] == p:
        return "grandparent"
    if parents[p] >= 0 and parents[parents[p]] == c:
        return "grandchild"
    return "other"


def question_relation(prompt: str) -> str:
    """The relation that a tree question's prompt asks about."""
    from ktm.tasks.tree import parse_question, parse_tree

    rendered, parent, child = parse_question(prompt)
    tree = parse_tree(rendered)
    return relation(tree.parents, tree.names.index(parent), tree.names.index(child))


def by_relation(predictions: list[dict], normalise) -> dict[str, dict]:
    """{relation: {"n", "correct", "accuracy"}} from evaluate()'s predictions."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for row in predictions:
        rel = question_relation(row["prompt"])
        counts[rel]["n"] += 1
        counts[rel]["correct"] += normalise(row["prediction"]) == normalise(row["answer"])
    return {rel: {"n": c["n"], "correct": c["correct"], "accuracy": c["correct"] / c["n"]}
            for rel in RELATIONS if (c := counts.get(rel))}


def table(results: dict[str, dict[str, dict]]) -> str:
    labels = list(results)
    rels = [r for r in RELATIONS if any(r in res for res in results.values())]
    lines = ["| relation (answer) | n | " + " | ".join(labels) + " |",
             "| --- | --- |" + " --- |" * len(labels)]
    for rel in rels:
        n = next(res[rel]["n"] for res in results.values() if rel in res)
        answer = "true" if rel == "parent" else "false"
        cells = [f"{100 * res[rel]['accuracy']:.1f}" if rel in res else "" for res in results.values()]
        lines.append(f"| {rel} ({answer}) | {n} | " + " | ".join(cells) + " |")
    totals = []
    for res in results.values():
        n, correct = sum(r["n"] for r in res.values()), sum(r["correct"] for r in res.values())
        totals.append(f"{100 * correct / n:.1f}")
    lines.append(f"| all | {sum(r['n'] for r in next(iter(results.values())).values())} | "
                 + " | ".join(totals) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="saved ktm model folders, each optionally as FOLDER=LABEL")
    ap.add_argument("--stage", default="small")
    ap.add_argument("--num-trees", type=int, default=2000)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--examples", type=int, default=196, help="held-out questions (0: all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the subsample (ktm train's --seed)")
    ap.add_argument("--model", default=None, help="base model (default: the embedded one)")
    ap.add_argument("--out", help="write OUT.md and OUT.json")
    args = ap.parse_args(argv)

    from ktm import KTokenMerging
    from ktm.train.evaluate import evaluate, subsample
    from ktm.tasks import TreeTask

    task = TreeTask(args.stage, num_trees=args.num_trees, seed=args.data_seed)
    examples = subsample(task.examples("test"), args.examples, args.seed)
    results = {}
    for spec in args.models:
        folder, _, label = spec.partition("=")
        model = KTokenMerging.from_pretrained(folder, base=args.model, device="cpu")
        res = evaluate(model, task, examples, keep_predictions=len(examples))
        results[label or folder] = by_relation(res["predictions"], task.normalise)
        del model
    text = table(results)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/tree_errors.py " + " ".join(argv if argv is not None else sys.argv[1:])
        out.with_suffix(".md").write_text(f"`{command}`\n\nAccuracy in %, by relation of Parent to Child.\n\n"
                                          f"{text}\n")
        out.with_suffix(".json").write_text(json.dumps({"command": command, "results": results}, indent=1))


if __name__ == "__main__":
    main()
