"""The metadata llama.cpp reads from a GGUF file, built from a Hugging Face llama base.

``ktm export --format gguf`` of a checkpoint whose base is a transformers folder or hub id
converts that base (:func:`ktm.serve.gguf.write_converted`); this module gives the two halves of
the file's header:

- :func:`add_llama_hparams`: ``llama.context_length``, ``embedding_length``, ``block_count``,
  ``feed_forward_length``, ``attention.head_count`` / ``head_count_kv``, ``rope.freq_base``,
  ``rope.dimension_count``, ``attention.layer_norm_rms_epsilon``, ``vocab_size`` (and
  ``attention.key_length`` / ``value_length`` where a head is not ``hidden / heads`` wide);
- :func:`vocabulary` then :func:`add_vocabulary`: the tokenizer as llama.cpp runs it,
  ``tokenizer.ggml.model`` ``gpt2`` (byte-level BPE: tokens, types, merges and the
  pre-tokenizer's name, ``tokenizer.ggml.pre``) or ``llama`` (SentencePiece-style BPE with byte
  fallback: tokens, types, scores), the bos/eos/unk/pad ids, whether a bos is added, and the
  chat template.

What is laid out is what llama.cpp's ``llama`` architecture and tokenizers reproduce; anything
else (another architecture, rope scaling, biases, a pre-tokenizer llama.cpp has no name for) is
refused with :class:`~ktm.serve.export.ExportError` naming it.

Example::

    vocab = vocabulary(tokenizer, config.vocab_size)   # Vocabulary(model="gpt2", pre="smollm", ...)
"""

from __future__ import annotations

import dataclasses
import json

from .export import ExportError

#: llama.cpp's names (tokenizer.ggml.pre) of Split-then-ByteLevel pre-tokenizers, by their regex
SPLIT_PATTERNS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}
#: gguf's TokenType values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPIECE = "\u2581"  # SentencePiece's word boundary


def add_llama_hparams(writer, config) -> None:
    """Write the ``llama.*`` hyper-parameters of a transformers llama ``config``; raises
    :class:`ExportError` for what llama.cpp's llama layout would not reproduce."""
    check_convertible(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    writer.add_rope_freq_base(float(rope_theta(config)))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim * heads != config.hidden_size:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))


def rope_theta(config) -> float:
    """The rope base of a transformers config (``rope_parameters`` in transformers 5, else ``rope_theta``)."""
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0)


def check_convertible(config) -> None:
    """Raise :class:`ExportError` unless ``config`` is a plain llama: no rope scaling, no biases."""
    kind = getattr(config, "model_type", None)
    if kind != "llama":
        raise ExportError(f"the base is a {kind!r} model; converting a Hugging Face base to GGUF lays out "
                          f"llama models only (export a {kind} base with --format hf)")
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    scaling = params.get("rope_type", params.get("type", "default"))
    if scaling not in ("default", None):
        raise ExportError(f"the base uses rope scaling {scaling!r}, which the GGUF conversion does not lay out")
    biased = [n for n in ("attention_bias", "mlp_bias") if getattr(config, n, False)]
    if biased:
        raise ExportError(f"the base sets {', '.join(biased)}: projection biases are not laid out by the GGUF conversion")


@dataclasses.dataclass
class Vocabulary:
    """A tokenizer as llama.cpp reads it: ``model`` ``"gpt2"`` (with ``merges`` and ``pre``) or
    ``"llama"`` (with ``scores`` and ``add_space_prefix``); ``types``: gguf TokenType values."""

    model: str
    tokens: list[str]
    types: list[int]
    special: dict[str, int]
    add_bos: bool
    pre: str | None = None
    merges: list[str] = dataclasses.field(default_factory=list)
    scores: list[float] | None = None
    add_space_prefix: bool = False
    chat_template: str | None = None


