"""Merged prompts on llama.cpp: the client merges, llama.cpp prefills embeddings and decodes.

:class:`LlamaCppEngine` runs a folder written by ``ktm export --format gguf``
(:mod:`ktm.serve.gguf`). For each prompt:

1. the prompt is tokenised (no special tokens) and merged K tokens at a time on the host, by
   ktm's own :class:`~ktm.model.PromptMerger` on the GGUF's embedding table and the exported
   encoder: (ceil(n / K), d) float32;
2. llama.cpp reads those rows as a ``llama_batch`` whose ``embd`` is set instead of ``token``
   (chunks of ``n_batch`` positions), building its KV cache at K-times fewer positions;
3. decoding runs in llama.cpp, one token per ``llama_decode``; the next token is picked on the
   host from the last logits (greedy argmax, or sampling with temperature / top-k / top-p),
   and generation stops at an end token of the model (not included in the answer).

Prompts run one after another in one llama.cpp context (its KV cache is cleared between them),
or, with ``generate(..., batch_size=B)``, B at a time in a second context with one KV stream per
sequence: prefilled together, then one ``llama_decode`` per step for all of them
(:mod:`ktm.serve.llamacpp_batch`); greedy answers are the same either way. A lock makes an
engine safe to share between threads (the HTTP server).

Needs ``llama-cpp-python`` (``pip install 'k-token-merging[llamacpp]'``); see docs/SERVING.md for
the build flags that make it fast on a given CPU.

Example::

    engine = LlamaCppEngine("exports/k2-gguf", threads=2)
    engine.generate(["Review: great shoes, Label:"], max_new_tokens=4)[0].text
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..checkpoint import file_sha256
from ..model.generation import check_sampling
from ..model.prompts import PromptError, PromptTooLong
from .export import ExportError, read_export
from .gguf import ENGINE, MODEL_FILE, gguf_table
from .llamacpp_batch import LlamaBatch, SequenceContext

INSTALL_HINT = "pip install 'k-token-merging[llamacpp]'"


class LlamaCppMissing(ValueError):
    """llama-cpp-python is not installed (a ValueError, so that the CLI says it in one line)."""


def import_llama_cpp():
    """The ``llama_cpp`` module, or :class:`LlamaCppMissing` with the install command."""
    try:
        import llama_cpp
    except ImportError as e:
        raise LlamaCppMissing(f"running a GGUF export needs llama-cpp-python: {INSTALL_HINT} "
                              f"(see docs/SERVING.md for a build that uses this CPU's vector units)") from e
    return llama_cpp


@dataclasses.dataclass
class Sampling:
    """How the next token is picked: greedy (``do_sample=False``) or sampled."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self):
        check_sampling(self.do_sample, self.temperature, self.top_k, self.top_p)

    def picker(self):
        """A function logits (V,) float32 -> token id, with its own random stream."""
        rng = np.random.default_rng(self.seed)

        def pick(logits: np.ndarray) -> int:
            if not self.do_sample:
                return int(np.argmax(logits))
            z = logits.astype(np.float64) / self.temperature
            if self.top_k is not None and self.top_k < z.size:
                z[z < np.partition(z, -self.top_k)[-self.top_k]] = -np.inf
            p = np.exp(z - z.max())
            p /= p.sum()
            if self.top_p is not None and self.top_p < 1.0:
                order = np.argsort(-p, kind="stable")
                cut = np.cumsum(p[order]) - p[order] >= self.top_p  # keep the smallest set reaching top_p
                p[order[cut]] = 0.0
                p /= p.sum()
            return int(rng.choice(p.size, p=p))

        return pick


@dataclasses.dataclass
class Completion:
    """One answer: its text and tokens, why it stopped (``"stop"``: an end token, ``"length"``:
    ``max_new_tokens``), the prompt's length in tokens and merged, and timings in seconds
    (``merge``: tokenise + merge on the host, ``prefill``: llama.cpp reading the merged prompt,
    ``first_token``: from the call to the first token, ``total``)."""

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    merged_length: int
    timings: dict[str, float]


