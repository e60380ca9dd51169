"""ktm's saved folders: file names, errors, atomic writes and the one compatibility check.

A saved model folder (``KTokenMerging.save_pretrained``) holds::

    ktm_config.json          ktm version, ModelConfig, encoder shape, base reference + fingerprint
    encoder.safetensors      the merge encoder
    adapter/                 the LoRA adapter (peft's format, safetensors)
    tokenizer/               the tokenizer

Mergers that ship inside the package (:mod:`ktm.train.zoo`, folder ``ktm/mergers/``) are such
folders too, addressed as ``zoo:NAME`` wherever a saved folder is expected
(:func:`resolve_folder`).

A training checkpoint (``OUT/checkpoint``) is such a folder plus the optimiser state. Every
folder is written beside its destination and renamed into place (:func:`write_dir`), so a
reader sees the old folder or the new one, never half of one. Whether a saved folder fits a
model is decided in one place, :func:`check_compatible`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load

CONFIG_NAME = "ktm_config.json"
ENCODER_NAME = "encoder.safetensors"
ADAPTER_DIR = "adapter"
ADAPTER_FILE = "adapter_model.safetensors"
TOKENIZER_DIR = "tokenizer"

#: ModelConfig fields that change what trained weights compute: a folder saved with other
#: values must not be loaded into a model built with these
FUNCTION_FIELDS = ("k", "method", "lora_r", "lora_alpha", "lora_targets", "lora_lm_head", "encoder_hidden",
                   "encoder_init", "encoder_norm", "encoder_layernorm", "encoder_stages", "context_layers",
                   "context_norm", "keep")
#: the fields that shape the LoRA adapter alone (loading an adapter into a model of any K)
ADAPTER_FIELDS = ("lora_r", "lora_alpha", "lora_targets", "lora_lm_head")


#: the folder of the pretrained mergers shipped with ktm (``zoo:NAME``; :mod:`ktm.train.zoo`)
MERGERS_DIR = Path(__file__).resolve().parent / "mergers"
ZOO_PREFIX = "zoo:"


class CheckpointError(ValueError):
    """A saved ktm folder that cannot be used as asked (missing, corrupt or mismatched)."""


def shipped_mergers() -> list[str]:
    """Names of the mergers shipped with ktm (``zoo:NAME``), sorted."""
    if not MERGERS_DIR.is_dir():
        return []
    for old in MERGERS_DIR.glob(".*.old"):  # a `ktm zoo build` killed between its two renames
        try:
            recover_dir(MERGERS_DIR / old.name[1:-len(".old")])
        except OSError:
            pass  # a read-only install: the merger stays unlisted until rebuilt
    return sorted(p.name for p in MERGERS_DIR.iterdir()
                  if not p.name.startswith(".") and (p / CONFIG_NAME).is_file())


def resolve_folder(path: str | os.PathLike) -> Path:
    """The folder a saved-model reference names: ``zoo:NAME`` is the merger NAME shipped with
    ktm (``MERGERS_DIR / NAME``), anything else a path. :class:`CheckpointError` for a
    ``zoo:`` name that does not ship, listing the ones that do."""
    text = os.fspath(path)
    if not text.startswith(ZOO_PREFIX):
        return Path(path)
    name = text[len(ZOO_PREFIX):]
    if name not in shipped_mergers():
        have = ", ".join(f"{ZOO_PREFIX}{n}" for n in shipped_mergers()) or "none"
        raise CheckpointError(f"no merger {name!r} ships with ktm (shipped: {have}; see `ktm zoo list`)")
    return MERGERS_DIR / name


def read_config(path: str | os.PathLike) -> dict:
    """Read and check ``ktm_config.json`` of a saved folder (a path or ``zoo:NAME``)."""
    path = resolve_folder(path)
    cfg = path / CONFIG_NAME
    if not path.is_dir():
        raise CheckpointError(f"no ktm checkpoint folder at {path}")
    if not cfg.is_file():
        raise CheckpointError(f"{path} is not a ktm checkpoint: {CONFIG_NAME} is missing")
    try:
        meta = json.loads(cfg.read_text())
        meta["model"], meta["base"]["embedding_fingerprint"], meta["base"]["reference"]
        if not isinstance(meta.get("files", {}), dict):
            raise TypeError(f"'files' must be a JSON object of file: SHA-256, got {json.dumps(meta['files'])}")
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise CheckpointError(f"{cfg} is corrupt or not a ktm config ({e})") from e
    return meta


def load_tensors(file: str | os.PathLike, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, read once: checked against ``sha256`` when given
    (the hash ``ktm_config.json`` recorded), then parsed. :class:`CheckpointError` when the
    file is missing, differs from its hash or is corrupt."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        data = file.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{file} cannot be read ({e})") from e
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(f"{file} is corrupt: its SHA-256 differs from the one recorded "
                              f"in {CONFIG_NAME} when it was saved")
    try:
        return load(data)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{file} is corrupt ({e})") from e


def load_weights(meta: dict, folder: str | os.PathLike, name: str) -> dict[str, torch.Tensor]:
    """``folder/name``'s tensors, checked against the SHA-256 that ``meta`` (the folder's
    ``ktm_config.json``) recorded for it; folders saved before hashes were recorded are not
    checked."""
    return load_tensors(Path(folder) / name, meta.get("files", {}).get(name))


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing an existing ``dst`` with minimal exposure."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def recover_dir(path: str | os.PathLike) -> bool:
    """Put back the previous version of a folder that :func:`replace_dir` was replacing when
    the process was killed (``path`` gone, ``.NAME.old`` left); returns whether it did."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():
        os.replace(old, path)
        return True
    return False


