"""benchmarks/fidelity_curve.py measure: snapshots already measured on the same windows are kept."""

import json


def test_measure_keeps_rows_already_measured(tmp_path, monkeypatch):
    from conftest import load_benchmark

    mod = load_benchmark("fidelity_curve")
    snaps, out = tmp_path / "snaps", tmp_path / "out" / "curve"
    for step in (100, 200):
        (snaps / f"step-{step:06d}").mkdir(parents=True)
    out.parent.mkdir()
    old = {"k": 4, "windows": 8, "perplexity_ratio": 1.8, "top1_agreement": 0.6, "step": 100, "snapshot": "step-000100"}
    other = dict(old, windows=16, snapshot="step-000200")  # measured on other windows: measured again
    out.with_suffix(".json").write_text(json.dumps([old, other]))
    assert mod.previous_rows(out, 8) == [old]
    assert mod.previous_rows(tmp_path / "missing", 8) == []

    measured = []

    class FakeModel:
        tokenizer = None

        @classmethod
        def from_pretrained(cls, folder):
            measured.append(folder.name)
            return cls()

        def load_trained(self, folder):
            measured.append(folder.name)

    import ktm
    import ktm.train.fidelity as fid

    monkeypatch.setattr(ktm, "KTokenMerging", FakeModel)
    monkeypatch.setattr(fid, "prose_windows", lambda *a, **k: ["w"] * 8)
    monkeypatch.setattr(fid, "fidelity_line", lambda r: f"ratio {r['perplexity_ratio']}")
    monkeypatch.setattr(fid, "fidelity", lambda model, wins, revs, **kw: {"k": 4, "windows": len(wins),
                                                                          "perplexity_ratio": 1.7})
    rows = mod.measure(snaps, "text.jsonl", None, 8, 256, 32, 8, out)
    assert measured == ["step-000200"]
    assert [r["snapshot"] for r in rows] == ["step-000100", "step-000200"] and rows[0] == old
    assert rows[1]["perplexity_ratio"] == 1.7 and rows[1]["step"] == 200
