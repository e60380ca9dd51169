"""The speed benchmark: its arithmetic on fake timings, and a smoke run of every mode on a
tiny random model (seconds; no thresholds on time)."""

import argparse
import dataclasses
import json
import math
import time

import pytest
import torch

from ktm.experiments import bench
from ktm.arguments import overrides

TEXT = ("def binomial(n, r):\n    c = [0] * (r + 1)\n    c[0] = 1\n    for i in range(1, n + 1):\n"
        "        j = min(i, r)\n        while j > 0:\n            c[j] += c[j - 1]\n            j -= 1\n"
        "    return c[r]\n") * 4


pytestmark = pytest.mark.usefixtures("one_thread")


def s(*xs):
    return bench.summary(xs)


# ---------------------------------------------------------------- arithmetic
def test_summary_median_and_spread():
    r = bench.summary([3.0, 1.0, 2.0, 10.0])
    assert r["median"] == 2.5 and r["min"] == 1.0 and r["max"] == 10.0 and r["n"] == 4
    assert r["spread"] == pytest.approx(9.0 / 2.5)
    assert r["q1"] <= r["median"] <= r["q3"]
    one = bench.summary([0.5])
    assert one["median"] == one["min"] == one["max"] == one["q1"] == one["q3"] == 0.5
    assert one["spread"] == 0.0
    with pytest.raises(ValueError):
        bench.median([])


def test_ratios():
    assert bench.speedup(8.0, 2.0) == 4.0
    assert bench.fraction_of_ideal(3.8, 4.0) == pytest.approx(0.95)
    assert bench.encoder_share(0.05, 1.0) == pytest.approx(0.05)
    assert bench.rate(64, 2.0) == 32.0
    for f in (bench.speedup, bench.encoder_share, bench.rate):
        with pytest.raises(ValueError):
            f(1.0, 0.0)
    with pytest.raises(ValueError):
        bench.fraction_of_ideal(1.0, 0.0)


