"""KTokenMerging on tiny random Llamas: equivalences that must hold to the float."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama
from ktm import CheckpointError, KTokenMerging

PROMPTS = ["a", "hello world, this is a longer prompt!", "abc", "tree AA +AB ++AC", "xy z w"]
ANSWERS = ["yes", "no", "maybe so", "true", "false"]


def perturb(model, seed=1, scale=0.05):
    """Give LoRA B matrices and the encoder's last layer non-zero values (trained-like)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters()["lora"] + model.trainable_parameters()["encoder"]:
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
def test_merged_length_and_embeddings(make_model, k):
    m = make_model(k=k)
    embeds, mask = m.merge_prompts(PROMPTS)
    for i, p in enumerate(PROMPTS):
        n = len(p)  # one token per character
        assert m.compressed_length(p) == -(-n // k) == int(mask[i].sum())
        # at init (mean) each merged embedding is the mean of its block's token embeddings
        ids = torch.tensor(m.tokenize([p])[0])
        tok = m.lm.get_input_embeddings()(ids)
        means = torch.stack([blk.mean(0) for blk in tok.split(k)])
        torch.testing.assert_close(embeds[i, mask[i].bool()], means, rtol=0, atol=1e-6)


def test_k1_equals_plain_lora_model(make_model):
    m = perturb(make_model(k=1, init="mean"))
    with torch.no_grad():
        m.encoder.mlp[-1].weight.zero_()
        m.encoder.mlp[-1].bias.zero_()
        out = m(["hello there"], ["ok"])
        ids = torch.tensor([m.tokenize(["hello thereok"])[0] + [m.tokenizer.eos_token_id]])
        full = m.lm(input_ids=ids).logits[0].float()
    n = len("hello there")
    torch.testing.assert_close(out.logits, full[n - 1:-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 4])
def test_prompt_alone_equals_prompt_in_batch(make_model, k):
    m = perturb(make_model(k=k, init="paper"))
    with torch.no_grad():
        batch_emb, batch_mask = m.merge_prompts(PROMPTS)
        batch = m(PROMPTS, ANSWERS)
        for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS)):
            alone_emb, _ = m.merge_prompts([p])
            torch.testing.assert_close(batch_emb[i, batch_mask[i].bool()], alone_emb[0], rtol=0, atol=1e-6)
            alone = m([p], [a])
            torch.testing.assert_close(batch.logits[batch.rows == i], alone.logits, rtol=1e-5, atol=1e-5)
    together = m.generate(PROMPTS, max_new_tokens=6, return_tokens=True)
    for i, p in enumerate(PROMPTS):
        assert m.generate([p], max_new_tokens=6, return_tokens=True)[0] == together[i]


@pytest.mark.parametrize("k", [1, 4])
def test_kv_cache_generation_equals_recomputation(make_model, k):
    m = perturb(make_model(k=k), scale=0.1)
    cached = m.generate(PROMPTS, max_new_tokens=10, return_tokens=True)
    recomputed = m.generate(PROMPTS, max_new_tokens=10, return_tokens=True, use_cache=False)
    assert cached == recomputed
    assert any(len(c) > 1 for c in cached)
    # and the teacher-forced forward pass agrees with every decoded token
    for p, toks in zip(PROMPTS, cached):
        if not toks:
            continue
        text = m.tokenizer.decode(toks)
        out = m([p], [text])
        assert out.logits.argmax(-1)[: len(toks)].tolist() == toks


def test_loss_equals_hand_computed_cross_entropy(make_model):
    m = perturb(make_model(k=3, init="paper"))
    with torch.no_grad():
        out = m(PROMPTS[:3], ANSWERS[:3])
        total, count = 0.0, 0
        for p, a in zip(PROMPTS[:3], ANSWERS[:3]):
            merged, _ = m.merge_prompts([p])
            ans = m.tokenize([a])[0] + [m.tokenizer.eos_token_id]
            emb = torch.cat([merged[0], m.lm.get_input_embeddings()(torch.tensor(ans[:-1]))])
            logits = m.lm(inputs_embeds=emb[None]).logits[0].float()  # every position
            mlen = merged.shape[1]
            total += F.cross_entropy(logits[mlen - 1:], torch.tensor(ans), reduction="sum")
            count += len(ans)
    torch.testing.assert_close(out.loss, total / count, rtol=1e-5, atol=1e-5)
    assert out.logits.shape[0] == count  # vocabulary logits only at target positions


