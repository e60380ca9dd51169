"""ktm export --format gguf without llama.cpp: llama.cpp's q/k layout, the GGUF writer (types,
copied metadata and tensors, refusals), and transformers reading the written file back to the
model's own logits (exactly in f32)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import char_tokenizer, tiny_llama
from ktm.serve.export import ExportError
from ktm.serve.gguf import (
    GGUF_TYPES, export_gguf, gguf_table, gguf_tensors, permute_rows, source_gguf, unpermute_rows, write_gguf,
)

gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("n_head, head_dim, cols", [(1, 4, 1), (4, 8, 3), (3, 64, 5)])
def test_permutation_interleaves_each_heads_halves_and_inverts(n_head, head_dim, cols):
    w = np.arange(n_head * head_dim * cols, dtype=np.float32).reshape(n_head * head_dim, cols)
    p = permute_rows(w, n_head)
    half = head_dim // 2
    for h in range(n_head):  # llama.cpp's row 2i / 2i+1 of a head = HF's row i / i + half
        for i in range(half):
            assert (p[h * head_dim + 2 * i] == w[h * head_dim + i]).all()
            assert (p[h * head_dim + 2 * i + 1] == w[h * head_dim + half + i]).all()
    assert (unpermute_rows(p, n_head) == w).all()


def test_permutation_refuses_rows_that_are_not_rotary_pairs():
    with pytest.raises(ExportError, match="rotary pairs"):
        permute_rows(np.zeros((6, 2)), 4)


@pytest.fixture(scope="module")
def tiny():
    tok = char_tokenizer()
    return tiny_llama(len(tok), tie=True), tok


def write_source(path: Path, model, tok, extra: bool = True, q8: tuple = ()) -> Path:
    """A llama GGUF of ``model`` with the metadata llama.cpp and transformers need (and a
    ``rope_freqs`` tensor the model does not produce, which the export must copy)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<") and len(t) > 1 else 1 for t in tokens])
    w.add_eos_token_id(2)
    for name, array in gguf_tensors(model.state_dict(), c, c.num_hidden_layers).items():
        if name in q8:
            w.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, array)
    if extra:
        w.add_tensor("rope_freqs.weight", np.ones(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tied_lm_head_is_left_out_and_names_are_llama_cpps(tiny):
    model, _ = tiny
    names = set(gguf_tensors(model.state_dict(), model.config, 2))
    assert "output.weight" not in names and "token_embd.weight" in names
    assert {"blk.1.attn_q.weight", "blk.1.ffn_down.weight", "output_norm.weight"} <= names


@pytest.mark.parametrize("kind, tol", [("f32", 0.0), ("f16", 1e-2), ("q8_0", 0.5)])  # q8_0: 8-bit rows of a model with large random weights
def test_written_gguf_reads_back_as_the_model(tmp_path, tiny, kind, tol):
    from transformers import AutoModelForCausalLM

    model, tok = tiny
    source = write_source(tmp_path / "source.gguf", model, tok)
    copied = write_gguf(tmp_path / "model.gguf", source, gguf_tensors(model.state_dict(), model.config, 2), kind)
    assert copied == ["rope_freqs.weight"]
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    assert reader.fields["general.file_type"].contents() == GGUF_TYPES[kind][1]
    assert reader.fields["tokenizer.ggml.tokens"].contents() == tok.convert_ids_to_tokens(list(range(len(tok))))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == GGUF_TYPES[kind][0]
    table = gguf_table(tmp_path / "model.gguf")
    assert table.shape == model.get_input_embeddings().weight.shape
    lm = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf", dtype=torch.float32).eval()
    x = torch.randint(3, len(tok), (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (lm(x).logits - model(x).logits).abs().max().item()
    assert diff <= tol


def test_writer_refuses_tensors_the_base_lacks_and_other_architectures(tmp_path, tiny):
    model, tok = tiny
    source = write_source(tmp_path / "source.gguf", model, tok)
    tensors = gguf_tensors(model.state_dict(), model.config, 2)
    with pytest.raises(ExportError, match="not trained on this base"):
        write_gguf(tmp_path / "a.gguf", source, {**tensors, "blk.9.attn_q.weight": tensors["blk.0.attn_q.weight"]},
                   "f32")
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ExportError, match="'gpt2' model"):
        write_gguf(tmp_path / "b.gguf", tmp_path / "gpt2.gguf", tensors, "f32")


def test_a_hugging_face_base_has_no_source_gguf_and_is_converted(base_dir):
    assert source_gguf(base_dir) is None  # export_gguf converts it (tests/serve/test_gguf_convert.py)


def test_export_refuses_an_unknown_type_and_an_existing_folder(tmp_path):
    with pytest.raises(ExportError, match="--gguf-type"):
        export_gguf("zoo:default-k2", tmp_path / "x", gguf_type="q4_0")
    (tmp_path / "there").mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export_gguf("zoo:default-k2", tmp_path / "there")


def test_source_type_keeps_each_tensors_type_of_the_base(tmp_path, tiny):
    model, tok = tiny
    source = write_source(tmp_path / "source.gguf", model, tok, q8=("blk.0.attn_q.weight", "token_embd.weight"))
    write_gguf(tmp_path / "model.gguf", source, gguf_tensors(model.state_dict(), model.config, 2), "source")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "model.gguf")).tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == "Q8_0"
    assert types["blk.1.attn_q.weight"] == types["blk.0.attn_norm.weight"] == "F32"