def vocabulary(tokenizer, vocab_size: int) -> Vocabulary:
    """The :class:`Vocabulary` of a transformers fast ``tokenizer`` for a model of ``vocab_size``
    rows (rows past the tokenizer's are named ``[PAD{i}]``, unused). Raises :class:`ExportError`
    for a tokenizer llama.cpp's would not reproduce."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("the base's tokenizer is not a fast (tokenizers) tokenizer: cannot describe it to llama.cpp")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"the base's tokenizer is a {model.get('type')!r} model; the GGUF conversion lays out "
                          f"BPE tokenizers (byte-level, or SentencePiece-style with byte fallback)")
    n = len(tokenizer)
    if n > vocab_size:
        raise ExportError(f"the tokenizer has {n} tokens but the model only {vocab_size} embedding rows")
    tokens = tokenizer.convert_ids_to_tokens(list(range(n))) + [f"[PAD{i}]" for i in range(n, vocab_size)]
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    spm = bool(model.get("byte_fallback"))
    types = [_token_type(i, t, added, spm, tokenizer.unk_token_id) for i, t in enumerate(tokens)]
    types[n:] = [UNUSED] * (vocab_size - n)
    special = {name: i for name in ("bos", "eos", "unk", "pad")
               if (i := getattr(tokenizer, f"{name}_token_id", None)) is not None}
    bos = special.get("bos")
    vocab = Vocabulary("llama" if spm else "gpt2", tokens, types, special,
                       add_bos=bos is not None and tokenizer("a")["input_ids"][:1] == [bos],
                       chat_template=tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if spm:
        vocab.add_space_prefix = _spm_prefix(spec)
        vocab.scores = _merge_scores(tokens, merges)
    else:
        vocab.pre, vocab.merges = _bpe_pre(spec), merges
    return vocab


def _token_type(i: int, token: str, added: dict, spm: bool, unk: int | None) -> int:
    if spm and i == unk:
        return UNKNOWN
    if i in added:
        return CONTROL if added[i].get("special") else USER_DEFINED
    if spm and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return BYTE
    return NORMAL


def _steps(part: dict | None) -> list[dict]:
    if not part:
        return []
    if part.get("type") == "Sequence":
        return part.get("pretokenizers") or part.get("normalizers") or []
    return [part]


def _bpe_pre(spec: dict) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer (its splitting regex)."""
    steps, norm = _steps(spec.get("pre_tokenizer")), _steps(spec.get("normalizer"))
    kinds = [s["type"] for s in steps]
    if any(s["type"] != "NFC" for s in norm):
        raise ExportError(f"the tokenizer normalises text ({', '.join(s['type'] for s in norm)}), which llama.cpp's "
                          f"byte-level BPE does not: cannot convert it")
    level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if level is None or level.get("add_prefix_space"):
        raise ExportError(f"the tokenizer's pre-tokenizer ({' + '.join(kinds) or 'none'}) is not byte-level "
                          f"without a prefix space: llama.cpp's gpt2 tokenizer would split text differently")
    if kinds == ["ByteLevel"] and level.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and level.get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not level.get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        for name, regex in SPLIT_PATTERNS.items():
            if pattern == regex and steps[0].get("behavior") == "Isolated":
                return name
    raise ExportError(f"the tokenizer's pre-tokenizer ({json.dumps(spec.get('pre_tokenizer'))[:200]}) has no "
                      f"name in llama.cpp that this conversion knows (gpt-2, smollm, {', '.join(SPLIT_PATTERNS)})")


def _spm_prefix(spec: dict) -> bool:
    """Whether a SentencePiece-style tokenizer puts a word boundary before the text."""
    for step in _steps(spec.get("pre_tokenizer")):
        if step["type"] == "Metaspace" and step.get("replacement") == SPIECE:
            return step.get("prepend_scheme", "always") in ("first", "always")
    norm = _steps(spec.get("normalizer"))
    if any(s["type"] == "Replace" and s.get("content") == SPIECE for s in norm):
        return any(s["type"] == "Prepend" and s.get("prepend") == SPIECE for s in norm)
    raise ExportError("the tokenizer has byte fallback but no SentencePiece word boundary (Metaspace): "
                      "cannot convert it")


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece scores from BPE merge ranks: llama.cpp's tokenizer merges the adjacent pair
    whose joined token scores highest, so the token the r-th merge makes scores -r; tokens no
    merge makes score below all of them."""
    ids = {t: i for i, t in enumerate(tokens)}
    scores = [-float(len(merges) + 1)] * len(tokens)
    for rank, merge in reversed(list(enumerate(merges))):
        joined = ids.get(merge.replace(" ", "", 1))
        if joined is not None:
            scores[joined] = -float(rank)
    return scores


def add_vocabulary(writer, vocab: Vocabulary) -> None:
    """Write ``tokenizer.ggml.*`` and ``tokenizer.chat_template`` of ``vocab``."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre or "default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    for name, i in vocab.special.items():
        getattr(writer, f"add_{name}_token_id")(int(i))
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
