"""Merged prompts on llama.cpp, timed (issue 27); one process, one JSON object per line.

* ``prefill``: for L in --lengths and K in --ks, llama.cpp reading L plain tokens, reading the
  ``ceil(L / K)`` merged embeddings (host merge included: ids -> merged, then the embeddings
  prefill), and reading L/K plain tokens (the ideal); medians of --repeats. The speedup over
  plain and its share of the ideal speedup; the merge's share of the merged prefill. K = 2 runs
  the export's own encoder; other K an untrained encoder of the paper's width for that K
  (timing does not depend on the weights). Tokenisation is left out of every path.
* ``merge_share``: the host merge of --share-batch prompts of --share-length tokens (one call)
  against llama.cpp prefilling them merged one after another (B x one prompt's prefill).
* ``decode``: tokens/s of llama.cpp's own step loop after a plain prompt, and of the engine's
  decoding (host-side pick and detokenisation included) after the merged prompt and after the
  same prompt read plainly (its own overhead); interleaved, medians of --repeats.
* ``pytorch``: ktm's PyTorch path on the same checkpoint: merged prefill at --pytorch-length
  and decoding tokens/s (--checkpoint).
* ``server``: time to first token through ktm's HTTP server (streaming, 127.0.0.1) against the
  engine called directly, and a bounded load test (--load-requests over --load-clients
  connections) with latency percentiles.

    OMP_NUM_THREADS=2 python benchmarks/llamacpp_speed.py --export exports/k2-f32 --threads 2
"""

import argparse
import http.client
import json
import statistics
import threading
import time
import timeit
from pathlib import Path

