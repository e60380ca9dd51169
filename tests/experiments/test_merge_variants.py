"""benchmarks/merge_variants.py: block layouts and the probe."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ktm.model.blocks import num_blocks

@pytest.fixture(scope="module")
def mod():
    from conftest import load_benchmark

    return load_benchmark("merge_variants")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", ",", "\n", "x\n", " c"]), min_size=1, max_size=30),
       st.sampled_from(["fixed", "lines", "tail0", "tail3", "tail50"]))
def test_segments_cover_the_prompt_in_order(mod, pieces, layout):
    segs = mod.segment_lengths(pieces, layout)
    assert sum(segs) == len(pieces) and all(n >= 1 for n in segs)
    if layout == "lines":  # every piece but the last ends with a separator, and none inside
        ends = [sum(segs[:i + 1]) - 1 for i in range(len(segs))]
        for i, text in enumerate(pieces):
            has_sep = any(s in text for s in mod.SEPARATORS)
            assert has_sep <= (i in ends)


def test_unknown_layout(mod):
    with pytest.raises(ValueError, match="unknown layout"):
        mod.segment_lengths(["a"], "tailx")


def test_lines_layout_merges_each_piece_from_its_start(mod, make_model):
    m = make_model(k=3)
    ids = m.tokenize(["a\ncdef,gh"])
    fixed = m.merge_ids(ids)[0]
    merged = mod.merge_in_pieces(m, ids, "lines")[0]
    # pieces "a\n" (2), "cdef," (5), "gh" (2) -> 1 + 2 + 1 blocks, against ceil(9 / 3) = 3
    assert fixed.shape[0] == 3 and merged.shape[0] == sum(num_blocks(n, 3) for n in (2, 5, 2)) == 4
    emb = m.embed(torch.tensor(ids[0]))
    assert torch.allclose(merged[1], emb[2:5].mean(0), atol=1e-6)  # "cde"
    assert torch.allclose(merged[2], emb[5:7].mean(0), atol=1e-6)  # "f," (partial: mean of its tokens)
    assert not torch.allclose(merged[1], fixed[1])
    assert torch.equal(mod.merge_in_pieces(m, ids, "fixed")[0], fixed)
    assert torch.equal(m.merge_ids(ids)[0], fixed)  # the model itself is untouched


def test_tail_layout_leaves_tokens_unmerged(mod, make_model):
    m = make_model(k=4)
    ids = m.tokenize(["abcdefgh"])
    merged = mod.merge_in_pieces(m, ids, "tail3")[0]
    assert merged.shape[0] == 2 + 3
    assert torch.allclose(merged[-3:], m.embed(torch.tensor(ids[0][-3:])), atol=1e-6)


def test_probe_accuracy_separates_separable_data(mod):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    y = (x[:, 0] > 0).float()
    xt = torch.randn(100, 8, generator=g)
    assert mod.probe_accuracy(x, y, xt, (xt[:, 0] > 0).float(), l2=1e-4) > 0.9
    noise = (torch.rand(100, generator=g) > 0.5).float()
    assert mod.probe_accuracy(x, (torch.rand(200, generator=g) > 0.5).float(), xt, noise) < 0.7


def test_probe_runs_on_a_tiny_model(mod, tmp_path, tokenizer, capsys):
    from conftest import tiny_llama

    from ktm import KTokenMerging

    base = tmp_path / "base"
    tiny_llama(len(tokenizer), max_position_embeddings=512).save_pretrained(base)
    tokenizer.save_pretrained(base)
    KTokenMerging.from_base(str(base), k=2).save_pretrained(tmp_path / "k2")
    mod.main(["probe", "--model", str(base), "--k", "1", "2", "--layout", "fixed", "lines",
              "--checkpoint", f"{tmp_path / 'k2'}=trained",
              "--num-trees", "60", "--train-examples", "40", "--out", str(tmp_path / "p")])
    data = json.loads((tmp_path / "p.json").read_text())
    assert [(r["k"], r["layout"], r["model"]) for r in data["rows"]] == [
        (1, "fixed", "untrained"), (2, "fixed", "untrained"), (2, "lines", "untrained"), (2, "fixed", "trained")]
    rows = data["rows"]
    assert all(r["best"] == max(r["accuracy_by_layer"].values()) for r in rows)
    # K = 2 reads about half as many positions as K = 1 (ceil(n / 2) per question)
    assert rows[0]["merged_length"] / 2 <= rows[1]["merged_length"] <= rows[0]["merged_length"] / 2 + 1
    assert "| 2 | lines | untrained |" in (tmp_path / "p.md").read_text()


def test_probe_reads_review_sentiment(mod, tmp_path, tokenizer):
    from conftest import tiny_llama

    base = tmp_path / "base"
    tiny_llama(len(tokenizer), max_position_embeddings=512).save_pretrained(base)
    tokenizer.save_pretrained(base)
    reviews = tmp_path / "reviews"
    reviews.mkdir()
    for split, n in (("train", 40), ("dev", 12)):
        (reviews / f"{split}.jsonl").write_text("".join(
            json.dumps({"rating": 5.0 if i % 3 else 1.0, "text": ("good " if i % 3 else "bad ") * (2 + i % 4)}) + "\n"
            for i in range(n)))
    mod.main(["probe", "--task", "amazon", "--reviews", str(reviews), "--review-chars", "12", "--model", str(base),
              "--k", "1", "4", "--train-examples", "40", "--out", str(tmp_path / "p")])
    data = json.loads((tmp_path / "p.json").read_text())
    assert [r["k"] for r in data["rows"]] == [1, 4]
    assert data["majority_rate"] == pytest.approx(8 / 12)  # 8 of the 12 dev reviews are positive
    assert "12 held-out amazon examples" in (tmp_path / "p.md").read_text()
    with pytest.raises(SystemExit, match="needs --reviews"):
        mod.main(["probe", "--task", "amazon", "--model", str(base)])