@pytest.mark.parametrize("options", [{}, {"encoder_layernorm": True}], ids=["plain-encoder", "layernorm"])
def test_save_load_round_trip(make_model, tmp_path, tokenizer, options):
    m = perturb(make_model(k=4, init="paper", **options))
    m.save_pretrained(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "ktm_config.json").read_text())
    assert meta["model"]["k"] == 4 and meta["encoder"]["hidden"] == m.encoder.hidden
    assert not list(tmp_path.glob("**/*.bin")) and not list(tmp_path.glob("**/*.pt"))
    loaded = KTokenMerging.from_pretrained(tmp_path / "ck", base=tiny_llama(len(tokenizer))).eval()
    with torch.no_grad():
        a, b = m(PROMPTS, ANSWERS), loaded(PROMPTS, ANSWERS)
    assert torch.equal(a.logits, b.logits)
    for (n1, p1), (n2, p2) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert m.generate(PROMPTS, 5) == loaded.generate(PROMPTS, 5)
    # saving again over the same folder replaces it whole
    m.save_pretrained(tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_loading_onto_wrong_base_or_k_fails(make_model, tmp_path, tokenizer):
    make_model(k=2).save_pretrained(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="fingerprint"):
        KTokenMerging.from_pretrained(tmp_path / "ck", base=tiny_llama(len(tokenizer), seed=5))
    with pytest.raises(CheckpointError, match="K = 2"):
        KTokenMerging.from_pretrained(tmp_path / "ck", base=tiny_llama(len(tokenizer)), k=4)
    with pytest.raises(CheckpointError, match="K = 2"):
        make_model(k=3).load_trained(tmp_path / "ck")


def test_corrupt_or_missing_checkpoint(make_model, tmp_path, tokenizer):
    make_model(k=2).save_pretrained(tmp_path / "ck")
    (tmp_path / "ck" / "encoder.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        KTokenMerging.from_pretrained(tmp_path / "ck", base=tiny_llama(len(tokenizer)))
    (tmp_path / "ck" / "ktm_config.json").write_text("{")
    with pytest.raises(CheckpointError, match="corrupt"):
        KTokenMerging.from_pretrained(tmp_path / "ck", base=tiny_llama(len(tokenizer)))
    with pytest.raises(CheckpointError, match="no ktm checkpoint"):
        KTokenMerging.from_pretrained(tmp_path / "nothing")


def test_bad_inputs_have_clear_errors(make_model, tokenizer):
    with pytest.raises(ValueError, match="K must be >= 1"):
        KTokenMerging.from_base(tiny_llama(len(tokenizer)), k=0, tokenizer=tokenizer)
    m = make_model(k=2)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        m.generate(["ok", ""])
    with pytest.raises(ValueError, match="too long for the model"):
        m.generate(["x" * 600], max_new_tokens=4)  # 300 merged > 256 positions
    with pytest.raises(ValueError, match="too long for the model"):
        m(["x" * 500], ["y" * 10])  # 250 merged + 10 answer tokens + end > 256
    with pytest.raises(TypeError, match="list of prompts"):
        m.merge_prompts("a string")
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        m(["a", "b"], ["c"])


def test_only_lora_and_encoder_train(make_model):
    m = make_model(k=2)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("encoder.") for n in trainable)
    assert not m.lm.get_input_embeddings().weight.requires_grad
    targets = {n.split(".")[-4] for n in trainable if "lora_A" in n}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_untied_lm_head_gets_lora(make_model):
    m = make_model(k=2, tie=False)
    assert any("lm_head.lora_A" in n for n, _ in m.named_parameters())
    m2 = make_model(k=2, tie=False, lora_lm_head=False)
    assert not any("lm_head.lora_A" in n for n, _ in m2.named_parameters())


def test_sampling_is_reproducible_with_a_generator(make_model):
    m = perturb(make_model(k=2))
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    a = m.generate(PROMPTS, generator=torch.Generator().manual_seed(3), **kw)
    b = m.generate(PROMPTS, generator=torch.Generator().manual_seed(3), **kw)
    assert a == b and len(a) == len(PROMPTS)


def test_from_base_loads_a_local_model_folder(tmp_path, tokenizer):
    base = tiny_llama(len(tokenizer))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    m = KTokenMerging.from_base(str(tmp_path / "base"), k=3)
    assert m.base_reference == str(tmp_path / "base")
    assert m.generate(["hello"], max_new_tokens=3) == m.generate(["hello"], max_new_tokens=3)
    m.save_pretrained(tmp_path / "ck")
    again = KTokenMerging.from_pretrained(tmp_path / "ck")  # base found from the saved reference
    assert again.k == 3 and again.base_fingerprint == m.base_fingerprint


def test_adapter_only_loading_moves_lora_across_k(make_model, tmp_path):
    src = make_model(k=1)
    with torch.no_grad():
        for name, p in src.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    src.save_pretrained(tmp_path / "k1")
    dst = make_model(k=4, seed=0)
    enc_before = {k: v.clone() for k, v in dst.encoder.state_dict().items()}
    with pytest.raises(CheckpointError, match="K = 1"):
        dst.load_trained(tmp_path / "k1")
    dst.load_trained(tmp_path / "k1", adapter_only=True)
    want = {n: p for n, p in src.lm.named_parameters() if "lora_" in n}
    got = {n: p for n, p in dst.lm.named_parameters() if "lora_" in n}
    assert want.keys() == got.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n])
    for k, v in dst.encoder.state_dict().items():
        torch.testing.assert_close(v, enc_before[k])