import numpy as np


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn``."""
    return statistics.median(timeit.repeat(fn, number=1, repeat=repeats))


def long_ids(engine, path: str, length: int) -> list[int]:
    """``length`` token ids of real text (documents of the file, joined)."""
    ids = []
    with open(path) as f:
        for line in f:
            ids += engine.prompts.tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            if len(ids) >= length:
                return ids[:length]
    raise ValueError(f"{path} has fewer than {length} tokens")


HIDDEN = None  # encoder MLP width for K other than the export's (--hidden; None: the paper's)


def with_k(engine, k: int):
    """The engine's PromptEncoder for K = k (its own when k is the export's)."""
    from ktm.config import ModelConfig
    from ktm.model.encoder import encoder_from_config
    from ktm.serve.serving import PromptEncoder

    p = engine.prompts
    if k == p.k:
        return p
    config = ModelConfig(k=k, encoder_hidden=HIDDEN)
    encoder = encoder_from_config(config, p.hidden_size).eval().requires_grad_(False)
    return PromptEncoder(p.tokenizer, p.table, encoder, config, p.max_positions, p.name)


def prefill(engine, ids, ks, repeats: int) -> list[dict]:
    rows = []
    plain = timed(lambda: engine.prefill_tokens(ids), repeats)
    for k in ks:
        enc = with_k(engine, k)
        short = ids[: -(-len(ids) // k)]
        ideal = timed(lambda: engine.prefill_tokens(short), repeats) if k > 1 else plain
        merge = timed(lambda: enc.merge_ids(ids), repeats)
        merged_rows = enc.merge_ids(ids).float().numpy()
        merged = timed(lambda: engine.prefill_embeddings(enc.merge_ids(ids).float().numpy()), repeats)
        rows.append({"what": "prefill", "L": len(ids), "K": k, "positions": len(merged_rows),
                     "plain_s": plain, "merged_s": merged, "ideal_s": ideal, "merge_s": merge,
                     "speedup": plain / merged, "ideal_speedup": plain / ideal,
                     "share_of_ideal": (plain / merged) / (plain / ideal), "merge_share": merge / merged})
    return rows


def merge_share(engine, ids, ks, batch: int) -> list[dict]:
    """The merge of ``batch`` prompts of len(ids) tokens (one (B, L) tensor, one call) against
    llama.cpp prefilling them merged, one after another (``batch`` x one prompt's prefill)."""
    import torch

    rows = []
    tensor = torch.tensor([ids] * batch)
    for k in ks:
        enc = with_k(engine, k)
        merge = timed(lambda: enc.merger.merge_ids(tensor), 1)
        one = enc.merge_ids(ids).float().numpy()
        prefill_one = timed(lambda: engine.prefill_embeddings(one), 1)
        rows.append({"what": "merge_share", "B": batch, "L": len(ids), "K": k,
                     "encoder_hidden": getattr(enc.encoder, "hidden", None), "merge_s": merge,
                     "prefill_s": batch * prefill_one, "share": merge / (merge + batch * prefill_one)})
    return rows


def decode(engine, ids, new: int, repeats: int) -> dict:
    """Decoding tokens/s after the prompt ``ids``: llama.cpp's own step loop after the plain prompt,
    the engine after the merged prompt (the export's K; a shorter cache), and the engine after the
    same prompt read plainly (K = 1 rows: the same cache length as the step loop, so their ratio is
    the engine's own per-token cost). The three run interleaved ``repeats`` times, each repeat
    starting with the next one of them (a fixed order favoured whichever ran second or third), so
    that the load of a shared machine falls on all of them alike; medians."""
    def step_loop() -> float:
        logits = engine.prefill_tokens(ids)
        t = time.perf_counter()
        token = int(np.argmax(logits))
        for i in range(new):
            token = int(np.argmax(engine.step(token, len(ids) + i)))
        return new / (time.perf_counter() - t)

    def through_engine(prompts) -> float:
        engine.prompts = prompts
        done = engine.complete(text, new + 1)
        return new / (done.timings["total"] - done.timings["first_token"])

    own, eos = engine.prompts, engine.eos_ids
    text, plain_rows = own.tokenizer.decode(ids), with_k(engine, 1)
    runs = {"plain": [], "merged": [], "engine_plain": []}
    engine.eos_ids = set()  # run all `new` steps
    try:
        measure = {"plain": step_loop, "merged": lambda: through_engine(own),
                   "engine_plain": lambda: through_engine(plain_rows)}
        names = list(measure)
        for r in range(repeats):
            for name in names[r % 3:] + names[:r % 3]:
                runs[name].append(measure[name]())
    finally:
        engine.prompts, engine.eos_ids = own, eos
    med = {name: statistics.median(v) for name, v in runs.items()}
    return {"what": "decode", "prompt_tokens": len(ids), "new_tokens": new, "repeats": repeats, "k": own.k,
            "llama_plain_tok_s": med["plain"], "engine_merged_tok_s": med["merged"],
            "engine_plain_tok_s": med["engine_plain"], "ratio": med["merged"] / med["plain"],
            "engine_overhead_ratio": med["engine_plain"] / med["plain"], "runs": runs}


def pytorch(checkpoint: str, engine, ids, new: int, repeats: int) -> dict:
    import torch

    from ktm import KTokenMerging

    model = KTokenMerging.from_pretrained(checkpoint, device="cpu", dtype="float32").eval()
    with torch.inference_mode():
        pre = timed(lambda: model.prefill([ids]), repeats)
        text = engine.prompts.tokenizer.decode(ids)
        t = time.perf_counter()
        model.generate([text], max_new_tokens=new, stop_at_end=False)
        total = time.perf_counter() - t
    return {"what": "pytorch", "L": len(ids), "K": model.k, "prefill_s": pre,
            "decode_tok_s": (new - 1) / max(total - pre, 1e-9)}


def first_chunk_s(address, body: dict) -> float:
    conn = http.client.HTTPConnection(*address, timeout=600)
    t = time.perf_counter()
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = None
    while True:
        line = resp.readline()
        if not line:
            break
        if first is None and line.startswith(b"data: {") and b'"text": ""' not in line:
            first = time.perf_counter() - t
    conn.close()
    return first


def server(engine, ids, load_ids, repeats: int, requests: int, clients: int, new: int, budget_s: float) -> list[dict]:
    from ktm.serve.http import Limits, make_server

    srv = make_server(engine, port=0, limits=Limits(max_concurrent=clients + 1))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    text = engine.prompts.tokenizer.decode(ids)
    body = {"prompt": text, "max_tokens": 4, "temperature": 0, "stream": True}
    eos, engine.eos_ids = engine.eos_ids, set()
    try:
        direct = statistics.median(_direct_first(engine, text) for _ in range(repeats))
        http_s = statistics.median(first_chunk_s(srv.server_address, body) for _ in range(repeats))
        load = load_test(srv.server_address, engine.prompts.tokenizer.decode(load_ids), requests, clients, new,
                         budget_s)
    finally:
        engine.eos_ids = eos
        srv.shutdown()
        srv.server_close()
    return [{"what": "ttft", "prompt_tokens": len(ids), "direct_s": direct, "server_s": http_s,
             "overhead": http_s / direct - 1}, {"what": "load", **load}]


def _direct_first(engine, text: str) -> float:
    t = time.perf_counter()
    events = engine.stream(text, 4)
    next(events)
    first = time.perf_counter() - t
    events.close()
    return first


def load_test(address, text: str, requests: int, clients: int, new: int, budget_s: float) -> dict:
    latencies, lock, todo = [], threading.Lock(), list(range(requests))
    stop_at = time.perf_counter() + budget_s
    body = json.dumps({"prompt": text, "max_tokens": new, "temperature": 0})

    def client():
        conn = http.client.HTTPConnection(*address, timeout=600)
        while time.perf_counter() < stop_at:
            with lock:
                if not todo:
                    break
                todo.pop()
            t = time.perf_counter()
            conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            with lock:
                latencies.append((resp.status, time.perf_counter() - t))
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    ok = sorted(s for status, s in latencies if status == 200)
    pct = {f"p{q}_s": float(np.percentile(ok, q)) for q in (50, 90, 99)} if ok else {}
    return {"requests": len(latencies), "ok": len(ok), "clients": clients, "new_tokens": new, "wall_s": wall,
            "requests_per_s": len(latencies) / wall, **pct}


def report(files: list[str]) -> str:
    """Markdown tables of the JSON lines in ``files`` (the prefill rows, then the others)."""
    rows = [json.loads(line) for f in files for line in open(f) if line.strip()]
    out = ["| L | K | positions | plain s | merged s (merge incl.) | merge s | ideal s (L/K plain) | speedup | "
           "ideal | share of ideal | merge share |", "|" + " --- |" * 11]
    for r in rows:
        if r["what"] == "prefill":
            out.append(f"| {r['L']} | {r['K']} | {r['positions']} | {r['plain_s']:.2f} | {r['merged_s']:.2f} | "
                       f"{r['merge_s']:.3f} | {r['ideal_s']:.2f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | "
                       f"{r['share_of_ideal']:.0%} | {r['merge_share']:.1%} |")
    out += [""] + [f"- {r['what']}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in r.items() if k != "what")
                   for r in rows if r["what"] not in ("prefill", "setup")]
    return "\n".join(out)


def main() -> None:
    import llama_cpp

    from ktm.serve.llamacpp import LlamaCppEngine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export")
    ap.add_argument("--checkpoint", default="zoo:default-k2", help="for the PyTorch rows ('' to skip)")
    ap.add_argument("--text", default="../shared/data/text/dev.jsonl")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--pytorch-length", type=int, default=512)
    ap.add_argument("--load-requests", type=int, default=24)
    ap.add_argument("--load-clients", type=int, default=4)
    ap.add_argument("--load-length", type=int, default=256)
    ap.add_argument("--load-budget-s", type=float, default=120)
    ap.add_argument("--share-length", type=int, default=8192)
    ap.add_argument("--share-batch", type=int, default=8)
    ap.add_argument("--n-ctx", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None,
                    help="encoder MLP width for the K other than the export's (default: the paper's for that K)")
    ap.add_argument("--parts", nargs="+", default=["prefill", "decode", "pytorch", "server", "share"])
    ap.add_argument("--report", nargs="+", default=None, help="print markdown tables of these JSONL results and stop")
    args = ap.parse_args()
    if args.report:
        print(report(args.report))
        return
    global HIDDEN
    HIDDEN = args.hidden
    engine = LlamaCppEngine(args.export, threads=args.threads, n_ctx=args.n_ctx)
    emit = lambda row: print(json.dumps(row), flush=True)  # noqa: E731
    emit({"what": "setup", "llama_cpp": llama_cpp.__version__, "lib": "/".join(Path(llama_cpp.__file__).parts[-2:]),
          "system_info": llama_cpp.llama_print_system_info().decode().strip(), "threads": engine.threads,
          "export": Path(args.export).name, "gguf_type": engine.meta["gguf"]["type"], "hidden_other_k": args.hidden})
    ids = long_ids(engine, args.text, max(args.lengths + [args.pytorch_length, args.load_length]))
    if "prefill" in args.parts:
        for length in args.lengths:
            for row in prefill(engine, ids[:length], args.ks, args.repeats):
                emit(row)
    if "share" in args.parts:
        for row in merge_share(engine, long_ids(engine, args.text, args.share_length), args.ks, args.share_batch):
            emit(row)
    if "decode" in args.parts:
        emit(decode(engine, ids[:512], args.new_tokens, args.repeats))
    if "server" in args.parts:
        for row in server(engine, ids[:512], ids[:args.load_length], args.repeats, args.load_requests, args.load_clients, 16,
                          args.load_budget_s):
            emit(row)
    if "pytorch" in args.parts and args.checkpoint:
        emit(pytorch(args.checkpoint, engine, ids[:args.pytorch_length], args.new_tokens, args.repeats))


if __name__ == "__main__":
    main()
