"""``ktm export --format gguf``: a trained ktm model as a folder that llama.cpp runs.

The folder holds::

    model.gguf               the base LLM with the LoRA merged into its weights, in llama.cpp's
                             layout (q/k rows permuted, see :func:`permute_rows`), as f32, f16,
                             q8_0 or the base file's own types (norms stay f32); metadata and
                             vocabulary copied from the base's own GGUF file, or, for a Hugging
                             Face base, written from its config and tokenizer
                             (:mod:`ktm.serve.gguf_meta`)
    tokenizer files          the checkpoint's tokenizer (prompts are tokenised by ktm, not llama.cpp)
    ktm_encoder.safetensors  the merge encoder
    ktm_serving.json         as for ``ktm export`` (K, method, encoder, hashes), plus
                             ``"engine": "llama.cpp"``, the GGUF file's type and SHA-256, and the
                             end-of-sequence ids; ``embedding.key`` is ``token_embd.weight``
    README.md                the model card (:func:`ktm.card.model_card`)

The client merges a prompt from the GGUF's own embedding table (:func:`gguf_table`), so the
merged embeddings and the token embeddings llama.cpp reads while decoding come from one table;
in f32 that table is exactly the model's.

Supported bases: llama-architecture models that come as a GGUF file (the embedded default
SmolLM2, or ``--model X.gguf``): their metadata and vocabulary are copied, their weights
replaced; and llama models given as a Hugging Face folder or hub id, converted (f32, f16 or
q8_0; no rope scaling or biases; a byte-level BPE tokenizer with a pre-tokenizer llama.cpp names,
or a SentencePiece-style one). Other bases are refused with the reason
(:class:`~ktm.serve.export.ExportError`).

Example::

    export_gguf("zoo:default-k2", "exports/k2-gguf", gguf_type="f32")
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..card import CARD_NAME, model_card
from ..checkpoint import file_sha256, read_config, write_dir
from ..hub import resolve
from ..config import save_json
from .export import ENCODER_FILE, SERVING_CONFIG, ExportError, check_destination, check_servable, serving_config
from .gguf_meta import add_llama_hparams, add_vocabulary, check_convertible, vocabulary

MODEL_FILE = "model.gguf"
ENGINE = "llama.cpp"
TABLE_KEY = "token_embd.weight"
#: --gguf-type -> (ggml tensor type name, llama.cpp's general.file_type); "source": each tensor
#: in the type the base's GGUF gives it (the embedded SmolLM2: Q4_1, embeddings Q8_0), re-quantised
GGUF_TYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "q8_0": ("Q8_0", 7), "source": (None, None)}
#: the architectures whose tensors this module knows how to lay out for llama.cpp
ARCHITECTURES = ("llama",)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's q/k projection rows -> llama.cpp's (its ``llama`` rope rotates adjacent
    pairs, transformers' rotates the two halves of each head): within each head the rows
    ``[0 .. h/2) , [h/2 .. h)`` are interleaved. ``w``: (n_head * h, ...)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ExportError(f"cannot permute {rows} rows into {n_head} heads of rotary pairs")
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`permute_rows` (what transformers does reading a llama GGUF)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def source_gguf(reference) -> Path | None:
    """The GGUF file of a base model reference (the embedded default, or a ``.gguf`` path);
    None for a base that comes as a Hugging Face folder or hub id (which the export converts)."""
    from ..loading import default_model_path, locate_base

    kind, where = locate_base(reference)
    if kind == "default":
        return default_model_path() if where == "embedded" else source_gguf(where)
    return Path(where) if kind == "gguf" else None


def _gguf():
    try:
        import gguf
    except ImportError as e:  # a dependency of ktm, so only a broken install gets here
        raise ExportError("the gguf package is missing: pip install gguf") from e
    return gguf


def gguf_table(path: str | os.PathLike, key: str = TABLE_KEY) -> torch.Tensor:
    """The input-embedding table (V, d), float32, of a GGUF file, dequantised as llama.cpp reads it."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        if t.name == key:
            rows = gguf.quants.dequantize(t.data, t.tensor_type)
            return torch.from_numpy(np.array(rows, dtype=np.float32).reshape(
                [int(n) for n in reversed(t.shape.tolist())]))
    raise ExportError(f"{path} has no tensor {key!r}")


def _copy_metadata(writer, reader, file_type: int | None) -> None:
    """Every key/value of the source GGUF but its header, architecture and (unless
    ``file_type`` is None) file type."""
    gguf = _gguf()
    skip = {"general.architecture"} | ({"general.file_type"} if file_type is not None else set())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        kind = field.types[0]
        sub = field.types[1] if kind == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), kind, sub)
    if file_type is not None:
        writer.add_file_type(file_type)


