"""Serving a ktm export: merged prompt embeddings on the client, and what a server accepts.

A served ktm model is a plain LLM (``ktm export``: the LoRA merged into its weights) that reads
*prompt embeddings*: for a prompt of n tokens, the ``ceil(n / K)`` embeddings that
:meth:`ktm.model.KTokenMerging.merge_prompts` gives. :class:`PromptEncoder` computes them
from an export folder with only the tokenizer, the embedding table (one tensor read from the
safetensors files) and the encoder loaded; the LLM's other weights are never read.

What vLLM takes (started with ``--enable-prompt-embeds``; ``LLM(..., enable_prompt_embeds=True)``
offline):

* offline, an ``EmbedsPrompt``: ``{"prompt_embeds": tensor}`` of shape (length, hidden_size)
  (:meth:`PromptEncoder.embeds_prompts`);
* the OpenAI Completions API, ``POST /v1/completions`` with ``"prompt_embeds"``: a base64
  string (or a list of them) of the tensor written by ``torch.save``, which vLLM reads back with
  ``torch.load(BytesIO(pybase64.b64decode(s, validate=True)), weights_only=True,
  map_location="cpu")``; no chat template is applied (:meth:`PromptEncoder.completion_request`,
  :func:`tensor_to_base64`).

Prompt embeddings are for trusted clients: a server decodes and runs whatever tensor it is
sent. :func:`load_prompt_embeds` bounds the payload before decoding it and
:func:`check_prompt_embeds` checks the tensor (layout, dtype, 2-D, hidden size, length,
finite), for whoever writes a server or a gateway in front of one.

Example::

    enc = PromptEncoder.from_export("exports/k4")
    body = enc.completion_request(["Review: great shoes, Label:"], max_tokens=4, temperature=0)
    enc.complete("http://127.0.0.1:8000", ["Review: great shoes, Label:"], max_tokens=4)
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

import torch

from ..model.methods import TOKEN_METHODS
from ..model.prompts import PromptMerger
from .export import ExportError, export_model_config, load_export_encoder, read_export
from .payload import FLOAT_DTYPES, check_prompt_embeds, load_prompt_embeds, payload_limit  # noqa: F401 - public here too

#: the dtypes a prompt-embeddings tensor may have (vLLM casts them to the model's dtype)
class PromptEncoder:
    """Prompts -> the merged embeddings a served ktm model reads, without the LLM.

    Holds the tokenizer, the input-embedding table (V, d) and the merge encoder of an export
    folder (:meth:`from_export`). :meth:`encode` gives, for each prompt alone, exactly what
    ``KTokenMerging.merge_prompts([prompt])`` gives (as float32).
    """

    def __init__(self, tokenizer, table: torch.Tensor, encoder: torch.nn.Module | None, config,
                 max_positions: int | None = None, name: str = "ktm"):
        self.tokenizer, self.table, self.encoder, self.config = tokenizer, table, encoder, config
        self.max_positions = max_positions
        self.name = name  # the served model name `ktm serve` gives by default
        #: the model's own prompt merging, on the table and encoder alone
        self.merger = PromptMerger(tokenizer, torch.nn.Embedding.from_pretrained(table, freeze=True), encoder,
                                   config, max_positions)

    @classmethod
    def from_export(cls, path: str | os.PathLike, *, device: str = "cpu", trust_remote_code: bool | None = None,
                    table: torch.Tensor | None = None) -> "PromptEncoder":
        """Load the tokenizer, the embedding table and the encoder of an export folder.

        Checks the encoder file against its recorded SHA-256 and the table against the
        embedding fingerprint recorded at export; raises :class:`~ktm.serve.export.ExportError`.
        ``table``: the embedding table, read by the caller where the export keeps it in another
        format (a GGUF file, :mod:`ktm.serve.gguf`); it is checked all the same.
        """
        from ..model.encoder import encoder_from_config
        from ..loading import load_tokenizer, table_fingerprint

        path = Path(path)
        meta = read_export(path)
        config = export_model_config(meta, path)
        if table is None:
            table = load_embedding_table(path, meta["embedding"]["key"], device=device)
        if table_fingerprint(table) != meta["embedding"]["fingerprint"]:
            raise ExportError(f"{path}: the embedding table differs from the one exported (fingerprint)")
        encoder = None
        if config.method not in TOKEN_METHODS:
            encoder = encoder_from_config(config, table.shape[1])
            state = load_export_encoder(meta, path)
            want = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
            if want != {k: tuple(v.shape) for k, v in state.items()}:
                raise ExportError(f"{path}: the encoder file does not fit K = {config.k}, d = {table.shape[1]}")
            encoder.load_state_dict(state)
            encoder.to(device).eval().requires_grad_(False)
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        return cls(tokenizer, table, encoder, config, meta.get("max_positions"), name=path.name)

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def hidden_size(self) -> int:
        return int(self.table.shape[1])

    def tokenize(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt, without special tokens (as the model reads them); raises
        :class:`~ktm.model.PromptError` for an empty prompt or one too long for the model."""
        ids = self.merger.tokenize(prompts)
        self.merger.check_length(ids)
        return ids

    @torch.inference_mode()
    def merge_ids(self, ids: list[int]) -> torch.Tensor:
        """The merged embeddings (ceil(n / K), d) of one prompt's token ids, in the table's
        dtype: ``KTokenMerging.merge_ids`` for a batch of one."""
        return self.merger.merge_ids([ids])[0]

    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """Each prompt's merged embeddings, float32 on the CPU, (ceil(n_i / K), d), each prompt
        encoded alone (so the result never depends on the other prompts)."""
        return [self.merge_ids(x).float().cpu() for x in self.tokenize(prompts)]

    def embeds_prompts(self, prompts: list[str]) -> list[dict]:
        """vLLM's offline inputs: ``[{"prompt_embeds": (M_i, d) tensor}, ...]`` for
        ``LLM(model=EXPORT, enable_prompt_embeds=True).generate(...)``, in the export's dtype
        (the values of :meth:`encode`, which only widens them to float32)."""
        return [embeds_prompt(t.to(self.table.dtype)) for t in self.encode(prompts)]

    def completion_request(self, prompts: list[str], model: str | None = None, **params) -> dict:
        """The JSON body of ``POST /v1/completions`` for these prompts (one choice per prompt,
        ``index`` = its position); ``model`` defaults to the export folder's name (the name
        ``ktm serve`` serves it under); ``params``: ``max_tokens``, ``temperature``, ...
        The tensors are sent in the export's dtype (the dtype ``ktm serve`` serves it in)."""
        return completion_request([t.to(self.table.dtype) for t in self.encode(prompts)], model or self.name,
                                  **params)

    def complete(self, url: str, prompts: list[str], model: str | None = None, *, api_key: str | None = None,
                 timeout: float = 600, **params) -> list[str]:
        """Send the prompts to the Completions API of the server at ``url`` (e.g.
        ``http://127.0.0.1:8000``) and return the answers, in the prompts' order."""
        body = self.completion_request(prompts, model, **params)
        answer = post_json(url.rstrip("/") + "/v1/completions", body, api_key=api_key, timeout=timeout)
        try:
            choices = sorted(answer["choices"], key=lambda c: c["index"])
            indices, texts = [c["index"] for c in choices], [c["text"] for c in choices]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{url} answered without the Completions API's choices: {str(answer)[:300]}") from e
        if indices != list(range(len(prompts))):
            raise ValueError(f"{url} answered {len(indices)} choices (indices {indices[:8]}) for {len(prompts)} "
                             f"prompts: one answer per prompt is needed (leave n and best_of at 1)")
        return texts


