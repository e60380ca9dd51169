"""Several merged prompts decoded together on llama.cpp: one context, one KV stream per sequence.

:meth:`ktm.serve.llamacpp.LlamaCppEngine.generate` with ``batch_size`` > 1 answers its prompts
in groups through :class:`SequenceContext`:

1. prefill: the merged rows of all the group's prompts are packed into ``llama_batch``es of up
   to ``n_batch`` rows, each row tagged with its prompt's sequence id and position; the logits
   of each prompt's last row are kept;
2. each step decodes one token of every unfinished sequence in a single ``llama_decode`` (one
   row per sequence), and the next tokens are picked on the host, each sequence with its own
   picker (its own random stream when sampling), until an end token or ``max_new_tokens``.

The context has ``kv_unified`` off, so each sequence has a KV stream of its own and never attends
to another; each row's matrix products are those of that row alone, so a prompt's greedy answer
is the one it gets decoded by itself (``tests/serve/test_llamacpp_batch.py``).

llama-cpp-python's ``Llama`` builds its context for one sequence (``n_seq_max`` is not one of
its options), so this is a second context on the same loaded model, made with
``llama_init_from_model`` from a copy of the first one's parameters; it holds
``n_seq x n_ctx_seq`` KV positions and is freed by :meth:`SequenceContext.close`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import numpy as np


class LlamaBatch:
    """A ``llama_batch`` of up to ``size`` rows, each of one sequence, with numpy views of its
    arrays; ``dim`` > 0: embeddings of that width, else token ids."""

    def __init__(self, api, size: int, dim: int):
        self.api, self.size, self.dim = api, size, dim
        self.batch = api.llama_batch_init(size, dim, 1)
        b = self.batch
        self.pos = np.ctypeslib.as_array(b.pos, shape=(size,))
        self.flags = np.ctypeslib.as_array(ctypes.cast(b.logits, ctypes.POINTER(ctypes.c_int8)), shape=(size,))
        np.ctypeslib.as_array(b.n_seq_id, shape=(size,))[:] = 1
        self.seq = np.zeros(size, dtype=np.int64)  # what each row's seq_id[0] holds
        for i in range(size):
            b.seq_id[i][0] = 0
        self.data = (np.ctypeslib.as_array(b.embd, shape=(size * dim,)) if dim
                     else np.ctypeslib.as_array(b.token, shape=(size,)))

    def put(self, rows: np.ndarray, pos: np.ndarray, seq: np.ndarray, out: np.ndarray) -> None:
        """Rows (n,) token ids or (n, dim) embeddings at positions ``pos`` of sequences ``seq``;
        ``out``: the rows whose logits llama.cpp keeps."""
        n = len(rows)
        self.batch.n_tokens = n
        self.data[:rows.size] = rows.reshape(-1)
        self.pos[:n] = pos
        self.flags[:n] = out
        for i in np.flatnonzero(self.seq[:n] != seq):
            self.batch.seq_id[i][0] = int(seq[i])
            self.seq[i] = seq[i]

    def fill(self, rows: np.ndarray, start: int, last: bool) -> None:
        """Rows of sequence 0 at positions ``start ..``; logits of the last row when ``last``."""
        n = len(rows)
        out = np.zeros(n, dtype=np.int8)
        out[-1] = 1 if last else 0
        self.put(rows, np.arange(start, start + n), np.zeros(n, dtype=np.int64), out)

    def free(self) -> None:
        if self.batch is not None:
            self.api.llama_batch_free(self.batch)
            self.batch = None


class SequenceContext:
    """A llama.cpp context on ``llm``'s model (a ``llama_cpp.Llama``) for ``n_seq`` sequences of
    up to ``n_ctx_seq`` positions each, prefilling embeddings of width ``dim``."""

    def __init__(self, api, llm, n_seq: int, n_ctx_seq: int, n_batch: int, dim: int):
        if not 1 <= n_seq <= min(n_batch, api.llama_max_parallel_sequences()):
            raise ValueError(f"cannot decode {n_seq} sequences together: llama.cpp takes 1 to "
                             f"{min(n_batch, api.llama_max_parallel_sequences())}")
        params = api.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_seq_max, params.n_ctx, params.kv_unified = n_seq, n_seq * n_ctx_seq, False
        params.n_batch = params.n_ubatch = n_batch
        self.api, self.n_batch, self.n_vocab = api, n_batch, llm.n_vocab()
        self.ctx = api.llama_init_from_model(llm.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context for {n_seq} sequences of {n_ctx_seq} positions")
        self.n_seq, self.n_ctx_seq = n_seq, api.llama_n_ctx(self.ctx) // n_seq
        self.embd, self.tokens = LlamaBatch(api, n_batch, dim), LlamaBatch(api, n_batch, 0)

    def close(self) -> None:
        self.embd.free()
        self.tokens.free()
        if self.ctx:
            self.api.llama_free(self.ctx)
            self.ctx = None

    def _decode(self, batch: LlamaBatch, what: str) -> None:
        rc = self.api.llama_decode(self.ctx, batch.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}) {what}")

    def _logits(self, row: int) -> np.ndarray:
        ptr = self.api.llama_get_logits_ith(self.ctx, row)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def prefill(self, merged: list[np.ndarray]) -> list[np.ndarray]:
        """Sequence i reads ``merged[i]`` (M_i, d) float32 from position 0 (the cache is cleared
        first); the logits (V,) of each one's last position."""
        self.api.llama_memory_clear(self.api.llama_get_memory(self.ctx), True)
        lengths = [len(m) for m in merged]
        rows = np.ascontiguousarray(np.concatenate(merged), dtype=np.float32)
        pos = np.concatenate([np.arange(n) for n in lengths])
        seq = np.repeat(np.arange(len(merged)), lengths)
        last = np.cumsum(lengths) - 1
        out = np.zeros(len(rows), dtype=np.int8)
        out[last] = 1
        logits: list[np.ndarray | None] = [None] * len(merged)
        for at in range(0, len(rows), self.n_batch):
            end = min(at + self.n_batch, len(rows))
            self.embd.put(rows[at:end], pos[at:end], seq[at:end], out[at:end])
            self._decode(self.embd, f"prefilling rows {at}..{end - 1} of {len(merged)} prompts")
            for s in np.flatnonzero((last >= at) & (last < end)):
                logits[s] = self._logits(int(last[s] - at))
        return logits

    def decode(self, merged: list[np.ndarray], max_new_tokens: int, pickers: list[Callable],
               eos_ids: set[int]) -> tuple[list[list[int]], list[str], tuple[float, float]]:
        """Answer each merged prompt (sequence i picks with ``pickers[i]``): the new tokens (end
        token left out), finish reasons (``"stop"``/``"length"``) and when the prefill ended and
        the first tokens were picked (``time.perf_counter``)."""
        import time

        if len(merged) > self.n_seq or max(len(m) for m in merged) + max_new_tokens > self.n_ctx_seq:
            raise ValueError(f"{len(merged)} prompts do not fit this context ({self.n_seq} sequences of "
                             f"{self.n_ctx_seq} positions)")
        logits = self.prefill(merged)
        prefilled = time.perf_counter()
        tokens: list[list[int]] = [[] for _ in merged]
        reasons = ["length"] * len(merged)
        active, first = list(range(len(merged))), None
        for step in range(max_new_tokens):
            going = []
            for s in active:
                token = pickers[s](logits[s])
                if token in eos_ids:
                    reasons[s] = "stop"
                    continue
                tokens[s].append(token)
                going.append(s)
            first = first or time.perf_counter()
            if not going or step == max_new_tokens - 1:
                break
            seq = np.array(going, dtype=np.int64)
            self.tokens.put(np.array([tokens[s][-1] for s in going], dtype=np.int32),
                            np.array([len(merged[s]) + step for s in going]), seq, np.ones(len(going), dtype=np.int8))
            self._decode(self.tokens, f"at step {step} of {len(going)} sequences")
            for row, s in enumerate(going):
                logits[s] = self._logits(row)
            active = going
        return tokens, reasons, (prefilled, first)
