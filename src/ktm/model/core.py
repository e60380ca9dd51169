"""KTokenMerging: one object that owns the tokenizer, the LoRA-adapted base LM and the encoder.

What the LLM reads for a prompt of n tokens is ``ceil(n / K)`` merged embeddings (see
:mod:`ktm.model.blocks` for the block and fill rules), followed, in training, by the answer's
ordinary token embeddings and the end token. ``forward(prompts, answers)`` returns the loss
over the answer and end tokens (vocabulary logits only at those positions);
``generate(prompts)`` prefills the merged prompts and decodes with a KV cache.

Example::

    m = KTokenMerging.from_base("default", k=4)        # embedded SmolLM2-135M-Instruct
    out = m(["Review: great shoes, Label:"], ["positive"])
    out.loss.backward()
    m.generate(["Review: great shoes, Label:"], max_new_tokens=4)
"""

from __future__ import annotations

import math
import numbers
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .. import __version__
from .blocks import (
    answer_targets,
    block_slots,
    concat_right_padded,
    fill_blocks,
    num_blocks,
    pad_sequences,
    position_ids,
    segment_layout,
    segmented_length,
)
from ..checkpoint import (
    ADAPTER_DIR,
    ADAPTER_FIELDS,
    ADAPTER_FILE,
    CONFIG_NAME,
    ENCODER_NAME,
    FUNCTION_FIELDS,
    TOKENIZER_DIR,
    CheckpointError,
    check_compatible,
    load_weights,
    read_config,
    resolve_folder,
    weight_hashes,
    write_dir,
)
from ..config import ModelConfig, from_dict, save_json, to_dict
from .encoder import build_encoder, encoder_stages
from ..loading import describe_base, embedding_fingerprint, load_base, load_tokenizer
from .methods import TOKEN_METHODS, select_tokens
from .segments import TASK_CUE, check_segments, keep_mask, kept_ranges, segments_of


@dataclass
class LossOutput:
    """What a forward pass gives: the task loss and what the auxiliary losses need.

    ``loss``: mean cross-entropy over all target tokens of the batch (plus the auxiliary
    terms once :func:`ktm.train.objectives.add_auxiliary` has added them); ``logits``: (N, V)
    float32 logits at the N target positions; ``targets``: (N,) token ids; ``rows``: (N,)
    batch row of each target (to sum per example); ``parts``: each loss term, detached
    (``{"task": ...}`` plus any auxiliary term); ``prompt_ids``: the prompts' token ids;
    ``merged``: their merged embeddings; ``hidden``: the LLM's last hidden states (B, T, d);
    ``hidden_states``: every layer's, when asked for (``all_layers``); ``ends``: whether each
    row's last target is the end token (``forward(..., end_token=True)``)."""

    loss: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor
    parts: dict = field(default_factory=dict)
    prompt_ids: list = field(default_factory=list)
    merged: list = field(default_factory=list)
    hidden: torch.Tensor | None = None
    hidden_states: tuple | None = None
    ends: bool = True