def encode_prompts(model, prompts: list[str]) -> list[torch.Tensor]:
    """Float32 CPU (M_i, d) merged embeddings of each prompt alone, from a
    :class:`PromptEncoder` or a :class:`~ktm.model.KTokenMerging` (``merge_prompts([p])``)."""
    if isinstance(model, PromptEncoder):
        return model.encode(prompts)
    with torch.inference_mode():
        return [model.merge_prompts([p])[0][0].float().cpu() for p in prompts]


def load_embedding_table(folder: str | os.PathLike, key: str, device: str = "cpu") -> torch.Tensor:
    """Only the tensor ``key`` of a model folder's safetensors file(s), read with ``safe_open``
    (the file named by ``model.safetensors.index.json`` when the weights are sharded)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    try:
        file = folder / json.loads(index.read_text())["weight_map"][key] if index.is_file() \
            else folder / "model.safetensors"
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExportError(f"{index} does not name the file of {key!r} ({e})") from e
    if not file.is_file():
        raise ExportError(f"{file} is missing")
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            if key not in f.keys():
                raise ExportError(f"{file} has no tensor {key!r}")
            return f.get_tensor(key)
    except SafetensorError as e:
        raise ExportError(f"{file} is corrupt ({e})") from e


# ---------------------------------------------------------------- payloads
def embeds_prompt(tensor: torch.Tensor) -> dict:
    """vLLM's offline ``EmbedsPrompt``: ``{"prompt_embeds": tensor}`` (length, hidden_size)."""
    return {"prompt_embeds": tensor}


