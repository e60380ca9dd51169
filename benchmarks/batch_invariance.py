"""How exactly does a prompt get the same logits alone and inside a padded batch?

    python benchmarks/batch_invariance.py [--model PATH_OR_ID] [--ks 1 4] [--dtypes float32 bfloat16]
        [--prompts 8] [--max-new-tokens 16] [--device cpu] [--out docs/reliability/batch_invariance]

Takes real prompts of different lengths: Amazon reviews (``Review: {text}, Label:``, from
``../shared/data/amazon/dev.jsonl`` when that file exists) and Textualized Tree questions
(``ktm.tasks.TreeTask``). For each dtype and K it runs the prompts as one left-padded batch
and each prompt alone, and reports the largest absolute difference of the first-step
(prefill) logits, the largest logit, and whether greedy decoding gives the same tokens.
The model is untrained (``KTokenMerging.from_base``: LoRA adapters that start at zero, the
exact-mean encoder), so the numbers measure the arithmetic of batching and padding, not a
trained model. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AMAZON = ROOT.parent / "shared" / "data" / "amazon" / "dev.jsonl"


def real_prompts(n: int, amazon: Path = AMAZON) -> list[dict]:
    """``n`` prompts of spread-out lengths: half Amazon reviews (when the file exists), the
    rest tree questions of growing stages. Each is ``{"source", "prompt"}``."""
    from ktm.tasks.tree import TreeTask

    out = []
    if amazon.is_file():
        rows = [json.loads(line) for line in amazon.read_text().splitlines() if line.strip()]
        rows.sort(key=lambda r: len(r["text"]))
        want = n // 2
        # the shortest, the longest under ~2,000 characters, and evenly between
        usable = [r for r in rows if len(r["text"]) <= 2000]
        picks = [usable[round(i * (len(usable) - 1) / max(want - 1, 1))] for i in range(want)]
        out += [{"source": f"amazon dev ({len(r['text'])} chars)", "prompt": f"Review: {r['text']}, Label:"}
                for r in picks]
    stages = ["small", "medium", "large", "x3large"]
    for i in range(n - len(out)):
        stage = stages[i % len(stages)]
        e = TreeTask(stage, num_trees=40, seed=i).examples("test")[0]
        out.append({"source": f"tree {stage}", "prompt": e.prompt})
    return out


def measure(model, prompts: list[str], max_new_tokens: int) -> dict:
    """Prefill logits and greedy tokens of ``prompts`` as one batch vs each alone."""
    import torch

    with torch.inference_mode():
        batch_logits = model.prefill(model.tokenize(prompts))[0].float()
        batch_tokens = model.generate(prompts, max_new_tokens, return_tokens=True)
        rows = []
        for i, p in enumerate(prompts):
            alone_logits = model.prefill(model.tokenize([p]))[0][0].float()
            alone_tokens = model.generate([p], max_new_tokens, return_tokens=True)[0]
            same = alone_tokens == batch_tokens[i]
            first_diff = None if same else next(
                (j for j, (a, b) in enumerate(zip(alone_tokens, batch_tokens[i])) if a != b),
                min(len(alone_tokens), len(batch_tokens[i])))
            rows.append({"tokens": len(model.tokenize([p])[0]), "merged": model.compressed_length(p),
                         "max_abs_diff": (alone_logits - batch_logits[i]).abs().max().item(),
                         "max_abs_logit": alone_logits.abs().max().item(),
                         "argmax_same": int(alone_logits.argmax()) == int(batch_logits[i].argmax()),
                         "greedy_same": same, "greedy_first_diff": first_diff})
    return {"max_abs_diff": max(r["max_abs_diff"] for r in rows),
            "max_abs_logit": max(r["max_abs_logit"] for r in rows),
            "greedy_identical": sum(r["greedy_same"] for r in rows), "prompts": len(rows), "rows": rows}


def to_markdown(report: dict) -> str:
    lines = [
        "# Batch invariance on the embedded model",
        "",
        f"Measured {report['date']} with `{report['command']}`",
        f"({report['model']}, device {report['device']}, torch {report['torch']}, "
        f"{report['machine']}).",
        "",
        f"{len(report['prompts'])} real prompts of {min(p['tokens'] for p in report['prompts'])} to "
        f"{max(p['tokens'] for p in report['prompts'])} tokens, run as one left-padded batch and each "
        f"alone. The model is untrained (LoRA at zero, exact-mean encoder). Greedy decoding: "
        f"{report['max_new_tokens']} new tokens.",
        "",
        "| dtype | K | largest abs. difference of first-step logits | largest abs. logit | "
        "first-step argmax equal | greedy tokens identical |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        argmax = sum(x["argmax_same"] for x in r["rows"])
        lines.append(f"| {r['dtype']} | {r['k']} | {r['max_abs_diff']:.2e} | {r['max_abs_logit']:.1f} | "
                     f"{argmax}/{r['prompts']} | {r['greedy_identical']}/{r['prompts']} |")
    lines += ["", "Prompts:", ""]
    lines += [f"- {p['source']}: {p['tokens']} tokens" for p in report["prompts"]]
    lines += ["", f"Per prompt and the raw numbers: `{Path(report['json']).name}`.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M)")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=8, help="how many prompts (half Amazon reviews)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "docs" / "reliability" / "batch_invariance"),
                    help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)

    import torch

    from ktm import KTokenMerging

    prompts = real_prompts(args.prompts)
    report = {"command": "python benchmarks/batch_invariance.py" + "".join(f" {shlex.quote(a)}" for a in
                                                                          (argv if argv is not None else sys.argv[1:])),
              "date": datetime.date.today().isoformat(), "model": args.model or "embedded SmolLM2-135M-Instruct",
              "device": args.device, "torch": torch.__version__,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "max_new_tokens": args.max_new_tokens, "results": []}
    for dtype in args.dtypes:
        t0 = time.perf_counter()
        base = KTokenMerging.from_base(args.model, k=args.ks[0], dtype=dtype, device=args.device, seed=0).eval()
        print(f"loaded {dtype} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if "prompts" not in report:
            report["prompts"] = [{**p, "tokens": len(base.tokenize([p["prompt"]])[0])} for p in prompts]
        for k in args.ks:
            torch.manual_seed(k)
            model = base.with_k(k).eval()
            r = {"dtype": dtype, "k": k, **measure(model, [p["prompt"] for p in prompts], args.max_new_tokens)}
            report["results"].append(r)
            print(f"{dtype:9s} K = {k}: max |logit diff| {r['max_abs_diff']:.2e} (max |logit| "
                  f"{r['max_abs_logit']:.1f}), greedy identical {r['greedy_identical']}/{r['prompts']}")
        del base
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report["json"] = out.with_suffix(".json").name
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(report))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