def test_hierarchical_model_grows_from_a_smaller_k(make_model, tmp_path):
    src = perturb(make_model(k=2))
    src.save_pretrained(tmp_path / "k2")
    dst = make_model(k=4, encoder_stages=(2, 2))
    # at initialisation the stacked encoder is the exact 4-block mean on full blocks
    stacked = dst.merge_ids(dst.tokenize(PROMPTS))
    single = make_model(k=4).merge_ids(dst.tokenize(PROMPTS))
    for p, a, b in zip(PROMPTS, stacked, single):
        full = len(p) // 4
        torch.testing.assert_close(a[:full], b[:full], rtol=0, atol=1e-5)
    dst.grow_from(tmp_path / "k2")
    with torch.no_grad():
        # first stage = the K = 2 encoder, second = mean of pairs of its outputs
        ids = dst.tokenize(["hello world"])
        pairs = src.merge_ids(ids)[0]
        got = dst.merge_ids(ids)[0]
        want = torch.stack([blk.mean(0) for blk in pairs.split(2)])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for (n, p), (n2, q) in zip(src.lm.named_parameters(), dst.lm.named_parameters()):
        if "lora_" in n:
            assert n == n2 and torch.equal(p, q)
    # the stages travel with the checkpoint
    dst.save_pretrained(tmp_path / "k4")
    meta = json.loads((tmp_path / "k4" / "ktm_config.json").read_text())
    assert meta["model"]["encoder_stages"] == [2, 2] and meta["encoder"]["stages"] == [2, 2]
    dst.load_trained(tmp_path / "k4")
    with pytest.raises(CheckpointError, match="must start with them"):
        make_model(k=4).grow_from(tmp_path / "k2")
    with pytest.raises(CheckpointError, match="must start with them"):
        make_model(k=6, encoder_stages=(3, 2)).grow_from(tmp_path / "k2")
    with pytest.raises(CheckpointError, match="encoder_norm"):
        make_model(k=4, encoder_stages=(2, 2), encoder_norm=True).grow_from(tmp_path / "k2")
    with pytest.raises(ValueError, match="multiply to 6, not K = 4"):
        make_model(k=4, encoder_stages=(2, 3))


def test_prompt_errors_are_typed_and_name_the_prompt(make_model):
    """Callers name their own input from the error's fields (ktm generate: the input line),
    never by parsing its message."""
    from ktm.model import EmptyPrompt, PromptError, PromptTooLong

    m = make_model(k=2)
    with pytest.raises(PromptTooLong) as e:
        m.generate(["ok", "x" * 600], max_new_tokens=4)
    assert (e.value.index, e.value.tokens, e.value.merged, e.value.extra, e.value.limit) == (1, 600, 300, 4, 256)
    assert isinstance(e.value, PromptError) and isinstance(e.value, ValueError)
    assert str(e.value) == f"prompt 1 {e.value.detail}"
    with pytest.raises(EmptyPrompt) as e:
        m.merge_prompts(["ok", "fine", ""])
    assert e.value.index == 2 and e.value.detail == "is empty: nothing to merge"
