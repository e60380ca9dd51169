"""What a server accepts as ``prompt_embeds``: the bounds and checks ktm applies (and asks of
vLLM) before a client's base64 payload becomes a tensor.

A payload is refused unread when longer than its length bound (:func:`payload_limit`),
when torch is too old for ``weights_only`` to hold (:func:`check_torch_load`), or when its
zip records declare more unpacked bytes than that bound promises (:func:`check_unpacked_size`);
the tensor it holds must then be dense, 2-D (length, hidden_size), of a float dtype, at most
``max_length`` long and finite (:func:`check_prompt_embeds`).
"""

from __future__ import annotations

import base64
import binascii
import io
import zipfile

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: bytes a torch.save file may add to its tensor's data (zip records, pickle: 1,577 measured
#: with torch 2.13 for any 2-D float tensor), with room to spare
SAVE_OVERHEAD = 4096


def payload_limit(hidden_size: int, max_length: int, dtype: torch.dtype = torch.float32) -> int:
    """Characters of the largest base64 ``prompt_embeds`` of a (max_length, hidden_size) tensor."""
    raw = max_length * hidden_size * dtype.itemsize + SAVE_OVERHEAD
    return 4 * -(-raw // 3)


def check_prompt_embeds(tensor, hidden_size: int, max_length: int, *, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """Return ``tensor`` if it is a dense 2-D (length, hidden_size) tensor of one of
    ``dtypes`` with 1 <= length <= ``max_length`` and finite values; raise ValueError saying
    what is wrong otherwise. (vLLM itself also accepts a 3-D tensor with a leading 1.)"""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"prompt_embeds is a {type(tensor).__name__}, not a tensor")
    if tensor.layout != torch.strided:
        raise ValueError(f"prompt_embeds must be a dense tensor, got layout {tensor.layout}")
    if tensor.dtype not in dtypes:
        raise ValueError(f"prompt_embeds has dtype {tensor.dtype}; accepted: {', '.join(map(str, dtypes))}")
    if tensor.dim() != 2:
        raise ValueError(f"prompt_embeds must be 2-D (length, hidden_size), got shape {tuple(tensor.shape)}")
    length, width = tensor.shape
    if width != hidden_size:
        raise ValueError(f"prompt_embeds has hidden size {width}, the model {hidden_size}")
    if not 1 <= length <= max_length:
        raise ValueError(f"prompt_embeds has {length} positions; accepted: 1 to {max_length}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError("prompt_embeds holds NaN or infinite values")
    return tensor


#: the first torch whose ``torch.load(weights_only=True)`` runs no code from a crafted file
#: (2.5.1 and older do: CVE-2025-32434)
SAFE_TORCH = (2, 6)


def check_torch_load(version: str | None = None) -> None:
    """Raise RuntimeError on a torch older than :data:`SAFE_TORCH` (``version``: default the
    installed one), whose ``weights_only`` a crafted payload gets past."""
    version = version or torch.__version__
    parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())
    if parts < SAFE_TORCH:
        raise RuntimeError(f"torch {version} runs code from a crafted file despite weights_only=True "
                           f"(CVE-2025-32434): reading prompt_embeds needs torch >= "
                           f"{'.'.join(map(str, SAFE_TORCH))}; upgrade torch")


def check_unpacked_size(data: bytes, limit: int) -> None:
    """Raise ValueError unless ``data`` is a zip archive (torch.save's format) whose records'
    declared sizes add up to at most ``limit`` bytes: a few kilobytes of deflated zeros must
    not make the reader allocate gigabytes (measured: a 349 KB payload unpacked to 257 MiB)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        raise ValueError(f"prompt_embeds could not be read as a torch tensor: not a torch.save zip archive "
                         f"({e})") from e
    if unpacked > limit:
        raise ValueError(f"prompt_embeds unpacks to {unpacked:,} bytes (its zip records' declared sizes), more "
                         f"than the {limit:,} bytes its length bound allows: refused unread")


def load_prompt_embeds(payload: str | bytes, hidden_size: int, max_length: int, *,
                       max_chars: int | None = None, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """Decode one base64 ``prompt_embeds`` as vLLM does, bounded and checked.

    The payload is refused unread when longer than ``max_chars`` (default:
    :func:`payload_limit` for float32 at ``max_length``); it is then base64-decoded strictly
    and read with ``torch.load(weights_only=True)`` (sparse-tensor invariants checked; only on
    a torch that honours it, :func:`check_torch_load`, and only when its zip records unpack to
    no more bytes than ``max_chars`` promises, :func:`check_unpacked_size`), and the tensor
    must pass :func:`check_prompt_embeds`. Raises ValueError.
    """
    limit = payload_limit(hidden_size, max_length) if max_chars is None else max_chars
    if not isinstance(payload, (str, bytes)):
        raise ValueError(f"prompt_embeds must be a base64 string, got a {type(payload).__name__}")
    if len(payload) > limit:
        raise ValueError(f"prompt_embeds is {len(payload)} characters long; accepted: at most {limit}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"prompt_embeds is not valid base64 ({e})") from e
    check_torch_load()
    check_unpacked_size(data, limit * 3 // 4)
    try:
        with torch.sparse.check_sparse_tensor_invariants():
            tensor = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises many types for bytes that are not a tensor file
        raise ValueError(f"prompt_embeds could not be read as a torch tensor ({str(e)[:200]})") from e
    return check_prompt_embeds(tensor, hidden_size, max_length, dtypes=dtypes)
