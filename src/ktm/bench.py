"""Speed benchmark: what merging K tokens into one buys in prefill, decoding, training and memory.

    ktm bench speed --device cpu --lengths 512 1024 2048 --out benchmarks/results/cpu
    python -m ktm.bench speed --modes prefill decode

Four modes, each a function that returns plain numbers (lists of dicts):

* :func:`bench_prefill`: time to first token, end to end from token ids (merge, padding,
  the LLM's forward with a KV cache, logits of the last position) for every prompt length
  L, K and batch size B; in the same round-robin, ``merge_ids`` alone (the encoder's share)
  and the *ideal*: the same LLM forward on ceil(L/K) plain token embeddings, no encoder.
* :func:`bench_decode`: tokens/s for N new tokens after a prompt: ktm's cached ``generate``
  against the release's loop (``generate(..., use_cache=False)``: the whole sequence is
  re-run for every token) and transformers' ``generate`` on the same merged embeddings.
  All three start from the prompt text and produce exactly N tokens.
* :func:`bench_train`: examples/s and tokens/s of one training step (forward, backward,
  AdamW step on LoRA + encoder) on short tree prompts and long text prompts.
* :func:`bench_memory`: peak memory of a prefill and the bytes of its KV cache.

Timings are medians over ``repeats`` runs after ``warmup`` runs; the functions being
compared run round-robin (one of each, then again) so that drift in the machine's speed
affects them alike. The arithmetic (:func:`summary`, :func:`derive_prefill`, ...,
:func:`check_goals`) is pure and works on any lists of seconds; formatting happens only in
:func:`render_markdown` and :func:`plot`.

All K share one LoRA-adapted LLM: :func:`with_k` puts a fresh encoder for another K beside
the same ``lm`` (weights are untrained: speed does not depend on their values).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .compiled import COMPILE_MODES
from .config import save_json

MODES = ("prefill", "decode", "train", "memory", "compile")
DEFAULT_MODES = ("prefill", "decode", "train", "memory")  # "compile" compiles for minutes: asked for by name
COMPILE_MAX_LENGTH = 2048  # the compile mode measures the launch-bound short prompts
DEFAULT_KS = (1, 2, 4, 8)
CPU_LENGTHS = (512, 1024, 2048)
CUDA_LENGTHS = (512, 1024, 2048, 4096, 8192)
CPU_MAX_BATCH_TOKENS = 8192

# The goals of the issue "Speed: measured prefill, decoding and training gains".
GOAL_PREFILL_FRACTION = 0.95   # ktm's speedup over K=1 >= 95% of the ideal ratio
GOAL_ENCODER_SHARE = 0.05      # merge_ids <= 5% of the compressed prefill
GOAL_DECODE_VS_RELEASE = 10.0  # cached generate >= 10x the release's loop
GOAL_TRAIN_RATIO = 3.0         # K=4 examples/s >= 3x K=1 on long prompts
GOAL_COMPILE_SPEEDUP = 2.0     # torch.compile / CUDA graphs >= 2x eager on short prompts


# ====================================================================== arithmetic (pure)
def median(xs: Sequence[float]) -> float:
    """Median of a non-empty list of numbers."""
    if not xs:
        raise ValueError("median of an empty list")
    return float(statistics.median(xs))


def summary(xs: Sequence[float]) -> dict:
    """``{"median", "min", "max", "q1", "q3", "spread", "n", "runs"}`` of repeated timings.

    ``spread`` is (max - min) / median: the relative width of all runs (0 for one run).

    >>> s = summary([1.0, 2.0, 4.0])
    >>> s["median"], s["min"], s["max"], s["spread"]
    (2.0, 1.0, 4.0, 1.5)
    """
    xs = [float(x) for x in xs]
    med = median(xs)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median": med, "min": min(xs), "max": max(xs), "q1": q1, "q3": q3,
            "spread": (max(xs) - min(xs)) / med if med > 0 else 0.0, "n": len(xs), "runs": xs}


def speedup(baseline_s: float, other_s: float) -> float:
    """How many times faster ``other`` is than ``baseline``: baseline / other."""
    if other_s <= 0:
        raise ValueError(f"a time must be > 0, got {other_s}")
    return baseline_s / other_s


def fraction_of_ideal(achieved: float, ideal: float) -> float:
    """Share of the ideal speedup that was achieved: 1.0 = all of it.

    Both are ratios over K=1, so 1.0 at K=1 by definition. Values above 1 happen when the
    measured ktm speedup beats the plain forward's ratio (noise, or a cheaper K=1 encoder).
    """
    if ideal <= 0:
        raise ValueError(f"the ideal ratio must be > 0, got {ideal}")
    return achieved / ideal


def encoder_share(merge_s: float, total_s: float) -> float:
    """Fraction of an end-to-end prefill spent merging (``merge_ids``)."""
    if total_s <= 0:
        raise ValueError(f"a time must be > 0, got {total_s}")
    return merge_s / total_s


def rate(count: float, seconds: float) -> float:
    """Items per second."""
    if seconds <= 0:
        raise ValueError(f"a time must be > 0, got {seconds}")
    return count / seconds


def derive_prefill(rows: list[dict]) -> list[dict]:
    """Add speedup / ideal / fraction / share to prefill rows (in place; returns them).

    Each row has ``batch_size``, ``length``, ``k`` and summaries ``ktm`` (end to end at K),
    ``merge`` (``merge_ids`` alone) and ``plain`` (LLM forward on ceil(L/K) plain
    embeddings). The K=1 row of the same (batch_size, length) is the baseline; rows without
    one get ``None``.
    """
    base = {(r["batch_size"], r["length"]): r for r in rows if r["k"] == 1}
    for r in rows:
        b = base.get((r["batch_size"], r["length"]))
        t, p = r["ktm"]["median"], r["plain"]["median"]
        r["encoder_share"] = encoder_share(r["merge"]["median"], t)
        r["ttft_ms"] = 1000 * t
        if b is None:
            r["speedup"] = r["ideal_ratio"] = r["fraction_of_ideal"] = None
            continue
        r["speedup"] = speedup(b["ktm"]["median"], t)
        r["ideal_ratio"] = speedup(b["plain"]["median"], p)
        r["fraction_of_ideal"] = fraction_of_ideal(r["speedup"], r["ideal_ratio"])
    return rows


def derive_decode(rows: list[dict]) -> list[dict]:
    """Add tokens/s and ratios to decode rows (in place; returns them).

    Each row has ``batch_size``, ``new_tokens`` and summaries ``ktm``, ``hf``, ``release``
    (N tokens per row, from the prompt text) and ``ktm_first``, ``hf_first`` (1 token: the
    prefill). ``*_tokens_per_s`` is end to end (prefill included); ``*_decode_tokens_per_s``
    counts only the N - 1 tokens after the first: (N - 1) B / (t_N - t_1).
    """
    for r in rows:
        n = r["batch_size"] * r["new_tokens"]
        for name in ("ktm", "hf", "release"):
            if r.get(name) is not None:
                r[f"{name}_tokens_per_s"] = rate(n, r[name]["median"])
        for name in ("ktm", "hf"):
            first = r.get(f"{name}_first")
            if r.get(name) is not None and first is not None and r["new_tokens"] > 1:
                dt = r[name]["median"] - first["median"]
                r[f"{name}_decode_tokens_per_s"] = (
                    rate(r["batch_size"] * (r["new_tokens"] - 1), dt) if dt > 0 else None)
        r["vs_release"] = speedup(r["release"]["median"], r["ktm"]["median"]) if r.get("release") else None
        r["vs_hf"] = speedup(r["hf"]["median"], r["ktm"]["median"]) if r.get("hf") else None
    return rows


def derive_train(rows: list[dict]) -> list[dict]:
    """Add examples/s, tokens/s and the ratio over K=1 of the same prompt kind (in place).

    Each row has ``kind``, ``k``, ``batch_size``, ``tokens`` (prompt + answer tokens per
    step, before merging) and the summary ``step`` (seconds per training step).
    """
    for r in rows:
        t = r["step"]["median"]
        r["examples_per_s"] = rate(r["batch_size"], t)
        r["tokens_per_s"] = rate(r["tokens"], t)
    base = {r["kind"]: r for r in rows if r["k"] == 1}
    for r in rows:
        b = base.get(r["kind"])
        r["ratio_vs_k1"] = r["examples_per_s"] / b["examples_per_s"] if b else None
    return rows


def derive_memory(rows: list[dict]) -> list[dict]:
    """Add the KV cache's and the peak's ratio over K=1 of the same (batch, length)."""
    base = {(r["batch_size"], r["length"]): r for r in rows if r["k"] == 1}
    for r in rows:
        b = base.get((r["batch_size"], r["length"]))
        r["kv_ratio_vs_k1"] = b["kv_cache_bytes"] / r["kv_cache_bytes"] if b and r["kv_cache_bytes"] else None
        r["peak_ratio_vs_k1"] = (b["peak_bytes"] / r["peak_bytes"]
                                 if b and r.get("peak_bytes") and b.get("peak_bytes") else None)
    return rows


def check_goals(results: dict) -> list[dict]:
    """The issue's goals, each ``{"goal", "where", "value", "target", "met"}``.

    Prefill goals are read at the longest length measured, batch size 1 (2048 on CPU,
    8192 on a GPU by default).
    """
    goals = []
    prefill = [r for r in results.get("prefill", []) if r["batch_size"] == 1 and r["k"] > 1
               and r.get("fraction_of_ideal") is not None]
    if prefill:
        L = max(r["length"] for r in prefill)
        for r in sorted((r for r in prefill if r["length"] == L), key=lambda r: r["k"]):
            goals.append({"goal": "prefill speedup >= 95% of the ideal ratio", "where": f"L={L}, B=1, K={r['k']}",
                          "value": r["fraction_of_ideal"], "target": GOAL_PREFILL_FRACTION,
                          "met": r["fraction_of_ideal"] >= GOAL_PREFILL_FRACTION})
        for r in sorted((r for r in prefill if r["length"] == L), key=lambda r: r["k"]):
            goals.append({"goal": "encoder share of the compressed prefill <= 5%", "where": f"L={L}, B=1, K={r['k']}",
                          "value": r["encoder_share"], "target": GOAL_ENCODER_SHARE,
                          "met": r["encoder_share"] <= GOAL_ENCODER_SHARE})
    for r in results.get("decode", []):
        where = f"prompt {r['length']} tokens, {r['new_tokens']} new, B={r['batch_size']}, K={r['k']}"
        if r.get("vs_hf") is not None:
            goals.append({"goal": "decoding never slower than transformers' generate", "where": where,
                          "value": r["vs_hf"], "target": 1.0, "met": r["vs_hf"] >= 1.0})
        if r.get("vs_release") is not None:
            goals.append({"goal": "decoding >= 10x faster than the release's loop", "where": where,
                          "value": r["vs_release"], "target": GOAL_DECODE_VS_RELEASE,
                          "met": r["vs_release"] >= GOAL_DECODE_VS_RELEASE})
    for r in results.get("train", []):
        if r["kind"] == "long" and r["k"] == 4 and r.get("ratio_vs_k1") is not None:
            goals.append({"goal": "training K=4 examples/s >= 3x K=1 (long prompts)",
                          "where": f"~{r['prompt_tokens']} prompt tokens, B={r['batch_size']}",
                          "value": r["ratio_vs_k1"], "target": GOAL_TRAIN_RATIO,
                          "met": r["ratio_vs_k1"] >= GOAL_TRAIN_RATIO})
    for r in results.get("compile", []):
        goals.append({"goal": f"{r['what']} with compile mode {r['mode']!r} >= 2x eager",
                      "where": f"L={r['length']}, B={r['batch_size']}, K={r['k']}"
                               + (f", {r['new_tokens']} new tokens" if r["what"] == "decode" else ""),
                      "value": r["speedup"], "target": GOAL_COMPILE_SPEEDUP,
                      "met": r["speedup"] >= GOAL_COMPILE_SPEEDUP})
    return goals


def derive_compile(rows: list[dict]) -> list[dict]:
    """Add ``speedup`` = eager / compiled median time to compile rows (in place)."""
    for r in rows:
        r["speedup"] = speedup(r["eager"]["median"], r["compiled"]["median"])
    return rows


# ====================================================================== timing
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns: dict[str, Callable[[], object]], *, warmup: int = 1, repeats: int = 3,
            device="cpu", inference: bool = True) -> dict[str, list[float]]:
    """Seconds per call of each function: ``warmup`` untimed calls, then ``repeats`` timed
    rounds in which every function runs once, in order (round-robin).

    Under ``torch.inference_mode`` unless ``inference=False``; CUDA is synchronised around
    every timed call.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times: dict[str, list[float]] = {name: [] for name in fns}
    ctx = torch.inference_mode() if inference else contextlib.nullcontext()
    with ctx:
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        _sync(device)
        for _ in range(repeats):
            for name, fn in fns.items():
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
    return times


