"""``ktm export``: a trained ktm model as a plain Hugging Face model folder, for serving.

An export folder holds::

    config.json, model.safetensors (or shards + model.safetensors.index.json), generation_config.json
                             the base causal LM with the LoRA merged into its weights: any
                             AutoModelForCausalLM user (vLLM, transformers, ...) loads it as is
    tokenizer files          the checkpoint's tokenizer (tokenizer.json, tokenizer_config.json, ...)
    ktm_encoder.safetensors  the merge encoder
    ktm_serving.json         how a prompt becomes what the LLM reads: K, method, encoder shape,
                             hidden size, longest sequence, the embedding table's tensor name and
                             fingerprint, SHA-256 of the encoder file
    README.md                the model card (:func:`ktm.card.model_card`), for the hub

The LLM reads a prompt of n tokens (tokenized without special tokens, no chat template) as
the ``ceil(n / K)`` merged embeddings of :meth:`ktm.model.KTokenMerging.merge_prompts`, and
answers in its vocabulary. :mod:`ktm.serve.serving` computes those embeddings on the client from
this folder (tokenizer, embedding table and encoder only) and sends them to a server started
with ``--enable-prompt-embeds``. Merging the LoRA into the weights means the server needs no
LoRA support (vLLM has crashed on Llama models with LoRA and prompt embeddings together).

Example::

    export_model("runs/k4/model", "exports/k4")     # then: ktm serve --export exports/k4
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import __version__
from ..card import CARD_NAME, model_card
from ..checkpoint import CheckpointError, file_sha256, load_tensors, read_config, write_dir
from ..hub import resolve
from ..config import ModelConfig, from_dict, save_json, to_dict
from ..loading import EXPORT_MARKER

SERVING_CONFIG = EXPORT_MARKER  # "ktm_serving.json"
ENCODER_FILE = "ktm_encoder.safetensors"
FORMAT = "ktm-export"
FORMAT_VERSION = 1

#: ModelConfig fields that ktm.serve.serving reproduces on the client (how a prompt is merged)
CLIENT_FIELDS = ("k", "method", "encoder_hidden", "encoder_init", "encoder_norm", "encoder_layernorm",
                 "encoder_stages")
#: fields that only shape the LoRA, which the export merges into the weights
MERGED_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_lm_head")


class ExportError(ValueError):
    """An export folder that cannot be written or used as asked."""


def check_servable(config: ModelConfig) -> None:
    """Raise :class:`ExportError` when ``config`` sets a model option (other than the ones in
    :data:`CLIENT_FIELDS` and :data:`MERGED_FIELDS`) to a value other than its default: the
    client encoder of :mod:`ktm.serve.serving` would not reproduce what the model reads."""
    default = ModelConfig(k=config.k)
    odd = [f.name for f in dataclasses.fields(ModelConfig)
           if f.name not in CLIENT_FIELDS + MERGED_FIELDS
           and getattr(config, f.name) != getattr(default, f.name)]
    if odd:
        raise ExportError(
            f"this model uses {', '.join(f'{n} = {getattr(config, n)!r}' for n in odd)}, which the "
            f"client-side encoder of ktm.serve.serving does not reproduce: it cannot be exported for serving")


def check_destination(checkpoint: Path, out: Path, overwrite: bool, base=None) -> None:
    """Refuse an ``out`` that is the checkpoint, its base model (``base``, default the one it
    saved), an existing folder without ``overwrite``, or a file."""
    src, dst = checkpoint.resolve(), out.resolve()
    if dst == src or dst in src.parents:
        raise ExportError(f"--out {out} would replace the checkpoint {checkpoint} it is exported from: "
                          f"choose another folder")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists: pass --overwrite to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    _refuse_replacing_the_base(checkpoint, out, base)


def _refuse_replacing_the_base(checkpoint: Path, out: Path, base) -> None:
    """An ``out`` that is (or holds) the local base model the checkpoint refers to would
    replace it under every checkpoint trained on it."""
    ref = base if base is not None else read_config(checkpoint)["base"]["reference"]
    if not isinstance(ref, (str, os.PathLike)) or not Path(ref).is_absolute() and not Path(ref).exists():
        return
    dst, used = out.resolve(), Path(ref).expanduser().resolve()
    if dst == used or dst in used.parents:
        raise ExportError(f"--out {out} is the base model {ref} that {checkpoint} was trained on: exporting "
                          f"there would replace it under every checkpoint that refers to it; choose another --out")


def _embedding_key(lm) -> str:
    """The state-dict name of the LM's input-embedding table (the first name of a tied one)."""
    table = lm.get_input_embeddings().weight
    names = [n for n, p in lm.named_parameters(remove_duplicate=False) if p is table]
    if not names:
        raise ExportError("cannot find the input-embedding table among the model's parameters")
    return names[0]


def drop_dequantized_gguf(lm) -> None:
    """A model loaded from a GGUF file (the embedded default) keeps transformers' GGUF quantizer,
    which refuses to be saved, even when every weight was dequantized on loading: drop it then.
    Weights still packed, or another quantization method, are refused: merging the LoRA into
    them would not give plain weights."""
    quantizer = getattr(lm, "hf_quantizer", None)
    if quantizer is None:
        return
    method = getattr(quantizer.quantization_config, "quant_method", None)
    method = getattr(method, "value", method)
    packed = [n for n, t in [*lm.named_parameters(), *lm.named_buffers()] if not t.is_floating_point()]
    if method != "gguf" or packed or getattr(quantizer, "packed_modules", None):
        raise ExportError(f"the base model is quantized ({method}{', packed weights' if packed else ''}): "
                          f"export a model trained on an unquantized base (--model), or dequantize it first")
    quantizer.remove_quantization_config(lm)


