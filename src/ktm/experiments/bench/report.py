"""Results: derived ratios, the issue's goals, Markdown tables and the plot."""

from __future__ import annotations

import os
from pathlib import Path

from .timing import encoder_share, fraction_of_ideal, rate, speedup

# The goals of the issue "Speed: measured prefill, decoding and training gains".
GOAL_PREFILL_FRACTION = 0.95   # ktm's speedup over K=1 >= 95% of the ideal ratio
GOAL_ENCODER_SHARE = 0.05      # merge_ids <= 5% of the compressed prefill
GOAL_DECODE_VS_RELEASE = 10.0  # cached generate >= 10x the release's loop
GOAL_TRAIN_RATIO = 3.0         # K=4 examples/s >= 3x K=1 on long prompts
GOAL_COMPILE_SPEEDUP = 2.0     # torch.compile / CUDA graphs >= 2x eager on short prompts


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


def mib(b) -> str:
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


def _md_meta(results: dict) -> list[str]:
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
    return out


def _md_prefill(results: dict) -> list[str]:
    out = []
    out.append("### Prefill (time to first token, end to end from token ids)")
    out.append(_table(
        ["B", "L", "K", "LLM positions", "encoder params", "ktm ms", "merge ms", "encoder share",
         "plain forward ms", "speedup vs K=1", "ideal ratio", "fraction of ideal"],
        [[str(r["batch_size"]), str(r["length"]), str(r["k"]), str(r["positions"]), _params(r.get("encoder_params")),
          _ms(r["ktm"]), _ms(r["merge"]), _pct(r["encoder_share"]), _ms(r["plain"]), _x(r["speedup"]),
          _x(r["ideal_ratio"]), _pct(r["fraction_of_ideal"])] for r in results["prefill"]]))
    return out


def _md_decode(results: dict) -> list[str]:
    out = []
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
    return out


def _md_train(results: dict) -> list[str]:
    out = []
    out.append("### Training step (forward + backward + AdamW)")
    out.append(_table(
        ["prompts", "B", "K", "prompt tokens (median)", "LLM positions / step", "step ms",
         "examples/s", "tokens/s", "examples/s vs K=1"],
        [[r["kind"], str(r["batch_size"]), str(r["k"]), str(r["prompt_tokens"]), str(r["positions"]),
          _ms(r["step"]), f"{r['examples_per_s']:.2f}", f"{r['tokens_per_s']:.0f}", _x(r["ratio_vs_k1"])]
         for r in results["train"]]))
    return out


def _md_memory(results: dict) -> list[str]:
    out = []
    out.append(f"### Memory of one prefill ({results['memory'][0]['measured']})")
    out.append(_table(
        ["B", "L", "K", "LLM positions", "peak MiB", "peak vs K=1", "KV cache MiB", "KV cache vs K=1"],
        [[str(r["batch_size"]), str(r["length"]), str(r["k"]), str(r["positions"]), mib(r["peak_bytes"]),
          _x(r["peak_ratio_vs_k1"]), mib(r["kv_cache_bytes"]), _x(r["kv_ratio_vs_k1"])]
         for r in sorted(results["memory"], key=lambda r: (r["batch_size"], r["length"], r["k"]))]))
    return out


def _md_compile(results: dict) -> list[str]:
    out = []
    out.append("### torch.compile / CUDA graphs against eager (static-shape decoder, `enable_compile`)")
    out.append(_table(
        ["what", "mode", "B", "L", "K", "LLM positions", "eager ms", "compiled ms", "speedup",
         "first call s", "same tokens"],
        [[r["what"], r["mode"], str(r["batch_size"]), str(r["length"]), str(r["k"]), str(r["positions"]),
          _ms(r["eager"]), _ms(r["compiled"]), _x(r["speedup"]), f"{r['first_call_s']:.1f}",
          _pct(r["agree"]) if r.get("agree") is not None else "–"] for r in results["compile"]]))
    return out


def _md_goals(results: dict) -> list[str]:
    out = []
    out.append("### Goals")
    out.append(_table(
        ["goal", "where", "measured", "target", "met"],
        [[g["goal"], g["where"], f"{g['value']:.3f}", f"{g['target']:g}", "yes" if g["met"] else "**no**"]
         for g in results["goals"]]))
    return out


