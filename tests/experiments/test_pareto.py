"""ktm pareto: the frontier arithmetic on hand-made points, and a grid end to end on a tiny
model, interrupted and resumed."""

import csv
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ktm.experiments.pareto as pareto
from ktm.cli import main
from ktm.experiments.frontier import length_reduction, normalised_performance, p_lf1, pareto_front
from ktm.experiments.pareto import Cell, GridConfig, cell_model_config, grid_cells, run_grid
from ktm.experiments.pareto_report import score_rows


# ---------------------------------------------------------------- arithmetic
def test_length_reduction_counts_positions_over_the_whole_set():
    assert length_reduction([10, 30], [3, 8]) == pytest.approx(1 - 11 / 40)
    assert length_reduction([4], [4]) == 0.0
    with pytest.raises(ValueError, match="equally many"):
        length_reduction([1, 2], [1])
    with pytest.raises(ValueError, match=">= 0"):
        length_reduction([0], [0])


def test_normalised_performance_is_one_for_plain_and_inverts_perplexity():
    assert normalised_performance(0.8, 0.8, "accuracy") == 1.0
    assert normalised_performance(0.4, 0.8, "accuracy") == 0.5
    assert normalised_performance(3.0, 3.0, "perplexity") == 1.0
    assert normalised_performance(6.0, 3.0, "perplexity") == 0.5  # twice the perplexity: half as good
    with pytest.raises(ValueError, match="unknown metric"):
        normalised_performance(1.0, 1.0, "bleu")
    with pytest.raises(ValueError, match="cannot normalise"):
        normalised_performance(0.5, 0.0, "accuracy")


def test_p_lf1_by_hand():
    assert p_lf1(1.0, 0.75) == pytest.approx(2 * 0.75 / 1.75)
    assert p_lf1(0.5, 0.5) == pytest.approx(0.5)
    assert p_lf1(1.0, 0.0) == 0.0 and p_lf1(0.0, 0.75) == 0.0 and p_lf1(0.0, 0.0) == 0.0
    with pytest.raises(ValueError):
        p_lf1(1.0, 1.5)


@given(st.floats(0.01, 2.0), st.floats(0.01, 1.0))
def test_p_lf1_lies_between_its_two_parts(perf, red):
    assert min(perf, red) - 1e-12 <= p_lf1(perf, red) <= max(perf, red) + 1e-12


def test_frontier_on_hand_made_points():
    # plain (0, .9); merge K=2 (.5, .7) is beaten by keep-first K=2 (.5, .8); K=4 points
    pts = [(0.0, 0.9), (0.5, 0.7), (0.5, 0.8), (0.75, 0.6), (0.75, 0.75), (0.875, 0.5)]
    assert pareto_front(pts) == [True, False, True, False, True, True]
    assert pareto_front([(0.5, 0.5), (0.5, 0.5)]) == [True, True]  # ties stay
    assert pareto_front([]) == []


@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=12))
def test_frontier_points_are_not_dominated_and_the_rest_are(points):
    front = pareto_front(points)
    assert any(front)
    for (r, p), on in zip(points, front):
        beaten = any(r2 >= r and p2 >= p and (r2, p2) != (r, p) for r2, p2 in points)
        assert on == (not beaten)


def test_a_majority_class_model_scores_zero_over_majority():
    from ktm.experiments.frontier import above_majority

    rows = [dict(method="plain", k=1, metric="accuracy", value=0.8, majority_rate=0.6, length_reduction=0.0),
            dict(method="merge", k=4, metric="accuracy", value=0.6, majority_rate=0.6, length_reduction=0.75),
            dict(method="keep-first", k=4, metric="accuracy", value=0.7, majority_rate=0.6, length_reduction=0.75)]
    plain, merge, first = score_rows(rows)
    assert merge["normalised_performance"] == pytest.approx(0.75)  # looks good on plain's scale ...
    assert merge["above_majority"] == 0.0 and merge["p_lf1_over_majority"] == 0.0  # ... but learned nothing
    assert first["above_majority"] == pytest.approx(0.5) and first["p_lf1_over_majority"] == pytest.approx(0.6)
    assert plain["above_majority"] == 1.0
    assert above_majority(0.7, 0.6, 0.6) is None  # plain itself at the majority class: undefined


