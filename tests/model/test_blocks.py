"""Block / padding / label arithmetic, tensor by tensor (property tests over K and lengths)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ktm.model.blocks import (
    answer_targets,
    block_slots,
    check_k,
    fill_blocks,
    num_blocks,
    pad_sequences,
    position_ids,
)

lengths_st = st.lists(st.integers(1, 40), min_size=1, max_size=6)


@given(n=st.integers(0, 10_000), k=st.integers(1, 64))
def test_num_blocks_is_ceil(n, k):
    nb = num_blocks(n, k)
    assert (nb - 1) * k < n <= nb * k or (n == 0 and nb == 0)


@pytest.mark.parametrize("bad", [0, -1, -7])
def test_k_below_one_rejected(bad):
    with pytest.raises(ValueError, match="K must be >= 1"):
        check_k(bad)
    with pytest.raises(TypeError):
        check_k(2.0)


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_st, k=st.integers(1, 9))
def test_block_slots_cover_each_prompt_in_order(lengths, k):
    index, valid, per = block_slots(lengths, k)
    assert per == [num_blocks(n, k) for n in lengths]
    assert index.shape == valid.shape == (sum(per), k)
    start, b = 0, 0
    for n, nb in zip(lengths, per):
        got = index[b:b + nb][valid[b:b + nb]].tolist()
        assert got == list(range(start, start + n))  # every token once, in order, own prompt only
        # only the last block of a prompt may be partial, and it is filled from the left
        assert valid[b:b + nb - 1].all()
        assert valid[b + nb - 1].tolist() == [i < n - (nb - 1) * k for i in range(k)]
        start, b = start + n, b + nb


def test_block_slots_rejects_empty_prompt():
    with pytest.raises(ValueError, match="at least one token"):
        block_slots([3, 0], 2)


@settings(max_examples=50, deadline=None)
@given(nb=st.integers(1, 5), k=st.integers(1, 6), seed=st.integers(0, 1000))
def test_fill_rule_keeps_real_slots_and_block_mean(nb, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(nb, k, 3, generator=g, dtype=torch.float64)
    valid = torch.rand(nb, k, generator=g) < 0.6
    valid[:, 0] = True
    out = fill_blocks(x, valid)
    assert torch.equal(out[valid], x[valid])
    real_mean = (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
    torch.testing.assert_close(out.mean(1), real_mean)


@given(lengths=lengths_st, side=st.sampled_from(["left", "right"]))
def test_pad_sequences_and_positions(lengths, side):
    seqs = [torch.arange(n, dtype=torch.float32)[:, None] + 1 for n in lengths]
    padded, mask = pad_sequences(seqs, side=side)
    pos = position_ids(mask)
    for i, n in enumerate(lengths):
        real = mask[i].bool()
        assert int(real.sum()) == n
        assert padded[i, real, 0].tolist() == list(range(1, n + 1))
        assert pos[i, real].tolist() == list(range(n))  # positions count real tokens only
        assert (padded[i, ~real] == 0).all()
        if side == "left":
            assert real[-1]
        else:
            assert real[0]


def test_pad_sequences_rejects_bad_side():
    with pytest.raises(ValueError):
        pad_sequences([torch.zeros(1, 2)], side="middle")


@given(m=st.lists(st.integers(1, 10), min_size=1, max_size=5), data=st.data())
def test_answer_targets_point_at_the_previous_position(m, data):
    a = data.draw(st.lists(st.integers(1, 6), min_size=len(m), max_size=len(m)))
    rows, cols, t = answer_targets(m, a)
    assert len(rows) == sum(a)
    k = 0
    for i, (mi, ai) in enumerate(zip(m, a)):
        for j in range(ai):
            # answer token j sits at column m_i + j, so the column before predicts it
            assert (rows[k].item(), cols[k].item(), t[k].item()) == (i, mi + j - 1, k)
            k += 1


def test_fill_blocks_with_an_empty_block_is_finite():
    blocks = torch.tensor([[[1.0], [float("nan")]], [[float("nan")], [float("inf")]]], requires_grad=True)
    valid = torch.tensor([[True, False], [False, False]])
    out = fill_blocks(blocks, valid)
    assert out.tolist() == [[[1.0], [1.0]], [[0.0], [0.0]]]
    out.sum().backward()
    assert torch.isfinite(blocks.grad).all()
