"""Static-shape decoding, for ``torch.compile`` and CUDA graphs.

:meth:`KTokenMerging.generate` normally grows a ``DynamicCache`` by one position per new
token, so every step has new shapes. That suits eager mode; but on a GPU a short prompt
spends most of its time launching kernels, not running them. :class:`StaticDecoder` fixes
the shapes so that ``torch.compile`` can fuse kernels and CUDA graphs can replay a whole
forward pass at once:

* the merged prompts are left-padded to a multiple of ``prompt_bucket`` positions (padding is
  masked and position ids count real tokens only, so the answer does not change);
* the KV cache is a transformers ``StaticCache`` of a multiple of ``cache_bucket`` positions,
  kept per (batch size, cache length, dtype, device) and reset between calls, so compiled graphs
  are reused;
* the attention mask covers the whole cache from the first step (the prompt's mask, then
  ones): the causal mask hides the slots not written yet, so the mask never changes shape.

Use it through the model: ``m.enable_compile("reduce-overhead")`` (inductor + CUDA graphs),
``"default"`` (inductor), ``"cudagraphs"`` (CUDA graphs without inductor), or ``None``
(static shapes, eager: to check the path itself). ``m.disable_compile()`` goes back.

The first call with a new shape compiles (tens of seconds on a GPU); later calls reuse it.
"""

from __future__ import annotations

import torch

from .blocks import position_ids

#: accepted ``mode`` values: torch.compile's modes, "cudagraphs" (the backend of that
#: name, no inductor) and None (no compilation)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "cudagraphs")


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``n`` (``n`` >= 0, ``multiple`` >= 1).

    >>> round_up(0, 64), round_up(1, 64), round_up(64, 64), round_up(65, 64)
    (0, 64, 64, 128)
    """
    if multiple < 1:
        raise ValueError(f"bucket sizes must be >= 1, got {multiple}")
    return -(-n // multiple) * multiple


def left_pad_to(embeds: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad (B, M, d) embeddings and their (B, M) mask with masked zeros to ``length``."""
    extra = length - embeds.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad {embeds.shape[1]} positions down to {length}")
    if extra == 0:
        return embeds, mask
    pad_e = embeds.new_zeros(embeds.shape[0], extra, embeds.shape[2])
    pad_m = mask.new_zeros(mask.shape[0], extra)
    return torch.cat([pad_e, embeds], 1), torch.cat([pad_m, mask], 1)


def cache_mask(prompt_mask: torch.Tensor, total: int) -> torch.Tensor:
    """The attention mask of a whole static cache: the prompt's (B, M) mask, then ones up to
    ``total`` slots (slots not written yet are hidden by the causal mask).

    >>> cache_mask(torch.tensor([[0, 1, 1]]), 5).tolist()
    [[0, 1, 1, 1, 1]]
    """
    ones = prompt_mask.new_ones(prompt_mask.shape[0], total - prompt_mask.shape[1])
    return torch.cat([prompt_mask, ones], 1)