# ====================================================================== inputs
def corpus_text(path: str | os.PathLike | None = None) -> str:
    """Text the synthetic prompts are cut from.

    ``path``: a ``.jsonl`` file (each record's ``old_contents``, ``text`` or ``prompt``
    field, e.g. the commit data) or any text file. Default: ktm's own source code.
    """
    if path is None:
        files = sorted(Path(__file__).parent.rglob("*.py"))
        return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    path = Path(path)
    if path.suffix == ".jsonl":
        parts = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                field = next((f for f in ("old_contents", "text", "prompt") if f in rec), None)
                if field is None:
                    raise ValueError(f"{path}: records need an 'old_contents', 'text' or 'prompt' field")
                parts.append(rec[field])
        return "\n\n".join(parts)
    return path.read_text(encoding="utf-8")


def token_stream(tokenizer, text: str, min_tokens: int = 0) -> list[int]:
    """The text's token ids (no special tokens), repeated until at least ``min_tokens``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the corpus text has no tokens")
    reps = max(1, -(-min_tokens // len(ids)))
    return ids * reps


def window(stream: Sequence[int], start: int, length: int) -> list[int]:
    """``length`` ids of ``stream`` from ``start``, wrapping around at the end.

    >>> window([1, 2, 3], 2, 4)
    [3, 1, 2, 3]
    """
    n = len(stream)
    return [stream[(start + i) % n] for i in range(length)]


def id_prompts(stream: Sequence[int], length: int, count: int, start: int = 0) -> list[list[int]]:
    """``count`` different prompts of exactly ``length`` token ids (consecutive windows)."""
    return [window(stream, start + i * length, length) for i in range(count)]


def texts_of_length(tokenizer, stream: Sequence[int], length: int, count: int, start: int = 0) -> list[str]:
    """``count`` texts that tokenize to ``length`` tokens (as near as the tokenizer allows).

    Decoding a window of ids and tokenizing it again can merge or split tokens at the cut,
    so a few nearby cut points are tried.
    """
    out = []
    for i in range(count):
        ids = window(stream, start + i * (length + 16), length + 16)
        best, best_gap = None, None
        for n in (length, length - 1, length + 1, length - 2, length + 2, length + 3, length + 4):
            if n < 1:
                continue
            text = tokenizer.decode(ids[:n])
            got = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if text.strip() and (best_gap is None or abs(got - length) < best_gap):
                best, best_gap = text, abs(got - length)
            if got == length and text.strip():
                break
        if best is None:
            raise ValueError(f"could not cut a text of {length} tokens from the corpus")
        out.append(best)
    return out


def tree_examples(count: int, stage: str = "small", seed: int = 0) -> tuple[list[str], list[str]]:
    """``count`` Textualized Tree questions ``(prompts, answers)`` of ``stage``."""
    import random

    from .tasks.tree import generate_tree, tree_questions

    rng = random.Random(seed)
    prompts, answers = [], []
    while len(prompts) < count:
        qs = tree_questions(generate_tree(stage, rng), len(prompts))
        q = qs[rng.randrange(len(qs))]
        prompts.append(q.prompt)
        answers.append(q.answer)
    return prompts, answers


# ====================================================================== model pieces
def with_k(model, k: int):
    """A KTokenMerging for block size ``k`` that shares ``model``'s LLM, LoRA and tokenizer
    and gets a fresh encoder (same init and width rule, same device and dtype)."""
    from .encoder import build_encoder
    from .model import KTokenMerging

    if k == model.k:
        return model
    config = dataclasses.replace(model.config, k=k, encoder_stages=None)
    enc_dtype = next(model.encoder.parameters()).dtype
    encoder = build_encoder(k, model.encoder.dim, config.encoder_hidden, config.encoder_init,
                            config.encoder_norm)
    encoder.to(device=model.device, dtype=enc_dtype)
    m = KTokenMerging(model.lm, model.tokenizer, encoder, config, model.base_reference, model.base_fingerprint)
    return m.train(model.training)


def prefill(model, ids: list[list[int]]):
    """Time to first token from token ids: merge, left-pad, LLM forward filling a KV
    cache, logits of the last position (what ``generate`` does for its first token).

    Returns ``(next_token_ids (B,), cache)``.
    """
    from transformers import DynamicCache

    from .blocks import pad_sequences

    embeds, mask = pad_sequences(model.merge_ids(ids), side="left")
    return _forward_first(model, embeds, mask, DynamicCache(config=model._decoder.config))


def plain_prefill(model, ids: list[list[int]]):
    """The ideal: the same LLM forward on the ids' plain token embeddings (no encoder)."""
    from transformers import DynamicCache

    from .blocks import pad_sequences

    flat = torch.tensor([t for x in ids for t in x], dtype=torch.long, device=model.device)
    emb = model._embedding(flat).split([len(x) for x in ids])
    embeds, mask = pad_sequences(list(emb), side="left")
    return _forward_first(model, embeds, mask, DynamicCache(config=model._decoder.config))


