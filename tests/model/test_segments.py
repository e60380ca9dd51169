"""Kept spans: segmented prompts merge only their ``merge`` spans and read ``keep`` spans
token-exact (``ktm.model.segments``, ``ktm.model.blocks.segment_layout``, ``ModelConfig.keep``)."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ktm.model.blocks import block_slots, num_blocks, segment_layout, segmented_length
from ktm.config import ModelConfig
from ktm.model.segments import check_segments, cue_pattern, keep_mask, kept_ranges, segments_of, task_keep_pattern
from test_model import perturb

keeps_st = st.lists(st.lists(st.booleans(), min_size=1, max_size=40), min_size=1, max_size=5)
SEGMENTED = [
    [("merge", "Tree: AA\n+AB\n++AC, Task: Parent/Child Relationship, "), ("keep", "Parent: AA, Child: AC, Answer: ")],
    [("keep", "Q: "), ("merge", "a long context to be merged"), ("keep", " Label:")],
    [("merge", "abc")],
    [("keep", "xyz")],
]


# ---------------------------------------------------------------- pure functions
@settings(max_examples=100, deadline=None)
@given(keeps=keeps_st, k=st.integers(1, 6))
def test_segment_layout_counts_and_order(keeps, k):
    index, valid, source, per = segment_layout(keeps, k)
    runs = [[(flag, len(list(g))) for flag, g in itertools.groupby(keep)] for keep in keeps]
    for keep, r, n_pos in zip(keeps, runs, per):
        assert n_pos == sum(n if flag else num_blocks(n, k) for flag, n in r) == segmented_length(keep, k)
    assert source.numel() == sum(per) and index.shape == valid.shape == (index.shape[0], k)
    assert index.shape[0] == sum(num_blocks(n, k) for r in runs for flag, n in r if not flag)
    # what each position reads, as flat token numbers: a block its first token, a kept token itself
    nb, firsts = index.shape[0], index[:, 0]
    read = torch.where(source < nb, firsts[source.clamp(max=max(nb - 1, 0))] if nb else source, source - nb)
    flat = 0
    for keep, chunk in zip(keeps, read.split(per)):
        got = chunk.tolist()
        assert got == sorted(got) and len(set(got)) == len(got)  # order preserved, nothing twice
        assert all(flat <= t < flat + len(keep) for t in got)  # a prompt reads only its own tokens
        kept = [flat + t for t, f in enumerate(keep) if f]
        assert set(kept) <= set(got)
        flat += len(keep)
    # every merged block holds real tokens of one merged run, none of them kept
    flat_keep = [f for x in keeps for f in x]
    assert all(not flat_keep[i] for i in index[valid].tolist())


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=5), k=st.integers(1, 6))
def test_nothing_kept_is_the_plain_layout(lengths, k):
    index, valid, source, per = segment_layout([[False] * n for n in lengths], k)
    i0, v0, p0 = block_slots(lengths, k)
    assert torch.equal(index, i0) and torch.equal(valid, v0) and per == p0
    assert source.tolist() == list(range(index.shape[0]))


@given(text=st.text(max_size=40), pattern=st.sampled_from([None, r"\S+\s*\Z", r"[ab]+", cue_pattern(3)]))
def test_segments_of_keeps_the_text(text, pattern):
    segs = segments_of(text, pattern)
    assert "".join(t for _, t in segs) == text and (all(t for _, t in segs) or segs == [("merge", "")])
    assert check_segments(segs) == segs


def test_segment_helpers():
    assert kept_ranges([("keep", "ab"), ("merge", "c"), ("keep", "de")]) == [(0, 2), (3, 5)]
    assert keep_mask([(0, 2), (2, 3), (3, 4)], [(1, 3)]) == [True, True, False]  # overlap keeps
    with pytest.raises(ValueError, match="kind"):
        check_segments([("drop", "x")])
    with pytest.raises(TypeError):
        check_segments([("keep",)])


def test_task_cues():
    from ktm.tasks import AmazonTask, TreeTask
    from ktm.tasks.amazon import review_prompt
    from ktm.tasks.tree import question_prompt

    tree = segments_of(question_prompt("AA\n+BB", "AA", "BB"), task_keep_pattern("cue", TreeTask))
    assert tree[-1] == ("keep", "Parent: AA, Child: BB, Answer: ") and len(tree) == 2
    review = segments_of(review_prompt("fits well, nice"), task_keep_pattern("cue", AmazonTask))
    assert review == [("merge", "Review: fits well, nice, "), ("keep", "Label:")]
    assert task_keep_pattern(r"x", TreeTask) == "x" and task_keep_pattern(None, TreeTask) is None


def test_config_checks_keep():
    assert ModelConfig(keep=r"Label:\Z").keep == r"Label:\Z"
    with pytest.raises(ValueError, match="regular expression"):
        ModelConfig(keep="(")
    with pytest.raises(ValueError, match="method"):
        ModelConfig(keep="x", method="keep-first")


# ---------------------------------------------------------------- the model
@pytest.fixture
def model(make_model):
    return perturb(make_model(k=3, init="paper"))


def test_all_keep_is_the_k1_reading(make_model):
    model = perturb(make_model(k=3, init="mean"))  # with_k(1) then gets the K = 1 mean encoder: the identity
    text, answer = "hello world, a prompt", "yes"
    ids = model.tokenize([text])[0]
    (seq,) = model.merge_ids(*model.tokenize_prompts([[("keep", text)]]))
    assert torch.equal(seq, model.embed(torch.tensor(ids)))
    k1 = model.with_k(1)  # same LLM, mean encoder: reads each token as it is
    torch.testing.assert_close(model([[("keep", text)]], [answer]).loss, k1([text], [answer]).loss, rtol=0, atol=0)
    assert model.compressed_length([("keep", text)]) == len(ids)


def test_all_merge_is_todays_merging(model):
    texts = ["hello world, a prompt", "abc"]
    as_segments = [[("merge", "hello "), ("merge", "world, a prompt")], [("merge", "abc")]]
    a, ma = model.merge_prompts(texts)
    b, mb = model.merge_prompts(as_segments)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert model.merged_lengths(as_segments) == [num_blocks(len(t), 3) for t in texts]


def test_kept_tokens_pass_through_and_runs_merge_alone(model):
    segs = [("merge", "abcd"), ("keep", "XY"), ("merge", "efg")]
    (seq,) = model.merge_ids(*model.tokenize_prompts([segs]))
    assert seq.shape[0] == 2 + 2 + 1 == model.compressed_length(segs)
    emb = model.embed(torch.tensor(model.tokenize(["XY"])[0]))
    assert torch.equal(seq[2:4], emb)
    (head,) = model.merge_ids(model.tokenize(["abcd"]))
    (tail,) = model.merge_ids(model.tokenize(["efg"]))
    torch.testing.assert_close(seq[:2], head, rtol=0, atol=1e-6)
    torch.testing.assert_close(seq[4:], tail, rtol=0, atol=1e-6)


def test_segmented_prompt_alone_and_in_a_padded_batch(model):
    for i, segs in enumerate(SEGMENTED):
        ids, keep = model.tokenize_prompts([segs])
        alone, _, _ = model.prefill(ids, keep)
        ids, keep = model.tokenize_prompts(SEGMENTED)
        batch, _, _ = model.prefill(ids, keep)
        torch.testing.assert_close(batch[i], alone[0], rtol=0, atol=1e-5)
    answers = ["true", "positive", "x", "y"]
    loss = model(SEGMENTED, answers)
    per_row = [model([s], [a]).loss for s, a in zip(SEGMENTED, answers)]
    n = [len(a) + 1 for a in answers]
    torch.testing.assert_close(loss.loss, sum(l * c for l, c in zip(per_row, n)) / sum(n), rtol=0, atol=1e-5)


def test_generation_with_cache_equals_recomputation(model):
    cached = model.generate(SEGMENTED, max_new_tokens=6, return_tokens=True, stop_at_end=False)
    rerun = model.generate(SEGMENTED, max_new_tokens=6, return_tokens=True, stop_at_end=False, use_cache=False)
    assert cached == rerun


def test_config_keep_splits_strings_and_survives_save_load(make_model, tmp_path, base_dir):
    from ktm import KTokenMerging

    pattern = cue_pattern(1)
    m = perturb(make_model(k=3, init="paper", keep=pattern))
    prompt = "Review: fits well, Label:"
    assert torch.equal(m.merge_prompts([prompt])[0], m.merge_prompts([segments_of(prompt, pattern)])[0])
    assert m.compressed_length(prompt) == num_blocks(len("Review: fits well, "), 3) + len("Label:")
    m2 = KTokenMerging.from_base(base_dir, k=3, keep=pattern, lora_dropout=0.0)
    m2.save_pretrained(tmp_path / "saved")
    back = KTokenMerging.from_pretrained(tmp_path / "saved")
    assert back.config.keep == pattern and back.compressed_length(prompt) == m.compressed_length(prompt)
    with pytest.raises(ValueError, match="cue"):
        KTokenMerging.from_base(base_dir, k=3, keep="cue")


def test_token_methods_refuse_kept_spans(make_model):
    m = make_model(k=2, method="keep-first")
    with pytest.raises(ValueError, match="method"):
        m.merge_prompts([[("merge", "abcd"), ("keep", "ef")]])


def test_cli_takes_keep():
    from ktm.cli import build_parser

    assert build_parser().parse_args(["train", "--keep", "cue", "--out", "x"]).keep == "cue"
