"""benchmarks/recipe_curves.py on fake run folders: table cells, files written."""

import json
from pathlib import Path

import pytest


def _module():
    from conftest import load_benchmark

    return load_benchmark("recipe_curves")


def _fake_run(folder: Path, values, loss):
    folder.mkdir()
    hist = [{"step": 50 * (i + 1), "value": v, "majority_rate": 0.648, "train_loss": loss,
             "elapsed_s": 60.0 * (i + 1)} for i, v in enumerate(values)]
    (folder / "history.json").write_text(json.dumps({"history": hist}))
    (folder / "run_config.json").write_text(json.dumps({"argv": ["train", "--k", "4"], "recipe": "fast"}))


def test_table_and_files(tmp_path, capsys):
    mod = _module()
    _fake_run(tmp_path / "a", [0.648, 0.75], 0.25)
    _fake_run(tmp_path / "b", [0.5], 0.3)
    mod.main([f"{tmp_path / 'a'}=K4 distill", str(tmp_path / "b"), "--out", str(tmp_path / "out" / "curves")])
    md = (tmp_path / "out" / "curves.md").read_text()
    assert "| K4 distill | 64.8 | 75.0 | 0.250 | 2.0 |" in md
    assert "| b | 50.0 |  | 0.300 | 1.0 |" in md
    assert "Majority class: 64.8%" in md and "`ktm train --k 4`" in md
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000
    assert json.loads((tmp_path / "out" / "curves.json").read_text())[0]["label"] == "K4 distill"
    assert "K4 distill" in capsys.readouterr().out


def test_wall_time_adds_up_segments_of_resumed_runs():
    mod = _module()
    assert mod.wall_minutes([{"elapsed_s": 60.0}, {"elapsed_s": 120.0}]) == 2.0
    # an old history resumed after 120 s: elapsed restarted at 0
    assert mod.wall_minutes([{"elapsed_s": 60.0}, {"elapsed_s": 120.0}, {"elapsed_s": 30.0},
                             {"elapsed_s": 90.0}]) == 3.5
    assert mod.wall_minutes([{"step": 1}]) is None


def test_a_chain_phase_uses_the_chains_run_config(tmp_path):
    mod = _module()
    _fake_run(tmp_path / "chain", [0.7], 0.2)
    phase = tmp_path / "chain" / "teacher"
    phase.mkdir()
    (phase / "history.json").write_text(json.dumps({"history": [{"step": 50, "value": 0.9}]}))
    run = mod.load_run(f"{phase}=teacher")
    assert (run["label"], run["argv"]) == ("teacher", ["train", "--k", "4"])
    (tmp_path / "lone").mkdir()
    (tmp_path / "lone" / "history.json").write_text(json.dumps({"history": [{"step": 50, "value": 0.9}]}))
    with pytest.raises(SystemExit, match="no run_config.json"):
        mod.load_run(str(tmp_path / "lone"))


def test_batch_sizes_and_changing_majority_rates():
    mod = _module()
    runs = [{"argv": ["train", "--batch-size", "64"], "history": [{"majority_rate": 0.648}, {"majority_rate": 0.74}]},
            {"argv": ["train"], "history": [{"majority_rate": 0.648}]}]
    assert mod.batch_sizes(runs) == [16, 64]
    assert mod.majority_rates(runs) == [0.648, 0.74]
    runs = [{"label": "a", "run": "a", "argv": [], "recipe": None,
             "history": [{"step": 1, "value": 0.7, "majority_rate": 0.648}, {"step": 2, "value": 0.8, "majority_rate": 0.74}]}]
    assert "64.8% to 74.0% (it depends on the stage" in mod.table(runs)
