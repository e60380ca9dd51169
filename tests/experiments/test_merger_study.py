"""benchmarks/merger_study.py: the cells it trains, reruns, and the spread it reports."""

import json
import statistics

import pytest


def _module():
    from conftest import load_benchmark

    return load_benchmark("merger_study")


def test_variants_map_to_train_options():
    mod = _module()
    pre = mod.parse_pretrained(["4=p4", "2:1=p21"])
    assert pre == {(4, 0): "p4", (2, 1): "p21"}
    assert mod.variant_args("k1", 4, pre) == ["--k", "1"]
    assert mod.variant_args("keep-first", 2, pre) == ["--method", "keep-first", "--k", "2"]
    assert mod.variant_args("ctx4", 4, pre) == ["--k", "4", "--context-layers", "4"]
    assert mod.variant_args("pre-ctx1", 2, pre) == ["--k", "2", "--init-from", "p21"]
    with pytest.raises(SystemExit, match="needs --pretrained 2=PATH"):
        mod.variant_args("pre", 2, pre)
    with pytest.raises(SystemExit, match="unknown variant"):
        mod.variant_args("ctx", 4, pre)
    with pytest.raises(SystemExit, match="K=PATH"):
        mod.parse_pretrained(["four=p"])
    assert mod.cell_name("k1", 4, 2) == "k1-s2" and mod.cell_name("pre-ctx2", 4, 0) == "pre-ctx2-k4-s0"


@pytest.fixture
def in_process(monkeypatch):
    """Run each cell's ``ktm train`` in this process (a subprocess would re-import torch)."""
    from ktm.cli import main

    calls = []

    def call(cmd, stdout=None, stderr=None):
        calls.append(cmd[1:])
        return main(cmd[1:])

    mod = _module()
    monkeypatch.setattr(mod, "ktm_command", lambda: ["ktm"])
    monkeypatch.setattr(mod.subprocess, "call", call)
    return mod, calls


def test_run_trains_each_cell_once_and_reports_the_spread(base_dir, tmp_path, in_process, capsys):
    mod, calls = in_process
    data = tmp_path / "task"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(
            json.dumps({"prompt": f"word {w} here, Label:", "answer": w}) + "\n" for w in "abcdef"))
    out = tmp_path / "study"
    common = ["--", "--task", "jsonl", "--data", str(data), "--model", base_dir, "--steps", "2", "--batch-size", "2",
              "--eval-every", "1", "--eval-examples", "4"]
    mod.main(["run", "--out", str(out), "--variants", "k1", "--k", "4", "--seeds", "0", "1", *common])
    mod.main(["run", "--out", str(out), "--variants", "scratch", "--k", "4", "--seeds", "0", *common])
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["k1-s0", "k1-s1", "scratch-k4-s0"]
    assert [c[c.index("--seed") + 1] for c in calls] == ["0", "1", "0"] and calls[0][calls[0].index("--k") + 1] == "1"
    # a pretrained merger is any saved model of that K; rerunning keeps the finished cells
    mod.main(["run", "--out", str(out), "--variants", "scratch", "pre", "--seeds", "0", "--pretrained",
              f"4={out / 'scratch-k4-s0' / 'model'}", *common])
    assert len(calls) == 4 and "--init-from" in calls[-1] and "done, kept" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="set per cell"):
        mod.main(["run", "--out", str(out), "--variants", "k1", "--", "--seed", "3"])

    # a cell still training (history, no model yet) is not reported
    (out / "pre-k4-s1").mkdir()
    (out / "pre-k4-s1" / "history.json").write_text(json.dumps({"history": [{"step": 1, "value": 0.0}]}))
    mod.main(["report", str(out), "--out", str(tmp_path / "doc" / "study")])
    summary = json.loads((tmp_path / "doc" / "study.json").read_text())["cells"]
    assert set(summary) == {"k1", "scratch-k4", "pre-k4"}
    # run_config.json records the command each cell ran
    assert json.loads((out / "pre-k4-s0" / "run_config.json").read_text())["argv"] == calls[-1]
    finals = [json.loads((out / f"k1-s{s}" / "history.json").read_text())["history"][-1]["value"] for s in (0, 1)]
    assert summary["k1"]["final"]["mean"] == pytest.approx(statistics.fmean(finals))
    assert summary["k1"]["final"]["sd"] == pytest.approx(statistics.stdev(finals))
    assert summary["k1"]["steps"] == [1, 2] and summary["pre-k4"]["seeds"] == [0]
    md = (tmp_path / "doc" / "study.md").read_text()
    assert "| k1 | 0,1 |" in md and "--init-from" in md
    # several folders: a label tells their variants apart
    mod.main(["report", str(out), f"{out}=again", "--out", str(tmp_path / "doc" / "two")])
    two = json.loads((tmp_path / "doc" / "two.json").read_text())["cells"]
    assert set(two) == {"k1", "scratch-k4", "pre-k4", "k1 (again)", "scratch-k4 (again)", "pre-k4 (again)"}
    assert two["k1 (again)"]["final"] == two["k1"]["final"]
    assert (tmp_path / "doc" / "study.png").stat().st_size > 1000
    # --k keeps one K's cells and the K = 1 reference
    mod.main(["report", str(out), "--k", "2", "--out", str(tmp_path / "doc" / "k2")])
    assert set(json.loads((tmp_path / "doc" / "k2.json").read_text())["cells"]) == {"k1"}
    mod.main(["report", str(out), "--k", "4", "--out", str(tmp_path / "doc" / "k4")])
    assert set(json.loads((tmp_path / "doc" / "k4.json").read_text())["cells"]) == {"k1", "scratch-k4", "pre-k4"}
    # --seeds keeps those seeds' cells (k1 has seeds 0 and 1, the others seed 0 only)
    mod.main(["report", str(out), "--seeds", "1", "--out", str(tmp_path / "doc" / "s1")])
    s1 = json.loads((tmp_path / "doc" / "s1.json").read_text())["cells"]
    assert set(s1) == {"k1"} and s1["k1"]["seeds"] == [1] and s1["k1"]["final"]["mean"] == pytest.approx(finals[1])
    with pytest.raises(SystemExit, match="no finished cells at K = 4 of seeds 7"):
        mod.main(["report", str(out), "--k", "4", "--seeds", "7", "--out", str(tmp_path / "doc" / "none")])


