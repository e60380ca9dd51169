"""ktm export --format gguf of a checkpoint whose base is a Hugging Face folder: the base is
converted (hyper-parameters, vocabulary, LoRA merged, q/k in llama.cpp's order), and llama.cpp
reads the file back as the model: its logits on a prompt equal transformers' (f32 to rounding,
f16 and q8_0 within their rounding), its tokenizer splits text as the Hugging Face tokenizer
does, and the engine's greedy answers on merged prompts are ktm's.

The tokenizers are real BPE tokenizers trained here on a few sentences (byte-level with the
pre-tokenizers llama.cpp names gpt-2, smollm, llama-bpe and qwen2, and a SentencePiece-style one
with byte fallback); the models are tiny random llamas with a random, non-zero LoRA.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_llama, trained_checkpoint
from ktm.serve.export import ExportError
from ktm.serve.gguf import export_gguf
from ktm.serve.gguf_meta import SPLIT_PATTERNS, check_convertible, vocabulary

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = ["The quick brown fox jumps over the lazy dog.", "It's 2024, and we'll see 12345 apples!",
          "Prompt compression merges K tokens into one embedding.", "  Spaces   and\ttabs\nand new lines.",
          "Review: these shoes are great, very comfortable. Label: positive", "don't can't won't I'm you're"] * 20
TEXTS = ["The quick brown fox", "It's 2024: 12345 apples!", "  two  spaces\nnew line", "héllo wörld ✓",
         "Review: great shoes, Label:", "I'm sure they'll"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def bpe_tokenizer(pre: str):
    """A byte-level BPE tokenizer (about 400 tokens) whose pre-tokenizer llama.cpp calls ``pre``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in ("gpt-2", "smollm"))
    steps = {"gpt-2": [], "smollm": [pre_tokenizers.Digits(individual_digits=True)]}.get(
        pre, [pre_tokenizers.Split(Regex(SPLIT_PATTERNS.get(pre, "x")), "isolated")])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps + [level]) if steps else level
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIALS[0], bos_token=SPECIALS[1],
                                   eos_token=SPECIALS[2], chat_template=TEMPLATE)