class LlamaCppEngine:
    """A ktm GGUF export on llama.cpp (see the module docstring).

    ``threads``: llama.cpp's threads (default: its own choice); ``n_ctx``: positions per
    sequence, merged prompt + answer (default: the model's, at most 8192); ``n_batch``:
    positions per ``llama_decode`` while prefilling; ``verify``: check ``model.gguf`` against the
    SHA-256 recorded at export (a second or two for a 500 MB file).
    """

    def __init__(self, export: str | os.PathLike, *, threads: int | None = None, n_ctx: int | None = None,
                 n_batch: int = 512, verify: bool = True, verbose: bool = False):
        from .serving import PromptEncoder

        llama_cpp = import_llama_cpp()
        self.path = Path(export)
        self.meta = read_export(self.path)
        if self.meta.get("engine") != ENGINE:
            raise ExportError(f"{self.path} is an export for {self.meta.get('engine', 'vLLM')}, not llama.cpp: "
                              f"write one with ktm export --format gguf")
        model_file = self.path / self.meta["gguf"]["file"]
        if not model_file.is_file():
            raise ExportError(f"{model_file} is missing")
        want = self.meta.get("files", {}).get(model_file.name)
        if verify and want and file_sha256(model_file) != want:
            raise ExportError(f"{model_file} differs from the file exported (SHA-256): re-export it")
        self.prompts = PromptEncoder.from_export(self.path, table=gguf_table(model_file))
        self.eos_ids = set(self.meta.get("eos_ids") or [self.prompts.tokenizer.eos_token_id])
        self.n_ctx = int(n_ctx or min(self.meta.get("max_positions") or 4096, 8192))
        self.n_batch = int(n_batch)
        self.llm = llama_cpp.Llama(model_path=str(model_file), n_ctx=self.n_ctx, n_batch=self.n_batch,
                                   n_ubatch=self.n_batch, n_threads=threads, n_threads_batch=threads,
                                   verbose=verbose)
        self.threads = self.llm.n_threads
        self._api = llama_cpp
        self._lock = threading.Lock()
        self.n_vocab = self.llm.n_vocab()
        self._embd_batch = LlamaBatch(llama_cpp, self.n_batch, self.prompts.hidden_size)
        self._token_batch = LlamaBatch(llama_cpp, self.n_batch, 0)
        self._group: SequenceContext | None = None  # made by the first batched generate

    @property
    def name(self) -> str:
        return self.prompts.name

    @property
    def k(self) -> int:
        return self.prompts.k

    def close(self) -> None:
        for b in (self._embd_batch, self._token_batch):
            b.free()
        if self._group is not None:
            self._group.close()
        self.llm.close()

    # ---------------------------------------------------------------- llama.cpp calls
    def _clear(self) -> None:
        self._api.llama_memory_clear(self._api.llama_get_memory(self.llm.ctx), True)

    def _run(self, batch: LlamaBatch, rows: np.ndarray, start: int) -> np.ndarray:
        """Feed ``rows`` (token ids (n,) or embeddings (n, d)) at positions ``start ..``, in
        chunks of n_batch; the logits (V,) after the last one."""
        for at in range(0, len(rows), self.n_batch):
            batch.fill(rows[at:at + self.n_batch], start + at, last=at + self.n_batch >= len(rows))
            rc = self._api.llama_decode(self.llm.ctx, batch.batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc}) at positions {start + at}..")
        ptr = self._api.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def prefill_embeddings(self, embeds: np.ndarray) -> np.ndarray:
        """A new sequence reading ``embeds`` (M, d) float32; the logits (V,) of its last position."""
        self._clear()
        return self._run(self._embd_batch, np.ascontiguousarray(embeds, dtype=np.float32), 0)

    def prefill_tokens(self, ids) -> np.ndarray:
        """A new sequence reading token ids plainly (no merging; for comparisons)."""
        self._clear()
        return self._run(self._token_batch, np.asarray(ids, dtype=np.int32), 0)

    def step(self, token: int, position: int) -> np.ndarray:
        """Read one token at ``position``; the next logits (V,)."""
        return self._run(self._token_batch, np.array([token], dtype=np.int32), position)

    # ---------------------------------------------------------------- generation
    def merge(self, prompt: str, max_new_tokens: int = 0, max_prompt_tokens: int | None = None
              ) -> tuple[list[int], np.ndarray]:
        """``(ids, merged)`` of one prompt, checked to fit the model and this context with
        ``max_new_tokens`` (and to have at most ``max_prompt_tokens`` tokens); raises
        :class:`~ktm.model.PromptError` (``index`` 0)."""
        ids = self.prompts.merger.tokenize([prompt])
        if max_prompt_tokens is not None and len(ids[0]) > max_prompt_tokens:
            raise PromptError(0, f"has {len(ids[0])} tokens; this server takes at most {max_prompt_tokens}")
        self.prompts.merger.check_length(ids, extra=max_new_tokens)
        merged = self.prompts.merge_ids(ids[0]).float().numpy()
        if len(merged) + max_new_tokens > self.n_ctx:
            raise PromptTooLong(0, len(ids[0]), len(merged), max_new_tokens, self.n_ctx)
        return ids[0], merged

    def stream(self, prompt: str, max_new_tokens: int = 32, sampling: Sampling | None = None, *,
               max_prompt_tokens: int | None = None) -> Iterator[tuple[str, Completion | None]]:
        """Answer one prompt, yielding ``(text_delta, None)`` as text becomes complete, and last
        ``("", Completion)``. The prompt is checked (and merged) before this returns; the
        generator holds the engine until it ends or is closed."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        t0 = time.perf_counter()
        ids, merged = self.merge(prompt, max_new_tokens, max_prompt_tokens)  # bad prompts fail here, before any output
        return self._decode(ids, merged, max_new_tokens, (sampling or Sampling()).picker(), t0)

    def _decode(self, ids, merged, max_new_tokens, pick, t0):
        decode = self.prompts.tokenizer.decode
        with self._lock:
            t1 = time.perf_counter()
            logits = self.prefill_embeddings(merged)
            t2 = time.perf_counter()
            out, sent, reason, first = [], "", "length", None
            for i in range(max_new_tokens):
                token = pick(logits)
                first = first or time.perf_counter()
                if token in self.eos_ids:
                    reason = "stop"
                    break
                out.append(token)
                text = decode(out, skip_special_tokens=True)
                if not text.endswith("\ufffd") and len(text) > len(sent):  # hold back half a character
                    yield text[len(sent):], None
                    sent = text
                if i < max_new_tokens - 1:
                    logits = self.step(token, len(merged) + i)
        text = decode(out, skip_special_tokens=True)
        if len(text) > len(sent):
            yield text[len(sent):], None
        t3 = time.perf_counter()
        yield "", Completion(text, out, reason, len(ids), len(merged),
                             {"merge": t1 - t0, "prefill": t2 - t1, "first_token": first - t0, "total": t3 - t0})

    def complete(self, prompt: str, max_new_tokens: int = 32, sampling: Sampling | None = None) -> Completion:
        """:meth:`stream` to its end: the :class:`Completion`."""
        for _, done in self.stream(prompt, max_new_tokens, sampling):
            if done is not None:
                return done
        raise AssertionError("stream ended without a completion")

    def generate(self, prompts: list[str], max_new_tokens: int = 32, sampling: Sampling | list[Sampling] | None = None,
                 batch_size: int = 1) -> list[Completion]:
        """Answer each prompt (each as if alone: batch mates never matter); ``sampling.seed``
        seeds the first prompt, ``seed + i`` the i-th (a list: each prompt's own). ``batch_size``: prompts decoded together
        (1: one after another); a group's :class:`Completion` timings are the group's (``merge``,
        ``prefill`` and ``first_token`` of all its prompts at once). Raises
        :class:`~ktm.model.PromptError` whose ``index`` is the prompt's in ``prompts``."""
        if isinstance(prompts, str):
            raise TypeError("expected a list of prompts, got a single string")
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
        if isinstance(sampling, list):
            if len(sampling) != len(prompts):
                raise ValueError(f"{len(sampling)} samplings for {len(prompts)} prompts")
            seeded = sampling
        else:
            sampling = sampling or Sampling()
            seeded = [dataclasses.replace(sampling, seed=sampling.seed + i) for i in range(len(prompts))]
        if batch_size == 1:
            return [self.complete(p, max_new_tokens, s) for p, s in zip(prompts, seeded)]
        out = []
        for at in range(0, len(prompts), batch_size):
            out += self._generate_group(prompts[at:at + batch_size], max_new_tokens, seeded[at:at + batch_size], at)
        return out

    def _generate_group(self, prompts, max_new_tokens, samplings, first_index) -> list[Completion]:
        t0 = time.perf_counter()
        merged = []
        for i, p in enumerate(prompts):
            try:
                merged.append(self.merge(p, max_new_tokens))
            except PromptError as e:
                raise PromptError(first_index + i, e.detail) from e
        t_merged = time.perf_counter()
        with self._lock:
            group = self._group_context(len(prompts), max(len(m) for _, m in merged) + max_new_tokens)
            t1 = time.perf_counter()
            tokens, reasons, (prefilled, first) = group.decode([m for _, m in merged], max_new_tokens,
                                                  [s.picker() for s in samplings], self.eos_ids)
        t2 = time.perf_counter()
        decode = self.prompts.tokenizer.decode
        timings = {"merge": t_merged - t0, "prefill": prefilled - t1, "first_token": first - t0, "total": t2 - t0}
        return [Completion(decode(t, skip_special_tokens=True), t, r, len(ids), len(m), dict(timings))
                for (ids, m), t, r in zip(merged, tokens, reasons)]

    def _group_context(self, n_seq: int, positions: int) -> SequenceContext:
        """The batched context, made (again) when it has fewer sequences or positions than needed:
        positions rounded up to a power of two (at least 256, at most ``n_ctx``)."""
        g = self._group
        if g is None or g.n_seq < n_seq or g.n_ctx_seq < positions:
            if g is not None:
                g.close()
                self._group = None
            size = min(max(256, 1 << (positions - 1).bit_length()), max(self.n_ctx, positions))
            self._group = SequenceContext(self._api, self.llm, max(n_seq, g.n_seq if g else 1), size,
                                          self.n_batch, self.prompts.hidden_size)
        return self._group