def test_a_failed_cell_stops_the_study(tmp_path, monkeypatch):
    mod = _module()
    monkeypatch.setattr(mod, "ktm_command", lambda: ["ktm"])
    monkeypatch.setattr(mod.subprocess, "call", lambda cmd, stdout=None, stderr=None: 2)
    with pytest.raises(SystemExit, match="k1-s0 failed"):
        mod.main(["run", "--out", str(tmp_path / "s"), "--variants", "k1", "--seeds", "0", "--", "--steps", "1"])


def _cell(folder, name, value, seed_step=3):
    cell = folder / name
    (cell / "model").mkdir(parents=True)
    (cell / "history.json").write_text(json.dumps({"history": [{"step": seed_step, "value": value, "macro_f1": value}]}))
    (cell / "run_config.json").write_text(json.dumps({"argv": ["train", "--out", str(cell)]}))


def test_report_pairs_each_merged_variant_with_keep_first_and_k1_seed_by_seed(tmp_path):
    mod = _module()
    study = tmp_path / "study"
    values = {"k1": [0.80, 0.84, 0.82], "keep-first-k2": [0.70, 0.75, 0.73], "pre-k2": [0.78, 0.74, 0.80]}
    for group, per_seed in values.items():
        for seed, v in enumerate(per_seed):
            _cell(study, f"{group}-s{seed}", v)
    _cell(study, "pre-k4-s1", 0.6)  # no keep-first at K = 4: paired with K = 1 only
    mod.main(["report", f"{study}=demo", "--out", str(tmp_path / "doc" / "p")])
    pairs = {(r["variant"], r["against"]): r for r in json.loads((tmp_path / "doc" / "p.json").read_text())["paired"]}
    vs_keep = pairs[("pre-k2 (demo)", "keep-first-k2")]
    assert vs_keep["diffs"] == pytest.approx([0.08, -0.01, 0.07]) and vs_keep["wins"] == 2
    assert vs_keep["mean"] == pytest.approx(statistics.fmean([0.08, -0.01, 0.07]))
    assert vs_keep["sd"] == pytest.approx(statistics.stdev([0.08, -0.01, 0.07]))
    assert pairs[("pre-k2 (demo)", "k1")]["diffs"] == pytest.approx([-0.02, -0.10, -0.02])
    assert pairs[("keep-first-k2 (demo)", "k1")]["wins"] == 0
    assert pairs[("pre-k4 (demo)", "k1")]["seeds"] == [1] and ("pre-k4 (demo)", "keep-first-k4") not in pairs
    md = (tmp_path / "doc" / "p.md").read_text()
    assert "| pre-k2 (demo) | keep-first-k2 | s0: +8.0, s1: -1.0, s2: +7.0 |" in md and "2 of 3 seeds" in md
    assert vs_keep["macro_f1"]["diffs"] == pytest.approx([0.08, -0.01, 0.07])  # the cells' macro-F1 = value here
    assert "| s0: +0.080, s1: -0.010, s2: +0.070 |" in md