def spm_tokenizer(style: str = "normalizer"):
    """A SentencePiece-style tokenizer as transformers writes Llama 2's: BPE over words marked with
    ``▁``, byte fallback to ``<0x..>`` tokens, ``<unk>``, ``<s>`` added in front. ``style``:
    ``"normalizer"`` (``▁`` prepended and spaces replaced by the normalizer, as in Llama 2's
    tokenizer.json) or ``"metaspace"`` (a Metaspace pre-tokenizer, as newer conversions write)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    meta = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = meta
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    spec = json.loads(trained.to_str())["model"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for t in sorted(spec["vocab"], key=spec["vocab"].get):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def hf_base(folder, tok, extra_rows=0):
    """A tiny random llama (untied head, ``extra_rows`` embedding rows past the tokenizer's) and
    ``tok`` saved as a Hugging Face model folder."""
    tiny_llama(len(tok) + extra_rows, tie=False).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A K = 3 checkpoint with a random LoRA (lm_head too) on a tiny llama folder (untied head, 5 padding
    rows, a byte-level BPE tokenizer with the smollm pre-tokenizer); (folder, model)."""
    root = tmp_path_factory.mktemp("convert")
    base = hf_base(root / "base", bpe_tokenizer("smollm"), extra_rows=5)
    return root / "ckpt", trained_checkpoint(root / "ckpt", base, k=3, lora_lm_head=True)


def llama(path, n_ctx=128, f32_cache=False):
    """llama.cpp on ``path``, 1 thread, logits of every position; ``f32_cache``: keys and values
    in float32 (llama.cpp's default, f16, rounds them)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=1, n_threads_batch=1, logits_all=True,
                           verbose=False, **cache)


#: largest logit difference over the largest logit; f32 with an f32 KV cache is the conversion
#: alone, the others add llama.cpp's default f16 cache and the weights' rounding
TOLERANCES = [("f32", True, 1e-4), ("f32", False, 1e-2), ("f16", False, 2e-2), ("q8_0", False, 0.1)]


@pytest.mark.parametrize("kind, f32_cache, tol", TOLERANCES)
def test_converted_base_gives_transformers_logits_in_llama_cpp(tmp_path, checkpoint, kind, f32_cache, tol):
    folder, model = checkpoint
    out = export_gguf(folder, tmp_path / kind, gguf_type=kind)
    meta = json.loads((out / "ktm_serving.json").read_text())
    assert meta["gguf"]["source"].startswith("converted from") and meta["gguf"]["copied_tensors"] == []
    assert "/" not in meta["gguf"]["source"]  # the base folder by name, not by a path of this machine
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    assert types["output.weight"] == types["blk.1.attn_k.weight"] == kind.upper() and types["output_norm.weight"] == "F32"
    ids = model.tokenizer.encode("Review: these shoes are great, very comfortable. Label:", add_special_tokens=False)
    with torch.no_grad():
        want = model.lm(torch.tensor([ids])).logits[0].numpy()  # the LoRA unmerged, in float32
    llm = llama(out / "model.gguf", f32_cache=f32_cache)
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)])
    assert got.shape == want.shape and np.abs(want).max() > 1  # logits of size ~3: the comparison means something
    print(f"{kind} (f32 cache: {f32_cache}): largest difference {np.abs(got - want).max():.3g}, largest logit "
          f"{np.abs(want).max():.3g}")
    assert np.abs(got - want).max() <= tol * np.abs(want).max()
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: ktm\n") and "- llama.cpp" in card and "k: 3" in card and kind in card


def test_merged_prompts_on_the_converted_base_answer_as_ktm(tmp_path, checkpoint):
    from ktm.serve.llamacpp import LlamaCppEngine

    pytest.importorskip("llama_cpp")
    folder, model = checkpoint
    out = export_gguf(folder, tmp_path / "f32", gguf_type="f32")
    prompts = ["Review: great shoes, Label:", "The quick brown fox jumps over"]
    engine = LlamaCppEngine(out, threads=1, n_ctx=128)
    try:
        got = [c.tokens for c in engine.generate(prompts, max_new_tokens=8)]
    finally:
        engine.close()
    assert got == model.generate(prompts, max_new_tokens=8, return_tokens=True)


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2", "spm", "spm-metaspace"])
def test_llama_cpp_tokenizes_as_the_hugging_face_tokenizer(tmp_path, pre):
    from ktm.serve.gguf import gguf_tensors, write_converted

    spm = pre.startswith("spm")
    tok = spm_tokenizer(pre.removeprefix("spm-") if "-" in pre else "normalizer") if spm else bpe_tokenizer(pre)
    lm = tiny_llama(len(tok) + 3)
    path = tmp_path / "model.gguf"
    write_converted(path, lm.config, tok, gguf_tensors(lm.state_dict(), lm.config, 2), "f32")
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.model"].contents() == ("llama" if spm else "gpt2")
    assert fields["tokenizer.ggml.pre"].contents() == ("default" if spm else pre)
    assert fields["general.quantization_version"].contents() == gguf.GGML_QUANT_VERSION
    llm = llama(path)
    # a Metaspace pre-tokenizer puts no second "▁" before a text that starts with a space, where
    # SentencePiece (and llama.cpp) do: such texts differ by that one token
    for text in [t for t in TEXTS if pre != "spm-metaspace" or not t.startswith(" ")]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text, add_special_tokens=False), text
        ids = tok.encode(text, add_special_tokens=False)
        back = llm.detokenize(ids).decode()
        # llama.cpp's detokenize keeps the space SentencePiece puts before the text; transformers strips it
        assert back == tok.decode(ids) or spm and back == " " + tok.decode(ids), text
    assert llm.token_bos() == tok.bos_token_id and llm.token_eos() == tok.eos_token_id
    assert (llm.tokenize(b"x")[:1] == [tok.bos_token_id]) == (tok("x")["input_ids"][:1] == [tok.bos_token_id])
    assert llm.metadata.get("tokenizer.chat_template") == tok.chat_template


def test_vocabulary_types_padding_and_specials():
    tok = bpe_tokenizer("gpt-2")
    vocab = vocabulary(tok, len(tok) + 2)
    assert vocab.tokens[-2:] == [f"[PAD{len(tok)}]", f"[PAD{len(tok) + 1}]"] and vocab.types[-2:] == [5, 5]
    assert vocab.types[:3] == [3, 3, 3] and set(vocab.types[3:-2]) == {1}
    assert vocab.special == {"bos": 1, "eos": 2, "pad": 0} and not vocab.add_bos
    assert vocab.merges[0].count(" ") == 1 and len(vocab.merges) == len(tok) - 259
    spm_tok = spm_tokenizer()
    spm = vocabulary(spm_tok, len(spm_tok))
    assert spm.model == "llama" and spm.add_space_prefix and spm.add_bos
    assert spm.types[:4] == [2, 3, 3, 6] and spm.types[258] == 6 and spm.types[259] == 1
    assert max(spm.scores) == 0.0 and spm.scores.count(0.0) == 1  # the first merge's token scores highest


def test_what_is_not_laid_out_is_refused(tmp_path, tokenizer):
    from transformers import LlamaConfig, MistralConfig

    with pytest.raises(ExportError, match="'mistral' model"):
        check_convertible(MistralConfig())
    with pytest.raises(ExportError, match="rope scaling 'linear'"):
        check_convertible(LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0}))
    with pytest.raises(ExportError, match="attention_bias"):
        check_convertible(LlamaConfig(attention_bias=True))
    with pytest.raises(ExportError, match="'WordLevel' model"):
        vocabulary(tokenizer, len(tokenizer))  # the character tokenizer of the other tests
    with pytest.raises(ExportError, match="only 10 embedding rows"):
        vocabulary(bpe_tokenizer("gpt-2"), 10)
    odd = bpe_tokenizer("gpt-2")
    from tokenizers import pre_tokenizers

    odd.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                                      pre_tokenizers.ByteLevel(add_prefix_space=False)])
    with pytest.raises(ExportError, match="no name in llama.cpp"):
        vocabulary(odd, len(odd))


def test_source_type_is_refused_for_a_hugging_face_base(tmp_path, checkpoint):
    with pytest.raises(ExportError, match="choose f32, f16 or q8_0"):
        export_gguf(checkpoint[0], tmp_path / "src", gguf_type="source")
    assert not (tmp_path / "src").exists()
