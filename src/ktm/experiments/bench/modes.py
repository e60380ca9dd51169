"""The four measurements (and the compile comparison), each a function returning rows.

All K share one LoRA-adapted LLM: ``model.with_k(k)`` puts a fresh encoder for another K
beside the same LLM (weights are untrained: speed does not depend on their values).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ...model.blocks import num_blocks
from .inputs import id_prompts, texts_of_length, tree_examples
from .memory import peak_memory
from .report import mib, derive_compile, derive_decode, derive_memory, derive_prefill, derive_train
from .timing import sync_device, measure, median, summary

COMPILE_MAX_LENGTH = 2048  # the compile mode measures the launch-bound short prompts


def with_k(model, k: int):
    """``model.with_k(k)``: the same LLM and LoRA, a fresh encoder for block size ``k``.
    K = 1 is the uncompressed baseline, so it never runs contextual merging's layers: with
    ``context_layers`` > 0 those are timed only at K > 1 (in ``merge_ids`` and the prefill)."""
    return model.with_k(k, context_layers=0) if k == 1 else model.with_k(k)


def prefill(model, ids: list[list[int]]):
    """Time to first token from token ids: ``model.prefill`` (merge, left-pad, LLM forward
    filling a KV cache, logits of the last position: the first step of ``generate``).

    Returns ``(next_token_ids (B,), cache)``.
    """
    logits, cache, _ = model.prefill(ids)
    return logits.argmax(-1), cache


def plain_prefill(model, ids: list[list[int]]):
    """The ideal: the same LLM forward on the ids' plain token embeddings (no encoder)."""
    from ...model.blocks import pad_sequences

    embeds, mask = pad_sequences(model.embed_each(ids), side="left")
    cache = model.new_cache()
    logits = model.logits(model.decode(embeds, mask, cache).last_hidden_state[:, -1])
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
                n = num_blocks(L, k)
                fns[f"ktm{k}"] = lambda m=m: prefill(m, ids)
                fns[f"merge{k}"] = lambda m=m: m.merge_ids(ids)
                fns[f"plain{k}"] = lambda n=n: plain_prefill(model, [x[:n] for x in ids])
            t0 = time.perf_counter()
            times = measure(fns, warmup=warmup, repeats=repeats, device=model.device)
            for k in ks:
                enc = models[k].encoder
                rows.append({"batch_size": B, "length": L, "k": k, "positions": num_blocks(L, k),
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
        if not _fits(m, num_blocks(max(got), k) + new_tokens):
            log(f"decode K={k}: skipped (prompt + new tokens exceed the model's {m.max_length} positions)")
            continue

        def hf(n, m=m, eos=list(m.eos_ids)):
            embeds, mask = m.merge_prompts(prompts)
            return m.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=m.pad_id,
                                 eos_token_id=eos)

        fns = {"ktm": lambda m=m: m.generate(prompts, new_tokens, return_tokens=True, stop_at_end=False),
               "ktm_first": lambda m=m: m.generate(prompts, 1, return_tokens=True, stop_at_end=False),
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
            rel = {"release": lambda m=m: m.generate(prompts, new_tokens, use_cache=False, return_tokens=True,
                                                  stop_at_end=False)}
            times.update(measure(rel, warmup=0, repeats=release_repeats, device=m.device))
            release = summary(times["release"])
        row = {"k": k, "batch_size": batch_size, "length": int(median(got)), "positions": num_blocks(max(got), k),
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
                if not _fits(m, max(num_blocks(p, k) + a for p, a in zip(p_tok, a_tok))):
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
                             "positions": sum(num_blocks(p, k) + a - 1 for p, a in zip(p_tok, a_tok)),
                             "step": summary(times[k])})
            derive_train(rows)
            for r in rows[-len(fns):]:
                log(f"train {kind} K={r['k']}: {r['examples_per_s']:.2f} examples/s, "
                    f"{r['tokens_per_s']:.0f} tokens/s, {r['ratio_vs_k1']:.2f}x K=1")
            log(f"  ({time.perf_counter() - t0:.0f} s)")
    finally:
        model.train(was_training)
    return rows


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
                rows.append({"batch_size": B, "length": L, "k": k, "positions": num_blocks(L, k),
                             "peak_bytes": peak, "kv_cache_bytes": kv, "measured": what})
                log(f"memory B={B} L={L} K={k}: peak {mib(peak)} MiB, KV cache {mib(kv)} MiB")
    return derive_memory(rows)


def static_prefill(model, decoder, ids: list[list[int]]):
    """:func:`prefill` through a :class:`~ktm.model.compiled.StaticDecoder`: merge, left-pad,
    compiled forward into a static cache, next token of each row."""
    from ...model.blocks import pad_sequences

    embeds, mask = pad_sequences(model.merge_ids(ids), side="left")
    logits, _ = decoder.start(embeds, mask, 1)
    return logits.argmax(-1)


def compiled_generate(model, decoder, prompts: list[str], new_tokens: int):
    """``model.generate`` through ``decoder`` (the model is left as it was)."""
    saved = model.enable_compile(decoder)
    try:
        return model.generate(prompts, new_tokens, return_tokens=True, stop_at_end=False)
    finally:
        saved.disable_compile()


def bench_compile(model, stream: Sequence[int], *, compile_modes: Sequence[str], lengths: Sequence[int],
                  ks: Sequence[int], batch_sizes: Sequence[int] = (1,), decode_length: int = 512,
                  new_tokens: int = 64, warmup: int = 1, repeats: int = 3, backend: str | None = None,
                  log=print) -> list[dict]:
    """Eager against static-shape compiled prefill and decoding, per compile mode.

    For each mode one :class:`~ktm.model.compiled.StaticDecoder` (``dynamic=True``: compiled once
    for all shapes, a CUDA graph recorded per shape) serves every K. ``first_call_s`` is the
    first call of each shape (compilation and graph recording included). Prefill rows: every
    (B, L <= 2048, K). Decode rows: ``new_tokens`` greedy tokens after a ``decode_length``-token
    prompt, B = 1, the eager and compiled runs must agree on the token count; ``agree`` is
    the fraction of positions where they chose the same token (they may drift apart after a
    rounding difference in low precision). ``backend`` replaces the modes' compiler (tests
    use ``"aot_eager"``).
    Returns rows for :func:`derive_compile` (already applied).
    """
    from ...model.compiled import StaticDecoder

    ks = sorted(set(ks) | {1})
    lengths = [L for L in lengths if L <= COMPILE_MAX_LENGTH and _fits(model, L)]
    models = {k: with_k(model, k) for k in ks}
    prompts = texts_of_length(model.tokenizer, stream, decode_length, 1)
    timing = dict(warmup=warmup, repeats=repeats, device=model.device)
    rows = []
    for mode in compile_modes:
        decoder = StaticDecoder(model, mode, dynamic=True, backend=backend)
        t_mode = time.perf_counter()
        for B in batch_sizes:
            for L in lengths:
                ids = id_prompts(stream, L, B)
                for k, m in models.items():
                    rows.append(_compiled_prefill_row(m, decoder, ids, mode, timing))
                    derive_compile(rows)
                    r = rows[-1]
                    log(f"compile {mode} prefill B={B} L={L} K={k}: eager {1000 * r['eager']['median']:.1f} ms, "
                        f"compiled {1000 * r['compiled']['median']:.1f} ms ({r['speedup']:.2f}x; "
                        f"first call {r['first_call_s']:.1f} s)")
        for k, m in models.items():
            if not _fits(m, num_blocks(decode_length, k) + new_tokens):
                continue
            rows.append(_compiled_decode_row(m, decoder, prompts, new_tokens, mode, timing))
            derive_compile(rows)
            r = rows[-1]
            log(f"compile {mode} decode K={k}: eager {new_tokens / r['eager']['median']:.1f} tok/s, "
                f"compiled {new_tokens / r['compiled']['median']:.1f} tok/s ({r['speedup']:.2f}x; "
                f"first call {r['first_call_s']:.1f} s, same token at {100 * r['agree']:.0f}% of positions)")
        log(f"  compile mode {mode}: {time.perf_counter() - t_mode:.0f} s in all")
    return rows


def _first_call(fn, device) -> float:
    """Seconds of one call (compilation and graph recording included, when it is the first)."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        fn()
        sync_device(device)
        return time.perf_counter() - t0


def _compiled_prefill_row(m, decoder, ids, mode, timing) -> dict:
    first = _first_call(lambda: static_prefill(m, decoder, ids), m.device)
    times = measure({"eager": lambda: prefill(m, ids), "compiled": lambda: static_prefill(m, decoder, ids)}, **timing)
    L, B = len(ids[0]), len(ids)
    return {"what": "prefill", "mode": mode, "batch_size": B, "length": L, "k": m.k, "positions": num_blocks(L, m.k),
            "first_call_s": first, "eager": summary(times["eager"]), "compiled": summary(times["compiled"])}


def _compiled_decode_row(m, decoder, prompts, new_tokens, mode, timing) -> dict:
    got = []
    first = _first_call(lambda: got.extend(compiled_generate(m, decoder, prompts, new_tokens)), m.device)
    with torch.inference_mode():
        ref = m.generate(prompts, new_tokens, return_tokens=True, stop_at_end=False)
    if [len(x) for x in got] != [len(x) for x in ref] or len(ref[0]) != new_tokens:
        raise RuntimeError(f"compile {mode}: {len(got[0])} compiled and {len(ref[0])} eager "
                           f"tokens instead of {new_tokens}")
    times = measure({"eager": lambda: m.generate(prompts, new_tokens, return_tokens=True, stop_at_end=False),
                     "compiled": lambda: compiled_generate(m, decoder, prompts, new_tokens)}, **timing)
    length = len(m.tokenize(prompts)[0])
    return {"what": "decode", "mode": mode, "batch_size": 1, "length": length, "k": m.k,
            "positions": num_blocks(length, m.k), "new_tokens": new_tokens, "first_call_s": first,
            "agree": sum(a == b for a, b in zip(got[0], ref[0])) / new_tokens,
            "eager": summary(times["eager"]), "compiled": summary(times["compiled"])}