def fake_prefill():
    # L=2048, B=1: plain forward scales 8 -> 4 -> 2 -> 1 s; ktm adds a little merge time
    rows = []
    for k, plain, ktm, merge in [(1, 8.0, 8.2, 0.2), (2, 4.0, 4.2, 0.1), (4, 2.0, 2.05, 0.05), (8, 1.0, 1.3, 0.1)]:
        rows.append({"batch_size": 1, "length": 2048, "k": k, "positions": -(-2048 // k),
                     "ktm": s(ktm, ktm * 1.1, ktm * 0.9), "merge": s(merge), "plain": s(plain)})
    rows.append({"batch_size": 8, "length": 512, "k": 2, "positions": 256,
                 "ktm": s(1.0), "merge": s(0.1), "plain": s(1.0)})  # no K=1 row of its own
    return bench.derive_prefill(rows)


def test_derive_prefill():
    rows = fake_prefill()
    k1, k2, k4, k8, orphan = rows
    assert k1["speedup"] == 1.0 and k1["ideal_ratio"] == 1.0 and k1["fraction_of_ideal"] == 1.0
    assert k2["speedup"] == pytest.approx(8.2 / 4.2)
    assert k2["ideal_ratio"] == pytest.approx(2.0)
    assert k2["fraction_of_ideal"] == pytest.approx(8.2 / 4.2 / 2.0)
    assert k4["encoder_share"] == pytest.approx(0.05 / 2.05)
    assert k8["ttft_ms"] == pytest.approx(1300.0)
    assert orphan["speedup"] is None and orphan["fraction_of_ideal"] is None
    assert orphan["encoder_share"] == pytest.approx(0.1)


def fake_decode():
    return bench.derive_decode([{"k": 4, "batch_size": 1, "length": 512, "positions": 128, "new_tokens": 64,
                                 "ktm": s(2.0), "ktm_first": s(0.4), "hf": s(2.5), "hf_first": s(0.5),
                                 "release": s(40.0)}])


def test_derive_decode():
    (r,) = fake_decode()
    assert r["ktm_tokens_per_s"] == 32.0 and r["hf_tokens_per_s"] == pytest.approx(25.6)
    assert r["release_tokens_per_s"] == pytest.approx(1.6)
    assert r["ktm_decode_tokens_per_s"] == pytest.approx(63 / 1.6)
    assert r["vs_release"] == 20.0 and r["vs_hf"] == 1.25
    (no_release,) = bench.derive_decode([{**r, "release": None}])
    assert no_release["vs_release"] is None


def fake_train():
    rows = []
    for kind, tokens, times in [("short", 120, {1: 0.5, 4: 0.4}), ("long", 2000, {1: 12.0, 4: 3.5})]:
        for k, t in times.items():
            rows.append({"kind": kind, "k": k, "batch_size": 4, "prompt_tokens": tokens // 4, "tokens": tokens,
                         "positions": tokens // k, "step": s(t)})
    return bench.derive_train(rows)


def test_derive_train():
    rows = {(r["kind"], r["k"]): r for r in fake_train()}
    assert rows["long", 1]["examples_per_s"] == pytest.approx(4 / 12.0)
    assert rows["long", 4]["tokens_per_s"] == pytest.approx(2000 / 3.5)
    assert rows["long", 4]["ratio_vs_k1"] == pytest.approx(12.0 / 3.5)
    assert rows["short", 4]["ratio_vs_k1"] == pytest.approx(0.5 / 0.4)


def fake_memory():
    return bench.derive_memory([
        {"batch_size": 1, "length": 2048, "k": 1, "positions": 2048, "peak_bytes": 400 * 2**20,
         "kv_cache_bytes": 240 * 2**20, "measured": "fake"},
        {"batch_size": 1, "length": 2048, "k": 4, "positions": 512, "peak_bytes": 100 * 2**20,
         "kv_cache_bytes": 60 * 2**20, "measured": "fake"},
        {"batch_size": 1, "length": 512, "k": 4, "positions": 128, "peak_bytes": None,
         "kv_cache_bytes": 15 * 2**20, "measured": "fake"}])


def test_derive_memory():
    k1, k4, orphan = fake_memory()
    assert k1["kv_ratio_vs_k1"] == 1.0 and k4["kv_ratio_vs_k1"] == 4.0 and k4["peak_ratio_vs_k1"] == 4.0
    assert orphan["kv_ratio_vs_k1"] is None and orphan["peak_ratio_vs_k1"] is None


def fake_results():
    res = {"meta": {"model": "fake", "dtype": "float32", "date": "today", "command": "ktm bench speed"},
           "prefill": fake_prefill(), "decode": fake_decode(), "train": fake_train(), "memory": fake_memory()}
    res["goals"] = bench.check_goals(res)
    return res


def test_check_goals():
    goals = fake_results()["goals"]
    by = {(g["goal"], g["where"]): g for g in goals}
    frac = [g for g in goals if "ideal" in g["goal"]]
    assert [g["where"] for g in frac] == ["L=2048, B=1, K=2", "L=2048, B=1, K=4", "L=2048, B=1, K=8"]
    assert [g["met"] for g in frac] == [True, True, False]  # 0.976, 0.976, 0.788
    share = [g for g in goals if "encoder" in g["goal"]]
    assert [g["met"] for g in share] == [True, True, False]  # 2.4%, 2.4%, 7.7%
    dec = [g for g in goals if "decoding" in g["goal"]]
    assert len(dec) == 2 and all(g["met"] for g in dec)
    (train,) = [g for g in goals if "training" in g["goal"]]
    assert train["value"] == pytest.approx(12.0 / 3.5) and train["met"]
    assert len(by) == len(goals)


def test_goals_use_longest_length_without_2048():
    rows = [dict(r, length=1024) for r in fake_prefill()[:4]]
    goals = bench.check_goals({"prefill": bench.derive_prefill(rows)})
    assert goals and all("L=1024" in g["where"] for g in goals)


def test_render_markdown_tables():
    md = bench.render_markdown(fake_results())
    for heading in ("### Prefill", "### Decoding", "### Training", "### Memory", "### Goals"):
        assert heading in md
    assert "| 1 | 2048 | 4 | 512 | – | 2050.0 (1845.0–2255.0) |" in md
    assert "97.6%" in md and "**no**" in md and "20.0x" in md
    assert "Command: `ktm bench speed`" in md
    # every table row has as many cells as its header
    for block in md.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        if lines:
            assert len({ln.count("|") for ln in lines}) == 1
    only = bench.render_markdown({"train": fake_train()})
    assert "### Training" in only and "### Prefill" not in only


def test_plot_writes_png(tmp_path):
    path = bench.plot(fake_results(), tmp_path / "x" / "speed.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        bench.plot({}, tmp_path / "empty.png")


def test_measure_round_robin():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = bench.measure(fns, warmup=2, repeats=3)
    assert calls == ["a", "b"] * 5
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    slow = bench.measure({"sleep": lambda: time.sleep(0.02), "fast": lambda: None}, warmup=0, repeats=2)
    assert all(t >= 0.02 for t in slow["sleep"]) and all(t < 0.02 for t in slow["fast"])
    with pytest.raises(ValueError):
        bench.measure(fns, repeats=0)


# ---------------------------------------------------------------- inputs and model pieces
def test_windows_and_texts(tokenizer):
    assert bench.window([1, 2, 3], 2, 5) == [3, 1, 2, 3, 1]
    stream = bench.token_stream(tokenizer, TEXT, min_tokens=10 * len(TEXT))
    assert len(stream) >= 10 * len(TEXT)
    a, b = bench.id_prompts(stream, 50, 2)
    assert len(a) == len(b) == 50 and a != b
    texts = bench.texts_of_length(tokenizer, stream, 37, 3)
    assert [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts] == [37, 37, 37]
    prompts, answers = bench.tree_examples(5)
    assert len(prompts) == 5 and set(answers) <= {"true", "false"} and prompts[0].startswith("Tree: ")


def test_corpus_text(tmp_path):
    assert "def run_speed" in bench.corpus_text()
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"old_contents": "x = 1"}) + "\n" + json.dumps({"old_contents": "y = 2"}) + "\n")
    assert bench.corpus_text(f) == "x = 1\n\ny = 2"
    f.write_text(json.dumps({"other": 1}) + "\n")
    with pytest.raises(ValueError):
        bench.corpus_text(f)


def test_with_k_shares_the_llm(make_model):
    m = make_model(k=1)
    m4 = bench.with_k(m, 4)
    assert m4.k == 4 and m4.encoder.k == 4 and m4.lm is m.lm and m.k == 1
    assert bench.with_k(m, 1) is m
    assert m4.merge_prompts(["abcdefgh"])[0].shape[1] == 2


def test_prefill_matches_generate_and_cache_bytes(make_model, tokenizer):
    m = make_model(k=4)
    ids = m.tokenize(["hello world, a prompt", "short"])
    with torch.inference_mode():
        nxt, cache = bench.prefill(m, ids)
    # stop_at_end=False: the first token is kept even when it is an end token
    first = [row[0] for row in m.generate(["hello world, a prompt", "short"], 1, return_tokens=True,
                                          stop_at_end=False)]
    assert nxt.tolist() == first
    cfg = m.llm_config
    positions = math.ceil(len(ids[0]) / 4)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    # keys + values, every layer, (B, kv heads, positions, head dim) float32
    assert bench.cache_nbytes(cache) == 2 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * positions * head_dim * 4
    with torch.inference_mode():
        _, plain_cache = bench.plain_prefill(m, [x[:positions] for x in ids])
    assert bench.cache_nbytes(plain_cache) == bench.cache_nbytes(cache)


def test_generate_without_stopping_gives_every_token(make_model):
    m = make_model(k=2)
    saved = list(m.eos_ids)
    full = m.generate(["abc", "hello there"], 7, return_tokens=True, stop_at_end=False)
    assert [len(x) for x in full] == [7, 7] and m.eos_ids == saved
    # the usual answer is the same tokens cut at the first end token
    cut = m.generate(["abc", "hello there"], 7, return_tokens=True)
    for f, c in zip(full, cut):
        n = next((i for i, t in enumerate(f) if t in m.eos_ids), len(f))
        assert c == f[:n]


def test_peak_memory_sees_an_allocation():
    peak, out, what = bench.peak_memory(lambda: torch.ones(64, 2**20 // 4 * 4).sum(), "cpu")  # 64 MiB
    assert "RSS" in what and float(out) == 64 * 2**20
    if peak is not None:  # Linux
        assert peak > 32 * 2**20


# ---------------------------------------------------------------- smoke run of every mode
def test_run_speed_smoke(make_model, tmp_path):
    m = make_model(k=1)
    lines = []
    bench.run_speed(m, modes=bench.DEFAULT_MODES, lengths=[8, 24], ks=[4], batch_sizes=[1, 2],
                    max_batch_tokens=32, repeats=2, warmup=0, new_tokens=3, decode_length=12,
                    release_repeats=1, train_batch_size=2, train_long_length=20, corpus=None,
                    out=tmp_path, command="test", log=lines.append)
    files = {p.name for p in tmp_path.iterdir()}
    assert files == {"speed.json", "speed.md", "speed.png"}
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["meta"]["command"] == "test" and saved["meta"]["threads"] >= 1
    pre = saved["prefill"]
    # B=2, L=48 skipped by max_batch_tokens; K=1 added to the K list
    assert {(r["batch_size"], r["length"], r["k"]) for r in pre} == {
        (b, L, k) for b, L in [(1, 8), (1, 24), (2, 8)] for k in (1, 4)}
    assert all(r["ktm"]["n"] == 2 and r["fraction_of_ideal"] > 0 for r in pre)
    assert [r["k"] for r in saved["decode"]] == [4]
    assert all(r["release"]["n"] == 1 and r["ktm_tokens_per_s"] > 0 for r in saved["decode"])
    assert {(r["kind"], r["k"]) for r in saved["train"]} == {(kind, k) for kind in ("short", "long") for k in (1, 4)}
    assert all(r["kv_cache_bytes"] > 0 for r in saved["memory"])
    assert saved["goals"] and (tmp_path / "speed.md").read_text() == bench.render_markdown(saved)
    assert any("skipped" in ln for ln in lines)
    assert not m.training


def test_finished_modes_are_saved_when_a_later_one_fails(make_model, tmp_path, monkeypatch):
    """A run stopped by an error or a time limit keeps the modes it finished."""
    def broken(*a, **kw):
        raise RuntimeError("out of time")

    monkeypatch.setattr(bench, "bench_decode", broken)
    with pytest.raises(RuntimeError, match="out of time"):
        bench.run_speed(make_model(k=1), modes=["prefill", "decode"], lengths=[8], ks=[2], batch_sizes=[1],
                        repeats=1, warmup=0, out=tmp_path, log=lambda line: None)
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert [r["k"] for r in saved["prefill"]] == [1, 2] and "decode" not in saved
    assert "Prefill" in (tmp_path / "speed.md").read_text()


def test_compile_mode_compares_eager_and_compiled(make_model):
    """Traced by dynamo (aot_eager: no code generation, fast on CPU); same tokens as eager."""
    import torch

    torch._dynamo.reset()
    m = make_model(k=2)
    stream = bench.token_stream(m.tokenizer, bench.corpus_text(None), 4000)
    rows = bench.bench_compile(m, stream, compile_modes=["default"], lengths=[16, 40, 4096], ks=[2],
                               batch_sizes=[1], decode_length=24, new_tokens=4, warmup=0, repeats=1,
                               backend="aot_eager", log=lambda line: None)
    pre = [r for r in rows if r["what"] == "prefill"]
    dec = [r for r in rows if r["what"] == "decode"]
    # L = 4096 is over the compile mode's 2048 (and the tiny model's 256 positions)
    assert {(r["length"], r["k"]) for r in pre} == {(16, 1), (16, 2), (40, 1), (40, 2)}
    assert [r["k"] for r in dec] == [1, 2] and all(r["agree"] == 1.0 for r in dec)
    assert all(r["speedup"] == r["eager"]["median"] / r["compiled"]["median"] for r in rows)
    goals = bench.check_goals({"compile": rows})
    assert len(goals) == len(rows) and all(g["target"] == 2.0 for g in goals)
    assert "torch.compile" in bench.render_markdown({"compile": rows})


def test_cli_parser():
    p = argparse.ArgumentParser(prog="ktm")
    sub = p.add_subparsers(dest="command", required=True)
    bench.register(sub)
    args = p.parse_args(["bench", "speed", "--device", "cpu", "--lengths", "512", "1024", "--ks", "1", "4",
                         "--modes", "prefill", "memory", "--out", "x"])
    assert args.func is bench.cmd_speed
    cfg = bench.BenchConfig(**overrides(args, bench.BenchConfig))  # what cmd_speed runs
    assert cfg.lengths == [512, 1024] and cfg.ks == [1, 4] and cfg.modes == ["prefill", "memory"]
    assert cfg.batch_sizes == (1, 8) and cfg.repeats == 3 and cfg.warmup == 1 and cfg.new_tokens == 64
    assert args.model is None and cfg.out == "x" and cfg.device == "cpu"
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "speed", "--modes", "nope"])
    # every flag is a field of the one options dataclass
    flags = {a.dest for a in sub.choices["bench"]._subparsers._group_actions[0].choices["speed"]._actions}
    assert flags - {"help", "model"} == {f.name for f in dataclasses.fields(bench.BenchConfig)}


def test_bench_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown modes"):
        bench.BenchConfig(modes=("prefill", "fast"))
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        bench.BenchConfig(repeats=0)
    with pytest.raises(ValueError, match="every value of ks must be >= 1"):
        bench.BenchConfig(ks=(0, 4))
