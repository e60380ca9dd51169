"""Contextual merging (ModelConfig.context_layers): the first j layers of the adapted LLM read
the full prompt, and their outputs are merged K at a time instead of the token embeddings."""

import json

import pytest
import torch

from ktm import KTokenMerging
from ktm.experiments import bench
from ktm.model.blocks import block_slots, fill_blocks
from ktm.checkpoint import CheckpointError
from ktm.config import ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


PROMPTS = ["the cat sat on the mat, Label:", "ok", "a somewhat longer prompt that spans many blocks of four"]
ANSWERS = ["yes", "no", "maybe so"]


def llama(tokenizer, layers=3, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, eos_token_id=2, pad_token_id=1, bos_token_id=None,
                      attn_implementation="sdpa", initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def contextual(tokenizer, j, k=4, layers=3, **options):
    base = llama(tokenizer, layers)
    m = KTokenMerging.from_base(base, k=k, tokenizer=tokenizer, seed=0, context_layers=j, lora_dropout=0.0,
                                **options)
    return m.eval(), base


def block_mean(states, n, k):
    """The mean-initialised encoder by hand: the fill rule, then the mean of each block."""
    index, valid, _ = block_slots([n], k)
    return fill_blocks(states[index], valid).mean(1)


def test_zero_context_layers_is_the_papers_merge_bitwise(make_model):
    m = make_model(k=4)
    assert m.config.context_layers == 0
    ids = m.tokenize(PROMPTS)
    for x, merged in zip(ids, m.merge_ids(ids)):
        assert torch.equal(merged, block_mean(m.embed(torch.tensor(x)), len(x), 4))
    explicit = make_model(k=4, context_layers=0)
    assert torch.equal(m(PROMPTS, ANSWERS).logits, explicit(PROMPTS, ANSWERS).logits)


@pytest.mark.parametrize("j", [1, 2])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("k", [1, 3, 4])
def test_merged_embeddings_are_the_block_means_of_layer_j(tokenizer, j, norm, k):
    m, base = contextual(tokenizer, j, k=k, context_norm=norm)
    ids = m.tokenize(PROMPTS)
    merged = m.merge_ids(ids)
    for x, got in zip(ids, merged):
        with torch.no_grad():
            states = base(torch.tensor([x]), output_hidden_states=True).hidden_states[j][0]
        if norm:  # each state rescaled to its token embedding's norm
            emb = base.get_input_embeddings()(torch.tensor(x))
            states = states * emb.norm(dim=-1, keepdim=True) / states.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(got, block_mean(states, len(x), k), rtol=1e-5, atol=1e-5)


def test_contextual_states_differ_from_embeddings(tokenizer):
    m, _ = contextual(tokenizer, 1)
    plain = m.with_k(4, context_layers=0)
    ids = m.tokenize(PROMPTS[:1])
    assert not torch.allclose(m.merge_ids(ids)[0], plain.merge_ids(ids)[0])
    assert plain.lm is m.lm and plain.config.context_layers == 0 and m.with_k(4) is m


def test_a_prompt_gives_the_same_result_alone_and_in_a_padded_batch(tokenizer):
    m, _ = contextual(tokenizer, 2)
    ids = m.tokenize(PROMPTS)
    together = m.merge_ids(ids)
    batch = m(PROMPTS, ANSWERS)
    for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS)):
        torch.testing.assert_close(m.merge_ids([ids[i]])[0], together[i], rtol=1e-5, atol=1e-6)
        alone = m([p], [a])
        torch.testing.assert_close(alone.logits, batch.logits[batch.rows == i], rtol=1e-4, atol=1e-5)
    assert m.generate(PROMPTS, max_new_tokens=4) == [m.generate([p], max_new_tokens=4)[0] for p in PROMPTS]


def test_gradients_reach_the_lora_of_the_first_j_layers_only_through_the_merge(tokenizer):
    m, _ = contextual(tokenizer, 2, layers=3)
    m.train()
    merged = m.merge_ids(m.tokenize(PROMPTS))
    torch.cat(merged).pow(2).sum().backward()
    grads = {}
    for name, p in m.lm.named_parameters():
        if "lora_B" in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            grads.setdefault(layer, 0.0)
            grads[layer] += 0.0 if p.grad is None else float(p.grad.abs().sum())
    assert grads[0] > 0 and grads[1] > 0 and grads[2] == 0
    assert all(p.grad is not None for p in m.encoder.parameters())


def test_save_and_load_round_trip(tokenizer, tmp_path):
    folder = tmp_path / "base"
    llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    m = KTokenMerging.from_base(str(folder), k=4, seed=0, context_layers=2, context_norm=False).eval()
    with torch.no_grad():  # trained-looking weights: LoRA B and the encoder's last layer non-zero
        for name, p in m.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    m.save_pretrained(tmp_path / "ck")
    saved = json.loads((tmp_path / "ck" / "ktm_config.json").read_text())["model"]
    assert saved["context_layers"] == 2 and saved["context_norm"] is False
    back = KTokenMerging.from_pretrained(tmp_path / "ck").eval()
    assert back.config.context_layers == 2
    ids = m.tokenize(PROMPTS)
    for a, b in zip(m.merge_ids(ids), back.merge_ids(ids)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(m(PROMPTS, ANSWERS).logits, back(PROMPTS, ANSWERS).logits)
    other = KTokenMerging.from_base(str(folder), k=4, seed=0, context_layers=1, context_norm=False)
    with pytest.raises(CheckpointError, match="context_layers = 2, this model has context_layers = 1"):
        other.load_trained(tmp_path / "ck")


def test_options_are_checked(tokenizer):
    with pytest.raises(ValueError, match="context_layers must be >= 0"):
        ModelConfig(context_layers=-1)
    with pytest.raises(ValueError, match="keeps tokens"):
        ModelConfig(method="keep-first", context_layers=1)
    ModelConfig(method="mean", context_layers=1)  # the block mean of contextual states
    with pytest.raises(ValueError, match="at least 4 layers"):
        contextual(tokenizer, 4, layers=3)


def test_the_full_prompt_must_fit_the_first_layers(tokenizer):
    m, _ = contextual(tokenizer, 1)  # 128 positions
    long = ["x" * 200]  # 50 merged embeddings, but the first layer reads 200 positions
    with pytest.raises(ValueError, match="too long for contextual merging"):
        m.generate(long, max_new_tokens=1)
    assert m.with_k(4, context_layers=0).generate(long, max_new_tokens=1)


def test_bench_times_the_contextual_layers_in_the_merge_and_keeps_k1_plain(tokenizer, tmp_path):
    m, _ = contextual(tokenizer, 2)
    assert bench.with_k(m, 1).config.context_layers == 0
    m4 = bench.with_k(m, 4)
    assert m4.config.context_layers == 2 and m4.lm is m.lm
    calls = []
    hook = m.lm.get_base_model().model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        m4.merge_ids(m4.tokenize(PROMPTS))  # what bench_prefill times as "merge"
    finally:
        hook.remove()
    assert calls
    res = bench.run_speed(m, modes=["prefill"], lengths=[16], ks=[4], batch_sizes=[1], repeats=1, warmup=0,
                          out=tmp_path, command="test", log=lambda line: None)
    assert res["meta"]["context_layers"] == 2
    assert {r["k"] for r in res["prefill"]} == {1, 4}
    assert bench.BenchConfig(context_layers=1).context_layers == 1
    with pytest.raises(ValueError, match="context_layers"):
        bench.BenchConfig(context_layers=-1)
