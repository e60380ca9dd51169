"""Saving and loading a :class:`~ktm.model.KTokenMerging` folder: the bodies of its
``save_pretrained``, ``from_pretrained``, ``load_trained`` and ``grow_from``, and the teacher.

A folder holds the LoRA adapter (peft, safetensors), the encoder, the tokenizer and
``ktm_config.json`` (:func:`describe`, with every weight file's SHA-256); it is written beside
its destination and renamed into place (:func:`ktm.checkpoint.write_dir`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from .. import __version__
from ..checkpoint import (
    ADAPTER_DIR,
    ADAPTER_FIELDS,
    ADAPTER_FILE,
    CONFIG_NAME,
    ENCODER_NAME,
    FUNCTION_FIELDS,
    TOKENIZER_DIR,
    CheckpointError,
    check_compatible,
    load_weights,
    read_config,
    weight_hashes,
    write_dir,
)
from ..card import CARD_NAME, model_card, portable_base
from ..config import ModelConfig, from_dict, save_json, to_dict
from ..hub import push_folder, resolve
from ..loading import describe_base, embedding_fingerprint, load_base, load_tokenizer
from .encoder import encoder_stages


def save_pretrained(model, path: str | os.PathLike, card: dict | None = None) -> Path:
    """Write adapter (peft, safetensors), encoder, tokenizer, ``ktm_config.json`` and the model
    card ``README.md`` (:func:`ktm.card.model_card`; ``card``: the numbers it shows, e.g.
    ``{"evaluation": {...}, "fidelity": {...}}``).

    The folder is written beside its destination and renamed into place, so an
    interrupted save never leaves a half-written checkpoint. No file in it holds a path of
    this machine, except ``ktm_config.json``'s base reference when the base is a local folder
    or file (the only way to find that base again).
    """
    return write_dir(path, lambda tmp: write_into(model, tmp, card))


def write_into(model, folder: Path, card: dict | None = None) -> None:
    """Write the files of a saved model into the existing ``folder`` (the temporary folder of
    a :func:`~ktm.checkpoint.write_dir`, e.g. the trainer's checkpoint, which adds its own
    files: one temporary folder, not one inside another), its model card included."""
    model.lm.save_pretrained(folder / ADAPTER_DIR, safe_serialization=True, save_embedding_layers=False)
    portable_adapter(folder / ADAPTER_DIR, model.base_reference)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()},
              str(folder / ENCODER_NAME))
    model.tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
    meta = {**model.describe(), "files": weight_hashes(folder)}
    save_json(folder / CONFIG_NAME, meta)
    (folder / CARD_NAME).write_text(model_card(meta, card))


def portable_adapter(folder: Path, reference: str) -> None:
    """Name the base in peft's ``adapter_config.json`` as another machine would: peft records
    the path the base was read from (for the embedded default, a folder of this machine's
    site-packages); ktm writes its hub id instead (:func:`ktm.card.portable_base`), or the
    folder's name for a local base. ktm never reads the field (the base is ktm_config's).
    peft's template card ``README.md``, which repeats that path, gives way to the folder's own."""
    (folder / CARD_NAME).unlink(missing_ok=True)
    file = folder / "adapter_config.json"
    cfg = json.loads(file.read_text())
    cfg["base_model_name_or_path"] = portable_base(reference) or Path(str(reference)).name or None
    file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def push_to_hub(model, repo_id: str, *, card: dict | None = None, base_reference: str | None = None,
                private: bool | None = None, token: str | None = None, commit_message: str | None = None) -> str:
    """Save the model and upload exactly that folder to the hub repository ``repo_id``
    (created if missing; :func:`ktm.hub.push_folder`); returns the commit's URL.
    ``base_reference``: the base's hub id, needed when the base was loaded from a local path."""
    with tempfile.TemporaryDirectory(prefix="ktm-push-") as tmp:
        folder = save_pretrained(model, Path(tmp) / repo_id.split("/")[-1], card=card)
        return push_folder(folder, repo_id, base_reference=base_reference, private=private, token=token,
                           commit_message=commit_message)


