"""Static-shape (compiled) decoding gives the numbers of eager decoding."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ktm.model.blocks import pad_sequences, position_ids
from ktm.model.compiled import StaticDecoder, cache_mask, left_pad_to, round_up
from ktm.model.generation import cached_steps

PROMPTS = ["hello world, this is a longer test prompt", "short", "x" * 70]


@given(st.integers(0, 500), st.integers(1, 300))
def test_round_up_is_the_smallest_multiple_not_below(n, multiple):
    r = round_up(n, multiple)
    assert r % multiple == 0 and r >= n and r - n < multiple


def test_round_up_rejects_a_zero_bucket():
    with pytest.raises(ValueError, match="bucket sizes must be >= 1"):
        round_up(3, 0)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=4), st.integers(0, 5))
def test_left_padding_keeps_real_positions_and_their_ids(lengths, extra):
    seqs = [torch.randn(n, 3) for n in lengths]
    embeds, mask = pad_sequences(seqs, side="left")
    e2, m2 = left_pad_to(embeds, mask, embeds.shape[1] + extra)
    assert e2.shape == (len(lengths), embeds.shape[1] + extra, 3)
    assert torch.equal(e2[:, extra:], embeds) and torch.equal(m2[:, extra:], mask)
    assert not m2[:, :extra].any() and not e2[:, :extra].any()
    # position ids of real tokens are unchanged by extra left padding
    assert torch.equal(position_ids(m2)[:, extra:], position_ids(mask))


def test_left_pad_cannot_shrink():
    with pytest.raises(ValueError, match="cannot pad 4 positions down to 3"):
        left_pad_to(torch.zeros(1, 4, 2), torch.ones(1, 4), 3)


def test_cache_mask_appends_ones():
    m = cache_mask(torch.tensor([[0, 0, 1], [1, 1, 1]]), 6)
    assert m.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]


def _merged(model, prompts):
    return pad_sequences(model.merge_ids(model.tokenize(prompts)), side="left")


@pytest.mark.parametrize("buckets", [(1, 1), (8, 16), (64, 256)])
def test_static_steps_equal_eager_steps(make_model, buckets):
    """Teacher-forced: the same new tokens fed to both paths give the same logits at every step."""
    m = make_model(k=3)
    embeds, mask = _merged(m, PROMPTS)
    dec = StaticDecoder(m, None, prompt_bucket=buckets[0], cache_bucket=buckets[1])
    with torch.inference_mode():
        cache = m.new_cache()
        ref = m.logits(m.decode(embeds, mask, cache).last_hidden_state[:, -1])
        ref_step = cached_steps(m, cache, mask)
        got, step = dec.start(embeds, mask, 6)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        gen = torch.Generator().manual_seed(0)
        for _ in range(5):
            nxt = torch.randint(3, 60, (len(PROMPTS), 1), generator=gen)
            e = m.embed(nxt)
            ref, got = ref_step(e), step(e)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_static_decoder_refuses_more_steps_than_it_holds(make_model):
    m = make_model(k=2)
    embeds, mask = _merged(m, ["abc"])
    dec = StaticDecoder(m, None, prompt_bucket=1, cache_bucket=1)
    with torch.inference_mode():
        _, step = dec.start(embeds, mask, 2)
        e = m.embed(torch.tensor([[5]]))
        step(e), step(e)
        with pytest.raises(RuntimeError, match="holds 2 new tokens"):
            step(e)


def test_caches_are_reused_and_reset(make_model):
    m = make_model(k=2).enable_compile(None, prompt_bucket=8, cache_bucket=16)
    first = m.generate(PROMPTS, 4, return_tokens=True)
    assert len(m.static_decoder.caches) == 1
    again = m.generate(PROMPTS, 4, return_tokens=True)
    assert again == first and len(m.static_decoder.caches) == 1


@pytest.mark.parametrize("sample", [False, True])
def test_generate_with_static_shapes_equals_eager(make_model, sample):
    m = make_model(k=3)
    kw = dict(do_sample=sample, temperature=0.8, top_k=20) if sample else {}
    ref = m.generate(PROMPTS, 8, return_tokens=True, generator=torch.Generator().manual_seed(1), **kw)
    m.enable_compile(None, prompt_bucket=16, cache_bucket=32)
    got = m.generate(PROMPTS, 8, return_tokens=True, generator=torch.Generator().manual_seed(1), **kw)
    assert got == ref
    m.disable_compile()
    assert m.generate(PROMPTS, 8, return_tokens=True, generator=torch.Generator().manual_seed(1), **kw) == ref


def test_compiled_generate_equals_eager(make_model):
    """Through torch.compile (aot_eager: dynamo's tracing, no code generation, fast on CPU)."""
    torch._dynamo.reset()
    m = make_model(k=2)
    ref = m.generate(PROMPTS, 6, return_tokens=True)
    m.enable_compile("default", backend="aot_eager", prompt_bucket=64, cache_bucket=128)
    assert m.generate(PROMPTS, 6, return_tokens=True) == ref
    assert m.generate(PROMPTS[:2], 6, return_tokens=True) == ref[:2]


@pytest.mark.slow
def test_inductor_generate_equals_eager(make_model):
    """The real compiler (inductor's C++ code on CPU; about a minute)."""
    torch._dynamo.reset()
    m = make_model(k=2)
    ref = m.generate(PROMPTS, 6, return_tokens=True)
    m.enable_compile("default")
    assert m.generate(PROMPTS, 6, return_tokens=True) == ref


def test_enable_compile_errors(make_model):
    m, other = make_model(k=2), make_model(k=2, seed=1)
    with pytest.raises(ValueError, match="compile mode must be one of"):
        m.enable_compile("fastest")
    with pytest.raises(ValueError, match="another model's LLM"):
        m.enable_compile(StaticDecoder(other, None))
    shared = StaticDecoder(m, None)
    with pytest.raises(ValueError, match="not to a shared one"):
        m.enable_compile(shared, cache_bucket=8)
    assert m.enable_compile(shared).static_decoder is shared