def test_an_earlier_report_is_a_source_that_reports_the_same_numbers(tmp_path):
    mod = _module()
    study, later = tmp_path / "study", tmp_path / "later"
    for group, per_seed in {"k1": [0.80, 0.84, 0.82], "keep-first-k2": [0.70, 0.75, 0.73],
                            "pre-k2": [0.78, 0.74, 0.80], "keep-first-k4": [0.6]}.items():
        for seed, v in enumerate(per_seed):
            _cell(study, f"{group}-s{seed}", v)
    for seed, v in enumerate([0.66, 0.61, 0.70]):  # cells of a later session, on another machine
        _cell(later, f"pre-k4-s{seed}", v)
    _cell(later, "keep-first-k4-s0", 0.1)  # also in the first source: the first one's is kept
    for seed, v in ((1, 0.64), (2, 0.62)):
        _cell(later, f"keep-first-k4-s{seed}", v)
    first = tmp_path / "doc" / "first"
    mod.main(["report", f"{study}=long", "--out", str(first)])
    # the report alone gives back its own numbers
    mod.main(["report", f"{first}.json:long=long", "--out", str(tmp_path / "doc" / "again")])
    read = lambda name: json.loads((tmp_path / "doc" / f"{name}.json").read_text())
    assert read("again")["cells"] == read("first")["cells"] and read("again")["paired"] == read("first")["paired"]
    # and combined with new cells it pairs them with the old references, seed by seed
    mod.main(["report", f"{first}.json:long+{later}=long", "--out", str(tmp_path / "doc" / "both")])
    both = read("both")
    assert both["cells"]["keep-first-k4 (long)"]["final"]["values"] == [0.6, 0.64, 0.62]
    pairs = {(r["variant"], r["against"]): r for r in both["paired"]}
    assert pairs[("pre-k4 (long)", "k1")]["diffs"] == pytest.approx([-0.14, -0.23, -0.12])
    assert pairs[("pre-k4 (long)", "keep-first-k4")]["diffs"] == pytest.approx([0.06, -0.03, 0.08])
    assert pairs[("pre-k2 (long)", "keep-first-k2")]["diffs"] == pytest.approx([0.08, -0.01, 0.07])
    with pytest.raises(SystemExit, match="no cells labelled 'demo'; its labels: long"):
        mod.main(["report", f"{first}.json:demo", "--out", str(tmp_path / "doc" / "x")])
    with pytest.raises(SystemExit, match="no cells without a label; its labels: long"):
        mod.main(["report", f"{first}.json", "--out", str(tmp_path / "doc" / "x")])


def test_loco_holds_out_every_review_of_one_category(tmp_path, capsys):
    mod = _module()
    src = tmp_path / "reviews"
    src.mkdir()
    rows = {"train": [("Books", 5.0), ("DVD", 1.0), ("Books", 2.0), ("DVD", 4.0)], "dev": [("DVD", 5.0), ("Books", 1.0)]}
    for split, part in rows.items():
        (src / f"{split}.jsonl").write_text("".join(json.dumps({"rating": r, "text": f"{c} {i}", "category": c}) + "\n"
                                                    for i, (c, r) in enumerate(part)))
    mod.main(["loco", "--reviews", str(src), "--hold-out", "DVD", "--out", str(tmp_path / "loco")])
    read = lambda name: [json.loads(x) for x in (tmp_path / "loco" / f"{name}.jsonl").read_text().splitlines()]
    assert {r["category"] for r in read("train")} == {"Books"} and len(read("train")) == 2
    assert sorted(r["text"] for r in read("test")) == ["DVD 0", "DVD 1", "DVD 3"]  # training and dev reviews of DVD
    assert "test 3 reviews of DVD" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="categories are Books, DVD"):
        mod.main(["loco", "--reviews", str(src), "--hold-out", "Toys", "--out", str(tmp_path / "x")])


def test_eval_precision_benchmark_compares_the_two_precisions(base_dir, tmp_path):
    from conftest import load_benchmark
    from ktm import KTokenMerging

    KTokenMerging.from_base(base_dir, k=2, device="cpu", dtype="float32").save_pretrained(tmp_path / "m")
    reviews = tmp_path / "reviews"
    reviews.mkdir()
    for split in ("train", "test"):
        (reviews / f"{split}.jsonl").write_text("".join(
            json.dumps({"rating": 5.0 if i % 2 else 1.0, "text": f"item {i} " * 3}) + "\n" for i in range(6)))
    out = tmp_path / "eval.json"
    summary = load_benchmark("eval_precision").main(["--model", str(tmp_path / "m"), "--reviews", str(reviews),
                                                     "--examples", "4", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(summary))
    assert summary["examples"] == 4 and 0 <= summary["answers_differ"] <= 4
    assert summary["float32"]["seconds"] > 0 and 0.0 <= summary["bf16"]["accuracy"] <= 1.0