def describe(model) -> dict:
    """The content of ``ktm_config.json``."""
    return {
        "ktm_version": __version__,
        "model": to_dict(model.config),
        "encoder": {"k": model.encoder.k, "dim": model.encoder.dim,
                    "hidden": model.encoder.hidden, "init": model.encoder.init,
                    "stages": list(encoder_stages(model.encoder))},
        "base": {"reference": model.base_reference, "embedding_fingerprint": model.base_fingerprint,
                 "weights_fingerprint": model.base_weights_fingerprint,
                 "model_type": getattr(model.lm.get_base_model().config, "model_type", None)},
    }


def from_pretrained(cls, path: str | os.PathLike, base=None, tokenizer=None, *, dtype=None,
                    device=None, k: int | None = None, trust_remote_code: bool | None = None,
                    revision: str | None = None):
    """Load a folder written by :meth:`save_pretrained`: a path, ``zoo:NAME`` or a hub id
    ``org/name`` (:func:`ktm.hub.resolve`: downloaded at ``revision``, or read from the hub
    cache, then checked like a local folder).

    Args:
        base: base model reference or object; default: the reference saved in the folder.
        tokenizer: default: the tokenizer saved in the folder.
        k: if given, the checkpoint must have been trained for this K.
        trust_remote_code: let transformers run Python code shipped with the checkpoint's
            tokenizer or the base model (default False; see :meth:`from_base`).
    When the base reference saved in the folder is used, one line on stderr says which
    base model is loaded and from where (local folder, GGUF file, embedded default or
    hub id). Raises :class:`CheckpointError` for a missing or corrupt folder, another K, or a
    base model whose embedding table differs from the one the checkpoint was trained on.
    """
    path = resolve(path, revision)
    meta = read_config(path)
    try:
        config = from_dict(ModelConfig, meta["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_NAME} holds invalid model settings: {e}") from e
    check_compatible(meta, path, k=k)
    if tokenizer is None and (path / TOKENIZER_DIR).is_dir():
        tokenizer = load_tokenizer(path / TOKENIZER_DIR, trust_remote_code=trust_remote_code)
    ref = base if base is not None else meta["base"]["reference"]
    if base is None:
        print(f"ktm: loading the base model of checkpoint {path}: {describe_base(ref)}", file=sys.stderr)
    base_model, tokenizer, ref_str = load_base(ref, tokenizer, dtype=dtype, device=device,
                                               trust_remote_code=trust_remote_code)
    got_fp = embedding_fingerprint(base_model)
    if got_fp != meta["base"]["embedding_fingerprint"]:
        raise CheckpointError(
            f"{path} was trained on base model {meta['base']['reference']!r} (embedding "
            f"fingerprint {meta['base']['embedding_fingerprint']}), but the base model given "
            f"({ref_str!r}) has fingerprint {got_fp}: a different model or different weights")
    model = cls.assemble(base_model, tokenizer, config, meta["base"]["reference"], got_fp)
    check_compatible(meta, path, weights=model.base_weights_fingerprint, given=ref_str)
    model.load_trained(path)
    return model


def load_trained(model, path: str | os.PathLike, adapter_only: bool = False) -> None:
    """Load the encoder and LoRA weights of a saved folder into this model.

    The folder must be for the same K, encoder shape and base model (checked against
    the embedding fingerprint); raises :class:`CheckpointError` otherwise. With
    ``adapter_only`` only the LoRA weights are loaded, from a model of any K (e.g. a
    K = 1 model trained on the task, to start a K = 4 model from), and the encoder is
    left as it is.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    path = resolve(path)
    meta = read_config(path)
    check_compatible(meta, path, fingerprint=model.base_fingerprint, config=model.config,
                     fields=ADAPTER_FIELDS if adapter_only else FUNCTION_FIELDS,
                     weights=model.base_weights_fingerprint)
    if not adapter_only:
        enc_state = load_weights(meta, path, ENCODER_NAME)
        want = {k: tuple(v.shape) for k, v in model.encoder.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in enc_state.items()}
        if want != got:
            raise CheckpointError(
                f"{path / ENCODER_NAME} does not fit an encoder for K = {model.k}, "
                f"d = {model.encoder.dim}: expected {want}, found {got}"
            )
        model.encoder.load_state_dict(enc_state)
    adapter = load_weights(meta, path, f"{ADAPTER_DIR}/{ADAPTER_FILE}")
    # as saved (save_pretrained): without the base embedding / untied lm_head weights
    expected = set(get_peft_model_state_dict(model.lm, save_embedding_layers=False))
    missing, unexpected = sorted(expected - set(adapter)), sorted(set(adapter) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path / ADAPTER_DIR / ADAPTER_FILE} does not hold this model's LoRA weights: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    set_peft_model_state_dict(model.lm, adapter)


def grow_from(model, path: str | os.PathLike) -> None:
    """Start from a trained model of a smaller block size (hierarchical merging).

    The saved model's LoRA weights are loaded, and its encoder becomes this model's
    first encoder stage(s); the remaining stages keep their initialisation (with
    ``encoder_init="mean"`` they average the saved encoder's outputs). For example a
    K = 2 model grows into K = 4 with ``encoder_stages=(2, 2)``. Raises
    :class:`CheckpointError` when the saved stages are not a proper prefix of this
    model's, or the encoders differ in norm matching or residual.
    """
    path = resolve(path)
    meta = read_config(path)
    saved = from_dict(ModelConfig, meta["model"])
    src = tuple(saved.encoder_stages or (saved.k,))
    mine = encoder_stages(model.encoder)
    if len(src) >= len(mine) or mine[:len(src)] != src:
        raise CheckpointError(
            f"{path} has encoder stages {list(src)} (K = {saved.k}); to grow from it, this "
            f"model's encoder_stages must start with them and add at least one (it has {list(mine)})"
        )
    def how(c):  # what each stage computes besides its weights
        return c.encoder_norm, c.encoder_layernorm, c.encoder_init == "random"

    if how(saved) != how(model.config):
        raise CheckpointError(
            f"{path} has encoder_norm={saved.encoder_norm}, encoder_layernorm={saved.encoder_layernorm}, "
            f"encoder_init={saved.encoder_init!r}; this model has encoder_norm={model.config.encoder_norm}, "
            f"encoder_layernorm={model.config.encoder_layernorm}, "
            f"encoder_init={model.config.encoder_init!r}: the stages would compute differently"
        )
    model.load_trained(path, adapter_only=True)
    state = load_weights(meta, path, ENCODER_NAME)
    if len(src) == 1:
        state = {f"stages.0.{k}": v for k, v in state.items()}
    want = model.encoder.state_dict()
    bad = [k for k, v in state.items() if k not in want or tuple(want[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"{path / ENCODER_NAME} does not fit this model's first stages: {bad[:3]}")
    model.encoder.load_state_dict({**want, **state})



def load_teacher(path, student, base=None, trust_remote_code: bool | None = None):
    """Load a saved K = 1 ktm model as the teacher of ``student`` (frozen, eval mode).

    The teacher must read plain prompts (K = 1) and sit on the same base model (same
    embedding fingerprint), or positions and vocabularies would not line up. ``base``,
    ``trust_remote_code``: as in :meth:`KTokenMerging.from_pretrained` (default base: the
    reference saved with the teacher).
    """
    path = resolve(path)
    meta = read_config(path)
    if meta["model"].get("k") != 1:
        raise CheckpointError(f"{path}: a teacher must read plain prompts (K = 1), this model has "
                              f"K = {meta['model'].get('k')}")
    check_compatible(meta, path, fingerprint=student.base_fingerprint, weights=student.base_weights_fingerprint)
    teacher = type(student).from_pretrained(path, base=base, device=student.device,
                                             trust_remote_code=trust_remote_code).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher

