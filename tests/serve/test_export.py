"""ktm export: the LoRA merged into a plain Hugging Face model folder that computes what the
adapter model computes, written atomically, with clear errors."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import char_tokenizer, tiny_llama, trained_checkpoint
from ktm import KTokenMerging
from ktm.model.blocks import position_ids
from ktm.cli import main
from ktm.cli.generate import escape_line
from ktm.config import ModelConfig
from ktm.serve.export import SERVING_CONFIG, ExportError, check_servable, export_model, read_export
from ktm.serve.serving import read_embeds


@pytest.fixture(scope="module")
def untied_base(tmp_path_factory):
    """A tiny model folder whose lm_head is not tied to the embeddings (so LoRA adapts it)."""
    folder = tmp_path_factory.mktemp("untied")
    tok = char_tokenizer()
    tiny_llama(len(tok), seed=1, tie=False, max_position_embeddings=512).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


PROMPTS = ["Tree: a-b, b-c. Is c below a? Answer:", "xy", "0123456789 " * 4]


def export_logits(folder, embeds, mask):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids(mask)).logits


@pytest.mark.parametrize("variant", [dict(k=3), dict(k=4, encoder_stages=(2, 2), encoder_norm=True),
                                     dict(k=2, untied=True)], ids=["k3", "k4-stages", "k2-untied-lm-head"])
def test_exported_model_computes_what_the_adapter_model_computes(tmp_path, base_dir, untied_base, variant):
    variant = dict(variant)
    base = untied_base if variant.pop("untied", False) else base_dir
    m = trained_checkpoint(tmp_path / "ck", base, **variant)
    out = export_model(tmp_path / "ck", tmp_path / "exp")
    assert not (out / "adapter").exists() and (out / "model.safetensors").is_file()
    assert {"config.json", "tokenizer.json", "ktm_encoder.safetensors", SERVING_CONFIG} <= set(os.listdir(out))
    meta = read_export(out)
    assert (meta["k"], meta["hidden_size"], meta["max_positions"], meta["dtype"]) == (m.k, 32, 512, "float32")
    embeds, mask = m.merge_prompts(PROMPTS)
    with torch.no_grad():
        want = m.logits(m.decode(embeds, mask).last_hidden_state)
        plain = m.lm.get_base_model()  # the base model without the LoRA: the export must differ from it
        with m.lm.disable_adapter():
            base_logits = plain(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids(mask)).logits
    got = export_logits(out, embeds, mask)
    real = mask.bool()
    assert (want[real] - base_logits[real]).abs().max() > 0.1  # the LoRA matters
    # float32 rounding only: W x + s B (A x) against (W + s B A) x, through every layer
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5 * float(want[real].abs().max()))


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def test_export_then_transformers_generate_on_encoded_prompts_answers_as_ktm_generate(tmp_path, base_dir, capsys):
    from transformers import AutoModelForCausalLM

    trained_checkpoint(tmp_path / "ck", base_dir, k=3)
    assert main(["export", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "exp")]) == 0
    assert main(["encode", "--checkpoint", str(tmp_path / "exp"), "--out", str(tmp_path / "p.safetensors"),
                 *PROMPTS]) == 0
    assert main(["generate", "--checkpoint", str(tmp_path / "ck"), "--device", "cpu", "--dtype", "float32",
                 "--max-new-tokens", "12", *PROMPTS]) == 0
    ktm_lines = capsys.readouterr().out.splitlines()[-len(PROMPTS):]
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "exp", dtype=torch.float32).eval()
    tok = char_tokenizer()
    answers = []
    for e, want in zip(read_embeds(tmp_path / "p.safetensors"), ktm_lines, strict=True):
        if e.shape[0] == 1 and transformers_major() < 5:  # transformers#41863 (docs/SERVING.md)
            answers.append(want)
            continue
        with torch.no_grad():
            ids = lm.generate(inputs_embeds=e[None], attention_mask=torch.ones(1, e.shape[0], dtype=torch.long),
                              max_new_tokens=12, do_sample=False)[0].tolist()
        ids = ids[:ids.index(2)] if 2 in ids else ids  # up to the end token, as ktm generate
        answers.append(escape_line(tok.decode(ids, skip_special_tokens=True)))
    assert answers == ktm_lines
    assert any(a for a in answers)


def test_export_in_bfloat16_saves_bfloat16_weights(tmp_path, base_dir):
    trained_checkpoint(tmp_path / "ck", base_dir, k=2)
    out = export_model(tmp_path / "ck", tmp_path / "exp", dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert read_export(out)["dtype"] == "bfloat16"


def test_export_refuses_to_overwrite_without_overwrite_and_replaces_with_it(tmp_path, base_dir, capsys):
    trained_checkpoint(tmp_path / "ck", base_dir, k=2)
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "mine.txt").write_text("keep me")
    args = ["export", "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "exp")]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ktm: error:") and "already exists" in err and "--overwrite" in err and "\n" not in err
    assert (tmp_path / "exp" / "mine.txt").read_text() == "keep me"
    assert main(args + ["--overwrite"]) == 0
    assert not (tmp_path / "exp" / "mine.txt").exists() and (tmp_path / "exp" / SERVING_CONFIG).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_never_replaces_its_own_checkpoint(tmp_path, base_dir):
    trained_checkpoint(tmp_path / "run" / "model", base_dir, k=2)
    for out in (tmp_path / "run" / "model", tmp_path / "run"):
        with pytest.raises(ExportError, match="would replace the checkpoint"):
            export_model(tmp_path / "run" / "model", out, overwrite=True)
    assert (tmp_path / "run" / "model" / "ktm_config.json").is_file()


def test_an_interrupted_export_leaves_nothing_behind(tmp_path, base_dir, monkeypatch):
    import ktm.serve.export

    trained_checkpoint(tmp_path / "ck", base_dir, k=2)

    def disk_full(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ktm.serve.export, "save_file", disk_full)
    with pytest.raises(OSError):
        export_model(tmp_path / "ck", tmp_path / "exp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no ktm checkpoint folder" in err


def test_a_model_whose_merging_the_client_does_not_reproduce_is_refused():
    check_servable(ModelConfig(k=4, encoder_stages=(2, 2), encoder_norm=True, lora_r=8))
    if not hasattr(ModelConfig(), "context_layers"):
        pytest.skip("this ktm has no contextual merging")
    with pytest.raises(ExportError, match="context_layers = 1"):
        check_servable(ModelConfig(k=4, context_layers=1))


def test_read_export_explains_what_is_wrong(tmp_path, base_dir):
    with pytest.raises(ExportError, match="no export folder"):
        read_export(tmp_path / "nothing")
    trained_checkpoint(tmp_path / "ck", base_dir, k=2)
    with pytest.raises(ExportError, match="export it first with ktm export"):
        read_export(tmp_path / "ck")
    out = export_model(tmp_path / "ck", tmp_path / "exp")
    meta = json.loads((out / SERVING_CONFIG).read_text())
    (out / SERVING_CONFIG).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ExportError, match="newer ktm"):
        read_export(out)
    (out / SERVING_CONFIG).write_text("{not json")
    with pytest.raises(ExportError, match="corrupt"):
        read_export(Path(out))


def test_a_dequantized_gguf_model_loses_its_quantizer_and_other_quantized_models_are_refused():
    from types import SimpleNamespace

    from ktm.serve.export import drop_dequantized_gguf

    removed = []

    def quantizer(method, packed=None):
        return SimpleNamespace(quantization_config=SimpleNamespace(quant_method=method), packed_modules=packed or {},
                               remove_quantization_config=removed.append)

    lm = tiny_llama(10)
    drop_dequantized_gguf(lm)  # not quantized: nothing to do
    lm.hf_quantizer = quantizer("gguf")
    drop_dequantized_gguf(lm)
    assert removed == [lm]
    for q in (quantizer("bitsandbytes"), quantizer("gguf", packed={"model.layers.0.mlp.up_proj": None})):
        lm.hf_quantizer = q
        with pytest.raises(ExportError, match="quantized"):
            drop_dequantized_gguf(lm)


@pytest.mark.slow
@pytest.mark.integration
def test_export_of_the_embedded_gguf_model(tmp_path):
    """The default base is loaded from a GGUF file: its export is a plain model folder."""
    from transformers import AutoModelForCausalLM

    from ktm.serve.serving import PromptEncoder

    m = KTokenMerging.from_base(None, k=4, seed=0, encoder_init="paper", lora_dropout=0.0, device="cpu",
                                dtype="float32").eval()
    with torch.no_grad():
        for p in m.trainable_parameters()["lora"]:
            p.normal_(0, 0.02)
    m.save_pretrained(tmp_path / "ck")
    out = export_model(tmp_path / "ck", tmp_path / "exp")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    prompts = ["Review: these shoes fit well and look great, Label:", "Hello"]
    enc = PromptEncoder.from_export(out)
    assert all(torch.equal(a, m.merge_prompts([p])[0][0]) for a, p in zip(enc.encode(prompts), prompts))
    lm = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    embeds, mask = m.merge_prompts(prompts)
    with torch.no_grad():
        want = m.logits(m.decode(embeds, mask).last_hidden_state)
        got = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids(mask)).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5 * float(want[real].abs().max()))
