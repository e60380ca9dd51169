"""Generation: prefill the merged prompts, then decode token by token (greedy or sampled).

:func:`generate` is the body of :meth:`ktm.model.KTokenMerging.generate`; :func:`cached_steps`
and :func:`rerun_steps` are its two ways of producing the next position's logits (B, V): a
growing KV cache, or the whole sequence re-run (the authors' release). After
``enable_compile`` the model's ``static_decoder`` (:mod:`ktm.model.compiled`) takes the cached
path with static shapes.
"""

from __future__ import annotations

import math
import numbers

import torch

from .blocks import pad_sequences


def check_sampling(do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> None:
    """Reject decoding options that are out of range, or that would be silently ignored.

    ``temperature`` must be finite and > 0, ``top_k`` >= 1, ``top_p`` in (0, 1]; and these
    only apply when sampling, so giving any of them (temperature other than 1) without
    ``do_sample=True`` is an error rather than a silent greedy decode.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None for no top-k cut), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0.0 < top_p <= 1.0):  # NaN fails the comparison too
        raise ValueError(f"top_p must be in (0, 1] (or None for no nucleus cut), got {top_p!r}")
    if not do_sample:
        given = [f"{name}={value!r}" for name, value, unset in
                 [("temperature", temperature, 1.0), ("top_k", top_k, None), ("top_p", top_p, None)]
                 if value != unset]
        if given:
            raise ValueError(f"{', '.join(given)} only apply when sampling, and decoding is greedy: "
                             f"pass do_sample=True (ktm generate: --sample), or leave them out")


class Picker:
    """Chooses the next token: argmax, or sampling through transformers' logits warpers."""

    def __init__(self, do_sample, temperature, top_k, top_p, generator):
        check_sampling(do_sample, temperature, top_k, top_p)
        self.do_sample, self.generator = do_sample, generator
        self.warpers = []
        if do_sample:
            from transformers.generation.logits_process import (
                TemperatureLogitsWarper,
                TopKLogitsWarper,
                TopPLogitsWarper,
            )

            if temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(temperature))
            if top_k is not None:
                self.warpers.append(TopKLogitsWarper(top_k))
            if top_p is not None and top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, logits: torch.Tensor, so_far: torch.Tensor | None) -> torch.Tensor:
        if not self.do_sample:
            return logits.argmax(-1)
        ids = so_far if so_far is not None else logits.new_zeros((logits.shape[0], 0), dtype=torch.long)
        for w in self.warpers:
            logits = w(ids, logits)
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)


@torch.inference_mode()
def generate(model, prompts: list[str], max_new_tokens: int = 16, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True,
             return_tokens: bool = False, stop_at_end: bool = True) -> list[str] | list[list[int]]:
    """Answer each prompt: prefill the merged prompt, then decode token by token.

    Greedy by default; ``do_sample=True`` samples with ``temperature``, ``top_k`` and
    ``top_p``. Each row stops at an end token. ``use_cache=False`` re-runs the whole
    sequence for every new token (the authors' release; for checks and benchmarks).
    After :meth:`enable_compile`, cached decoding runs with static shapes, compiled.
    ``stop_at_end=False`` produces exactly ``max_new_tokens`` per row, end tokens included
    (benchmarks). A prompt is a string or a list of ``("merge" | "keep", text)`` segments
    (:meth:`tokenize_prompts`), e.g. ``[("merge", context), ("keep", question)]``.
    Returns decoded texts (special tokens dropped), or token ids with ``return_tokens``.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_sampling(do_sample, temperature, top_k, top_p)
    ids, keep = model.tokenize_prompts(prompts)
    model.merger.check_length(ids, extra=max_new_tokens, keep=keep)
    pick = Picker(do_sample, temperature, top_k, top_p, generator)
    end_ids = model.eos_ids if stop_at_end else []
    eos = torch.tensor(end_ids, dtype=torch.long, device=model.device)
    done = torch.zeros(len(ids), dtype=torch.bool, device=model.device)
    out: list[torch.Tensor] = []
    if use_cache and model.static_decoder is None:
        logits, cache, mask = model.prefill(ids, keep)  # what the speed benchmark times
        step = cached_steps(model, cache, mask)
    else:
        embeds, mask = pad_sequences(model.merger.merge_ids(ids, keep), side="left")
        if use_cache:
            logits, step = model.static_decoder.start(embeds, mask, max_new_tokens)
        else:
            logits, step = rerun_steps(model, embeds, mask)
    for i in range(max_new_tokens):
        nxt = pick(logits, torch.cat(out, 1) if out else None)
        nxt = torch.where(done, torch.full_like(nxt, model.pad_id), nxt)
        out.append(nxt[:, None])
        done |= torch.isin(nxt, eos)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = step(model.embed(nxt[:, None]))
    tokens = torch.cat(out, 1).tolist()
    result = []
    for row in tokens:
        cut = next((i for i, t in enumerate(row) if t in end_ids), len(row))
        result.append(row[:cut])
    if return_tokens:
        return result
    return [model.tokenizer.decode(r, skip_special_tokens=True) for r in result]


def cached_steps(model, cache, mask: torch.Tensor):
    """``step(new_embeds (B, 1, d))``: append one token per row to ``cache`` (whose
    positions ``mask`` covers) and return its logits (B, V)."""
    state = {"mask": mask}

    def step(new_embeds: torch.Tensor) -> torch.Tensor:
        state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], 1)
        return model.logits(model.decode(new_embeds, state["mask"], cache).last_hidden_state[:, -1])

    return step

def rerun_steps(model, embeds: torch.Tensor, mask: torch.Tensor):
    """The authors' release: ``(first logits, step)``, where every step re-runs the
    whole sequence with the new token appended (no cache)."""
    state = {"embeds": embeds, "mask": mask}

    def run() -> torch.Tensor:
        return model.logits(model.decode(state["embeds"], state["mask"]).last_hidden_state[:, -1])

    def step(new_embeds: torch.Tensor) -> torch.Tensor:
        state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], 1)
        state["embeds"] = torch.cat([state["embeds"], new_embeds], 1)
        return run()

    return run(), step
