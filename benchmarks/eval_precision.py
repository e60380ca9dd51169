"""Greedy evaluation of a saved model in float32 against bf16 autocast (docs/PERFORMANCE.md,
"Evaluations in a bf16 run"): time, accuracy and how many answers differ, on one thread::

    python benchmarks/eval_precision.py --model RUN/model --reviews ../shared/data/amazon \\
        --review-chars 200 --examples 150 --out docs/perf/eval-precision.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a saved ktm model folder (or zoo:NAME)")
    ap.add_argument("--reviews", required=True, help="reviews folder (train.jsonl and dev.jsonl or test.jsonl)")
    ap.add_argument("--review-chars", type=int, default=200)
    ap.add_argument("--examples", type=int, default=150, help="the first N held-out reviews")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON file for the numbers")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ktm import KTokenMerging
    from ktm.tasks.amazon import AmazonTask
    from ktm.train.evaluate import evaluate

    model = KTokenMerging.from_pretrained(args.model)
    task = AmazonTask(args.reviews, max_chars=args.review_chars)
    examples = task.examples("test")[: args.examples]
    result = {}
    for name, dtype in (("float32", None), ("bf16", torch.bfloat16)):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            res = evaluate(model, task, examples, progress=False, keep_predictions=len(examples))
        result[name] = {"seconds": time.perf_counter() - start, "accuracy": res["value"],
                        "answers": [p["prediction"] for p in res["predictions"]]}
    differ = sum(a != b for a, b in zip(result["float32"].pop("answers"), result["bf16"].pop("answers")))
    summary = {**result, "examples": len(examples), "answers_differ": differ, "threads": args.threads,
               "speedup": result["float32"]["seconds"] / result["bf16"]["seconds"]}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