def gguf_tensors(state: dict[str, torch.Tensor], config, n_layers: int) -> dict[str, np.ndarray]:
    """A llama model's Hugging Face state dict -> llama.cpp tensor names and float32 arrays,
    q/k rows permuted; a tied ``lm_head`` is left out (llama.cpp then reads ``token_embd``)."""
    gguf = _gguf()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    tied = "lm_head.weight" in state and state["lm_head.weight"].data_ptr() == \
        state["model.embed_tokens.weight"].data_ptr()
    heads = {"q_proj": config.num_attention_heads,
             "k_proj": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    out = {}
    for key, value in state.items():
        if key == "lm_head.weight" and tied:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"the model's tensor {key!r} has no llama.cpp name: its layout is not llama's")
        array = value.detach().to(torch.float32).cpu().numpy()
        proj = key.split(".")[-2]
        if proj in heads:
            array = permute_rows(array, heads[proj])
        out[name] = array
    return out


def encode_tensor(array: np.ndarray, gguf_type: str, source_kind=None):
    """(data, raw dtype) for the writer: 1-D tensors (norms) stay float32, rows that do not
    fill whole quantisation blocks float16; ``source_kind``: the tensor's type in the base
    GGUF, used for ``gguf_type="source"``."""
    gguf = _gguf()
    name = GGUF_TYPES[gguf_type][0]
    kind = source_kind if name is None else gguf.GGMLQuantizationType[name]
    if kind is None:
        kind = gguf.GGMLQuantizationType.F16
    if array.ndim < 2 or kind == gguf.GGMLQuantizationType.F32:
        return array.astype(np.float32), None
    if kind == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16), None
    if kind == gguf.GGMLQuantizationType.BF16 or array.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
        return array.astype(np.float16), None
    try:
        return gguf.quants.quantize(array, kind), kind
    except NotImplementedError:  # a type gguf cannot write (k-quants): the nearest it can
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def write_gguf(path: Path, source: Path, tensors: dict[str, np.ndarray], gguf_type: str) -> list[str]:
    """Write ``path``: the metadata of ``source`` with ``tensors``; tensors of the source this
    model does not produce (e.g. ``rope_freqs``) are copied as they are. Returns their names.
    Raises :class:`ExportError` for a tensor the source does not have (other than ``output``)."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    if arch not in ARCHITECTURES:
        raise ExportError(f"{source} is a {arch!r} model; --format gguf lays out {', '.join(ARCHITECTURES)} models")
    have = {t.name: t for t in reader.tensors}
    extra = sorted(set(tensors) - set(have) - {"output.weight"})
    if extra:
        raise ExportError(f"the model has tensors its base GGUF {source} lacks ({', '.join(extra[:5])}): "
                          f"the checkpoint was not trained on this base")
    writer = gguf.GGUFWriter(str(path), arch)
    _copy_metadata(writer, reader, GGUF_TYPES[gguf_type][1])
    copied = []
    for t in reader.tensors:  # the source's order, then an untied output
        if t.name in tensors:
            data, raw = encode_tensor(tensors[t.name], gguf_type, t.tensor_type)
            writer.add_tensor(t.name, data, raw_dtype=raw)
        else:
            writer.add_tensor(t.name, t.data, raw_shape=list(reversed(t.shape.tolist())), raw_dtype=t.tensor_type)
            copied.append(t.name)
    if "output.weight" in tensors and "output.weight" not in have:
        data, raw = encode_tensor(tensors["output.weight"], gguf_type)
        writer.add_tensor("output.weight", data, raw_dtype=raw)
    _finish(writer)
    return copied


def write_converted(path: Path, config, tokenizer, tensors: dict[str, np.ndarray], gguf_type: str,
                    name: str | None = None) -> None:
    """Write ``path``: a llama GGUF of ``tensors`` (from :func:`gguf_tensors`) with the
    hyper-parameters of the transformers ``config`` and the vocabulary of ``tokenizer``
    (:mod:`ktm.serve.gguf_meta`), weights as ``gguf_type`` (f32, f16 or q8_0; norms f32)."""
    gguf = _gguf()
    if GGUF_TYPES[gguf_type][0] is None:
        raise ExportError(f"--gguf-type {gguf_type} keeps the types of the base's GGUF file, and a Hugging Face "
                          f"base has none: choose f32, f16 or q8_0")
    vocab = vocabulary(tokenizer, config.vocab_size)  # refusals before anything is written
    check_convertible(config)
    writer = gguf.GGUFWriter(str(path), "llama")
    if name:
        writer.add_name(name)
    add_llama_hparams(writer, config)
    add_vocabulary(writer, vocab)
    writer.add_file_type(GGUF_TYPES[gguf_type][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, array in tensors.items():
        data, raw = encode_tensor(array, gguf_type)
        writer.add_tensor(key, data, raw_dtype=raw)
    _finish(writer)


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(checkpoint: str | os.PathLike, out: str | os.PathLike, *, gguf_type: str = "f32",
                overwrite: bool = False, base=None, trust_remote_code: bool | None = None) -> Path:
    """Write ``out`` (see the module docstring) from a ktm checkpoint (a folder or ``zoo:NAME``).

    The LoRA is merged in float32, then the weights are written as ``gguf_type`` (``"f32"``,
    ``"f16"``, ``"q8_0"``, or ``"source"``: the base GGUF's own type per tensor). A base that is
    a GGUF file lends the export its metadata and vocabulary; a Hugging Face base is converted
    (:func:`write_converted`). Atomic: the folder is written beside ``out`` and renamed into
    place; an existing ``out`` is replaced only with ``overwrite``. Raises :class:`ExportError`
    for a model llama.cpp cannot reproduce (a setting the client-side merger lacks, a base that
    is not a llama model, a tokenizer llama.cpp's would not reproduce).
    """
    from ..model import KTokenMerging

    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}")
    checkpoint, out = resolve(checkpoint), Path(out)  # a folder, zoo:NAME or hub id
    check_destination(checkpoint, out, overwrite, base)
    model = KTokenMerging.from_pretrained(checkpoint, base=base, device="cpu", dtype="float32",
                                          trust_remote_code=trust_remote_code).eval()
    check_servable(model.config)
    reference = base if base is not None else model.base_reference
    source = source_gguf(reference)
    lm = model.lm.merge_and_unload()  # W <- W + scale * B @ A, in float32
    if getattr(lm.config, "model_type", None) not in ARCHITECTURES:
        raise ExportError(f"the base is a {lm.config.model_type!r} model; --format gguf supports "
                          f"{', '.join(ARCHITECTURES)}")
    tensors = gguf_tensors(lm.state_dict(), lm.config, lm.config.num_hidden_layers)

    def write_model(path: Path) -> dict:
        # recorded by name and hash, never by a path of this machine
        if source is not None:
            return {"source": source.name, "source_sha256": file_sha256(source),
                    "copied_tensors": write_gguf(path, source, tensors, gguf_type)}
        write_converted(path, lm.config, model.tokenizer, tensors, gguf_type, name=f"ktm K={model.k}")
        named = Path(str(reference)).name if Path(str(reference)).exists() else reference
        return {"source": f"converted from the Hugging Face model {named}", "copied_tensors": []}

    card = read_config(checkpoint)
    if base is not None:  # the card names the base the weights come from
        card["base"] = {**card.get("base", {}), "reference": str(base)}
    return write_dir(out, lambda tmp: _write_folder(tmp, model, lm, card, gguf_type, write_model))


def _write_folder(tmp: Path, model, lm, card: dict, gguf_type: str, write_model) -> None:
    """Fill the export folder ``tmp``: ``model.gguf`` (``write_model(path)`` -> what it came
    from), the tokenizer, the encoder, ``ktm_serving.json`` and the model card (of the
    checkpoint's ``ktm_config.json``, ``card``)."""
    from safetensors.torch import save_file

    from ..loading import table_fingerprint

    made = write_model(tmp / MODEL_FILE)
    model.tokenizer.save_pretrained(str(tmp))
    encoder_state = {k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()}
    save_file(encoder_state, str(tmp / ENCODER_FILE), metadata={"format": "pt"})
    table = gguf_table(tmp / MODEL_FILE)  # what the client will merge from, read back
    save_json(tmp / SERVING_CONFIG, {
        **serving_config(model, lm, "model.embed_tokens.weight", torch.float32),
        "engine": ENGINE, "dtype": gguf_type, "eos_ids": list(model.eos_ids),
        "embedding": {"key": TABLE_KEY, "fingerprint": table_fingerprint(table)},
        "gguf": {"file": MODEL_FILE, "type": gguf_type, **made, "lora": "merged into the weights",
                 "ktm_version": __version__},
        "files": {ENCODER_FILE: file_sha256(tmp / ENCODER_FILE), MODEL_FILE: file_sha256(tmp / MODEL_FILE)},
    })
    (tmp / CARD_NAME).write_text(model_card(card, export=True, gguf_type=gguf_type))
