"""Typed options shared by the Python API, the CLI and the saved ``ktm_config.json``.

Each field has one name everywhere: ``ModelConfig.lora_r`` is ``--lora-r`` on the command
line and ``"lora_r"`` in the JSON file. Configs validate themselves on construction.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

#: the choices of the string options, as types (argparse offers exactly these)
EncoderInit = typing.Literal["mean", "paper", "random"]
Decay = typing.Literal["constant", "cosine"]
AlignMode = typing.Literal["cosine", "standardized"]
Method = typing.Literal["merge", "mean", "keep-first", "keep-last", "stride", "random-drop"]
#: hidden-state alignment modes (ktm.train.objectives.alignment_loss)
ALIGN_MODES = typing.get_args(AlignMode)
INITS = typing.get_args(EncoderInit)  # the merge encoder's initialisations (ktm.model.encoder)

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
        if self.method != "merge" and (self.encoder_stages or self.encoder_norm or self.encoder_init != "mean"):
            raise ValueError(f"method {self.method!r} does not train an encoder: leave encoder_stages, "
                             f"encoder_norm and encoder_init (must be 'mean') at their defaults")
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
    decay: Decay = _help("learning-rate schedule after warm-up: constant or cosine", default="constant")
    max_grad_norm: float | None = _help("gradient clipping norm (none: off)", default=1.0)
    eval_every: int = _help("evaluate every N steps (0: only at the end)", default=0)
    eval_examples: int = _help("held-out examples per evaluation (0: all)", default=400)
    save_every: int = _help("checkpoint every N steps (0: only at the end)", default=0)
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

    def __post_init__(self):
        check_types(self)
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})"
            )
        if self.lr <= 0 or (self.encoder_lr is not None and self.encoder_lr <= 0):
            raise ValueError("learning rates must be > 0")
        if self.decay not in ("constant", "cosine"):
            raise ValueError(f"decay must be 'constant' or 'cosine', got {self.decay!r}")
        for name in ("eval_every", "eval_examples", "save_every", "warmup_steps", "reconstruct", "distill",
                     "distill_answer", "task_loss", "reconstruct_rows", "align", "teacher_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if not (self.task_loss or self.distill_answer or self.distill or self.align or self.reconstruct):
            raise ValueError("task_loss is 0 and no auxiliary loss is on: nothing to train")
        if self.align_mode not in ALIGN_MODES:
            raise ValueError(f"align_mode must be one of {ALIGN_MODES}, got {self.align_mode!r}")
        if self.grow_steps is not None and self.grow_steps < 1:
            raise ValueError(f"grow_steps must be >= 1, got {self.grow_steps}")
        if self.phase_threshold is not None and not 0.0 < self.phase_threshold <= 1.0:
            raise ValueError(f"phase_threshold is an accuracy in (0, 1], got {self.phase_threshold}")
        if self.phase_rounds < 1:
            raise ValueError(f"phase_rounds must be >= 1, got {self.phase_rounds}")


# ---------------------------------------------------------------- type checks
class _Mismatch(Exception):
    """Internal: a value does not fit an annotation; ``args[0]`` says what was expected and
    ``path`` where inside the value (e.g. ``[2]`` for a tuple's third item)."""

    def __init__(self, expected: str, value, path: str = "", bad_value: bool = False):
        super().__init__(expected)  # bad_value: the right type, a value no field takes (NaN)
        self.value, self.path, self.bad_value = value, path, bad_value


def _show(value) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _expected(tp) -> str:
    """What an annotation accepts, in words: 'a bool', 'an int or None', ..."""
    if tp is type(None):
        return "None"
    if _is_union(tp):
        args = typing.get_args(tp)
        # None last: "an int or None"
        args = [a for a in args if a is not type(None)] + [a for a in args if a is type(None)]
        return " or ".join(_expected(a) for a in args)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if origin is tuple:
        return f"a list or tuple of {_plural(typing.get_args(tp)[0])}"
    if tp is bool:
        return "a bool"
    if tp is int:
        return "an int"
    if tp is float:
        return "a number (int or float)"
    if tp is str:
        return "a str"
    if isinstance(tp, type):
        return f"a {tp.__name__}"
    return str(tp)


def _plural(tp) -> str:
    return {bool: "bools", int: "ints", float: "numbers", str: "strings"}.get(tp, _expected(tp))


def _conform(tp, value):
    """``value`` if it fits the annotation ``tp`` (lists become tuples for ``tuple[T, ...]``,
    integer-like numbers such as numpy ints become ``int``); raises :class:`_Mismatch`."""
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch("None", value)
    if _is_union(tp):
        for arm in typing.get_args(tp):
            try:
                return _conform(arm, value)
            except _Mismatch as e:
                if e.path or e.bad_value:  # the right container, a wrong item / the right type, a bad value
                    raise
        raise _Mismatch(_expected(tp), value)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        # bool == int in Python (True == 1): compare the type as well as the value
        if any(type(value) is type(v) and value == v for v in typing.get_args(tp)):
            return value
        raise _Mismatch(_expected(tp), value)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise NotImplementedError(f"ktm.config checks tuple[T, ...] only, not {tp}")
        if not isinstance(value, (tuple, list)):
            raise _Mismatch(_expected(tp), value)
        items = []
        for i, item in enumerate(value):
            try:
                items.append(_conform(args[0], item))
            except _Mismatch as e:
                raise _Mismatch(e.args[0], e.value, f"[{i}]{e.path}") from None
        return tuple(items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch(_expected(tp), value)
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise _Mismatch(_expected(tp), value)
    if tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
            if math.isfinite(value):  # --lr nan would train to NaN weights and exit 0
                return value if isinstance(value, float) else float(value)
            raise _Mismatch("a finite number", value, bad_value=True)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise _Mismatch(_expected(tp), value)
    if isinstance(tp, type) and origin is None:
        if isinstance(value, tp):
            return value
        raise _Mismatch(_expected(tp), value)
    raise NotImplementedError(f"ktm.config cannot check values of type {tp}: add it to _conform")


def literal_choices(tp) -> tuple | None:
    """The values of a ``Literal[...]`` annotation (also inside ``Optional``), else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None


def check_types(cfg) -> None:
    """Check every field of the dataclass instance ``cfg`` against its annotation.

    bool fields take only bools (not ``"false"`` or 0); int fields ints, not bools; float
    fields finite ints or floats, not bools; ``X | None`` also None; ``tuple[T, ...]`` a tuple or
    list of T (stored as a tuple); ``Literal[...]`` only its values. Raises ``TypeError`` (``ValueError``
    for a ``Literal`` field, NaN or infinity) naming the field, what it takes and what it got, e.g.
    ``ModelConfig.encoder_norm must be a bool, got 'false' (str)``."""
    cls = type(cfg)
    hints = _hints(cls)
    for f in dataclasses.fields(cfg):
        tp, value = hints[f.name], getattr(cfg, f.name)
        try:
            checked = _conform(tp, value)
        except _Mismatch as e:
            where = f"{cls.__name__}.{f.name}{e.path}"
            message = f"{where} must be {e.args[0]}, got {_show(e.value)}"
            if isinstance(e.value, os.PathLike):
                message += ": convert the path to a str, e.g. str(path)"
            literal = literal_choices(tp) is not None
            raise (ValueError if literal or e.bad_value else TypeError)(message) from None
        if checked is not value:
            object.__setattr__(cfg, f.name, checked)


def to_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def from_dict(cls, data: dict):
    """Build a config from a dict (e.g. a saved JSON file), rejecting unknown keys and values
    of the wrong type (:func:`check_types`; JSON lists become tuples) with a clear message."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} settings must be a JSON object (a dict of field: value), "
                        f"got {_show(data)}")
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
