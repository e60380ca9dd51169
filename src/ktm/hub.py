"""ktm folders on the Hugging Face hub: load a saved model by hub id, push one.

A saved folder (:meth:`KTokenMerging.save_pretrained`) is a hub model repository as it is:
``ktm_config.json``, ``encoder.safetensors``, ``adapter/``, ``tokenizer/`` and the model card
``README.md``. Wherever a saved folder is expected (``from_pretrained``, ``--checkpoint``,
``--init-from``, ``ktm export``) an ``org/name`` that is not a local path is fetched with
``huggingface_hub.snapshot_download`` into the hub cache (``HF_HUB_CACHE``; offline with
``HF_HUB_OFFLINE=1`` it is read from there) and then checked exactly like a local folder:
the same ``ktm_config.json`` checks and the same SHA-256 of every weight file.

Example::

    KTokenMerging.from_pretrained("org/name", revision="v1")
    ktm push runs/a/model org/name            # uploads exactly that folder
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .card import CARD_NAME, model_card
from .checkpoint import CONFIG_NAME, ZOO_PREFIX, CheckpointError, read_config, resolve_folder
from .loading import looks_like_path

#: ``org/name`` as the hub spells a repository id (letters, digits, ``-``, ``_``, ``.``)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def is_hub_id(ref) -> bool:
    """True for ``org/name`` that is no local path (existing, or looking like one) and no
    ``zoo:NAME``: such a reference is fetched from the hub."""
    if not isinstance(ref, str) or ref.startswith(ZOO_PREFIX) or Path(ref).expanduser().exists():
        return False
    return bool(HUB_ID.match(ref)) and not looks_like_path(ref)


def resolve(ref: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of a saved-model reference: a path, ``zoo:NAME``
    (:func:`ktm.checkpoint.resolve_folder`) or a hub id ``org/name``, downloaded (or read from
    the hub cache) at ``revision`` (a branch, tag or commit; default ``main``).

    Raises :class:`CheckpointError` in one line when the hub cannot give it (no such
    repository or revision, offline and not cached, no network)."""
    text = os.fspath(ref)
    if not is_hub_id(text):
        if revision is not None:
            raise ValueError(f"revision={revision!r} is for hub ids (org/name); {text} is a local folder")
        return resolve_folder(ref)
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(text, revision=revision))
    except (OSError, ValueError) as e:  # huggingface_hub's errors (HTTP, offline, not found) are these
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        hint = (" and HF_HUB_OFFLINE is set: download it once online, or unset HF_HUB_OFFLINE" if offline
                else ": check the name, the revision and your access (huggingface-cli login)")
        raise CheckpointError(f"hub model {text!r}{f' at revision {revision!r}' if revision else ''} "
                              f"could not be fetched ({type(e).__name__}){hint}") from e
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(f"hub model {text!r} is not a ktm model: it has no {CONFIG_NAME}")
    return folder


def push_folder(folder: str | os.PathLike, repo_id: str, *, base_reference: str | None = None,
                private: bool | None = None, token: str | None = None, revision: str | None = None,
                commit_message: str | None = None) -> str:
    """Upload a saved ktm folder to the hub repository ``repo_id`` (created if missing);
    returns the commit's URL.

    Exactly the folder's files are uploaded. Two cases upload a staged copy instead: a folder
    without a model card gets one (:func:`ktm.card.model_card`), and ``base_reference`` (the
    hub id of the base model) replaces a base saved as a local path, which nobody else could
    load; such a folder is refused without it."""
    from huggingface_hub import HfApi

    src = resolve_folder(folder)
    meta = read_config(src)
    saved = meta["base"]["reference"]
    if base_reference is None and saved not in ("default", "") and not HUB_ID.match(saved):
        raise CheckpointError(
            f"{src} was trained on the local base model {saved}, which nobody else can load: name its "
            f"hub id (ktm push --base org/name, push_to_hub(..., base_reference='org/name'))")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    message = commit_message or f"ktm: K = {meta['model'].get('k')} {meta['model'].get('method', 'merge')} model"
    if base_reference is None and (src / CARD_NAME).is_file():
        info = api.upload_folder(folder_path=str(src), repo_id=repo_id, revision=revision,
                                 commit_message=message)
        return str(getattr(info, "commit_url", info))
    with tempfile.TemporaryDirectory(prefix="ktm-push-") as tmp:
        staged = Path(tmp) / src.name
        shutil.copytree(src, staged)
        if base_reference is not None:
            meta["base"]["reference"] = base_reference
            (staged / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if base_reference is not None or not (staged / CARD_NAME).is_file():
            (staged / CARD_NAME).write_text(model_card(meta))
        info = api.upload_folder(folder_path=str(staged), repo_id=repo_id, revision=revision,
                                 commit_message=message)
    return str(getattr(info, "commit_url", info))