class StaticDecoder:
    """Prefill and one-token steps of a :class:`~ktm.model.KTokenMerging` with static shapes.

    Args:
        model: the KTokenMerging whose decoder and output layer are run.
        mode: a ``torch.compile`` mode, ``"cudagraphs"``, or None (no compilation).
        prompt_bucket: merged prompts are left-padded to a multiple of this many positions.
        cache_bucket: the cache holds a multiple of this many positions.
        dynamic: passed to ``torch.compile`` (None: recompile once with dynamic shapes when
            a second shape is seen).
        backend: a ``torch.compile`` backend to use instead of the mode's (e.g.
            ``"aot_eager"``, which traces like inductor but compiles nothing: for tests).
    """

    def __init__(self, model, mode: str | None = "reduce-overhead", *, prompt_bucket: int = 64,
                 cache_bucket: int = 256, dynamic: bool | None = None, backend: str | None = None):
        if mode is not None and mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {COMPILE_MODES} or None, got {mode!r}")
        round_up(1, prompt_bucket), round_up(1, cache_bucket)  # validates both
        self.model, self.mode, self.backend = model, mode, backend
        self.prompt_bucket, self.cache_bucket = prompt_bucket, cache_bucket
        self.caches: dict = {}
        # two functions, so that dynamo keeps the prefill's and the step's graphs apart
        self._prefill = self._compile(self._prefill_fn, dynamic)
        self._step = self._compile(self._step_fn, dynamic)

    def _compile(self, fn, dynamic):
        if self.mode is None:
            return fn
        if self.backend is not None:
            return torch.compile(fn, backend=self.backend, dynamic=dynamic)
        if self.mode == "cudagraphs":
            return torch.compile(fn, backend="cudagraphs", dynamic=dynamic)
        return torch.compile(fn, mode=self.mode, dynamic=dynamic)

    def _prefill_fn(self, embeds, mask, pos, cache):
        return self._forward_last(embeds, mask, pos, cache)

    def _step_fn(self, embeds, mask, pos, cache):
        return self._forward_last(embeds, mask, pos, cache)

    def _forward_last(self, embeds, mask, pos, cache):
        m = self.model
        return m.logits(m.decode(embeds, mask, cache, positions=pos).last_hidden_state[:, -1])

    def _cache(self, batch: int, total: int, dtype, device):
        """A reset StaticCache for (batch, total) slots, made once and reused."""
        from transformers import StaticCache

        key = (batch, total, dtype, device)
        cache = self.caches.get(key)
        if cache is None:
            cfg = self.model.llm_config
            heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            cache = StaticCache(config=cfg, max_cache_len=total)
            # allocated here, outside any compiled region, so its tensors get static addresses
            cache.early_initialization(batch, heads, head_dim, dtype, device)
            self.caches[key] = cache
        else:
            cache.reset()
        return cache

    def _call(self, fn, *args):
        if self.backend is None and self.mode in ("reduce-overhead", "max-autotune", "cudagraphs"):
            # each call starts a new CUDA-graph step; its outputs are read before the next call
            torch.compiler.cudagraph_mark_step_begin()
        return fn(*args)

    def start(self, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int):
        """Prefill left-padded ``embeds`` (B, M, d) / ``mask`` (B, M) for ``max_new_tokens``.

        Returns ``(logits (B, V) of the last prompt position, step)``, where
        ``step(new_embeds (B, 1, d))`` appends one token per row and returns its logits.
        """
        batch, m_len, _ = embeds.shape
        padded = round_up(m_len, self.prompt_bucket)
        embeds, mask = left_pad_to(embeds, mask, padded)
        total = round_up(padded + max_new_tokens, self.cache_bucket)
        cache = self._cache(batch, total, embeds.dtype, embeds.device)
        full_mask = cache_mask(mask, total)
        logits = self._call(self._prefill, embeds, full_mask, position_ids(mask), cache)
        next_pos = mask.long().sum(1, keepdim=True)  # position id of the first new token
        written = [0]

        def step(new_embeds: torch.Tensor) -> torch.Tensor:
            if written[0] >= total - padded:
                raise RuntimeError(f"the static cache holds {total - padded} new tokens; all are used")
            pos = next_pos + written[0]
            written[0] += 1
            return self._call(self._step, new_embeds, full_mask, pos, cache)

        return logits, step


def enable_compile(model, mode="reduce-overhead", **options):
    """Decode with static shapes, compiled (see :mod:`ktm.model.compiled`); returns ``model``.

    ``mode``: ``"reduce-overhead"`` (inductor + CUDA graphs), ``"default"`` (inductor),
    ``"cudagraphs"`` (CUDA graphs alone), None (static shapes, not compiled), or a
    :class:`~ktm.model.compiled.StaticDecoder` to share (models of several K on one LLM).
    ``options``: ``prompt_bucket``, ``cache_bucket``, ``dynamic`` of
    :class:`ktm.model.compiled.StaticDecoder`. The answers are those of eager decoding (up to
    floating-point rounding); the first call per shape pays the compilation.
    """
    if isinstance(mode, StaticDecoder):
        if options:
            raise ValueError("options go to a new StaticDecoder, not to a shared one")
        if mode.model.lm is not model.lm:
            raise ValueError("that StaticDecoder runs another model's LLM")
        model.static_decoder = mode
    else:
        model.static_decoder = StaticDecoder(model, mode, **options)
    return model
