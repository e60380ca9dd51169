"""Typed options shared by the Python API, the CLI and the saved ``ktm_config.json``.

Each field has one name everywhere: ``ModelConfig.lora_r`` is ``--lora-r`` on the command
line and ``"lora_r"`` in the JSON file. Configs validate themselves on construction.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .typecheck import check_types, literal_choices, show_value  # noqa: F401 (re-exported)

#: the choices of the string options, as types (argparse offers exactly these)
EncoderInit = typing.Literal["mean", "paper", "random"]
Decay = typing.Literal["constant", "cosine"]
AlignMode = typing.Literal["cosine", "standardized"]
MixedPrecision = typing.Literal["auto", "no", "bf16", "fp16"]
Method = typing.Literal["merge", "mean", "keep-first", "keep-last", "stride", "random-drop"]
#: hidden-state alignment modes (ktm.train.objectives.alignment_loss)
ALIGN_MODES = typing.get_args(AlignMode)
INITS = typing.get_args(EncoderInit)  # the merge encoder's initialisations (ktm.model.encoder)

#: Encoder settings that only a merging model may change, at the values a model that merges
#: nothing keeps (another method; the K = 1 teacher and references): validated here, cleared by
#: ``ktm.train.phases.train_teacher`` and by the Pareto grid's unmerged cells.
MERGE_ONLY_DEFAULTS = {"encoder_stages": None, "encoder_norm": False, "encoder_layernorm": False}
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_k(k: int) -> int:
    """Validate a block size: an integer >= 1 (K = 1 is the uncompressed baseline)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"K must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"K must be >= 1 (K = 1 is the uncompressed baseline), got K = {k}")
    return k


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class ModelConfig:
    """How the merged model is built around a base causal LM."""

    k: int = _help("block size K: tokens merged into one embedding (1 = uncompressed)", default=4)
    method: Method = _help(
        "how a prompt is shortened K-fold (ktm.model.methods): merge (K-Token Merging), mean (the block "
        "mean, not trained), or a token-space baseline keeping ceil(n/K) tokens: keep-first, keep-last, "
        "stride, random-drop", default="merge")
    keep: str | None = _help(
        "keep spans of every prompt uncompressed: a regular expression whose matches are read "
        "token by token while the rest is merged (ktm.model.segments), or 'cue' for the task's cue "
        "(tree: 'Parent: .., Child: .., Answer: ', amazon: 'Label:'; saved resolved)", default=None)
    encoder_hidden: int | None = _help(
        "encoder MLP width h (default: the paper's int(a*K)*d)", default=None
    )
    encoder_init: EncoderInit = _help(f"encoder initialisation, one of {INITS}", default="mean")
    encoder_norm: bool = _help(
        "rescale each merged embedding to the mean norm of its block's token embeddings",
        default=False)
    encoder_layernorm: bool = _help(
        "a learned LayerNorm on each merged embedding (centred, scaled to its block's mean token norm, then "
        "a gain and a bias); excludes encoder_norm", default=False)
    encoder_stages: tuple[int, ...] | None = _help(
        "hierarchical merging: block sizes of successive encoder stages, multiplying to K "
        "(e.g. 2 2 for K = 4; default: one stage of K)", default=None)
    context_layers: int = _help(
        "contextual merging: the first j layers of the LoRA-adapted LLM read the full prompt and "
        "their outputs, not the token embeddings, are merged (0: the paper's method)", default=0)
    context_norm: bool = _help(
        "contextual merging: rescale each of those outputs to its token embedding's norm before "
        "merging (the scale the LLM's first layer reads)", default=True)
    lora_r: int = _help("LoRA rank", default=4)
    lora_alpha: float = _help("LoRA alpha", default=16.0)
    lora_dropout: float = _help("LoRA dropout", default=0.05)
    lora_targets: tuple[str, ...] = _help(
        "module names that get LoRA adapters", default=DEFAULT_LORA_TARGETS
    )
    lora_lm_head: bool = _help(
        "also adapt lm_head (only where it is not tied to the input embeddings)", default=True
    )

    def __post_init__(self):
        check_types(self)
        check_k(self.k)
        if self.encoder_init not in INITS:
            raise ValueError(f"encoder_init must be one of {INITS}, got {self.encoder_init!r}")
        if self.encoder_stages is not None:
            self.encoder_stages = tuple(int(s) for s in self.encoder_stages)
            if not self.encoder_stages or any(s < 1 for s in self.encoder_stages):
                raise ValueError(f"encoder_stages must be block sizes >= 1, got {self.encoder_stages}")
            if math.prod(self.encoder_stages) != self.k:
                raise ValueError(
                    f"encoder_stages {self.encoder_stages} multiply to {math.prod(self.encoder_stages)}, "
                    f"not K = {self.k}")
        if self.method != "merge":
            changed = [name for name, value in MERGE_ONLY_DEFAULTS.items() if getattr(self, name) != value]
            changed += ["encoder_init"] if self.encoder_init != "mean" else []
            if changed:
                raise ValueError(f"method {self.method!r} does not train an encoder: leave {', '.join(changed)} at "
                                 f"the default ({', '.join(MERGE_ONLY_DEFAULTS)} off, encoder_init 'mean')")
        if self.encoder_norm and self.encoder_layernorm:
            raise ValueError("encoder_norm and encoder_layernorm both normalise the merged embedding: choose one")
        if self.context_layers < 0:
            raise ValueError(f"context_layers must be >= 0, got {self.context_layers}")
        if self.context_layers and self.method not in ("merge", "mean"):
            raise ValueError(f"context_layers merges hidden states: method {self.method!r} keeps tokens, "
                             f"use method 'merge' or 'mean'")
        if self.keep is not None:
            try:
                re.compile(self.keep)
            except re.error as e:
                raise ValueError(f"keep must be a regular expression, got {self.keep!r}: {e}") from None
            if self.method not in ("merge", "mean"):
                raise ValueError(f"keep needs method 'merge' or 'mean' ({self.method!r} selects tokens itself)")
        if self.encoder_hidden is not None and self.encoder_hidden < 1:
            raise ValueError(f"encoder_hidden must be >= 1, got {self.encoder_hidden}")
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        self.lora_targets = tuple(self.lora_targets)