def test_score_rows_uses_plain_as_reference_and_lower_perplexity_as_better():
    rows = [dict(method="plain", k=1, metric="perplexity", value=2.0, length_reduction=0.0),
            dict(method="merge", k=4, metric="perplexity", value=4.0, length_reduction=0.75),
            dict(method="stride", k=4, metric="perplexity", value=8.0, length_reduction=0.75)]
    scored = score_rows(rows)
    assert [r["normalised_performance"] for r in scored] == [1.0, 0.5, 0.25]
    assert scored[1]["p_lf1"] == pytest.approx(2 * 0.5 * 0.75 / 1.25)
    assert [r["on_frontier"] for r in scored] == [True, True, False]


# ---------------------------------------------------------------- grid
def test_grid_cells_always_start_with_plain_and_skip_k1():
    assert [c.name for c in grid_cells(["merge"], [1, 4])] == ["plain", "merge-k4"]
    assert [c.name for c in grid_cells(["plain"], [2])] == ["plain"]
    with pytest.raises(ValueError, match="unknown method"):
        grid_cells(["zip"], [2])
    with pytest.raises(ValueError, match="K must be"):
        grid_cells(["merge"], [0])


def test_each_method_gets_its_model_settings():
    recipe = dict(lora_r=8, encoder_init="mean")
    assert cell_model_config(Cell("plain", 1), recipe).k == 1
    assert cell_model_config(Cell("merge", 4), recipe).method == "merge"
    assert cell_model_config(Cell("merge-random-init", 4), recipe).encoder_init == "random"
    assert cell_model_config(Cell("mean", 2), recipe).method == "mean"
    cfg = cell_model_config(Cell("stride", 4), {**recipe, "encoder_init": "paper"})
    assert (cfg.method, cfg.k, cfg.encoder_init) == ("stride", 4, "mean")
    assert cell_model_config(Cell("llmlingua2", 4), recipe).k == 1  # reads the compressed prompts plainly
    ln = {**recipe, "encoder_layernorm": True}  # a recipe's LayerNorm is for merged blocks only
    assert cell_model_config(Cell("merge", 4), ln).encoder_layernorm
    assert not cell_model_config(Cell("plain", 1), ln).encoder_layernorm
    assert not cell_model_config(Cell("keep-first", 4), ln).encoder_layernorm