def tensor_to_base64(tensor: torch.Tensor) -> str:
    """``torch.save`` of the tensor, base64: what vLLM's Completions API reads as
    ``prompt_embeds`` (its own ``tensor2base64``). The tensor is copied first, so that a view
    of a larger tensor does not send that tensor's whole storage."""
    buf = io.BytesIO()
    torch.save(tensor.detach().cpu().contiguous().clone(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def completion_request(embeds: list[torch.Tensor], model: str, **params) -> dict:
    """``POST /v1/completions`` body: ``{"model", "prompt_embeds": [base64, ...], **params}``."""
    if not embeds:
        raise ValueError("no prompts to send")
    return {"model": model, "prompt_embeds": [tensor_to_base64(t) for t in embeds], **params}


#: the most bytes of a server's answer the client reads (a completion is text: far less)
MAX_RESPONSE_BYTES = 64 << 20


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise ValueError(f"{req.full_url} redirected (HTTP {code}) to {newurl}: ktm does not follow redirects, "
                         f"which would carry the API key elsewhere; give the server's own address")


def post_json(url: str, body: dict, *, api_key: str | None = None, timeout: float = 600,
              max_bytes: int = MAX_RESPONSE_BYTES) -> dict:
    """POST ``body`` as JSON and return the JSON answer; an HTTP error raises ValueError with
    the status and the start of the server's message. Redirects are refused (the
    ``Authorization`` header would follow them), and an answer over ``max_bytes`` is not read."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.build_opener(_NoRedirects()).open(request, timeout=timeout) as response:
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise ValueError(f"{url} answered HTTP {e.code}: {e.read(500).decode(errors='replace')}") from e
    if len(data) > max_bytes:
        raise ValueError(f"{url} answered with more than {max_bytes:,} bytes: not read")
    return json.loads(data)


# ---------------------------------------------------------------- files of prompt embeddings
def save_embeds(path: str | os.PathLike, tensors: list[torch.Tensor], metadata: dict | None = None) -> Path:
    """Write tensors as one safetensors file, named ``"0"``, ``"1"``, ... in order, atomically."""
    from safetensors.torch import save_file

    from ..checkpoint import write_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_file(path, lambda tmp: save_file({str(i): t.contiguous() for i, t in enumerate(tensors)}, str(tmp),
                                                  metadata={k: str(v) for k, v in (metadata or {}).items()}))


def read_embeds(path: str | os.PathLike) -> list[torch.Tensor]:
    """The tensors of a file written by :func:`save_embeds` (``ktm encode``), in order."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    return [state[str(i)] for i in range(len(state))]



# ---------------------------------------------------------------- the server
class VLLMNotInstalled(ValueError):
    """``ktm serve`` needs vLLM, which is not installed."""


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_executable() -> str:
    """The ``vllm`` command of this environment (beside the Python running ktm, else on PATH)."""
    if not vllm_installed():
        raise VLLMNotInstalled(
            "vLLM is not installed: pip install 'k-token-merging[serve]' (or pip install vllm; vLLM runs on Linux, "
            "most models on a CUDA GPU), or serve the export folder with any server that takes prompt "
            "embeddings (docs/SERVING.md)")
    beside = Path(sys.executable).with_name("vllm")
    found = str(beside) if beside.is_file() else shutil.which("vllm")
    if not found:
        raise VLLMNotInstalled("the vllm package is installed but its `vllm` command is not on PATH")
    return found


#: vllm serve options that ktm serve sets itself, and why they may not be passed through
RESERVED = {"--max-model-len": "use ktm serve --max-model-len", "--served-model-name": "use ktm serve --name",
            "--host": "use ktm serve --host", "--port": "use ktm serve --port",
            "--enable-lora": "the export has its LoRA merged into the weights (and vLLM has crashed with LoRA "
                             "and prompt embeddings together on Llama models)",
            "--lora-modules": "the export has its LoRA merged into the weights"}


def vllm_flag(arg: str) -> str:
    """The flag an argument of ``vllm serve`` names, spelled with dashes as vLLM matches it
    (``--max_model_len=9`` names ``--max-model-len``); other arguments as they are."""
    if not arg.startswith("--"):
        return arg
    return "--" + arg[2:].split("=", 1)[0].replace("_", "-")


def exposure_warning(host: str, extra: list[str], env=os.environ) -> str | None:
    """A warning when the server would listen beyond this machine without an API key (vLLM's
    ``--api-key`` or ``VLLM_API_KEY``): prompt embeddings are for trusted clients."""
    import ipaddress

    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = host == "localhost"
    if local or "--api-key" in {vllm_flag(str(a)) for a in extra} or env.get("VLLM_API_KEY"):
        return None
    return (f"ktm: warning: serving on {host} without an API key: anyone who can reach it can send prompt "
            f"embeddings; pass -- --api-key KEY (or set VLLM_API_KEY), or listen on 127.0.0.1")


def serve_command(export: str | os.PathLike, *, vllm: str = "vllm", max_model_len: int | None = None,
                  name: str | None = None, host: str = "127.0.0.1", port: int = 8000,
                  extra: list[str] = ()) -> list[str]:
    """The ``vllm serve`` command line for an export folder: prompt embeddings on, the folder
    as the model, served as ``name`` (default: the folder's name) on ``host:port`` (default:
    this machine only), at most ``max_model_len`` positions (default: the model's), in the
    export's dtype unless ``extra`` gives ``--dtype``; ``extra``: more ``vllm serve`` options."""
    path = Path(export).resolve()
    meta = read_export(path)
    longest = meta.get("max_positions")
    if max_model_len is not None and longest and max_model_len > longest:
        raise ValueError(f"--max-model-len {max_model_len} is more than the model's {longest} positions")
    extra = [str(a) for a in extra]
    given = {vllm_flag(a) for a in extra}  # vLLM reads --max_model_len as --max-model-len
    for flag, why in RESERVED.items():
        if flag in given:
            raise ValueError(f"{flag} is not passed through to vllm serve: {why}")
    cmd = [vllm, "serve", str(path), "--enable-prompt-embeds", "--served-model-name", name or path.name,
           "--host", host, "--port", str(port)]
    length = max_model_len or longest
    if length:
        cmd += ["--max-model-len", str(length)]
    if "--dtype" not in given:
        cmd += ["--dtype", meta.get("dtype", "auto")]
    return cmd + extra
