"""Same answers (issue 27): llama.cpp's greedy tokens against ktm's PyTorch greedy tokens.

For the first N reviews of an Amazon JSONL file (prompt ``Review: {text}, Label:``), ktm's own
``generate`` (float32, one prompt at a time) gives the reference tokens; each export folder given
(``ktm export --format gguf``) answers the same prompts through llama.cpp. Where the tokens
differ, the first differing step is shown with the gap between the top two logits there, in
ktm's logits (teacher-forced on the common prefix) and in llama.cpp's: a near-tie makes the
difference a rounding matter rather than a wrong model.

    python benchmarks/llamacpp_agreement.py --checkpoint zoo:default-k2 \\
        --exports exports/k2-f32 exports/k2-q8_0 --prompts 100 --max-new-tokens 16 --out agreement.json

``--model`` loads the checkpoint on another base (e.g. a Hugging Face folder of the same weights,
whose export was converted). Each export's result also counts the prompts that llama.cpp's own
tokenizer (the GGUF's vocabulary) splits into ktm's tokens (``tokenize_same``).
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def reviews(path: str, n: int) -> list[str]:
    out = []
    with open(path) as f:
        for line in f:
            text = json.loads(line)["text"].strip()
            if text:
                out.append(f"Review: {text}, Label:")
            if len(out) == n:
                break
    return out


def top2_gap(logits) -> float:
    a = np.sort(np.asarray(logits, dtype=np.float64))[-2:]
    return float(a[1] - a[0])


@torch.inference_mode()
def ktm_logits_after(model, prompt: str, prefix: list[int]) -> np.ndarray:
    """ktm's next-token logits after the merged prompt and the answer tokens ``prefix``."""
    embeds, mask = model.merge_prompts([prompt])
    if prefix:
        embeds = torch.cat([embeds, model.embed(torch.tensor([prefix]))], 1)
        mask = torch.cat([mask, torch.ones(1, len(prefix), dtype=mask.dtype)], 1)
    return model.logits(model.decode(embeds, mask).last_hidden_state)[0, -1].float().numpy()


def llama_logits_after(engine, prompt: str, prefix: list[int]) -> np.ndarray:
    _, merged = engine.merge(prompt)
    logits = engine.prefill_embeddings(merged)
    for i, t in enumerate(prefix):
        logits = engine.step(t, len(merged) + i)
    return logits


def compare(model, engine, prompts, reference, max_new_tokens: int) -> dict:
    rows, same = [], 0
    for p, want in zip(prompts, reference):
        got = engine.complete(p, max_new_tokens).tokens
        if got == want:
            same += 1
            continue
        j = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        ours = ktm_logits_after(model, p, want[:j])
        theirs = llama_logits_after(engine, p, want[:j])
        rows.append({"prompt": p[:80], "step": j, "ktm": want[j:j + 3], "llama.cpp": got[j:j + 3],
                     "ktm_top2_gap": top2_gap(ours), "llama_top2_gap": top2_gap(theirs),
                     "max_logit_diff": float(np.abs(ours - theirs).max())})
    tokenized = sum(engine.llm.tokenize(p.encode(), add_bos=False, special=False) == engine.prompts.merger.tokenize([p])[0]
                    for p in prompts)
    return {"same": same, "total": len(prompts), "tokenize_same": tokenized, "differences": rows}


def main() -> None:
    from ktm import KTokenMerging
    from ktm.serve.llamacpp import LlamaCppEngine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="zoo:default-k2")
    ap.add_argument("--model", default=None, help="the base to load the checkpoint on (default: its own)")
    ap.add_argument("--exports", nargs="+", required=True)
    ap.add_argument("--data", default="../shared/data/amazon/dev.jsonl")
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--skip", type=int, default=0, help="compare only from this prompt on (to finish a run cut short)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference", default=None, help="cache of ktm's tokens (JSON), read or written")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    prompts = reviews(args.data, args.prompts)
    model = KTokenMerging.from_pretrained(args.checkpoint, base=args.model, device="cpu", dtype="float32").eval()
    cache = Path(args.reference) if args.reference else None
    if cache and cache.is_file():
        reference = json.loads(cache.read_text())
    else:
        reference = [model.generate([p], max_new_tokens=args.max_new_tokens, return_tokens=True)[0] for p in prompts]
        if cache:
            cache.write_text(json.dumps(reference))
    result = {}
    for folder in args.exports:
        engine = LlamaCppEngine(folder, threads=args.threads)
        result[Path(folder).name] = {"type": engine.meta["gguf"]["type"],
                          **compare(model, engine, prompts[args.skip:], reference[args.skip:], args.max_new_tokens)}
        engine.close()
        r = result[Path(folder).name]
        print(f"{folder} ({r['type']}): {r['same']}/{r['total']} prompts with the same greedy tokens; llama.cpp "
              f"tokenizes {r['tokenize_same']}/{r['total']} as ktm", flush=True)
        for d in r["differences"]:
            print(f"  step {d['step']}: ktm {d['ktm']} llama.cpp {d['llama.cpp']}; top-2 gap ktm "
                  f"{d['ktm_top2_gap']:.4f}, llama.cpp {d['llama_top2_gap']:.4f}; max |logit diff| "
                  f"{d['max_logit_diff']:.4f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