@dataclass(frozen=True)
class LossWeights:
    """The weight of each loss term of a training step (:func:`ktm.train.objectives.add_auxiliary`);
    the fields are :class:`TrainConfig`'s of the same names, which document them."""

    task_loss: float = 1.0
    reconstruct: float = 0.0
    reconstruct_rows: int = 0
    distill: float = 0.0
    distill_answer: float = 0.0
    distill_hidden: tuple[int, ...] = ()
    distill_hidden_weight: float = 1.0
    align: float = 0.0
    align_mode: AlignMode = "cosine"

    def __post_init__(self):
        check_types(self)

    @property
    def hidden(self) -> bool:
        """Whether hidden-state distillation is on."""
        return bool(self.distill_hidden and self.distill_hidden_weight)

    @property
    def all_layers(self) -> bool:
        """Whether the forward pass must return every layer's hidden states."""
        return bool(self.align) or self.hidden

    @property
    def auxiliary(self) -> bool:
        """Whether any term besides the task loss is on."""
        return bool(self.reconstruct or self.distill or self.align or self.distill_answer or self.hidden)

    @property
    def trains(self) -> bool:
        """Whether some term has a weight."""
        return bool(self.task_loss) or self.auxiliary


@dataclass
class TrainConfig:
    """One training run (a recipe fills the learning-rate fields)."""

    steps: int = _help("optimiser steps", default=200)
    batch_size: int = _help("examples per optimiser step (per process)", default=16)
    grad_accum: int = _help("micro-batches per step (batch_size must divide evenly)", default=1)
    lr: float = _help("AdamW learning rate for LoRA", default=1e-4)
    encoder_lr: float | None = _help("learning rate for the encoder (default: lr)", default=None)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    warmup_steps: int = _help("linear warm-up steps", default=0)
    merger_warmup: int = _help(
        "steps at the start of the run in which only the encoder (the merger) learns, LoRA frozen "
        "at learning rate 0; LoRA then warms up over warmup_steps (0: joint training from step 0)", default=0)
    merger_warmup_lr: float | None = _help(
        "the encoder's learning rate during merger_warmup (default: its own rate)", default=None)
    decay: Decay = _help("learning-rate schedule after warm-up: constant or cosine", default="constant")
    cooldown: int = _help(
        "the last N steps of the run (up to --steps) scale the rate down linearly to 0, on top of "
        "--decay: a warm-up-stable-decay run, or a last piece that anneals a long constant-rate run "
        "(0: none)", default=0)
    max_grad_norm: float | None = _help("gradient clipping norm (none: off)", default=1.0)
    eval_every: int = _help("evaluate every N steps (0: only at the end)", default=0)
    eval_examples: int = _help("held-out examples per evaluation (0: all)", default=400)
    save_every: int = _help("checkpoint every N steps (0: only at the end)", default=0)
    max_minutes: float | None = _help(
        "stop this piece of the run after N minutes of training (checkpointed and evaluated as at the last "
        "step; --resume continues it): for a machine lent for a fixed time (none: no limit)", default=None)
    seed: int = _help("random seed (data order, dropout, init)", default=0)
    balance: bool = _help("sample classes equally (classification tasks)", default=False)
    reconstruct: float = _help(
        "weight of the auxiliary loss of recovering the prompt's tokens from its merged "
        "embeddings (0: off; ktm.train.objectives)", default=0.0)
    reconstruct_rows: int = _help(
        "rows of each batch that also get the reconstruction loss (0: all)", default=0)
    distill: float = _help(
        "weight of dense self-distillation from the base model reading the plain prompt "
        "(0: off; ktm.train.objectives)", default=0.0)
    distill_answer: float = _help(
        "weight of distillation on the answer tokens: at each answer position the student's "
        "next-token distribution moves towards the teacher's (the base model, or --teacher) reading "
        "the plain prompt and the answer so far (0: off; ktm pretrain's main loss)", default=0.0)
    distill_hidden: tuple[int, ...] = _help(
        "layers (1 = the first, -1 = the last) whose hidden states at each answer position move "
        "towards the teacher's at the same answer position (cosine distance; needs the teacher's "
        "plain reading of prompt and answer, as distill_answer; empty: off)", default=())
    distill_hidden_weight: float = _help("weight of the distill_hidden term", default=1.0)
    mixed_precision: MixedPrecision = _help(
        "autocast the forward and backward passes: 'bf16' (CPUs with AVX-512 BF16 or AMX, and GPUs), "
        "'fp16' (GPUs) or 'no'; 'auto' takes accelerate's own setting (ACCELERATE_MIXED_PRECISION, "
        "set by `accelerate launch` from its config) when there is one, else bf16 for a float32 "
        "model on a GPU and no on a CPU", default="auto")
    task_loss: float = _help(
        "weight of the answer's cross-entropy (0: train on the auxiliary losses alone)", default=1.0)
    align: float = _help(
        "weight of hidden-state alignment with the teacher at every block end and layer "
        "(0: off; ktm.train.objectives)", default=0.0)
    align_mode: AlignMode = _help(
        "alignment distance: 'cosine' on the raw hidden states, or 'standardized' (per-dimension "
        "standardised by the teacher's batch statistics, attention-sink position left out)",
        default="cosine")
    teacher: str | None = _help(
        "a saved K = 1 ktm model to distil/align from, or 'auto' to train one first on the "
        "same task in OUT/teacher (default: the base model itself)", default=None)
    teacher_steps: int = _help("steps per task of the K = 1 teacher that --teacher auto trains",
                               default=250)
    grow_from: str | None = _help(
        "hierarchical merging: a saved ktm model of a smaller K whose LoRA and encoder become "
        "this model's first encoder stages, or 'auto' to train that model first in "
        "OUT/grow-k<K'> with the same settings (stages default to pairs: 2 2 for K = 4)",
        default=None)
    grow_steps: int | None = _help(
        "steps per task of each smaller model that --grow-from auto trains (default: --steps)",
        default=None)
    phase_threshold: float | None = _help(
        "held-out accuracy that the automatic teacher and smaller models must reach before the "
        "next phase starts: a phase below it trains more rounds of its steps on the last task, "
        "at most phase_rounds rounds in all (default: none, a fixed number of steps)",
        default=None)
    phase_rounds: int = _help("most rounds of a phase with phase_threshold", default=3)

    def loss_weights(self) -> "LossWeights":
        """The loss terms' weights of this run, as one object for :func:`ktm.train.objectives.add_auxiliary`."""
        return LossWeights(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LossWeights)})

    def __post_init__(self):
        check_types(self)
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})"
            )
        if self.lr <= 0 or any(v is not None and v <= 0 for v in (self.encoder_lr, self.merger_warmup_lr)):
            raise ValueError("learning rates must be > 0")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")
        if self.decay not in ("constant", "cosine"):
            raise ValueError(f"decay must be 'constant' or 'cosine', got {self.decay!r}")
        for name in ("eval_every", "eval_examples", "save_every", "warmup_steps", "reconstruct", "distill",
                     "distill_answer", "task_loss", "reconstruct_rows", "align", "teacher_steps",
                     "distill_hidden_weight", "merger_warmup", "cooldown"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if 0 in self.distill_hidden:
            raise ValueError("distill_hidden counts layers from 1 (the first) or from -1 (the last); "
                             "0 (the input embeddings) is not a layer")
        if not self.loss_weights().trains:
            raise ValueError("task_loss is 0 and no auxiliary loss is on: nothing to train")
        if self.align_mode not in ALIGN_MODES:
            raise ValueError(f"align_mode must be one of {ALIGN_MODES}, got {self.align_mode!r}")
        if self.grow_steps is not None and self.grow_steps < 1:
            raise ValueError(f"grow_steps must be >= 1, got {self.grow_steps}")
        if self.phase_threshold is not None and not 0.0 < self.phase_threshold <= 1.0:
            raise ValueError(f"phase_threshold is an accuracy in (0, 1], got {self.phase_threshold}")
        if self.phase_rounds < 1:
            raise ValueError(f"phase_rounds must be >= 1, got {self.phase_rounds}")


def to_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def from_dict(cls, data: dict):
    """Build a config from a dict (e.g. a saved JSON file), rejecting unknown keys and values
    of the wrong type (:func:`check_types`; JSON lists become tuples) with a clear message."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} settings must be a JSON object (a dict of field: value), "
                        f"got {show_value(data)}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**data)


def save_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as JSON atomically: a reader sees the old file or the new one, never half."""
    from .checkpoint import write_text

    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class Runtime:
    """Where and how a run loads its models: the machine's choices, never saved with a model
    (a saved ``ktm_config.json`` holds :class:`ModelConfig` alone).

    ``base``: the base model (hub id, folder, ``.gguf`` file, ``PreTrainedModel`` or None for the
    embedded default); ``device``, ``dtype``: as :meth:`ktm.model.KTokenMerging.from_base` takes
    them (None: auto); ``trust_remote_code``: whether code shipped with a model may run, for
    every model the run loads (teacher and smaller models included; None: the
    ``KTM_TRUST_REMOTE_CODE`` environment variable, else no). Example: ``Runtime(device="cpu")``.
    """

    base: object = None
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool | None = None

    def load_options(self) -> dict:
        """The keyword arguments of the model loaders (``from_base``, ``from_pretrained``)."""
        return {"device": self.device, "dtype": self.dtype, "trust_remote_code": self.trust_remote_code}
