"""The demo's last step: the trained merged model answers real reviews through llama.cpp.

:func:`llamacpp_showcase` exports the demo's K-Token Merging model for llama.cpp (``ktm export
--format gguf``, f32: the same answers as ktm's own float32 model), answers a few held-out reviews
through :class:`~ktm.serve.llamacpp.LlamaCppEngine`, and prints each answer with its time to first
token, merged, against llama.cpp reading the same review's tokens plain. Without llama-cpp-python it
says how to install it and returns None.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np


def _plain_first_token_s(engine, prompt: str) -> float:
    """Tokenise, prefill every token in llama.cpp, pick the first token: the plain time to first token."""
    t = time.perf_counter()
    ids = engine.prompts.merger.tokenize([prompt])[0]
    int(np.argmax(engine.prefill_tokens(ids)))
    return time.perf_counter() - t


def llamacpp_showcase(model_dir, examples, out, *, threads: int | None = None, log=print) -> dict | None:
    """Export ``model_dir`` (a saved ktm model) to ``out`` for llama.cpp and answer ``examples``
    (task examples with ``prompt`` and ``answer``); returns the numbers it prints."""
    from ..serve.gguf import export_gguf
    from ..serve.llamacpp import LlamaCppEngine, LlamaCppMissing, import_llama_cpp

    try:
        import_llama_cpp()
    except LlamaCppMissing as e:
        log(f"llama.cpp step skipped: {e}")
        return None
    from ..serve.export import ExportError

    log(f"exporting {model_dir} for llama.cpp (f32, LoRA merged) to {out} ...")
    try:
        export = export_gguf(model_dir, Path(out), gguf_type="f32", overwrite=True)
    except ExportError as e:  # e.g. a base that llama.cpp cannot read as it is: the demo's numbers stand
        log(f"llama.cpp step skipped: {e}")
        return None
    engine = LlamaCppEngine(export, threads=threads)
    try:
        engine.complete(examples[0].prompt, 1)  # warm-up: first calls allocate llama.cpp's buffers
        rows = []
        for e in examples:
            done = engine.complete(e.prompt, 3)
            rows.append({"answer": done.text.strip(), "reference": e.answer, "tokens": done.prompt_tokens,
                         "merged": done.merged_length, "merged_ttft_s": done.timings["first_token"],
                         "plain_ttft_s": _plain_first_token_s(engine, e.prompt)})
    finally:
        engine.close()
    log(f"through llama.cpp ({engine.threads} threads), K = {engine.k}: time to first token merged vs plain")
    for r in rows:
        log(f"  {r['tokens']:>4} tokens -> {r['merged']:>3} merged: answer {r['answer']!r:<12} reference "
            f"{r['reference']!r:<11} {r['merged_ttft_s'] * 1e3:7.1f} ms vs plain {r['plain_ttft_s'] * 1e3:7.1f} ms")
    speedup = statistics.median(r["plain_ttft_s"] / r["merged_ttft_s"] for r in rows)
    log(f"  median time-to-first-token speedup {speedup:.2f}x; serve it with: ktm serve --export {export}")
    return {"export": str(export), "rows": rows, "median_speedup": speedup}
