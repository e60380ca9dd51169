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

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..loading import embedding_fingerprint, load_base, weights_fingerprint
from . import compiled, generation, io
from .blocks import answer_targets, concat_right_padded, pad_sequences, position_ids
from .encoder import encoder_from_config
from .prompts import PromptMerger
from .segments import TASK_CUE


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
    row's last target is the end token (``forward(..., end_token=True)``); ``cols``: (N,) the
    column of each target's position in ``hidden``."""

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
    cols: torch.Tensor | None = None


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
        #: ktm.loading.weights_fingerprint of the base (all its tensors, sampled); set by assemble
        self.base_weights_fingerprint = None
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
        #: a ktm.model.compiled.StaticDecoder after enable_compile(), else None (eager decoding)
        self.static_decoder = None
        #: tokenises and merges prompts (shared with the client-side encoder of ktm.serve)
        self.merger = PromptMerger(tokenizer, lm.get_input_embeddings(), encoder, config, self.max_length,
                                   self._contextual)
        if config.context_layers:
            first_layers(self._decoder, config.context_layers)  # fails now, not at the first prompt


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
        return cls.from_config(ModelConfig(k=k, **options), model, tokenizer, dtype=dtype, device=device,
                               seed=seed, trust_remote_code=trust_remote_code)

    @classmethod
    def from_config(cls, config: ModelConfig, model=None, tokenizer=None, *, dtype=None, device=None,
                    seed: int | None = None, trust_remote_code: bool | None = None) -> "KTokenMerging":
        """:meth:`from_base` with the whole :class:`ModelConfig` given as one object."""
        base, tokenizer, ref = load_base(model, tokenizer, dtype=dtype, device=device,
                                         trust_remote_code=trust_remote_code)
        if seed is not None:
            torch.manual_seed(seed)
        return cls.assemble(base, tokenizer, config, ref)

    @classmethod
    def assemble(cls, base, tokenizer, config: ModelConfig, ref: str,
                 fingerprint: str | None = None) -> "KTokenMerging":
        """LoRA adapters on the loaded ``base`` and a fresh encoder for ``config``
        (``ref``: how the base was named; ``fingerprint``: its embedding fingerprint, computed
        when not given)."""
        from peft import LoraConfig, get_peft_model

        if config.keep == TASK_CUE:
            raise ValueError("keep='cue' names a task's cue: train_run resolves it (ktm.model.segments.task_keep_pattern); "
                             "give the model a regular expression")
        fingerprint = fingerprint or embedding_fingerprint(base)
        weights = weights_fingerprint(base)  # before LoRA wraps it
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
        encoder = encoder_from_config(config, dim)
        encoder.to(base.get_input_embeddings().weight.device)
        if config.method != "merge":  # the block mean, or no encoder at all: nothing to train
            encoder.requires_grad_(False)
        model = cls(lm, tokenizer, encoder, config, ref, fingerprint)
        model.base_weights_fingerprint = weights
        return model

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
        return self.merger.embed_each(ids)

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
        embeds, mask = pad_sequences(self.merger.merge_ids(ids, keep), side="left")
        cache = self.new_cache()
        hidden = self.decode(embeds, mask, cache).last_hidden_state
        return self.logits(hidden[:, -1]), cache, mask

    def with_k(self, k: int, **changes) -> "KTokenMerging":
        """A model for block size ``k`` on the same LLM, LoRA and tokenizer (shared, not
        copied), with a fresh encoder (same initialisation and width rule, device and
        dtype). ``changes``: other :class:`ModelConfig` fields to change, e.g.
        ``context_layers=0``. ``self`` when ``k`` is already its K and nothing changes."""
        if k == self.k and all(getattr(self.config, name) == v for name, v in changes.items()):
            return self
        config = dataclasses.replace(self.config, k=k, encoder_stages=None, **changes)
        enc_dtype = next(self.encoder.parameters()).dtype
        encoder = encoder_from_config(config, self.encoder.dim)
        encoder.to(device=self.device, dtype=enc_dtype)
        encoder.requires_grad_(config.method == "merge")
        m = KTokenMerging(self.lm, self.tokenizer, encoder, config, self.base_reference, self.base_fingerprint)
        m.base_weights_fingerprint = self.base_weights_fingerprint
        return m.train(self.training)
    # ------------------------------------------------------------------ prompts (ktm.model.prompts)
    def tokenize(self, texts: list[str], what: str = "prompt") -> list[list[int]]:
        """Token ids of each text, without special tokens; rejects empty prompts."""
        return self.merger.tokenize(texts, what)

    def tokenize_prompts(self, prompts: list) -> tuple[list[list[int]], list[list[bool]] | None]:
        """Token ids of each prompt and which tokens are kept (:meth:`PromptMerger.tokenize_prompts`)."""
        return self.merger.tokenize_prompts(prompts)

    def merge_ids(self, ids: list[list[int]], keep: list[list[bool]] | None = None) -> list[torch.Tensor]:
        """Merged embeddings of each prompt, (ceil(n_i / K), d) (:meth:`PromptMerger.merge_ids`)."""
        return self.merger.merge_ids(ids, keep)

    def merge_prompts(self, prompts: list, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
        """Exactly what the LLM reads for these prompts (strings or segment lists).

        Returns ``(inputs_embeds (B, M, d), attention_mask (B, M))`` padded on ``side``
        (left by default, as for generation), M = the longest merged prompt.
        """
        ids, keep = self.merger.tokenize_prompts(prompts)
        self.merger.check_length(ids, extra=0, keep=keep)
        return pad_sequences(self.merger.merge_ids(ids, keep), side=side)

    def merged_lengths(self, prompts: list) -> list[int]:
        """How many embeddings the LLM reads for each prompt (:meth:`PromptMerger.merged_lengths`)."""
        return self.merger.merged_lengths(prompts)

    def compressed_length(self, prompt) -> int:
        """How many embeddings the LLM reads for one prompt (:meth:`merged_lengths`)."""
        return self.merger.merged_lengths([prompt])[0]

    def _contextual(self, emb: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Contextual merging: the outputs of the first ``config.context_layers`` layers of the
        adapted LLM reading each prompt in full (right-padded, its own causal mask and
        positions 0 .. n-1), for the flat token embeddings ``emb`` (sum n_i, d) of prompts of
        ``lengths``; same shape and order. With ``config.context_norm`` each output is rescaled
        to its token embedding's norm: a few layers in, the residual stream is far larger than
        an embedding (the first position most of all), and the merged vectors enter the LLM
        where it reads embeddings."""
        x, mask = pad_sequences(list(emb.split(lengths)), side="right")
        stack = first_layers(self._decoder, self.config.context_layers)
        out = stack(inputs_embeds=x, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).last_hidden_state
        hidden = out[mask.bool()]
        if self.config.context_norm:
            scale = emb.float().norm(dim=-1, keepdim=True) / hidden.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
            hidden = hidden * scale.to(hidden.dtype)
        return hidden.to(emb.dtype)



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
        p_ids, keep = self.merger.tokenize_prompts(prompts)
        eos = self.tokenizer.eos_token_id
        a_ids = [x + [eos] if end_token else x for x in self.merger.tokenize(answers, what="answer")]
        if not all(a_ids):
            raise ValueError("without the end token every answer needs at least one token")
        self.merger.check_length(p_ids, extra=[len(a) - 1 for a in a_ids], keep=keep)
        merged = self.merger.merge_ids(p_ids, keep)
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
                          dec.hidden_states if all_layers else None, end_token, cols)


    # ------------------------------------------------------------------ generation (ktm.model.generation)
    generate = generation.generate

    enable_compile = compiled.enable_compile

    def disable_compile(self) -> "KTokenMerging":
        """Back to eager decoding with a growing cache; returns ``self``."""
        self.static_decoder = None
        return self


    # ------------------------------------------------------------------ save / load (ktm.model.io)
    save_pretrained = io.save_pretrained
    describe = io.describe
    from_pretrained = classmethod(io.from_pretrained)
    load_trained = io.load_trained
    grow_from = io.grow_from
    push_to_hub = io.push_to_hub


def _tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is None or out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def first_layers(decoder: nn.Module, j: int) -> nn.Module:
    """The LLM's ``decoder`` cut to its first ``j`` layers (contextual merging), without the final
    norm: a shallow copy sharing every module and weight (LoRA, and disabling it, included),
    made per call so that it follows the decoder's train/eval mode and device."""
    import copy

    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or j > len(layers):
        raise ValueError(f"context_layers = {j} needs a decoder with at least {j} layers in .layers "
                         f"(Llama-style); this one has {len(layers) if layers is not None else 'none'}")
    stack = copy.copy(decoder)
    stack._modules = dict(decoder._modules)
    stack.layers = layers[:j]
    for name in ("norm", "final_layernorm", "ln_f"):
        if isinstance(stack._modules.get(name), nn.Module):
            stack._modules[name] = nn.Identity()
    return stack
