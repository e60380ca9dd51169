import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ktm import MergeEncoder
from ktm.model.encoder import StackedEncoder, build_encoder, default_hidden, encoder_from_config, encoder_stages


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 8), d=st.integers(1, 16), seed=st.integers(0, 99))
def test_mean_init_equals_block_mean(k, d, seed):
    torch.manual_seed(seed)
    enc = MergeEncoder(k, d)
    x = torch.randn(5, k, d)
    assert torch.equal(enc(x), enc(x))
    torch.testing.assert_close(enc(x), x.mean(-2), rtol=0, atol=1e-6)


def test_paper_and_random_inits_differ_from_mean():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8)
    paper, rand = MergeEncoder(3, 8, init="paper"), MergeEncoder(3, 8, init="random")
    assert paper.residual and not rand.residual
    assert not torch.allclose(paper(x), x.mean(-2))
    assert not torch.allclose(rand(x), x.mean(-2))


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 6), d=st.integers(2, 16), seed=st.integers(0, 99))
def test_layernorm_starts_as_centred_norm_matching(k, d, seed):
    torch.manual_seed(seed)
    enc = MergeEncoder(k, d, layernorm=True)
    x = torch.randn(5, k, d)
    out, mean = enc(x), x.mean(-2)
    centred = mean - mean.mean(-1, keepdim=True)
    target = x.norm(dim=-1).mean(-1, keepdim=True)
    std = (centred.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()  # LayerNorm's biased variance and eps
    torch.testing.assert_close(out, centred / std * target / d ** 0.5, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mean(-1), torch.zeros(5), rtol=0, atol=1e-5)


def test_layernorm_gain_and_bias_are_learned():
    torch.manual_seed(0)
    enc = MergeEncoder(2, 8, layernorm=True)
    x = torch.randn(4, 2, 8)
    with torch.no_grad():
        enc.ln_gain.mul_(2.0)
        enc.ln_bias.fill_(0.5)
    plain = MergeEncoder(2, 8, layernorm=True)
    torch.testing.assert_close(enc(x), 2.0 * plain(x) + 0.5)
    enc(x).sum().backward()
    assert enc.ln_gain.grad is not None and enc.ln_bias.grad is not None
    assert {"ln_gain", "ln_bias"} <= set(enc.state_dict()) and "ln_gain" not in MergeEncoder(2, 8).state_dict()
    stacked = StackedEncoder((2, 2), 8, layernorm=True)
    assert all(st.layernorm for st in stacked.stages)
    with pytest.raises(ValueError, match="choose one"):
        MergeEncoder(2, 8, norm=True, layernorm=True)


def test_default_hidden_width_follows_the_paper():
    assert default_hidden(2, 896) == 4 * 896
    assert default_hidden(3, 896) == 6 * 896
    assert default_hidden(4, 896) == 6 * 896
    assert default_hidden(8, 10) == 12 * 10
    assert MergeEncoder(4, 10).hidden == 60
    assert MergeEncoder(4, 10, hidden=7).mlp[0].out_features == 7


def test_bad_arguments():
    with pytest.raises(ValueError, match="K must be >= 1"):
        MergeEncoder(0, 8)
    with pytest.raises(ValueError, match="init"):
        MergeEncoder(2, 8, init="zeros")
    with pytest.raises(ValueError, match="expected blocks"):
        MergeEncoder(2, 8)(torch.zeros(3, 3, 8))


@settings(max_examples=30, deadline=None)
@given(stages=st.lists(st.integers(1, 4), min_size=2, max_size=3), d=st.integers(1, 12),
       seed=st.integers(0, 99))
def test_stacked_mean_init_equals_block_mean(stages, d, seed):
    torch.manual_seed(seed)
    enc = StackedEncoder(stages, d)
    k = enc.k
    x = torch.randn(5, k, d)
    torch.testing.assert_close(enc(x), x.mean(-2), rtol=0, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(n_real=st.integers(1, 8), seed=st.integers(0, 99))
def test_stacked_stages_refill_partial_blocks(n_real, seed):
    """Each stage sees a partial block as a single-stage encoder of its size would."""
    from ktm.model.blocks import fill_blocks

    torch.manual_seed(seed)
    x = torch.randn(1, 8, 6)
    valid = (torch.arange(8) < n_real)[None]
    enc = StackedEncoder((2, 4), 6, init="paper")
    filled = fill_blocks(x, valid)
    x[0, n_real:] = float("nan")  # what empty slots held before filling must not matter
    pairs = [enc.stages[0](fill_blocks(x[:, i:i + 2], valid[:, i:i + 2])) for i in range(0, n_real, 2)]
    pairs = torch.stack(pairs, 1)
    by_hand = enc.stages[1](fill_blocks(torch.cat([pairs, pairs.new_zeros(1, 4 - pairs.shape[1], 6)], 1),
                                        (torch.arange(4) < pairs.shape[1])[None]))
    got = enc(filled, valid)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, by_hand, rtol=0, atol=1e-5)
    if n_real == 8:
        torch.testing.assert_close(enc(filled), got, rtol=0, atol=1e-6)


def test_stacked_stages_merge_adjacent_runs_first():
    torch.manual_seed(0)
    enc = StackedEncoder((2, 3), 4, init="paper")
    x = torch.randn(7, 6, 4)
    by_hand = enc.stages[1](torch.stack([enc.stages[0](x[:, i:i + 2]) for i in (0, 2, 4)], dim=1))
    torch.testing.assert_close(enc(x), by_hand)
    assert enc.hidden == [default_hidden(2, 4), default_hidden(3, 4)]


def test_build_encoder_and_stage_errors():
    assert isinstance(build_encoder(4, 8), MergeEncoder)
    assert isinstance(build_encoder(4, 8, stages=(4,)), MergeEncoder)
    assert isinstance(build_encoder(4, 8, stages=(2, 2)), StackedEncoder)
    assert encoder_stages(build_encoder(6, 8, stages=(3, 2))) == (3, 2)
    assert encoder_stages(build_encoder(6, 8)) == (6,)
    with pytest.raises(ValueError, match="multiply to 6, not K = 4"):
        build_encoder(4, 8, stages=(2, 3))
    with pytest.raises(ValueError, match="do not multiply"):
        build_encoder(4, 8, stages=(2,))
    with pytest.raises(ValueError, match="expected blocks"):
        StackedEncoder((2, 2), 8)(torch.zeros(3, 2, 8))


def test_encoder_from_config_reads_every_encoder_field():
    from ktm.config import ModelConfig

    enc = encoder_from_config(ModelConfig(k=4, encoder_hidden=5, encoder_init="paper", encoder_stages=(2, 2),
                                          encoder_layernorm=True), 8)
    assert isinstance(enc, StackedEncoder) and enc.stages_k == (2, 2) and enc.hidden == [5, 5]
    assert enc.init == "paper" and enc.layernorm and not enc.norm
    single = encoder_from_config(ModelConfig(k=2, encoder_norm=True), 8)
    assert isinstance(single, MergeEncoder) and single.norm and single.hidden == default_hidden(2, 8)
