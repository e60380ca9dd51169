"""Token-space baselines keep exactly ceil(n / K) tokens, in order, the same in any batch."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from ktm.model.methods import TOKEN_METHODS, kept_positions, select_tokens


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 200), st.integers(1, 9), st.sampled_from(TOKEN_METHODS), st.integers(0, 1000))
def test_kept_positions_are_ceil_n_over_k_in_order(n, k, method, seed):
    kept = kept_positions(n, k, method, seed)
    assert len(kept) == math.ceil(n / k)
    assert kept == sorted(set(kept)) and all(0 <= i < n for i in kept)


def test_each_method_keeps_what_it_says():
    assert kept_positions(10, 4, "keep-first") == [0, 1, 2]
    assert kept_positions(10, 4, "keep-last") == [7, 8, 9]
    assert kept_positions(10, 4, "stride") == [0, 4, 8]
    assert kept_positions(5, 1, "random-drop") == [0, 1, 2, 3, 4]  # K = 1 keeps everything


def test_random_drop_depends_on_the_prompt_not_the_batch():
    a, b = list(range(100, 140)), list(range(200, 230))
    alone = select_tokens([a], 4, "random-drop")[0]
    assert select_tokens([b, a], 4, "random-drop")[1] == alone
    assert set(alone) <= set(a) and alone == sorted(alone)


def test_a_token_method_reads_the_kept_tokens_plainly(make_model):
    import torch

    m = make_model(k=3, method="keep-last")
    ids = m.tokenize(["abcdefgh", "xy"])
    merged = m.merge_ids(ids)
    assert [x.shape[0] for x in merged] == [3, 1] == [m.compressed_length(p) for p in ("abcdefgh", "xy")]
    torch.testing.assert_close(merged[0], m.embed(torch.tensor(ids[0][-3:])))
    assert m.trainable_parameters()["encoder"] == []  # nothing to train but LoRA


def test_mean_is_the_untrained_block_mean_and_stays_so(make_model):
    import torch

    from ktm.config import TrainConfig
    from ktm.train.trainer import Trainer
    from toy_tasks import LastChar

    m = make_model(k=2, method="mean")
    ids = m.tokenize(["abcd"])
    emb = m.embed(torch.tensor(ids[0]))
    before = m.merge_ids(ids)[0].detach().clone()
    torch.testing.assert_close(before, torch.stack([emb[:2].mean(0), emb[2:].mean(0)]))
    Trainer(m, TrainConfig(steps=2, batch_size=2, eval_examples=4, lr=1e-2), progress=False,
            log=lambda line: None).fit(LastChar())
    assert torch.equal(m.merge_ids(ids)[0], before)  # the encoder was not trained


def test_methods_are_checked_and_saved(make_model, tmp_path):
    import pytest

    from ktm.checkpoint import CheckpointError
    from ktm.config import ModelConfig

    with pytest.raises(ValueError, match="does not train an encoder: leave encoder_norm at the default"):
        ModelConfig(k=4, method="stride", encoder_norm=True)
    with pytest.raises(ValueError, match="leave encoder_stages, encoder_layernorm, encoder_init at"):
        ModelConfig(k=4, method="mean", encoder_stages=(2, 2), encoder_layernorm=True, encoder_init="paper")
    with pytest.raises(ValueError, match="one of"):
        ModelConfig(k=4, method="drop-half")
    make_model(k=2, method="stride").save_pretrained(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="method = 'stride', this model has method = 'merge'"):
        make_model(k=2).load_trained(tmp_path / "ck")
    assert make_model(k=2).with_k(4).trainable_parameters()["encoder"]
    assert not make_model(k=2, method="mean").with_k(4).trainable_parameters()["encoder"]