def clean_stale(folder: str | os.PathLike, name: str) -> list[Path]:
    """Remove the temporary folders that interrupted writes of ``folder/name`` left behind
    (``.NAME.xxxx``, and ``..NAME.xxxx.yyyy`` from versions that nested one temporary folder
    in another; not ``.NAME.old``, which :func:`recover_dir` may still need while ``NAME`` is
    missing). Call it only when no other process writes there."""
    folder, removed = Path(folder), []
    keep = {f".{name}.old"} if not (folder / name).exists() else set()
    for p in [*folder.glob(f".{name}.*"), *folder.glob(f"..{name}.*")]:
        if p.is_dir() and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _publish(folder: Path) -> None:
    """Give a finished temporary folder the permissions of a normally made one (mkdtemp's
    are private), and flush its files to disk, so that a rename publishes complete data."""
    umask = _umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            file = os.path.join(root, name)
            os.chmod(file, 0o666 & ~umask)
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write one file atomically, the way :func:`write_dir` writes a folder: ``write(tmp)`` fills
    a temporary file beside ``path`` (with its suffix, for writers that pick the format by it),
    which gets a normal file's permissions and then replaces ``path``, so a reader sees the old
    file or the new one, never half of one. On any error the temporary file is removed."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        raise_located(e, path)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`write_file`)."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_dir(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a folder atomically: ``write(tmp)`` fills a temporary folder beside ``path``,
    whose files are then given normal permissions and flushed to disk, and which then
    replaces ``path``; on any error the temporary folder is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        _publish(tmp)
        replace_dir(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_located(e, path)
    return path


def raise_located(error: BaseException, path: Path):
    """Re-raise ``error`` from writing ``path``: an operating-system error without a file name
    (a full disk fails a ``write``, not an ``open``), or one that safetensors wrapped in its own
    error (``... (os error 28)``), becomes an ``OSError`` of the same errno naming
    ``path`` (``PermissionError`` etc. by errno), so the message says what could not be written."""
    code = getattr(error, "errno", None) if isinstance(error, OSError) and error.filename is None else None
    if isinstance(error, SafetensorError):
        found = re.search(r"\bcode: (\d+)|\bos error (\d+)", str(error))
        code = int(found.group(1) or found.group(2)) if found else None
    if code:
        raise OSError(code, os.strerror(code), str(path)) from error
    raise error


#: the weight files whose SHA-256 ``ktm_config.json`` records (safetensors checks headers only)
WEIGHT_FILES = (ENCODER_NAME, f"{ADAPTER_DIR}/{ADAPTER_FILE}")


def file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weight_hashes(folder: Path) -> dict[str, str]:
    """``{relative path: SHA-256}`` of the weight files present in ``folder``."""
    return {name: file_sha256(folder / name) for name in WEIGHT_FILES if (folder / name).is_file()}


def _show(value) -> str:
    return repr(list(value) if isinstance(value, tuple) else value)


def check_compatible(meta: dict, path, *, fingerprint: str | None = None, config=None,
                     fields: Iterable[str] = FUNCTION_FIELDS, k: int | None = None,
                     weights: str | None = None, given: str | None = None) -> None:
    """Raise :class:`CheckpointError` unless the saved folder ``path`` (its ``meta``, from
    :func:`read_config`) fits: the same base model (``fingerprint`` of its embeddings,
    ``weights`` of all its tensors, :func:`ktm.loading.weights_fingerprint`; folders saved
    before ktm recorded the latter are checked on the embeddings alone), the same value of
    every one of ``fields`` as ``config`` (a :class:`~ktm.config.ModelConfig`), and K = ``k``.
    The message names the first field that differs and both values (``given``: how the base
    model was named, for the message)."""
    saved = meta["model"]
    if k is not None and saved.get("k") != k:
        raise CheckpointError(f"{path} was trained for K = {saved.get('k')}, not K = {k}")
    if fingerprint is not None and meta["base"]["embedding_fingerprint"] != fingerprint:
        raise CheckpointError(
            f"{path} was trained on another base model ({meta['base']['reference']!r}, embedding "
            f"fingerprint {meta['base']['embedding_fingerprint']}; this model's base has fingerprint {fingerprint})")
    theirs = meta["base"].get("weights_fingerprint")
    if weights is not None and theirs is not None and theirs != weights:
        raise CheckpointError(
            f"{path} was trained on base model {meta['base']['reference']!r}, but the base model given"
            f"{f' ({given!r})' if given else ''} has other weights (weights fingerprint {weights}, the checkpoint "
            f"recorded {theirs}) though the same embedding table: e.g. a ktm export, or a fine-tuned or replaced "
            f"copy of the base")
    if config is None:
        return
    defaults = type(config)()  # a field missing from an older folder had its default value
    for name in fields:
        mine = getattr(config, name)
        theirs = saved.get(name, getattr(defaults, name))
        if isinstance(mine, tuple) and isinstance(theirs, list):
            theirs = tuple(theirs)
        if theirs != mine:
            what = f"K = {theirs}, this model has K = {mine}" if name == "k" else \
                f"{name} = {_show(theirs)}, this model has {name} = {_show(mine)}"
            raise CheckpointError(f"{path} was saved with {what}: the weights would compute another function")