def _saved_keys(folder: Path) -> set[str]:
    """The tensor names of a saved model folder (one file or shards with an index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def serving_config(model, lm, key: str, dtype: torch.dtype) -> dict:
    """The content of ``ktm_serving.json`` for ``model`` (a KTokenMerging) whose merged LM is ``lm``."""
    from ..loading import embedding_fingerprint

    llm = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "ktm_version": __version__,
        "k": model.k, "method": model.config.method,
        "merge": "each block of K prompt tokens (no special tokens, no chat template) becomes one "
                 "embedding; empty slots of a partial last block hold the mean of its real tokens",
        "model": to_dict(model.config),
        "encoder": {**model.describe()["encoder"], "file": ENCODER_FILE},
        "hidden_size": int(lm.get_input_embeddings().weight.shape[1]),
        "max_positions": getattr(llm, "max_position_embeddings", None),
        "dtype": str(dtype).removeprefix("torch."),
        "embedding": {"key": key, "fingerprint": embedding_fingerprint(lm)},
        "base": model.describe()["base"],
    }


def export_model(checkpoint: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                 dtype: str = "float32", base=None, trust_remote_code: bool | None = None) -> Path:
    """Write ``out``: the checkpoint's LLM with the LoRA merged in, its tokenizer, the encoder
    and ``ktm_serving.json`` (see the module docstring).

    The LoRA is merged in float32 and the weights are then saved in ``dtype``
    (``"float32"``, ``"bfloat16"`` or ``"float16"``). The folder is written beside ``out`` and
    renamed into place; an existing ``out`` is replaced only with ``overwrite``. ``base``:
    the base model, when not the one saved in the checkpoint. Raises :class:`ExportError`
    (or :class:`~ktm.checkpoint.CheckpointError` for a bad checkpoint).
    """
    from ..loading import resolve_dtype
    from ..model import KTokenMerging

    checkpoint, out = resolve(checkpoint), Path(out)
    check_destination(checkpoint, out, overwrite, base)
    save_dtype = resolve_dtype(dtype, "cpu")
    model = KTokenMerging.from_pretrained(checkpoint, base=base, device="cpu", dtype="float32",
                                          trust_remote_code=trust_remote_code).eval()
    check_servable(model.config)
    encoder_state = {k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()}
    lm = model.lm.merge_and_unload()  # plain causal LM; W <- W + scale * B @ A
    drop_dequantized_gguf(lm)
    lm.to(save_dtype)
    key = _embedding_key(lm)
    meta = serving_config(model, lm, key, save_dtype)

    def write(tmp: Path) -> None:
        lm.save_pretrained(str(tmp))
        model.tokenizer.save_pretrained(str(tmp))
        if key not in _saved_keys(tmp):
            raise ExportError(f"the saved model has no tensor {key!r} (its input embeddings)")
        save_file(encoder_state, str(tmp / ENCODER_FILE), metadata={"format": "pt"})
        save_json(tmp / SERVING_CONFIG, {**meta, "files": {ENCODER_FILE: file_sha256(tmp / ENCODER_FILE)}})
        (tmp / CARD_NAME).write_text(model_card(read_config(checkpoint), export=True))

    return write_dir(out, write)


def read_export(path: str | os.PathLike) -> dict:
    """``ktm_serving.json`` of an export folder, checked; raises :class:`ExportError`."""
    path = Path(path)
    cfg = path / SERVING_CONFIG
    if not path.is_dir():
        raise ExportError(f"no export folder at {path}")
    if not cfg.is_file():
        hint = " (a ktm checkpoint: export it first with ktm export)" if (path / "ktm_config.json").is_file() else ""
        raise ExportError(f"{path} is not a ktm export folder: {SERVING_CONFIG} is missing{hint}")
    try:
        meta = json.loads(cfg.read_text())
        ok = meta["format"] == FORMAT and isinstance(meta["hidden_size"], int) and meta["embedding"]["key"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ExportError(f"{cfg} is corrupt or not a ktm export config ({e})") from e
    if not ok:
        raise ExportError(f"{cfg} is not a ktm export config")
    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ExportError(f"{path}/{SERVING_CONFIG} is corrupt: format_version must be an integer, got "
                          f"{json.dumps(version)}")
    if version > FORMAT_VERSION:
        raise ExportError(f"{path} was written by a newer ktm (export format {meta['format_version']}; "
                          f"this ktm reads up to {FORMAT_VERSION}): upgrade ktm")
    return meta


def export_model_config(meta: dict, path) -> ModelConfig:
    """The :class:`~ktm.config.ModelConfig` saved in an export's ``ktm_serving.json``, checked
    to be one the client reproduces."""
    try:
        config = from_dict(ModelConfig, meta["model"])
    except (TypeError, ValueError, KeyError) as e:
        raise ExportError(f"{Path(path) / SERVING_CONFIG} holds invalid model settings: {e}") from e
    check_servable(config)
    return config


def load_export_encoder(meta: dict, path) -> dict[str, torch.Tensor]:
    """The encoder's tensors, checked against the SHA-256 recorded at export."""
    try:
        return load_tensors(Path(path) / ENCODER_FILE, meta.get("files", {}).get(ENCODER_FILE))
    except CheckpointError as e:
        raise ExportError(str(e)) from e
