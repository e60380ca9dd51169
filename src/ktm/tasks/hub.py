"""Raw data files of Hugging Face dataset repositories, fetched without ``datasets``.

The paper's two real benchmarks live on the Hub as ``McAuley-Lab/Amazon-Reviews-2023`` and
``bigcode/commitpackft``. Both are loaded there by a Python script, which ``datasets`` >= 4
no longer runs; their data, though, are plain JSONL files in the dataset repository. This
module fetches one such file with ``huggingface_hub.hf_hub_download(repo_type="dataset")``:
it is downloaded once into the Hugging Face cache (``HF_HUB_CACHE``), and with
``HF_HUB_OFFLINE=1`` only the cache is read. The Hub's errors become one-line messages.

Example::

    >>> is_hub_id("McAuley-Lab/Amazon-Reviews-2023"), is_hub_id("reviews.jsonl"), is_hub_id("a/b.jsonl")
    (True, False, False)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_NAME = re.compile(r"[\w+#-][\w+#.-]*")


def is_hub_id(source: str | Path) -> bool:
    """True when ``source`` reads as a Hub dataset id (``owner/name``) and is no local path.
    A name ending in ``.json`` or ``.jsonl`` is always taken for a (missing) local file."""
    text = str(source)
    return (not Path(text).exists() and bool(_HUB_ID.fullmatch(text))
            and not text.endswith((".json", ".jsonl")))


def check_name(value: str, what: str) -> str:
    """``value`` as one path component of a Hub file (a category, a language), or ``ValueError``."""
    if not _NAME.fullmatch(value or ""):
        raise ValueError(f"{what} must be a plain name (letters, digits, _ + # - .), got {value!r}")
    return value


def hub_file(repo_id: str, filename: str, download: Callable | None = None) -> Path:
    """The local path of ``filename`` in the Hub dataset ``repo_id``, downloaded if needed.

    ``download`` defaults to ``huggingface_hub.hf_hub_download`` (tests pass a stand-in with
    its keywords ``repo_id``, ``filename``, ``repo_type``). Errors: ``FileNotFoundError`` when
    the file is not cached and cannot be fetched (offline, no connection), ``ValueError`` for
    an unknown dataset or file, ``OSError`` for other Hub failures, each one line.
    """
    from huggingface_hub import constants, errors, hf_hub_download

    what = f"{filename} of the Hugging Face dataset {repo_id} (no local file or folder has that name)"
    try:
        return Path((download or hf_hub_download)(repo_id=repo_id, filename=filename, repo_type="dataset"))
    except errors.LocalEntryNotFoundError:  # before EntryNotFoundError, its base
        raise FileNotFoundError(
            f"{what} is not in the Hugging Face cache {constants.HF_HUB_CACHE} and cannot be downloaded "
            f"(HF_HUB_OFFLINE=1 or no connection): run once online, or give a local file or folder "
            f"as --source") from None
    except errors.RepositoryNotFoundError:
        raise ValueError(f"no Hugging Face dataset {repo_id} (or it is private or gated), and no local file "
                         f"or folder of that name") from None
    except errors.EntryNotFoundError:
        raise ValueError(f"the Hugging Face dataset {repo_id} has no file {filename}") from None
    except errors.HfHubHTTPError as e:
        raise OSError(f"{what} could not be downloaded: {' '.join(str(e).split())}") from None