#: the sections of the report, in order: (result key, renderer)
SECTIONS = [("prefill", _md_prefill), ("decode", _md_decode), ("train", _md_train),
            ("memory", _md_memory), ("compile", _md_compile), ("goals", _md_goals)]


def render_markdown(results: dict) -> str:
    """All tables of a result dict (missing modes are left out), goals last."""
    out = _md_meta(results)
    for key, section in SECTIONS:
        if results.get(key):
            out += section(results)
    return "\n\n".join(out) + "\n"


def _log_ticks(ax, values) -> None:
    """Ticks at exactly ``values`` on a log axis, without minor labels."""
    from matplotlib.ticker import NullFormatter

    values = sorted(set(values))
    ax.set_xticks(values, [str(v) for v in values])
    ax.xaxis.set_minor_formatter(NullFormatter())


def _panel_prefill(ax, results: dict) -> None:
    rows = [r for r in results["prefill"] if r["batch_size"] == min(x["batch_size"] for x in results["prefill"])]
    for k in sorted({r["k"] for r in rows}):
        pts = sorted((r["length"], r["ktm"]["median"]) for r in rows if r["k"] == k)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"K={k}")
    ax.set(xscale="log", yscale="log", xlabel="prompt tokens L", ylabel="time to first token (s)",
           title=f"Prefill, B={rows[0]['batch_size']}")
    _log_ticks(ax, [r["length"] for r in rows])
    ax.legend()


def _panel_speedup(ax, results: dict) -> None:
    rows = results["prefill"]
    B = min(r["batch_size"] for r in rows)
    L = max(r["length"] for r in rows if r["batch_size"] == B)
    sel = sorted((r for r in rows if r["batch_size"] == B and r["length"] == L), key=lambda r: r["k"])
    ks = [r["k"] for r in sel]
    ax.plot(ks, [r["ideal_ratio"] for r in sel], "s--", color="gray", label="ideal (plain forward)")
    ax.plot(ks, [r["speedup"] for r in sel], "o-", label="ktm end to end")
    ax.set(xscale="log", yscale="log", xlabel="K", ylabel="speedup over K=1",
           title=f"Prefill speedup, L={L}, B={B}")
    _log_ticks(ax, ks)
    ax.legend()


def _panel_decode(ax, results: dict) -> None:
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


def _panel_train(ax, results: dict) -> None:
    rows = results["train"]
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    for kind in kinds:
        pts = sorted((r["k"], r["examples_per_s"]) for r in rows if r["kind"] == kind)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-",
                label=f"{kind} (~{next(r['prompt_tokens'] for r in rows if r['kind'] == kind)} tokens)")
    ks = sorted({r["k"] for r in rows})
    ax.set(xscale="log", yscale="log", xlabel="K", ylabel="examples/s", title="Training step")
    _log_ticks(ax, ks)
    ax.legend()


def _panel_memory(ax, results: dict) -> None:
    rows = results["memory"]
    B = min(r["batch_size"] for r in rows)
    for k in sorted({r["k"] for r in rows}):
        pts = sorted((r["length"], r["kv_cache_bytes"] / 2**20, (r["peak_bytes"] or 0) / 2**20)
                     for r in rows if r["k"] == k and r["batch_size"] == B)
        line, = ax.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=f"peak K={k}")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "x:", color=line.get_color())
    ax.set(xscale="log", yscale="log", xlabel="prompt tokens L", ylabel="MiB",
           title=f"Prefill memory, B={B} (dotted: KV cache)")
    _log_ticks(ax, [r["length"] for r in rows if r["batch_size"] == B])
    ax.legend(fontsize="small")


PANELS = {"prefill": _panel_prefill, "speedup": _panel_speedup, "decode": _panel_decode,
          "train": _panel_train, "memory": _panel_memory}


def plot(results: dict, path: str | os.PathLike) -> Path:
    """One PNG with a panel per mode that has results (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in PANELS if results.get("prefill" if m == "speedup" else m)]
    if not panels:
        raise ValueError("nothing to plot: no results")
    cols = min(3, len(panels))
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.0 * cols, 4.2 * rows_n), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        PANELS[panel](ax, results)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
