"""Batched decoding on llama.cpp (issue 27): the same reviews answered one by one and B at a time.

For each batch size, the first N reviews of an Amazon JSONL file (``Review: {text}, Label:``) are
answered greedily by one export's :class:`~ktm.serve.llamacpp.LlamaCppEngine`; prints the wall
time, the new tokens per second over all prompts, and whether every answer equals the one-by-one
answer (batch size 1, always run first). A batch size's first run includes making its llama.cpp
context (one KV stream per sequence).

    python benchmarks/llamacpp_batch.py --export exports/k2-f32 --prompts 8 --batch-sizes 1 4 8 \\
        --threads 1 --out batch.json
"""

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    from ktm.serve.llamacpp import LlamaCppEngine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", required=True)
    ap.add_argument("--data", default="../shared/data/amazon/dev.jsonl")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--chars", type=int, default=600, help="each review cut to this many characters")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with open(args.data) as f:
        texts = [t for t in (json.loads(line)["text"].strip()[:args.chars] for line in f) if t][:args.prompts]
    prompts = [f"Review: {t}, Label:" for t in texts]
    engine = LlamaCppEngine(args.export, threads=args.threads)
    rows, alone = [], None
    for b in [1] + [b for b in args.batch_sizes if b != 1]:
        t0 = time.perf_counter()
        done = engine.generate(prompts, args.max_new_tokens, batch_size=b)
        wall = time.perf_counter() - t0
        tokens = [c.tokens for c in done]
        alone = alone or tokens
        rows.append({"batch_size": b, "prompts": len(prompts), "seconds": round(wall, 3),
                     "new_tokens": sum(map(len, tokens)), "tokens_per_s": round(sum(map(len, tokens)) / wall, 2),
                     "merged_lengths": [c.merged_length for c in done], "same_as_one_by_one": tokens == alone})
        print(json.dumps(rows[-1]), flush=True)
    engine.close()
    if args.out:
        Path(args.out).write_text(json.dumps({"export": Path(args.export).name, "threads": args.threads,
                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