def _data(folder, n_train=24, n_test=8):
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [{"prompt": f"x {'ab' * (i % 4 + 2)} y", "answer": "yes" if i % 2 else "no"} for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def _grid(data, base_dir, **kw):
    return GridConfig(**{**dict(task="jsonl", task_options={"data": data}, steps=3, batch_size=2, eval_examples=6,
                                model=base_dir, dtype="float32"), **kw})


def test_two_cell_grid_end_to_end_interrupted_and_resumed(tmp_path, base_dir, monkeypatch):
    data, out = _data(tmp_path / "data"), tmp_path / "grid"
    grid = _grid(data, base_dir)
    real = pareto.time_prefill

    def crash_on_merge(model, plain, cell, repeats=5):
        if model.k == 2:
            raise KeyboardInterrupt  # the process stops after merge-k2 trained, before it was scored
        return real(model, plain, cell, repeats=2)

    monkeypatch.setattr(pareto, "time_prefill", crash_on_merge)
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, ["merge"], [2], out, device="cpu", progress=False, log=lambda s: None)
    plain_done = out / "cells" / "plain" / "cell.json"
    assert plain_done.is_file() and not (out / "cells" / "merge-k2" / "cell.json").exists()
    assert json.loads((out / "pareto.json").read_text())["cells"][0]["cell"] == "plain"  # report after each cell
    stamp = plain_done.stat().st_mtime_ns
    history = json.loads((out / "cells" / "merge-k2" / "run" / "history.json").read_text())["history"]

    monkeypatch.setattr(pareto, "time_prefill", lambda m, p, c, repeats=5: real(m, p, c, repeats=2))
    rows = run_grid(grid, ["merge"], [2], out, device="cpu", progress=False, log=lambda s: None)
    assert plain_done.stat().st_mtime_ns == stamp  # reused, not retrained
    again = json.loads((out / "cells" / "merge-k2" / "run" / "history.json").read_text())["history"]
    assert again == history  # resumed at its last step: no step trained twice
    assert [r["cell"] for r in rows] == ["plain", "merge-k2"]
    plain, merge = rows
    assert plain["length_reduction"] == 0.0 and plain["llm_positions"] == plain["prompt_tokens"]
    # the character tokenizer gives one token per character
    lengths = [len(f"x {'ab' * (i % 4 + 2)} y") for i in range(8)]
    assert merge["prompt_tokens"] == pytest.approx(sum(lengths[i] for i in _scored(grid)) / 6)
    assert merge["length_reduction"] == pytest.approx(
        1 - sum((lengths[i] + 1) // 2 for i in _scored(grid)) / sum(lengths[i] for i in _scored(grid)))
    assert merge["prefill_ratio"] > 0 and merge["steps"] == 3
    assert 0.0 <= merge["value"] <= 1.0 and "macro_f1" in merge and merge["metric"] == "accuracy"
    table = list(csv.DictReader((out / "pareto.csv").open()))
    assert [r["cell"] for r in table] == ["plain", "merge-k2"] and table[0]["normalised_performance"] in ("1.0", "")
    assert (out / "pareto.png").stat().st_size > 1000 and "P-LF1" in (out / "pareto.md").read_text()


def _scored(grid):
    """The indices of the test examples a grid scores (the evaluator's fixed subset)."""
    import random

    return random.Random(grid.seed).sample(range(8), grid.eval_examples)


def test_a_grid_refuses_other_settings_in_the_same_folder(tmp_path, base_dir):
    data, out = _data(tmp_path / "data"), tmp_path / "grid"
    out.mkdir()
    pareto.check_grid(out, _grid(data, base_dir), overwrite=False)
    with pytest.raises(ValueError, match=r"other settings \(steps: 3 -> 5\)"):
        pareto.check_grid(out, _grid(data, base_dir, steps=5), overwrite=False)
    pareto.check_grid(out, _grid(data, base_dir, steps=5), overwrite=True)  # starts over


def test_cli_pareto_runs_a_grid(tmp_path, base_dir, capsys):
    data, out = _data(tmp_path / "data"), tmp_path / "grid"
    assert main(["pareto", "--task", "jsonl", "--data", data, "--methods", "keep-first", "--k", "2",
                 "--steps", "2", "--batch-size", "2", "--eval-examples", "4", "--timing-prompts", "2",
                 "--model", base_dir, "--device", "cpu", "--dtype", "float32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| keep-first | 2 |" in printed and "pareto.md" in printed
    cells = json.loads((out / "pareto.json").read_text())["cells"]
    assert [c["cell"] for c in cells] == ["plain", "keep-first-k2"]


# ---------------------------------------------------------------- the real-data demo
def _rows(plain, merge, first, majority=0.6, n=200):
    def row(method, k, acc, f1):
        return dict(method=method, k=k, value=acc, macro_f1=f1, majority_rate=majority, n=n,
                    length_reduction=0.0 if k == 1 else 0.74, prefill_speedup=1.0 if k == 1 else 2.5)
    return [row("plain", 1, *plain), row("merge", 4, *merge), row("keep-first", 4, *first)]


def test_the_verdict_follows_the_numbers():
    from ktm.experiments.demo import amazon_verdict

    lose = amazon_verdict(_rows((0.80, 0.78), (0.60, 0.38), (0.70, 0.66)))
    assert "stayed at the majority class" in lose and "keep-first" in lose and "does not pay" in lose
    win = amazon_verdict(_rows((0.80, 0.78), (0.79, 0.77), (0.70, 0.66)))
    assert "beats keep-first (the first 1/4 of each review) by 9.0 points" in win and "level with merging" in win
    tie = amazon_verdict(_rows((0.80, 0.78), (0.71, 0.69), (0.70, 0.66)))
    assert "level with it" in tie and "9.0 points above merging" in tie


def test_amazon_demo_on_a_tiny_model(tmp_path, base_dir):
    from ktm.experiments.demo import run_amazon_demo

    reviews = tmp_path / "reviews"
    reviews.mkdir()
    for split, n in (("train", 16), ("test", 6)):
        rows = [{"rating": 5.0 if i % 3 else 1.0, "text": f"item {'good ' * (i % 3 + 1)}", "parent_asin": f"p{i}"}
                for i in range(n)]
        (reviews / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = []
    summary = run_amazon_demo(reviews, out=str(tmp_path / "demo"), steps=2, eval_examples=6, model=base_dir,
                              device="cpu", log=lines.append, progress=False)
    assert [r["cell"] for r in summary["rows"]] == ["plain", "merge-k4", "keep-first-k4"]
    text = "\n".join(lines)
    assert "verdict: K-Token Merging at K = 4" in text and "keep-first (K = 4)" in text
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["verdict"] == summary["verdict"]


def test_the_demo_without_reviews_says_what_to_pass(monkeypatch, tmp_path):
    import ktm.experiments.demo as demo

    monkeypatch.setattr(demo, "_SHARED_REVIEWS", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="--reviews FOLDER"):
        demo.default_reviews()


def test_an_llmlingua2_cell_reads_compressed_prompts_plainly(tmp_path, base_dir):
    pytest.importorskip("llmlingua")
    from test_lingua import tiny_classifier

    lingua = str(tiny_classifier(tmp_path / "lingua"))
    data, out = tmp_path / "data", tmp_path / "grid"
    data.mkdir()
    for split, first in (("train", 0), ("test", 12)):  # 18 different prompts
        rows = [{"prompt": f"review {' '.join(['good', 'bad', 'nice'][j % 3] for j in range(i + 8))} Label:",
                 "answer": "yes" if i % 2 else "no"} for i in range(first, first + (12 if first == 0 else 6))]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    grid = _grid(str(data), base_dir, eval_examples=6, lingua_model=lingua)
    rows = run_grid(grid, ["llmlingua2"], [2], out, device="cpu", timing_prompts=2, progress=False,
                    log=lambda s: None)
    cell = rows[1]
    assert cell["cell"] == "llmlingua2-k2" and cell["k"] == 2
    cache = out / "cells" / "llmlingua2-k2" / "compressed.jsonl"
    assert len(cache.read_text().splitlines()) == 18  # every train and test prompt, once
    # about half of the tokens are kept (LLMLingua-2 keeps whole words), the cue word stays
    assert 0.3 < cell["length_reduction"] < 0.7
    assert cell["llm_positions"] < cell["prompt_tokens"] == rows[0]["prompt_tokens"]
    assert json.loads((out / "cells" / "llmlingua2-k2" / "run" / "run_config.json").read_text())["model"]["k"] == 1


def test_a_perplexity_grid_scores_generations_and_inverts_the_frontier(tmp_path, base_dir):
    data, out = _data(tmp_path / "data"), tmp_path / "grid"
    grid = _grid(data, base_dir, task_options={"data": data, "metric": "perplexity"}, generate_examples=2)
    rows = run_grid(grid, ["stride"], [2], out, device="cpu", timing_prompts=2, progress=False, log=lambda s: None)
    assert [r["metric"] for r in rows] == ["perplexity", "perplexity"]
    for r in rows:
        assert r["value"] > 1 and r["generated"] == 2 and 0 <= r["exact_match"] <= 1 and 0 <= r["chrf"] <= 100
    scored = json.loads((out / "pareto.json").read_text())["cells"]
    plain, stride = scored
    assert stride["normalised_performance"] == pytest.approx(plain["value"] / stride["value"])
    assert "chrF" in (out / "pareto.md").read_text()


def test_doctests():
    import doctest

    import ktm.experiments.frontier

    for module in (ktm.experiments.frontier, pareto):
        assert doctest.testmod(module).failed == 0


def test_a_rerun_on_changed_data_is_refused_and_a_broken_cell_file_named(tmp_path, base_dir):
    data, out = _data(tmp_path / "data"), tmp_path / "grid"
    grid = _grid(data, base_dir, steps=1, eval_examples=2)
    run_grid(grid, ["merge"], [2], out, device="cpu", timing_prompts=1, progress=False, log=lambda s: None)
    (out / "cells" / "plain" / "cell.json").write_text("")
    with pytest.raises(ValueError, match=r"cells/plain/cell.json is unreadable \(JSONDecodeError: .*\): delete it "
                                         r"to train the cell again, or pass --overwrite to start the grid over"):
        run_grid(grid, ["merge"], [2], out, device="cpu", timing_prompts=1, progress=False, log=lambda s: None)
    with open(tmp_path / "data" / "test.jsonl", "a") as f:  # the same path, other data
        f.write(json.dumps({"prompt": "x new y", "answer": "yes"}) + "\n")
    with pytest.raises(ValueError, match=r"holds a grid made with other settings \(data_sha256: '[0-9a-f]{64}' -> "
                                         r"'[0-9a-f]{64}'\); use another --out, the same settings, or --overwrite"):
        run_grid(grid, ["merge"], [2], out, device="cpu", timing_prompts=1, progress=False, log=lambda s: None)


def test_a_merge_cell_starts_from_the_saved_model_init_from_names(tmp_path, base_dir):
    """--init-from K=MODEL: the merge cell at K loads that model (its encoder, not the block mean);
    the other cells start as the recipe does, and every cell trains at the grid's rate."""
    import torch
    from ktm import KTokenMerging

    saved = KTokenMerging.from_base(base_dir, k=2, device="cpu", dtype="float32")
    with torch.no_grad():
        for p in saved.encoder.parameters():
            p.add_(0.5)
    saved.save_pretrained(tmp_path / "start")
    data, out = _data(tmp_path / "data"), tmp_path / "grid"
    grid = _grid(data, base_dir, steps=1, lr=1e-12, init_from={"2": str(tmp_path / "start")})
    rows = run_grid(grid, ["merge", "keep-first"], [2], out, device="cpu", progress=False, log=lambda s: None,
                    timing_prompts=2)
    assert [r["init_from"] for r in rows] == [None, str(tmp_path / "start"), None]
    trained = KTokenMerging.from_pretrained(out / "cells" / "merge-k2" / "run" / "model")
    for a, b in zip(trained.encoder.state_dict().values(), saved.encoder.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # a rate of 1e-12 leaves the start as it was
    config = json.loads((out / "cells" / "plain" / "run" / "run_config.json").read_text())
    assert config["train"]["lr"] == config["train"]["encoder_lr"] == 1e-12


def test_an_older_grid_without_the_new_settings_is_still_continued(tmp_path, base_dir):
    data, out = _data(tmp_path / "data"), tmp_path / "grid"
    out.mkdir()
    pareto.check_grid(out, _grid(data, base_dir), overwrite=False)
    record = json.loads((out / "grid.json").read_text())
    del record["init_from"], record["lr"]  # as written before the grid had them
    (out / "grid.json").write_text(json.dumps(record))
    pareto.check_grid(out, _grid(data, base_dir), overwrite=False)  # defaults then: the same grid
    with pytest.raises(ValueError, match=r"init_from: \{\} -> \{'4': 'zoo:default-k4'\}"):
        pareto.check_grid(out, _grid(data, base_dir, init_from={"4": "zoo:default-k4"}), overwrite=False)


def test_cli_pareto_init_from_takes_k_equals_model(tmp_path, base_dir, capsys):
    assert main(["pareto", "--task", "jsonl", "--data", "x", "--init-from", "zoo:default-k4", "--out",
                 str(tmp_path)]) == 2
    assert "expected K=MODEL with K >= 2" in capsys.readouterr().err
    from ktm.cli.experiments import k_reference

    assert k_reference("4=zoo:default-k4") == ("4", "zoo:default-k4")


def test_the_amazon_demo_starts_its_merged_model_from_the_shipped_merger(monkeypatch, tmp_path):
    from ktm import checkpoint
    from ktm.experiments.demo import shipped_start

    assert shipped_start(4) == "zoo:default-k4" and shipped_start(2) == "zoo:default-k2"
    assert shipped_start(3) is None and shipped_start(4, model="some/other-model") is None
    monkeypatch.setattr(checkpoint, "MERGERS_DIR", tmp_path)
    assert shipped_start(4) is None
