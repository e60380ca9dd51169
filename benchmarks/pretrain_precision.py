"""Pretraining step rate and loss curve in float32 against bfloat16 autocast, in one run.

Two copies of the same merged model (same seed, same initial weights) take the same batches of
prose windows, one step each in turn, so that the machine's noise falls on both alike. Each
step is the shipped mergers' pretraining step (continuation KL + hidden-state distillation,
:data:`ktm.train.zoo.ZOO`); the bf16 copy runs it under ``torch.autocast`` as accelerate does
for ``mixed_precision="bf16"``, with float32 master weights and optimizer.

    python benchmarks/pretrain_precision.py --k 2 --steps 40 --threads 1 --out docs/perf/pretrain-precision

Writes OUT.json (every step's time and losses) and OUT.md (the summary) and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def batches(tokenizer, path: str, steps: int, batch: int, prompt: int, cont: int):
    from ktm.train.fidelity import prose_windows

    wins = prose_windows(path, tokenizer, prompt, cont, windows=steps * batch)
    return [wins[i:i + batch] for i in range(0, len(wins), batch)][:steps]


def step(model, opt, chunk, bf16: bool, layers) -> tuple[float, dict]:
    from ktm.config import LossWeights
    from ktm.train.objectives import add_auxiliary

    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model([e.prompt for e in chunk], [e.answer for e in chunk], all_layers=True, end_token=False)
        out = add_auxiliary(model, out, LossWeights(distill_answer=1.0, task_loss=0.0, distill_hidden=layers,
                                                    distill_hidden_weight=0.5))
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, {k: float(v) for k, v in out.parts.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--text", default="../shared/data/text/train.jsonl")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--continuation-tokens", type=int, default=32)
    p.add_argument("--out", required=True, help="OUT.json and OUT.md are written")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ktm import KTokenMerging

    models, opts = {}, {}
    for mode in ("float32", "bf16"):
        m = KTokenMerging.from_base(None, k=args.k, encoder_hidden=256, lora_r=8, lora_alpha=16, seed=0).train()
        models[mode] = m
        opts[mode] = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-3)
    data = batches(models["float32"].tokenizer, args.text, args.steps, args.batch_size, args.prompt_tokens,
                   args.continuation_tokens)
    rows = []
    for i, chunk in enumerate(data):
        row = {"step": i + 1}
        for mode in ("float32", "bf16"):
            t, parts = step(models[mode], opts[mode], chunk, mode == "bf16", (15, 30))
            row[mode] = {"seconds": t, **parts}
        rows.append(row)
        print(f"step {i + 1}: " + ", ".join(f"{m} {row[m]['seconds']:.1f} s KL {row[m]['distill_answer']:.3f}"
                                            for m in ("float32", "bf16")), flush=True)
    summary = summarise(rows, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"summary": summary, "steps": rows}, indent=1))
    out.with_suffix(".md").write_text(report(summary))
    print(report(summary))
    return 0


def summarise(rows: list[dict], args) -> dict:
    warm = rows[2:] or rows  # the first steps include one-off allocation
    med = {m: statistics.median(r[m]["seconds"] for r in warm) for m in ("float32", "bf16")}
    last = rows[-10:]
    loss = {m: {name: statistics.mean(r[m][name] for r in last) for name in ("distill_answer", "distill_hidden")}
            for m in ("float32", "bf16")}
    return {"k": args.k, "steps": len(rows), "batch_size": args.batch_size, "threads": args.threads,
            "window": args.prompt_tokens + args.continuation_tokens, "median_step_s": med,
            "speedup": med["float32"] / med["bf16"], "last10_loss": loss,
            "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
            "date": time.strftime("%Y-%m-%d")}


def report(s: dict) -> str:
    f, b = s["last10_loss"]["float32"], s["last10_loss"]["bf16"]
    return (f"# Pretraining step: float32 vs bf16 autocast (K = {s['k']}, {s['steps']} steps of {s['batch_size']} "
            f"windows of {s['window']} tokens, {s['threads']} thread(s), {s['date']})\n\n"
            "| | float32 | bf16 autocast |\n| --- | --- | --- |\n"
            f"| median step (s) | {s['median_step_s']['float32']:.2f} | {s['median_step_s']['bf16']:.2f} |\n"
            f"| continuation KL, mean of last 10 steps | {f['distill_answer']:.4f} | {b['distill_answer']:.4f} |\n"
            f"| hidden-state distance, mean of last 10 | {f['distill_hidden']:.4f} | {b['distill_hidden']:.4f} |\n\n"
            f"bf16 runs a step {s['speedup']:.2f}x as fast. Machine: {s['machine']}.\n")


if __name__ == "__main__":
    raise SystemExit(main())
