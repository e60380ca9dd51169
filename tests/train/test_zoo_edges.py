"""Edges of the merger zoo (issue 28 item 15): ``ktm encode --checkpoint zoo:NAME``, and a
``ktm zoo build`` killed between its two renames (the old folder moved aside as ``.NAME.old``,
the new one not yet in place)."""

import os

from conftest import save_tiny_base
from ktm import KTokenMerging, checkpoint
from ktm.cli import main


def test_a_merger_left_aside_by_a_killed_build_is_put_back_and_encode_reads_zoo_names(tmp_path, monkeypatch,
                                                                                      capsys):
    base = save_tiny_base(tmp_path / "base")
    mergers = tmp_path / "mergers"
    mergers.mkdir()
    monkeypatch.setattr(checkpoint, "MERGERS_DIR", mergers)  # the package's folder, somewhere writable
    KTokenMerging.from_base(base, k=2, device="cpu", dtype="float32", seed=0).save_pretrained(mergers / "tiny")
    os.replace(mergers / "tiny", mergers / ".tiny.old")  # killed between "tiny -> .tiny.old" and "new -> tiny"
    assert checkpoint.shipped_mergers() == ["tiny"]  # put back, and no hidden folder listed
    assert sorted(p.name for p in mergers.iterdir()) == ["tiny"]
    out = tmp_path / "embeds.safetensors"
    assert main(["encode", "--checkpoint", "zoo:tiny", "--model", str(base), "--device", "cpu", "--out", str(out),
                 "a prompt"]) == 0
    assert out.is_file() and "wrote 1 prompt embeddings" in capsys.readouterr().out