class KTokenMerging(nn.Module):
    """A causal LM that reads prompts merged K tokens at a time.

    Build with :meth:`from_base` or :meth:`from_pretrained`. Trainable parameters are the
    LoRA adapters and the encoder; the base weights and embedding table stay frozen.
    """

    def __init__(self, lm, tokenizer, encoder: nn.Module, config: ModelConfig,
                 base_reference: str, base_fingerprint: str):
        super().__init__()
        self.lm = lm  # peft PeftModel around the base causal LM
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.config = config
        self.base_reference = base_reference
        self.base_fingerprint = base_fingerprint
        causal = lm.get_base_model()
        self._decoder = getattr(causal, causal.base_model_prefix)
        self._lm_head = causal.get_output_embeddings()
        self.max_length = getattr(causal.config, "max_position_embeddings", None)
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(causal, "generation_config", None), "eos_token_id", None)
        eos |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
        eos.discard(None)
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no end-of-sequence token; set tokenizer.eos_token")
        self.eos_ids = sorted(eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._static = None  # a ktm.model.compiled.StaticDecoder after enable_compile()
        if config.context_layers:
            self._context_stack()  # fails now, not at the first prompt, for too many layers

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_base(cls, model=None, k: int = 4, tokenizer=None, *, dtype=None, device=None,
                  seed: int | None = None, trust_remote_code: bool | None = None,
                  **options) -> "KTokenMerging":
        """Wrap a base causal LM: LoRA adapters + a fresh merge encoder.

        Args:
            model: hub id, local folder, ``.gguf`` path, ``PreTrainedModel`` or ``None`` /
                ``"default"`` (the embedded SmolLM2-135M-Instruct); see :mod:`ktm.loading`.
            k: block size (1 = uncompressed baseline, same code path).
            tokenizer: the model's tokenizer (loaded alongside the model when omitted).
            dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"`` (bf16 on GPU).
            device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
            seed: seeds the encoder and LoRA initialisation.
            trust_remote_code: let transformers run Python code shipped with the model (an
                ``auto_map`` in its config): only for code you trust. Default False (or
                ``KTM_TRUST_REMOTE_CODE=1``); see :func:`ktm.loading.trust_remote_code_setting`.
            **options: any :class:`ktm.config.ModelConfig` field (``lora_r=16``, ...).
        """
        config = ModelConfig(k=k, **options)
        base, tokenizer, ref = load_base(model, tokenizer, dtype=dtype, device=device,
                                         trust_remote_code=trust_remote_code)
        if seed is not None:
            torch.manual_seed(seed)
        return cls._assemble(base, tokenizer, config, ref)

    @classmethod
    def _assemble(cls, base, tokenizer, config: ModelConfig, ref: str,
                  fingerprint: str | None = None) -> "KTokenMerging":
        from peft import LoraConfig, get_peft_model

        if config.keep == TASK_CUE:
            raise ValueError("keep='cue' names a task's cue: train_run resolves it (ktm.model.segments.task_keep_pattern); "
                             "give the model a regular expression")
        fingerprint = fingerprint or embedding_fingerprint(base)
        targets = list(config.lora_targets)
        if config.lora_lm_head and not _tied(base):
            targets.append("lm_head")
        for p in base.parameters():
            p.requires_grad_(False)
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                          lora_dropout=config.lora_dropout, target_modules=targets,
                          bias="none", task_type="CAUSAL_LM")
        lm = get_peft_model(base, lora)
        dim = base.get_input_embeddings().weight.shape[1]
        encoder = build_encoder(config.k, dim, config.encoder_hidden, config.encoder_init,
                                config.encoder_norm, config.encoder_stages)
        encoder.to(base.get_input_embeddings().weight.device)
        if config.method != "merge":  # the block mean, or no encoder at all: nothing to train
            encoder.requires_grad_(False)
        return cls(lm, tokenizer, encoder, config, ref, fingerprint)

    # ------------------------------------------------------------------ properties
    @property
    def k(self) -> int:
        return self.config.k

    @property
    def device(self) -> torch.device:
        return self._embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._embedding.weight.dtype

    @property
    def _embedding(self) -> nn.Embedding:
        return self.lm.get_input_embeddings()

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by group: ``{"lora": [...], "encoder": [...]}``."""
        return {
            "lora": [p for p in self.lm.parameters() if p.requires_grad],
            "encoder": [p for p in self.encoder.parameters() if p.requires_grad],
        }

    # ------------------------------------------------------------------ the LLM's pieces
    @property
    def llm_config(self):
        """The LLM's transformers configuration (layers, heads, hidden size, ...)."""
        return self._decoder.config

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of token ``ids`` (any shape) from the LLM's frozen input table."""
        return self._embedding(ids)

    def embed_each(self, ids: list[list[int]]) -> list[torch.Tensor]:
        """The token embeddings of each id list, (n_i, d), from one lookup."""
        flat = torch.tensor([t for x in ids for t in x], dtype=torch.long, device=self.device)
        return list(self.embed(flat).split([len(x) for x in ids]))

    def decode(self, embeds: torch.Tensor, mask: torch.Tensor, cache=None, all_layers: bool = False,
               positions: torch.Tensor | None = None):
        """Run the LLM's layers on ``embeds`` (B, T, d) under ``mask``.

        ``mask`` covers the cache and the new positions (B, cached + T); position ids count
        real tokens only (or are ``positions``, (B, T)). With ``cache`` (from
        :meth:`new_cache` or a ``StaticCache``) the keys and values are appended to it.
        Returns the transformers output: ``last_hidden_state`` and, with ``all_layers``,
        ``hidden_states`` (embeddings, then every layer).
        """
        if positions is None:
            positions = position_ids(mask)[:, -embeds.shape[1]:]
        return self._decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=cache is not None,
                             output_hidden_states=all_layers)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (float32) of hidden states (..., d)."""
        return self._lm_head(hidden).float()

    def new_cache(self):
        """An empty KV cache that grows as positions are decoded."""
        from transformers import DynamicCache

        return DynamicCache(config=self._decoder.config)

    def prefill(self, ids: list[list[int]], keep: list[list[bool]] | None = None):
        """The first step of :meth:`generate` from token ids (and kept tokens, as in
        :meth:`merge_ids`): merge, left-pad, run the LLM into a new cache. Returns ``(logits
        of each prompt's last position (B, V), cache, mask)``."""
        embeds, mask = pad_sequences(self.merge_ids(ids, keep), side="left")
        cache = self.new_cache()
        hidden = self.decode(embeds, mask, cache).last_hidden_state
        return self.logits(hidden[:, -1]), cache, mask

    def with_k(self, k: int, **changes) -> "KTokenMerging":
        """A model for block size ``k`` on the same LLM, LoRA and tokenizer (shared, not
        copied), with a fresh encoder (same initialisation and width rule, device and
        dtype). ``changes``: other :class:`ModelConfig` fields to change, e.g.
        ``context_layers=0``. ``self`` when ``k`` is already its K and nothing changes."""
        import dataclasses

        if k == self.k and all(getattr(self.config, name) == v for name, v in changes.items()):
            return self
        config = dataclasses.replace(self.config, k=k, encoder_stages=None, **changes)
        enc_dtype = next(self.encoder.parameters()).dtype
        encoder = build_encoder(k, self.encoder.dim, config.encoder_hidden, config.encoder_init,
                                config.encoder_norm)
        encoder.to(device=self.device, dtype=enc_dtype)
        encoder.requires_grad_(config.method == "merge")
        m = KTokenMerging(self.lm, self.tokenizer, encoder, config, self.base_reference, self.base_fingerprint)
        return m.train(self.training)

    # ------------------------------------------------------------------ prompts
    def tokenize(self, texts: list[str], what: str = "prompt") -> list[list[int]]:
        """Token ids of each text, without special tokens; rejects empty texts."""
        if isinstance(texts, str):
            raise TypeError(f"expected a list of {what}s, got a single string")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"{what} {i} is a {type(t).__name__}, not a string")
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
        if what == "prompt":
            for i, x in enumerate(ids):
                if len(x) == 0:
                    raise ValueError(f"prompt {i} is empty: nothing to merge")
        return ids

    def merge_ids(self, ids: list[list[int]], keep: list[list[bool]] | None = None) -> list[torch.Tensor]:
        """Merged embeddings of each prompt: list of (ceil(n_i / K), d) tensors.

        All prompts' blocks go through the encoder as one flat batch; each prompt's blocks
        start at its own first token (no batch padding is ever merged). With a token-space
        ``config.method`` (a baseline, see :mod:`ktm.model.methods`) the embeddings of the
        ``ceil(n_i / K)`` kept tokens are returned instead.

        ``keep`` (segmented prompts, :mod:`ktm.model.segments`): per prompt, whether each token is
        kept. Kept tokens are read as their own embeddings, unchanged, and each run of merged
        tokens is merged K at a time from its own first token
        (:func:`ktm.model.blocks.segment_layout`); prompt i then gives (segmented_length, d).
        """
        if keep is not None and not any(any(x) for x in keep):
            keep = None  # nothing kept: exactly the plain path
        if self.config.method in TOKEN_METHODS:  # a token-space baseline: kept tokens, read plainly
            if keep is not None:
                raise ValueError(f"method {self.config.method!r} selects tokens itself: kept spans need "
                                 f"method 'merge' or 'mean'")
            return self.embed_each(select_tokens(ids, self.k, self.config.method))
        lengths = [len(x) for x in ids]
        if keep is None:
            (index, valid, per), source = block_slots(lengths, self.k), None
        else:
            index, valid, source, per = segment_layout(keep, self.k)
        flat = torch.tensor([t for x in ids for t in x], dtype=torch.long, device=self.device)
        emb = tokens = self._embedding(flat)
        if self.config.context_layers:  # contextual merging: merge what the first layers made of them
            emb = self._contextual(emb, lengths)
        valid = valid.to(self.device)
        blocks = fill_blocks(emb[index.to(self.device)], valid)
        enc_dtype = next(self.encoder.parameters()).dtype
        merged = self.encoder(blocks.to(enc_dtype), valid).to(emb.dtype)
        if source is not None:  # kept tokens between the merged blocks, as they are
            merged = torch.cat([merged, tokens])[source.to(self.device)]
        return list(merged.split(per))

    def _contextual(self, emb: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Contextual merging: the outputs of the first ``config.context_layers`` layers of the
        adapted LLM reading each prompt in full (right-padded, its own causal mask and
        positions 0 .. n-1), for the flat token embeddings ``emb`` (sum n_i, d) of prompts of
        ``lengths``; same shape and order. With ``config.context_norm`` each output is rescaled
        to its token embedding's norm: a few layers in, the residual stream is far larger than
        an embedding (the first position most of all), and the merged vectors enter the LLM
        where it reads embeddings."""
        x, mask = pad_sequences(list(emb.split(lengths)), side="right")
        out = self._context_stack()(inputs_embeds=x, attention_mask=mask, position_ids=position_ids(mask),
                                    use_cache=False).last_hidden_state
        hidden = out[mask.bool()]
        if self.config.context_norm:
            scale = emb.float().norm(dim=-1, keepdim=True) / hidden.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
            hidden = hidden * scale.to(hidden.dtype)
        return hidden.to(emb.dtype)

    def _context_stack(self) -> nn.Module:
        """The LLM's decoder cut to its first ``config.context_layers`` layers, without the final
        norm: a shallow copy sharing every module and weight (LoRA, and disabling it, included),
        made per call so that it follows the decoder's train/eval mode and device."""
        import copy

        j, layers = self.config.context_layers, getattr(self._decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList) or j > len(layers):
            raise ValueError(f"context_layers = {j} needs a decoder with at least {j} layers in .layers "
                             f"(Llama-style); this one has {len(layers) if layers is not None else 'none'}")
        stack = copy.copy(self._decoder)
        stack._modules = dict(self._decoder._modules)
        stack.layers = layers[:j]
        for name in ("norm", "final_layernorm", "ln_f"):
            if isinstance(stack._modules.get(name), nn.Module):
                stack._modules[name] = nn.Identity()
        return stack

    def merge_prompts(self, prompts: list, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
        """Exactly what the LLM reads for these prompts (strings or segment lists).

        Returns ``(inputs_embeds (B, M, d), attention_mask (B, M))`` padded on ``side``
        (left by default, as for generation), M = the longest merged prompt.
        """
        ids, keep = self.tokenize_prompts(prompts)
        self._check_length(ids, extra=0, keep=keep)
        return pad_sequences(self.merge_ids(ids, keep), side=side)

    def tokenize_prompts(self, prompts: list) -> tuple[list[list[int]], list[list[bool]] | None]:
        """Token ids of each prompt and which tokens are kept (None: none is).

        A prompt is a string, split by ``config.keep`` when it is set, or a list of
        ``("merge" | "keep", text)`` segments (:mod:`ktm.model.segments`), taken as given. The
        segments' texts are joined and tokenised whole, so the ids are those of the plain
        prompt; a token overlapping a kept span is kept (needs a fast tokenizer; a slow one
        tokenises each segment on its own).
        """
        if isinstance(prompts, str):
            raise TypeError("expected a list of prompts, got a single string")
        segs = [segments_of(p, self.config.keep) if isinstance(p, str) else check_segments(p) for p in prompts]
        texts = ["".join(t for _, t in s) for s in segs]
        ranges = [kept_ranges(s) for s in segs]
        ids = self.tokenize(texts)  # checks types and empty prompts
        if not any(ranges):
            return ids, None
        if not getattr(self.tokenizer, "is_fast", False):  # no offsets: each segment on its own
            parts = [[self.tokenize([t], "answer")[0] for _, t in s] for s in segs]
            return ([sum(p, []) for p in parts],
                    [[kind == "keep" for (kind, _), x in zip(s, p) for _ in x] for s, p in zip(segs, parts)])
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return ids, [keep_mask(o, r) for o, r in zip(enc["offset_mapping"], ranges)]

    def merged_lengths(self, prompts: list) -> list[int]:
        """How many embeddings the LLM reads for each prompt: ceil(tokens / K), or with kept
        spans ceil(n / K) per merged run plus the kept tokens."""
        ids, keep = self.tokenize_prompts(prompts)
        return [self._read_length(x, None if keep is None else keep[i]) for i, x in enumerate(ids)]

    def compressed_length(self, prompt) -> int:
        """How many embeddings the LLM reads for one prompt (:meth:`merged_lengths`)."""
        return self.merged_lengths([prompt])[0]

    def _read_length(self, ids: list[int], keep: list[bool] | None) -> int:
        if self.config.method in TOKEN_METHODS or keep is None:
            return num_blocks(len(ids), self.k)
        return segmented_length(keep, self.k)

    def _check_length(self, ids, extra, keep=None) -> None:
        if self.max_length is None:
            return
        for i, x in enumerate(ids):
            extra_i = extra[i] if isinstance(extra, (list, tuple)) else extra
            need = self._read_length(x, None if keep is None else keep[i]) + extra_i
            if self.config.context_layers and len(x) > self.max_length:
                raise ValueError(f"prompt {i} is too long for contextual merging: its first layers read all "
                                 f"{len(x)} tokens > {self.max_length} positions the model allows")
            if need > self.max_length:
                raise ValueError(
                    f"prompt {i} is too long for the model: {len(x)} tokens merge to "
                    f"{need - extra_i} embeddings, + {extra_i} answer/new tokens = "
                    f"{need} > {self.max_length} positions the model allows"
                )

    # ------------------------------------------------------------------ training
    def forward(self, prompts: list[str], answers: list[str], *, all_layers: bool = False,
                end_token: bool = True) -> LossOutput:
        """Next-token cross-entropy over each answer's tokens and the end token.

        The LLM reads [merged prompt][answer tokens][end token] per row (right-padded,
        padding masked); vocabulary logits are computed only where a target exists.
        The output also carries what the auxiliary losses of :mod:`ktm.train.objectives` need
        (every layer's hidden states with ``all_layers``); the trainer adds them with
        :func:`ktm.train.objectives.add_auxiliary`. ``end_token=False`` leaves the end token out
        (an answer that is a text cut mid-way, :class:`ktm.tasks.text.TextTask`): the answer's
        last token is then the last target. A prompt is a string or a list of ``("merge" |
        "keep", text)`` segments (:meth:`tokenize_prompts`).
        """
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        p_ids, keep = self.tokenize_prompts(prompts)
        eos = self.tokenizer.eos_token_id
        a_ids = [x + [eos] if end_token else x for x in self.tokenize(answers, what="answer")]
        if not all(a_ids):
            raise ValueError("without the end token every answer needs at least one token")
        self._check_length(p_ids, extra=[len(a) - 1 for a in a_ids], keep=keep)
        merged = self.merge_ids(p_ids, keep)
        # the last answer token (the end token) is a target but never an input
        a_flat = torch.tensor([t for a in a_ids for t in a], dtype=torch.long, device=self.device)
        embeds, mask = concat_right_padded(merged, self.embed_each([a[:-1] for a in a_ids]))
        dec = self.decode(embeds, mask, all_layers=all_layers)
        hidden = dec.last_hidden_state
        rows, cols, _ = answer_targets([m.shape[0] for m in merged], [len(a) for a in a_ids])
        rows, cols = rows.to(self.device), cols.to(self.device)
        logits = self.logits(hidden[rows, cols])
        loss = F.cross_entropy(logits, a_flat)
        return LossOutput(loss, logits, a_flat, rows, {"task": loss.detach()}, p_ids, merged, hidden,
                          dec.hidden_states if all_layers else None, end_token)

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, prompts: list[str], max_new_tokens: int = 16, *, do_sample: bool = False,
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
        ids, keep = self.tokenize_prompts(prompts)
        self._check_length(ids, extra=max_new_tokens, keep=keep)
        pick = _Picker(do_sample, temperature, top_k, top_p, generator)
        end_ids = self.eos_ids if stop_at_end else []
        eos = torch.tensor(end_ids, dtype=torch.long, device=self.device)
        done = torch.zeros(len(ids), dtype=torch.bool, device=self.device)
        out: list[torch.Tensor] = []
        if use_cache and self._static is None:
            logits, cache, mask = self.prefill(ids, keep)  # what the speed benchmark times
            step = self._cached_steps(cache, mask)
        else:
            embeds, mask = pad_sequences(self.merge_ids(ids, keep), side="left")
            if use_cache:
                logits, step = self._static.start(embeds, mask, max_new_tokens)
            else:
                logits, step = self._rerun_steps(embeds, mask)
        for i in range(max_new_tokens):
            nxt = pick(logits, torch.cat(out, 1) if out else None)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            out.append(nxt[:, None])
            done |= torch.isin(nxt, eos)
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            logits = step(self.embed(nxt[:, None]))
        tokens = torch.cat(out, 1).tolist()
        result = []
        for row in tokens:
            cut = next((i for i, t in enumerate(row) if t in end_ids), len(row))
            result.append(row[:cut])
        if return_tokens:
            return result
        return [self.tokenizer.decode(r, skip_special_tokens=True) for r in result]

    def _cached_steps(self, cache, mask: torch.Tensor):
        """``step(new_embeds (B, 1, d))``: append one token per row to ``cache`` (whose
        positions ``mask`` covers) and return its logits (B, V)."""
        state = {"mask": mask}

        def step(new_embeds: torch.Tensor) -> torch.Tensor:
            state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], 1)
            return self.logits(self.decode(new_embeds, state["mask"], cache).last_hidden_state[:, -1])

        return step

    def _rerun_steps(self, embeds: torch.Tensor, mask: torch.Tensor):
        """The authors' release: ``(first logits, step)``, where every step re-runs the
        whole sequence with the new token appended (no cache)."""
        state = {"embeds": embeds, "mask": mask}

        def run() -> torch.Tensor:
            return self.logits(self.decode(state["embeds"], state["mask"]).last_hidden_state[:, -1])

        def step(new_embeds: torch.Tensor) -> torch.Tensor:
            state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], 1)
            state["embeds"] = torch.cat([state["embeds"], new_embeds], 1)
            return run()

        return run(), step

    def enable_compile(self, mode="reduce-overhead", **options) -> "KTokenMerging":
        """Decode with static shapes, compiled (see :mod:`ktm.model.compiled`); returns ``self``.

        ``mode``: ``"reduce-overhead"`` (inductor + CUDA graphs), ``"default"`` (inductor),
        ``"cudagraphs"`` (CUDA graphs alone), None (static shapes, not compiled), or a
        :class:`~ktm.model.compiled.StaticDecoder` to share (models of several K on one LLM).
        ``options``: ``prompt_bucket``, ``cache_bucket``, ``dynamic`` of
        :class:`ktm.model.compiled.StaticDecoder`. The answers are those of eager decoding (up to
        floating-point rounding); the first call per shape pays the compilation.
        """
        from .compiled import StaticDecoder

        if isinstance(mode, StaticDecoder):
            if options:
                raise ValueError("options go to a new StaticDecoder, not to a shared one")
            if mode.model.lm is not self.lm:
                raise ValueError("that StaticDecoder runs another model's LLM")
            self._static = mode
        else:
            self._static = StaticDecoder(self, mode, **options)
        return self

    def disable_compile(self) -> "KTokenMerging":
        """Back to eager decoding with a growing cache; returns ``self``."""
        self._static = None
        return self

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write adapter (peft, safetensors), encoder, tokenizer and ``ktm_config.json``.

        The folder is written beside its destination and renamed into place, so an
        interrupted save never leaves a half-written checkpoint.
        """
        def write(tmp: Path) -> None:
            self.lm.save_pretrained(tmp / ADAPTER_DIR, safe_serialization=True, save_embedding_layers=False)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()},
                      str(tmp / ENCODER_NAME))
            self.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            save_json(tmp / CONFIG_NAME, {**self.describe(), "files": weight_hashes(tmp)})

        return write_dir(path, write)

    def describe(self) -> dict:
        """The content of ``ktm_config.json``."""
        return {
            "ktm_version": __version__,
            "model": to_dict(self.config),
            "encoder": {"k": self.encoder.k, "dim": self.encoder.dim,
                        "hidden": self.encoder.hidden, "init": self.encoder.init,
                        "stages": list(encoder_stages(self.encoder))},
            "base": {"reference": self.base_reference, "embedding_fingerprint": self.base_fingerprint,
                     "model_type": getattr(self.lm.get_base_model().config, "model_type", None)},
        }

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, base=None, tokenizer=None, *, dtype=None,
                        device=None, k: int | None = None,
                        trust_remote_code: bool | None = None) -> "KTokenMerging":
        """Load a folder written by :meth:`save_pretrained`.

        Args:
            base: base model reference or object; default: the reference saved in the folder.
            tokenizer: default: the tokenizer saved in the folder.
            k: if given, the checkpoint must have been trained for this K.
            trust_remote_code: let transformers run Python code shipped with the checkpoint's
                tokenizer or the base model (default False; see :meth:`from_base`).
        When the base reference saved in the folder is used, one line on stderr says which
        base model is loaded and from where (local folder, GGUF file, embedded default or
        hub id). Raises :class:`CheckpointError` for a missing or corrupt folder, another K, or a
        base model whose embedding table differs from the one the checkpoint was trained on.
        """
        path = resolve_folder(path)
        meta = read_config(path)
        try:
            config = from_dict(ModelConfig, meta["model"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path / CONFIG_NAME} holds invalid model settings: {e}") from e
        check_compatible(meta, path, k=k)
        if tokenizer is None and (path / TOKENIZER_DIR).is_dir():
            tokenizer = load_tokenizer(path / TOKENIZER_DIR, trust_remote_code=trust_remote_code)
        ref = base if base is not None else meta["base"]["reference"]
        if base is None:
            print(f"ktm: loading the base model of checkpoint {path}: {describe_base(ref)}", file=sys.stderr)
        base_model, tokenizer, ref_str = load_base(ref, tokenizer, dtype=dtype, device=device,
                                                   trust_remote_code=trust_remote_code)
        got_fp = embedding_fingerprint(base_model)
        if got_fp != meta["base"]["embedding_fingerprint"]:
            raise CheckpointError(
                f"{path} was trained on base model {meta['base']['reference']!r} (embedding "
                f"fingerprint {meta['base']['embedding_fingerprint']}), but the base model given "
                f"({ref_str!r}) has fingerprint {got_fp}: a different model or different weights")
        model = cls._assemble(base_model, tokenizer, config, meta["base"]["reference"], got_fp)
        model.load_trained(path)
        return model

    def load_trained(self, path: str | os.PathLike, adapter_only: bool = False) -> None:
        """Load the encoder and LoRA weights of a saved folder into this model.

        The folder must be for the same K, encoder shape and base model (checked against
        the embedding fingerprint); raises :class:`CheckpointError` otherwise. With
        ``adapter_only`` only the LoRA weights are loaded, from a model of any K (e.g. a
        K = 1 model trained on the task, to start a K = 4 model from), and the encoder is
        left as it is.
        """
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        path = resolve_folder(path)
        meta = read_config(path)
        check_compatible(meta, path, fingerprint=self.base_fingerprint, config=self.config,
                         fields=ADAPTER_FIELDS if adapter_only else FUNCTION_FIELDS)
        if not adapter_only:
            enc_state = load_weights(meta, path, ENCODER_NAME)
            want = {k: tuple(v.shape) for k, v in self.encoder.state_dict().items()}
            got = {k: tuple(v.shape) for k, v in enc_state.items()}
            if want != got:
                raise CheckpointError(
                    f"{path / ENCODER_NAME} does not fit an encoder for K = {self.k}, "
                    f"d = {self.encoder.dim}: expected {want}, found {got}"
                )
            self.encoder.load_state_dict(enc_state)
        adapter = load_weights(meta, path, f"{ADAPTER_DIR}/{ADAPTER_FILE}")
        # as saved (save_pretrained): without the base embedding / untied lm_head weights
        expected = set(get_peft_model_state_dict(self.lm, save_embedding_layers=False))
        missing, unexpected = sorted(expected - set(adapter)), sorted(set(adapter) - expected)
        if missing or unexpected:
            raise CheckpointError(
                f"{path / ADAPTER_DIR / ADAPTER_FILE} does not hold this model's LoRA weights: "
                f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
        set_peft_model_state_dict(self.lm, adapter)

    def grow_from(self, path: str | os.PathLike) -> None:
        """Start from a trained model of a smaller block size (hierarchical merging).

        The saved model's LoRA weights are loaded, and its encoder becomes this model's
        first encoder stage(s); the remaining stages keep their initialisation (with
        ``encoder_init="mean"`` they average the saved encoder's outputs). For example a
        K = 2 model grows into K = 4 with ``encoder_stages=(2, 2)``. Raises
        :class:`CheckpointError` when the saved stages are not a proper prefix of this
        model's, or the encoders differ in norm matching or residual.
        """
        path = resolve_folder(path)
        meta = read_config(path)
        saved = from_dict(ModelConfig, meta["model"])
        src = tuple(saved.encoder_stages or (saved.k,))
        mine = encoder_stages(self.encoder)
        if len(src) >= len(mine) or mine[:len(src)] != src:
            raise CheckpointError(
                f"{path} has encoder stages {list(src)} (K = {saved.k}); to grow from it, this "
                f"model's encoder_stages must start with them and add at least one (it has {list(mine)})"
            )
        if saved.encoder_norm != self.config.encoder_norm or \
                (saved.encoder_init == "random") != (self.config.encoder_init == "random"):
            raise CheckpointError(
                f"{path} has encoder_norm={saved.encoder_norm}, encoder_init={saved.encoder_init!r}; "
                f"this model has encoder_norm={self.config.encoder_norm}, "
                f"encoder_init={self.config.encoder_init!r}: the stages would compute differently"
            )
        self.load_trained(path, adapter_only=True)
        state = load_weights(meta, path, ENCODER_NAME)
        if len(src) == 1:
            state = {f"stages.0.{k}": v for k, v in state.items()}
        want = self.encoder.state_dict()
        bad = [k for k, v in state.items() if k not in want or tuple(want[k].shape) != tuple(v.shape)]
        if bad:
            raise CheckpointError(f"{path / ENCODER_NAME} does not fit this model's first stages: {bad[:3]}")
        self.encoder.load_state_dict({**want, **state})


def load_teacher(path, student, base=None):
    """Load a saved K = 1 ktm model as the teacher of ``student`` (frozen, eval mode).

    The teacher must read plain prompts (K = 1) and sit on the same base model (same
    embedding fingerprint), or positions and vocabularies would not line up. ``base``: as in
    :meth:`KTokenMerging.from_pretrained` (default: the reference saved with the teacher).
    """
    meta = read_config(path)
    if meta["model"].get("k") != 1:
        raise CheckpointError(f"{path}: a teacher must read plain prompts (K = 1), this model has "
                              f"K = {meta['model'].get('k')}")
    check_compatible(meta, path, fingerprint=student.base_fingerprint)
    teacher = KTokenMerging.from_pretrained(path, base=base, device=student.device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


#: the name this function had before ktm.checkpoint existed (scripts may use it)
read_checkpoint_config = read_config


def _tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is None or out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


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


class _Picker:
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
