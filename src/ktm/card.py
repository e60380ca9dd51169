"""The model card (``README.md`` with YAML metadata) of a saved ktm folder.

Written by ``save_pretrained``, ``ktm export`` and ``ktm zoo build``, and by ``ktm push`` for a
folder that has none; the hub shows it as the repository's page. It holds only what the
folder knows: the method, K, the encoder and LoRA shapes, the base model, and whatever numbers
the caller passes (``extra``: fidelity, task evaluation, held-out perplexities). Never a path of
the machine that wrote it.

Example::

    text = model_card(json.load(open("my-ktm/ktm_config.json")),
                      {"fidelity": {"perplexity_ratio": 1.41, "top1_agreement": 0.62}})
"""

from __future__ import annotations

import json
from pathlib import Path

from . import __version__

CARD_NAME = "README.md"
#: the hub model the embedded default base (a 4-bit Q4_1 GGUF file of it) was quantised from
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TAGS = ("ktm", "k-token-merging", "prompt-compression", "lora", "peft")
#: the sections of ``extra`` shown as tables, in this order, with their headings
SECTIONS = {"fidelity": "Fidelity (merged vs plain reading, held-out text)",
            "evaluation": "Task evaluation", "held_out": "Held-out perplexity"}


def portable_base(reference: str) -> str | None:
    """The base model as another machine can name it: the hub id it comes from, or None for a
    local folder or file (whose path means nothing elsewhere)."""
    if reference in ("default", None, ""):
        return DEFAULT_HUB_ID
    if reference.startswith(("/", ".", "~")) or "\\" in reference or reference.count("/") > 1 \
            or reference.lower().endswith(".gguf") or Path(reference).is_absolute():
        return None
    return reference


def _yaml_scalar(value) -> str:
    return json.dumps(value)  # a JSON string or number is a valid YAML scalar


def _rows(values: dict, prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in values.items():
        if isinstance(value, dict):
            rows += _rows(value, f"{prefix}{key}.")
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, float):
            rows.append((prefix + key, f"{value:.4g}"))
        elif isinstance(value, (int, str)):
            rows.append((prefix + key, str(value)))
    return rows


def _metadata(meta: dict, base: str | None, model: dict, tags: tuple = TAGS) -> str:
    lines = ["---", "library_name: ktm"]  # no license: the weights follow the base model's
    if base:
        lines.append(f"base_model: {_yaml_scalar(base)}")
    lines += ["pipeline_tag: text-generation", "tags:", *[f"- {t}" for t in tags],
              "ktm:", f"  k: {int(model.get('k', 1))}", f"  method: {_yaml_scalar(model.get('method', 'merge'))}",
              f"  ktm_version: {_yaml_scalar(meta.get('ktm_version', __version__))}", "---", ""]
    return "\n".join(lines)


def model_card(meta: dict, extra: dict | None = None, *, repo_id: str | None = None,
               export: bool = False, gguf_type: str | None = None) -> str:
    """The card of a folder whose ``ktm_config.json`` holds ``meta``.

    Args:
        meta: the folder's ``ktm_config.json`` (``describe()`` of the model).
        extra: numbers to show, each a flat or nested dict of numbers: ``"fidelity"``
            (``perplexity_ratio``, ``top1_agreement``, ...), ``"evaluation"`` (a task's
            ``metric``, ``value``, ...), ``"held_out"``; other keys are ignored.
        repo_id: the hub id the usage lines load (default: a placeholder ``ORG/NAME``).
        export: the card of a ``ktm export`` folder (LoRA merged, for ``ktm serve``).
        gguf_type: with ``export``, the card of a ``ktm export --format gguf`` folder (llama.cpp)
            whose weights are of this type (tagged ``gguf``, ``llama.cpp``).
    Returns: the text of ``README.md``: YAML metadata (``library_name``, ``base_model``,
    ``tags``, ``ktm: {k, method}``), then a short description, the numbers and usage.
    """
    model, enc = meta.get("model", {}), meta.get("encoder", {})
    k, method = int(model.get("k", 1)), model.get("method", "merge")
    reference = meta.get("base", {}).get("reference", "")
    base = portable_base(reference)
    shown_base = "the embedded SmolLM2-135M-Instruct (4-bit Q4_1 GGUF, dequantised on load)" \
        if reference == "default" else (f"`{base}`" if base else "a local model (not on the hub)")
    repo = repo_id or "ORG/NAME"
    tags = TAGS + (("gguf", "llama.cpp") if export and gguf_type else ())
    text = [_metadata(meta, base, model, tags),
            f"# K-Token Merging, K = {k} ({method})", "",
            f"A [ktm](https://pypi.org/project/k-token-merging/) model: a merge encoder reads each block "
            f"of {k} prompt-token embeddings as one, and a LoRA-adapted base model reads that {k}x "
            f"shorter prompt and answers in its own vocabulary.", "",
            f"- base model: {shown_base}",
            f"- encoder: hidden {enc.get('hidden')}, init `{enc.get('init')}`, stages {enc.get('stages')}",
            f"- LoRA: r = {model.get('lora_r')}, alpha = {model.get('lora_alpha')}, "
            f"targets {', '.join(model.get('lora_targets') or [])}", ""]
    for key, heading in SECTIONS.items():
        rows = _rows((extra or {}).get(key) or {})
        if rows:
            text += [f"## {heading}", "", "| | |", "|---|---|", *[f"| {n} | {v} |" for n, v in rows], ""]
    usage = (_gguf_usage(repo, gguf_type) if gguf_type else _export_usage(repo)) if export else _usage(repo)
    return "\n".join(text + usage)


def _usage(repo: str) -> list[str]:
    return ["## Use", "", "```sh", "pip install k-token-merging", f"ktm generate --checkpoint {repo} \"a prompt\"",
            "```", "", "```python", "from ktm import KTokenMerging", "",
            f"model = KTokenMerging.from_pretrained(\"{repo}\")  # checks every weight file's SHA-256",
            "print(model.generate([\"a prompt\"], max_new_tokens=32))", "```", ""]


def _gguf_usage(repo: str, gguf_type: str) -> list[str]:
    return ["## Use", "", f"An export for llama.cpp: `model.gguf` is the base model with the LoRA merged into its "
            f"weights ({gguf_type}, llama.cpp's layout), with the merge encoder beside it (`ktm_serving.json`, "
            f"`ktm_encoder.safetensors`) and the tokenizer; ktm merges each prompt on the host and llama.cpp "
            f"reads the merged embeddings, then decodes.", "",
            "```sh", "pip install 'k-token-merging[llamacpp]'",
            f"huggingface-cli download {repo} --local-dir ktm-gguf",
            "ktm generate --export ktm-gguf \"a prompt\"      # or: ktm serve --export ktm-gguf", "```", ""]


def _export_usage(repo: str) -> list[str]:
    return ["## Use", "", "An export for serving: the LoRA is merged into the base model's weights "
            "(`config.json`, `model.safetensors`), with the merge encoder beside it "
            "(`ktm_serving.json`); a client merges prompts and sends their embeddings.", "",
            "```sh", "pip install 'k-token-merging[serve]'",
            f"huggingface-cli download {repo} --local-dir ktm-export", "ktm serve --export ktm-export", "```", ""]