def _forward_first(model, embeds, mask, cache):
    from .blocks import position_ids

    h = model._decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids(mask),
                       past_key_values=cache, use_cache=True).last_hidden_state
    logits = model._lm_head(h[:, -1]).float()
    return logits.argmax(-1), cache


def cache_nbytes(cache) -> int:
    """Bytes held by a transformers KV cache: the sum of its key and value tensors."""
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.nelement() * t.element_size()
        return total
    for t in list(getattr(cache, "key_cache", [])) + list(getattr(cache, "value_cache", [])):
        total += t.nelement() * t.element_size()
    return total


@contextlib.contextmanager
def no_early_stop(model):
    """Make ``model.generate`` produce exactly ``max_new_tokens`` (benchmarks only): no
    token id is negative, so with the end ids set to [-1] no row ever stops early."""
    saved = model.eos_ids
    model.eos_ids = [-1]
    try:
        yield model
    finally:
        model.eos_ids = saved


def _fits(model, positions: int) -> bool:
    return model.max_length is None or positions <= model.max_length


# ====================================================================== modes
def bench_prefill(model, stream: Sequence[int], *, lengths: Sequence[int], ks: Sequence[int],
                  batch_sizes: Sequence[int] = (1,), warmup: int = 1, repeats: int = 3,
                  max_batch_tokens: int | None = None, log=print) -> list[dict]:
    """Prefill (time to first token) end to end from ids, for every (B, L, K).

    For each (B, L) all K run round-robin: ktm's prefill, ``merge_ids`` alone, and the plain
    forward on ceil(L/K) token embeddings. Configurations with B * L > ``max_batch_tokens``
    or more positions than the model allows are skipped (and logged).
    Returns rows for :func:`derive_prefill` (already applied).
    """
    ks = sorted(set(ks) | {1})
    models = {k: with_k(model, k) for k in ks}
    rows = []
    for B in batch_sizes:
        for L in lengths:
            if max_batch_tokens and B * L > max_batch_tokens:
                log(f"prefill B={B} L={L}: skipped (B*L = {B * L} > max batch tokens {max_batch_tokens})")
                continue
            if not _fits(model, L):
                log(f"prefill L={L}: skipped (the model allows {model.max_length} positions)")
                continue
            ids = id_prompts(stream, L, B)
            fns = {}
            for k, m in models.items():
                n = -(-L // k)
                fns[f"ktm{k}"] = lambda m=m: prefill(m, ids)
                fns[f"merge{k}"] = lambda m=m: m.merge_ids(ids)
                fns[f"plain{k}"] = lambda n=n: plain_prefill(model, [x[:n] for x in ids])
            t0 = time.perf_counter()
            times = measure(fns, warmup=warmup, repeats=repeats, device=model.device)
            for k in ks:
                enc = models[k].encoder
                rows.append({"batch_size": B, "length": L, "k": k, "positions": -(-L // k),
                             "encoder_hidden": enc.hidden, "encoder_params": sum(p.numel() for p in enc.parameters()),
                             "ktm": summary(times[f"ktm{k}"]), "merge": summary(times[f"merge{k}"]),
                             "plain": summary(times[f"plain{k}"])})
            derive_prefill(rows)
            for r in rows[-len(ks):]:
                log(f"prefill B={B} L={L} K={r['k']}: {r['ttft_ms']:.1f} ms, speedup {r['speedup']:.2f}x "
                    f"(ideal {r['ideal_ratio']:.2f}x), encoder {100 * r['encoder_share']:.1f}%")
            log(f"  ({time.perf_counter() - t0:.0f} s)")
    return rows


def bench_decode(model, stream: Sequence[int], *, ks: Sequence[int], length: int = 512,
                 new_tokens: int = 64, batch_size: int = 1, warmup: int = 1, repeats: int = 3,
                 release_repeats: int = 1, log=print) -> list[dict]:
    """Tokens/s for ``new_tokens`` greedy tokens after a ``length``-token prompt, per K.

    ``ktm``: ``model.generate`` (KV cache); ``hf``: ``model.lm.generate`` on the same merged
    embeddings (the merge timed with it); ``release``: ``model.generate(use_cache=False)``.
    ``*_first``: the same with one new token. The release's loop runs ``release_repeats``
    times without warm-up (it is ``new_tokens`` full forwards; the others warmed up the
    same kernels). Every method must yield exactly ``new_tokens`` tokens per row.
    """
    prompts = texts_of_length(model.tokenizer, stream, length, batch_size)
    got = [len(x) for x in model.tokenize(prompts)]
    rows = []
    for k in ks:
        m = with_k(model, k)
        if not _fits(m, -(-max(got) // k) + new_tokens):
            log(f"decode K={k}: skipped (prompt + new tokens exceed the model's {m.max_length} positions)")
            continue

        def hf(n, m=m, eos=list(m.eos_ids)):
            embeds, mask = m.merge_prompts(prompts)
            return m.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=m.pad_id,
                                 eos_token_id=eos)

        with no_early_stop(m):
            fns = {"ktm": lambda m=m: m.generate(prompts, new_tokens, return_tokens=True),
                   "ktm_first": lambda m=m: m.generate(prompts, 1, return_tokens=True),
                   "hf": lambda: hf(new_tokens), "hf_first": lambda: hf(1)}
            with torch.inference_mode():
                counts = {"ktm": [len(x) for x in fns["ktm"]()], "hf": list(fns["hf"]().shape[1:]) * batch_size}
            for name, c in counts.items():
                if any(x != new_tokens for x in c):
                    raise RuntimeError(f"decode: {name} produced {c} tokens instead of {new_tokens}")
            t0 = time.perf_counter()
            times = measure(fns, warmup=warmup, repeats=repeats, device=m.device)
            release = None
            if release_repeats > 0:
                rel = {"release": lambda m=m: m.generate(prompts, new_tokens, use_cache=False, return_tokens=True)}
                times.update(measure(rel, warmup=0, repeats=release_repeats, device=m.device))
                release = summary(times["release"])
        row = {"k": k, "batch_size": batch_size, "length": int(median(got)), "positions": -(-max(got) // k),
               "new_tokens": new_tokens, "release": release,
               **{name: summary(times[name]) for name in ("ktm", "ktm_first", "hf", "hf_first")}}
        rows.append(row)
        derive_decode(rows)
        log(f"decode K={k}: ktm {row['ktm_tokens_per_s']:.1f} tok/s, hf {row['hf_tokens_per_s']:.1f} tok/s"
            + (f", release {row['release_tokens_per_s']:.2f} tok/s ({row['vs_release']:.1f}x)" if release else "")
            + f"  ({time.perf_counter() - t0:.0f} s)")
    return rows


def bench_train(model, stream: Sequence[int], *, ks: Sequence[int], batch_size: int = 4,
                long_length: int = 500, short_stage: str = "small", answer_tokens: int = 8,
                warmup: int = 1, repeats: int = 3, lr: float = 1e-4, log=print) -> list[dict]:
    """Seconds per training step (forward + backward + AdamW on LoRA and the encoder).

    ``short``: Textualized Tree questions of ``short_stage`` (answers true/false);
    ``long``: ``long_length``-token text prompts with an ``answer_tokens``-token
    continuation as the answer. Returns rows for :func:`derive_train` (already applied).
    """
    ks = sorted(set(ks) | {1})
    tok = model.tokenizer
    long_prompts = texts_of_length(tok, stream, long_length, batch_size)
    long_answers = texts_of_length(tok, stream, answer_tokens, batch_size, start=long_length + 16)
    data = {"short": tree_examples(batch_size, short_stage), "long": (long_prompts, long_answers)}
    was_training = model.training
    rows = []
    try:
        model.train()
        for kind, (prompts, answers) in data.items():
            p_tok = [len(x) for x in model.tokenize(prompts)]
            a_tok = [len(x) + 1 for x in model.tokenize(answers, what="answer")]  # + end token
            fns = {}
            for k in ks:
                m = with_k(model, k).train()
                if not _fits(m, max(-(-p // k) + a for p, a in zip(p_tok, a_tok))):
                    log(f"train {kind} K={k}: skipped (too long for the model)")
                    continue
                params = [p for group in m.trainable_parameters().values() for p in group]
                opt = torch.optim.AdamW(params, lr=lr)

                def step(m=m, opt=opt):
                    opt.zero_grad(set_to_none=True)
                    m(prompts, answers).loss.backward()
                    opt.step()

                fns[k] = step
            t0 = time.perf_counter()
            times = measure(fns, warmup=warmup, repeats=repeats, device=model.device, inference=False)
            for k in fns:
                rows.append({"kind": kind, "k": k, "batch_size": batch_size,
                             "prompt_tokens": int(median(p_tok)), "tokens": sum(p_tok) + sum(a_tok),
                             "positions": sum(-(-p // k) + a - 1 for p, a in zip(p_tok, a_tok)),
                             "step": summary(times[k])})
            derive_train(rows)
            for r in rows[-len(fns):]:
                log(f"train {kind} K={r['k']}: {r['examples_per_s']:.2f} examples/s, "
                    f"{r['tokens_per_s']:.0f} tokens/s, {r['ratio_vs_k1']:.2f}x K=1")
            log(f"  ({time.perf_counter() - t0:.0f} s)")
    finally:
        model.train(was_training)
    return rows


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS starts from live memory."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """Peak resident-set growth of this process while the ``with`` block runs.

    A thread samples /proc/self/statm every ``interval`` seconds; ``peak_bytes`` is the
    highest sample minus the RSS just before the block (after ``malloc_trim``). Sampling can
    miss spikes shorter than the interval, so this is a lower bound on the true peak.
    """

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak_bytes: int | None = None

    def __enter__(self):
        _malloc_trim()
        self.base = _rss_bytes()
        self._max = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self.base is not None:
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            r = _rss_bytes()
            if r is not None and r > self._max:
                self._max = r
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        if self.base is None:
            return False
        self._thread.join()
        r = _rss_bytes()
        self.peak_bytes = max(self._max, r or 0) - self.base
        return False


def peak_memory(fn: Callable[[], object], device) -> tuple[int | None, object, str]:
    """``(peak bytes above the starting point, fn's result, what was measured)``."""
    device = torch.device(device)
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
            out = fn()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - start, out, "cuda max_memory_allocated"
        with PeakRSS() as p:
            out = fn()
        return p.peak_bytes, out, "cpu RSS growth (sampled every 1 ms)"


def bench_memory(model, stream: Sequence[int], *, lengths: Sequence[int], ks: Sequence[int],
                 batch_sizes: Sequence[int] = (1,), max_batch_tokens: int | None = None,
                 log=print) -> list[dict]:
    """Peak memory of one end-to-end prefill and its KV cache's bytes, per (B, L, K).

    Smallest K's last: each larger prefill must bring in its own memory (see
    :class:`PeakRSS` for what is measured on CPU). One untimed prefill per K warms up first.
    """
    ks = sorted(set(ks) | {1})
    models = {k: with_k(model, k) for k in ks}
    rows = []
    warm = id_prompts(stream, 64, 1)
    with torch.inference_mode():
        for m in models.values():
            prefill(m, warm)
    for B in batch_sizes:
        for L in lengths:
            if (max_batch_tokens and B * L > max_batch_tokens) or not _fits(model, L):
                continue
            ids = id_prompts(stream, L, B)
            for k in sorted(ks, reverse=True):
                peak, (_, cache), what = peak_memory(lambda m=models[k]: prefill(m, ids), model.device)
                kv = cache_nbytes(cache)
                del cache
                rows.append({"batch_size": B, "length": L, "k": k, "positions": -(-L // k),
                             "peak_bytes": peak, "kv_cache_bytes": kv, "measured": what})
                log(f"memory B={B} L={L} K={k}: peak {_mib(peak)} MiB, KV cache {_mib(kv)} MiB")
    return derive_memory(rows)


def static_prefill(model, decoder, ids: list[list[int]]):
    """:func:`prefill` through a :class:`~ktm.compiled.StaticDecoder`: merge, left-pad,
    compiled forward into a static cache, next token of each row."""
    from .blocks import pad_sequences

    embeds, mask = pad_sequences(model.merge_ids(ids), side="left")
    logits, _ = decoder.start(embeds, mask, 1)
    return logits.argmax(-1)


def compiled_generate(model, decoder, prompts: list[str], new_tokens: int):
    """``model.generate`` through ``decoder`` (the model is left as it was)."""
    saved = model.enable_compile(decoder)
    try:
        return model.generate(prompts, new_tokens, return_tokens=True)
    finally:
        saved.disable_compile()


def bench_compile(model, stream: Sequence[int], *, compile_modes: Sequence[str], lengths: Sequence[int],
                  ks: Sequence[int], batch_sizes: Sequence[int] = (1,), decode_length: int = 512,
                  new_tokens: int = 64, warmup: int = 1, repeats: int = 3, backend: str | None = None,
                  log=print) -> list[dict]:
    """Eager against static-shape compiled prefill and decoding, per compile mode.

    For each mode one :class:`~ktm.compiled.StaticDecoder` (``dynamic=True``: compiled once
    for all shapes, a CUDA graph recorded per shape) serves every K. ``first_call_s`` is the
    first call of each shape (compilation and graph recording included). Prefill rows: every
    (B, L <= 2048, K). Decode rows: ``new_tokens`` greedy tokens after a ``decode_length``-token
    prompt, B = 1, the eager and compiled runs must agree on the token count; ``agree`` is
    the fraction of positions where they chose the same token (they may drift apart after a
    rounding difference in low precision). ``backend`` replaces the modes' compiler (tests
    use ``"aot_eager"``).
    Returns rows for :func:`derive_compile` (already applied).
    """
    from .compiled import StaticDecoder

    ks = sorted(set(ks) | {1})
    lengths = [L for L in lengths if L <= COMPILE_MAX_LENGTH and _fits(model, L)]
    models = {k: with_k(model, k) for k in ks}
    prompts = texts_of_length(model.tokenizer, stream, decode_length, 1)
    rows = []
    for mode in compile_modes:
        decoder = StaticDecoder(model, mode, dynamic=True, backend=backend)
        t_mode = time.perf_counter()
        for B in batch_sizes:
            for L in lengths:
                ids = id_prompts(stream, L, B)
                for k, m in models.items():
                    with torch.inference_mode():
                        t0 = time.perf_counter()
                        static_prefill(m, decoder, ids)
                        _sync(model.device)
                        first = time.perf_counter() - t0
                    times = measure({"eager": lambda m=m: prefill(m, ids),
                                     "compiled": lambda m=m: static_prefill(m, decoder, ids)},
                                    warmup=warmup, repeats=repeats, device=model.device)
                    rows.append({"what": "prefill", "mode": mode, "batch_size": B, "length": L, "k": k,
                                 "positions": -(-L // k), "first_call_s": first,
                                 "eager": summary(times["eager"]), "compiled": summary(times["compiled"])})
                    derive_compile(rows)
                    log(f"compile {mode} prefill B={B} L={L} K={k}: eager {1000 * rows[-1]['eager']['median']:.1f} ms, "
                        f"compiled {1000 * rows[-1]['compiled']['median']:.1f} ms ({rows[-1]['speedup']:.2f}x; "
                        f"first call {first:.1f} s)")
        for k, m in models.items():
            if not _fits(m, -(-decode_length // k) + new_tokens):
                continue
            with no_early_stop(m):
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    got = compiled_generate(m, decoder, prompts, new_tokens)
                    _sync(model.device)
                    first = time.perf_counter() - t0
                    ref = m.generate(prompts, new_tokens, return_tokens=True)
                if [len(x) for x in got] != [len(x) for x in ref] or len(ref[0]) != new_tokens:
                    raise RuntimeError(f"compile {mode}: {len(got[0])} compiled and {len(ref[0])} eager "
                                       f"tokens instead of {new_tokens}")
                agree = sum(a == b for a, b in zip(got[0], ref[0])) / new_tokens
                times = measure({"eager": lambda m=m: m.generate(prompts, new_tokens, return_tokens=True),
                                 "compiled": lambda m=m: compiled_generate(m, decoder, prompts, new_tokens)},
                                warmup=warmup, repeats=repeats, device=model.device)
            rows.append({"what": "decode", "mode": mode, "batch_size": 1, "length": decode_length, "k": k,
                         "positions": -(-decode_length // k), "new_tokens": new_tokens, "first_call_s": first,
                         "agree": agree, "eager": summary(times["eager"]), "compiled": summary(times["compiled"])})
            derive_compile(rows)
            log(f"compile {mode} decode K={k}: eager {new_tokens / rows[-1]['eager']['median']:.1f} tok/s, "
                f"compiled {new_tokens / rows[-1]['compiled']['median']:.1f} tok/s ({rows[-1]['speedup']:.2f}x; "
                f"first call {first:.1f} s, same token at {100 * agree:.0f}% of positions)")
        log(f"  compile mode {mode}: {time.perf_counter() - t_mode:.0f} s in all")
    return rows


# ====================================================================== reporting
def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def _params(n) -> str:
    return "–" if n is None else f"{n / 1e6:.1f}M"


def _ms(s: dict) -> str:
    return f"{1000 * s['median']:.1f} ({1000 * s['min']:.1f}–{1000 * s['max']:.1f})"


def _x(v, digits=2) -> str:
    return "–" if v is None else f"{v:.{digits}f}x"


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(results: dict) -> str:
    """All tables of a result dict (missing modes are left out), goals last."""
    out = []
    meta = results.get("meta", {})
    if meta:
        out.append(f"Model `{meta.get('model')}` ({meta.get('dtype')}) on {meta.get('device_name')}, "
                   f"{meta.get('threads')} threads; torch {meta.get('torch')}, transformers "
                   f"{meta.get('transformers')}; {meta.get('date')}; warm-up {meta.get('warmup')}, "
                   f"repeats {meta.get('repeats')}; encoder width {meta.get('encoder_hidden')}; load average "
                   f"{meta.get('load_avg_start')} at the start, {meta.get('load_avg_end')} at the end. "
                   "Times: median (min–max).")
        if meta.get("command"):
            out.append(f"Command: `{meta['command']}`")
    if results.get("prefill"):
        out.append("### Prefill (time to first token, end to end from token ids)")
        out.append(_table(
            ["B", "L", "K", "LLM positions", "encoder params", "ktm ms", "merge ms", "encoder share",
             "plain forward ms", "speedup vs K=1", "ideal ratio", "fraction of ideal"],
            [[str(r["batch_size"]), str(r["length"]), str(r["k"]), str(r["positions"]), _params(r.get("encoder_params")),
              _ms(r["ktm"]), _ms(r["merge"]), _pct(r["encoder_share"]), _ms(r["plain"]), _x(r["speedup"]),
              _x(r["ideal_ratio"]), _pct(r["fraction_of_ideal"])] for r in results["prefill"]]))
    if results.get("decode"):
        d0 = results["decode"][0]
        out.append(f"### Decoding ({d0['new_tokens']} new tokens after a {d0['length']}-token prompt, "
                   f"B={d0['batch_size']}, greedy, from the prompt text)")

        def tps(r, name):
            v = r.get(f"{name}_tokens_per_s")
            return "–" if v is None else f"{v:.2f}"

        def dps(r, name):
            v = r.get(f"{name}_decode_tokens_per_s")
            return "–" if v is None else f"{v:.1f}"

        out.append(_table(
            ["K", "ktm s", "ktm tok/s", "ktm decode tok/s", "transformers s", "transformers tok/s",
             "transformers decode tok/s", "release s", "release tok/s", "ktm vs transformers",
             "ktm vs release"],
            [[str(r["k"]), f"{r['ktm']['median']:.2f}", tps(r, "ktm"), dps(r, "ktm"),
              f"{r['hf']['median']:.2f}", tps(r, "hf"), dps(r, "hf"),
              f"{r['release']['median']:.1f}" if r.get("release") else "–", tps(r, "release"),
              _x(r["vs_hf"]), _x(r["vs_release"], 1)] for r in results["decode"]]))
    if results.get("train"):
        out.append("### Training step (forward + backward + AdamW)")
        out.append(_table(
            ["prompts", "B", "K", "prompt tokens (median)", "LLM positions / step", "step ms",
             "examples/s", "tokens/s", "examples/s vs K=1"],
            [[r["kind"], str(r["batch_size"]), str(r["k"]), str(r["prompt_tokens"]), str(r["positions"]),
              _ms(r["step"]), f"{r['examples_per_s']:.2f}", f"{r['tokens_per_s']:.0f}", _x(r["ratio_vs_k1"])]
             for r in results["train"]]))
    if results.get("memory"):
        out.append(f"### Memory of one prefill ({results['memory'][0]['measured']})")
        out.append(_table(
            ["B", "L", "K", "LLM positions", "peak MiB", "peak vs K=1", "KV cache MiB", "KV cache vs K=1"],
            [[str(r["batch_size"]), str(r["length"]), str(r["k"]), str(r["positions"]), _mib(r["peak_bytes"]),
              _x(r["peak_ratio_vs_k1"]), _mib(r["kv_cache_bytes"]), _x(r["kv_ratio_vs_k1"])]
             for r in sorted(results["memory"], key=lambda r: (r["batch_size"], r["length"], r["k"]))]))
    if results.get("compile"):
        out.append("### torch.compile / CUDA graphs against eager (static-shape decoder, `enable_compile`)")
        out.append(_table(
            ["what", "mode", "B", "L", "K", "LLM positions", "eager ms", "compiled ms", "speedup",
             "first call s", "same tokens"],
            [[r["what"], r["mode"], str(r["batch_size"]), str(r["length"]), str(r["k"]), str(r["positions"]),
              _ms(r["eager"]), _ms(r["compiled"]), _x(r["speedup"]), f"{r['first_call_s']:.1f}",
              _pct(r["agree"]) if r.get("agree") is not None else "–"] for r in results["compile"]]))
    if results.get("goals"):
        out.append("### Goals")
        out.append(_table(
            ["goal", "where", "measured", "target", "met"],
            [[g["goal"], g["where"], f"{g['value']:.3f}", f"{g['target']:g}", "yes" if g["met"] else "**no**"]
             for g in results["goals"]]))
    return "\n\n".join(out) + "\n"


def plot(results: dict, path: str | os.PathLike) -> Path:
    """One PNG with a panel per mode that has results (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in ("prefill", "speedup", "decode", "train", "memory")
              if results.get("prefill" if m == "speedup" else m)]
    if not panels:
        raise ValueError("nothing to plot: no results")
    from matplotlib.ticker import NullFormatter

    cols = min(3, len(panels))
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.0 * cols, 4.2 * rows_n), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)

    def log_ticks(ax, values):
        values = sorted(set(values))
        ax.set_xticks(values, [str(v) for v in values])
        ax.xaxis.set_minor_formatter(NullFormatter())

    for ax, panel in zip(axes.flat, panels):
        if panel == "prefill":
            rows = [r for r in results["prefill"] if r["batch_size"] == min(x["batch_size"] for x in results["prefill"])]
            for k in sorted({r["k"] for r in rows}):
                pts = sorted((r["length"], r["ktm"]["median"]) for r in rows if r["k"] == k)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"K={k}")
            ax.set(xscale="log", yscale="log", xlabel="prompt tokens L", ylabel="time to first token (s)",
                   title=f"Prefill, B={rows[0]['batch_size']}")
            log_ticks(ax, [r["length"] for r in rows])
            ax.legend()
        elif panel == "speedup":
            rows = results["prefill"]
            B = min(r["batch_size"] for r in rows)
            L = max(r["length"] for r in rows if r["batch_size"] == B)
            sel = sorted((r for r in rows if r["batch_size"] == B and r["length"] == L), key=lambda r: r["k"])
            ks = [r["k"] for r in sel]
            ax.plot(ks, [r["ideal_ratio"] for r in sel], "s--", color="gray", label="ideal (plain forward)")
            ax.plot(ks, [r["speedup"] for r in sel], "o-", label="ktm end to end")
            ax.set(xscale="log", yscale="log", xlabel="K", ylabel="speedup over K=1",
                   title=f"Prefill speedup, L={L}, B={B}")
            log_ticks(ax, ks)
            ax.legend()
        elif panel == "decode":
            rows = results["decode"]
            xs = range(len(rows))
            w = 0.27
            for i, (name, label) in enumerate([("ktm", "ktm"), ("hf", "transformers"), ("release", "release loop")]):
                vals = [r.get(f"{name}_tokens_per_s") or 0 for r in rows]
                ax.bar([x + (i - 1) * w for x in xs], vals, w, label=label)
            ax.set_xticks(list(xs), [f"K={r['k']}" for r in rows])
            ax.set(yscale="log", ylabel="new tokens/s (end to end)",
                   title=f"Decoding {rows[0]['new_tokens']} tokens, {rows[0]['length']}-token prompt")
            ax.set_ylim(top=ax.get_ylim()[1] * 4)  # room for the legend above the bars
            ax.legend(loc="upper left", ncols=3, fontsize="small")
        elif panel == "train":
            rows = results["train"]
            kinds = list(dict.fromkeys(r["kind"] for r in rows))
            for kind in kinds:
                pts = sorted((r["k"], r["examples_per_s"]) for r in rows if r["kind"] == kind)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-",
                        label=f"{kind} (~{next(r['prompt_tokens'] for r in rows if r['kind'] == kind)} tokens)")
            ks = sorted({r["k"] for r in rows})
            ax.set(xscale="log", yscale="log", xlabel="K", ylabel="examples/s", title="Training step")
            log_ticks(ax, ks)
            ax.legend()
        elif panel == "memory":
            rows = results["memory"]
            B = min(r["batch_size"] for r in rows)
            for k in sorted({r["k"] for r in rows}):
                pts = sorted((r["length"], r["kv_cache_bytes"] / 2**20, (r["peak_bytes"] or 0) / 2**20)
                             for r in rows if r["k"] == k and r["batch_size"] == B)
                line, = ax.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=f"peak K={k}")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "x:", color=line.get_color())
            ax.set(xscale="log", yscale="log", xlabel="prompt tokens L", ylabel="MiB",
                   title=f"Prefill memory, B={B} (dotted: KV cache)")
            log_ticks(ax, [r["length"] for r in rows if r["batch_size"] == B])
            ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ====================================================================== run
def machine_info(device) -> dict:
    """CPU model, core count, OS, library versions and the accelerator (if any)."""
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    device = torch.device(device)
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda_available": torch.cuda.is_available()}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = f"CPU ({cpu}, {os.cpu_count()} cores)"
    return info


def _load_avg() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine skews timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def portable_path(path: str | os.PathLike) -> str:
    """A path fit for saved results: as given when relative, relative to the working folder
    when inside it, else the file name alone (no machine's folder layout in the docs).

    >>> portable_path("data/dev.jsonl"), portable_path("/somewhere/else/dev.jsonl")
    ('data/dev.jsonl', 'dev.jsonl')
    """
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return p.name


def default_out(device: str) -> Path:
    return Path("benchmarks") / "results" / f"{_dt.date.today().isoformat()}-{device}"


def run_speed(model=None, *, device: str = "auto", dtype: str | None = None,
              modes: Sequence[str] = DEFAULT_MODES, lengths: Sequence[int] | None = None,
              ks: Sequence[int] = DEFAULT_KS, batch_sizes: Sequence[int] = (1, 8),
              max_batch_tokens: int | None = -1, repeats: int = 3, warmup: int = 1,
              new_tokens: int = 64, decode_length: int = 512, release_repeats: int = 1,
              train_batch_size: int = 4, train_long_length: int = 500, corpus: str | None = None,
              encoder_hidden: int | None = None, compile_modes: Sequence[str] = ("reduce-overhead",),
              out: str | os.PathLike | None = None, command: str | None = None, log=print) -> dict:
    """Run the selected modes, print the Markdown tables, write ``OUT/speed.json``,
    ``OUT/speed.md`` and ``OUT/speed.png``; return the results dict.

    ``model``: a :class:`~ktm.model.KTokenMerging` (any K) or a base-model reference for
    :func:`ktm.loading.load_base` (``None``: the embedded SmolLM2-135M-Instruct).
    ``lengths`` default: 512-2048 on CPU, 512-8192 on CUDA. ``max_batch_tokens``: skip
    prefill/memory configurations with B * L above it (-1: 8192 on CPU, no limit on CUDA;
    0 or None: no limit). ``encoder_hidden``: the encoder's MLP width when the model is
    loaded here (default: the paper's ``int(a*K)*d``). ``compile_modes``: what the
    ``compile`` mode measures against eager (:func:`bench_compile`).
    """
    from .loading import resolve_device
    from .model import KTokenMerging

    bad = set(modes) - set(MODES)
    if bad:
        raise ValueError(f"unknown modes {sorted(bad)}; choose from {MODES}")
    if isinstance(model, KTokenMerging):
        m = model
        dev = m.device
    else:
        dev = resolve_device(device)
        t0 = time.perf_counter()
        m = KTokenMerging.from_base(model, k=1, dtype=dtype, device=dev, seed=0, encoder_hidden=encoder_hidden)
        log(f"loaded {model or 'default'} in {time.perf_counter() - t0:.0f} s")
    m.eval()
    on_cuda = dev.type == "cuda"
    if lengths is None:
        lengths = CUDA_LENGTHS if on_cuda else CPU_LENGTHS
    if max_batch_tokens == -1:
        max_batch_tokens = None if on_cuda else CPU_MAX_BATCH_TOKENS
    need = max(max(lengths) * max(batch_sizes), (decode_length + 16) * 2, (train_long_length + 16) * train_batch_size * 2)
    stream = token_stream(m.tokenizer, corpus_text(corpus), need)
    results: dict = {"meta": {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command, "model": m.base_reference, "dtype": str(m.dtype).replace("torch.", ""),
        "device": dev.type, "modes": list(modes), "ks": list(ks), "lengths": list(lengths),
        "batch_sizes": list(batch_sizes), "max_batch_tokens": max_batch_tokens, "repeats": repeats,
        "warmup": warmup, "corpus": portable_path(corpus) if corpus else "ktm source code",
        "encoder_hidden": m.config.encoder_hidden or "int(a*K)*d", "encoder_init": m.config.encoder_init,
        "compile_modes": list(compile_modes) if "compile" in modes else None,
        "load_avg_start": _load_avg(), **machine_info(dev)}}
    out = Path(out) if out is not None else default_out(dev.type)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runners = {
        "prefill": lambda: bench_prefill(m, stream, lengths=lengths, ks=ks, batch_sizes=batch_sizes,
                                         warmup=warmup, repeats=repeats, max_batch_tokens=max_batch_tokens, log=log),
        "decode": lambda: bench_decode(m, stream, ks=ks, length=decode_length, new_tokens=new_tokens,
                                       warmup=warmup, repeats=repeats, release_repeats=release_repeats, log=log),
        "train": lambda: bench_train(m, stream, ks=ks, batch_size=train_batch_size, long_length=train_long_length,
                                     warmup=warmup, repeats=repeats, log=log),
        "compile": lambda: bench_compile(m, stream, compile_modes=compile_modes, lengths=lengths, ks=ks,
                                         batch_sizes=batch_sizes, decode_length=decode_length,
                                         new_tokens=new_tokens, warmup=warmup, repeats=repeats, log=log),
        # last: it trims the heap and runs a sampling thread
        "memory": lambda: bench_memory(m, stream, lengths=lengths, ks=ks, batch_sizes=batch_sizes,
                                       max_batch_tokens=max_batch_tokens, log=log),
    }
    for mode in [mode for mode in runners if mode in modes]:
        results[mode] = runners[mode]()
        # written after every mode: a run stopped by a time limit keeps what it finished
        written = _write_results(results, out, started)
    md = render_markdown(results)
    log(md)
    if any(results.get(mode) for mode in DEFAULT_MODES):  # the compile mode has tables only
        written.append(plot(results, out / "speed.png"))
    log("wrote " + ", ".join(str(p) for p in written))
    return results


def _write_results(results: dict, out: Path, started: float) -> list[Path]:
    """Goals, timing and load average into ``results``; ``OUT/speed.json`` and ``OUT/speed.md``."""
    results["goals"] = check_goals(results)
    results["meta"]["seconds"] = round(time.perf_counter() - started, 1)
    results["meta"]["load_avg_end"] = _load_avg()
    save_json(out / "speed.json", results)
    (out / "speed.md").write_text(render_markdown(results))
    return [out / "speed.json", out / "speed.md"]


# ====================================================================== command line
class _Defaults(argparse.HelpFormatter):
    """Append ``(default: X)`` to options whose help does not state its default already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _add_speed_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("speed", help="prefill, decoding, training and memory at several K",
                              formatter_class=_Defaults)
    p.add_argument("--model", default=None, help="base model reference (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES),
                   help="what to measure ('compile' is left out by default: it compiles for minutes)")
    p.add_argument("--lengths", nargs="+", type=int, default=None,
                   help=f"prompt lengths (default: {list(CPU_LENGTHS)} on CPU, {list(CUDA_LENGTHS)} on CUDA)")
    p.add_argument("--ks", nargs="+", type=int, default=list(DEFAULT_KS), help="block sizes (1 is always added)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8], help="prefill and memory batch sizes")
    p.add_argument("--max-batch-tokens", type=int, default=-1,
                   help="skip prefill/memory runs with B*L above this (-1: 8192 on CPU, none on CUDA; 0: none)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--new-tokens", type=int, default=64, help="decode: new tokens")
    p.add_argument("--decode-length", type=int, default=512, help="decode: prompt tokens")
    p.add_argument("--release-repeats", type=int, default=1, help="decode: runs of the release's loop (0: skip)")
    p.add_argument("--train-batch-size", type=int, default=4, help="train: examples per step")
    p.add_argument("--train-long-length", type=int, default=500, help="train: tokens of a long prompt")
    p.add_argument("--encoder-hidden", type=int, default=None,
                   help="encoder MLP width (default: the paper's int(a*K)*d)")
    p.add_argument("--compile-modes", nargs="+", choices=COMPILE_MODES, default=["reduce-overhead"],
                   help="compile mode: torch.compile modes (or 'cudagraphs') to measure against eager")
    p.add_argument("--corpus", default=None, help="text or .jsonl the prompts are cut from (default: ktm's source)")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results/<date>-<device>)")
    p.set_defaults(func=cmd_speed)
    return p


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` (with its ``speed`` sub-command) to a CLI's sub-parsers."""
    b = subparsers.add_parser("bench", help="benchmarks: ktm bench speed")
    bsub = b.add_subparsers(dest="bench", required=True)
    _add_speed_parser(bsub)
    return b


def _command_line() -> str:
    args = " ".join(sys.argv[1:])
    return f"ktm {args}" if Path(sys.argv[0]).name == "ktm" else f"python -m ktm.bench {args}"


def cmd_speed(args) -> int:
    """Handler of ``bench speed``: ``args`` is the parsed namespace."""
    run_speed(args.model, device=args.device, dtype=args.dtype, modes=args.modes, lengths=args.lengths,
              ks=args.ks, batch_sizes=args.batch_sizes, max_batch_tokens=args.max_batch_tokens,
              repeats=args.repeats, warmup=args.warmup, new_tokens=args.new_tokens,
              decode_length=args.decode_length, release_repeats=args.release_repeats,
              train_batch_size=args.train_batch_size, train_long_length=args.train_long_length,
              corpus=args.corpus, encoder_hidden=args.encoder_hidden, compile_modes=args.compile_modes,
              out=args.out,
              command=_command_line())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ktm.bench", description="ktm benchmarks")
    sub = p.add_subparsers(dest="bench", required=True)
    _add_speed_parser(sub)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
