import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ktm import MergeEncoder
from ktm.encoder import default_hidden


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
