"""Pretrained mergers that ship with ktm (``zoo:NAME``), and the one command that rebuilds each.

A shipped merger is an ordinary saved ktm folder (:meth:`ktm.KTokenMerging.save_pretrained`)
inside the package, ``ktm/mergers/NAME/``, slimmed by :func:`write_slim`: weights in
bfloat16, no tokenizer (the base model's is used). Its ``zoo.json`` says how it was built
and what it measured. Everything that takes a saved folder takes ``zoo:NAME``
(:func:`ktm.checkpoint.resolve_folder`)::

    ktm train --task amazon --reviews ../shared/data/amazon --k 2 --init-from zoo:default-k2 --out runs/a
    KTokenMerging.from_pretrained("zoo:default-k2")       # the embedded SmolLM2 as base

``ktm zoo build NAME --out RUN`` rebuilds one from the settings recorded in :data:`ZOO`: it
pretrains (:func:`ktm.train.pretrain.pretrain_run`, resumable in RUN), writes the slim copy into
``ktm/mergers/NAME`` (``--into`` elsewhere) and measures the held-out continuation
perplexity of the float32 run and of the slim copy, so the card shows what the cast costs.
``ktm zoo list`` shows what ships.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import __version__, checkpoint
from ..checkpoint import (
    ADAPTER_DIR,
    ADAPTER_FILE,
    CONFIG_NAME,
    ENCODER_NAME,
    TOKENIZER_DIR,
    CheckpointError,
    load_weights,
    read_config,
    resolve_folder,
    shipped_mergers,
    weight_hashes,
    write_dir,
)
from ..card import CARD_NAME as README_NAME, model_card
from ..config import save_json
from ..model.io import portable_adapter
from .trainer import CHECKPOINT_DIR, STATE_NAME

#: the card each shipped merger carries: how it was built, what it measured
CARD_NAME = "zoo.json"
#: the text the shipped mergers are pretrained on, relative to the repository root: general prose,
#: never a task's text (its dev file stays held out for the fidelity numbers)
PROSE_TEXT = ("../shared/data/text/train.jsonl",)
#: held-out prose and reviews on which ``zoo build`` measures fidelity (never trained on)
FIDELITY_TEXT = "../shared/data/text/dev.jsonl"
FIDELITY_REVIEWS = "../shared/data/amazon/dev.jsonl"


@dataclass(frozen=True)
class ZooEntry:
    """How one shipped merger is built: ``ktm pretrain`` with these settings, then slimmed.

    ``model`` / ``train`` / ``text``: :class:`~ktm.config.ModelConfig`,
    :class:`~ktm.config.TrainConfig` and :class:`~ktm.tasks.text.TextOptions` fields, over
    ``recipe`` and pretraining's own defaults (:func:`ktm.train.pretrain.pretrain_configs`).
    ``base``: the base model reference (None: the embedded SmolLM2-135M-Instruct)."""

    name: str
    summary: str
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    recipe: str = "fast"
    base: str | None = None
    save_dtype: str = "bfloat16"


#: how the shipped mergers pretrain: continuation distillation (KL) plus hidden-state distillation at
#: layers 15 and 30, on 256-token prompts of prose with 32-token continuations, autocast to bfloat16
#: (2.3x the float32 step rate on an AVX-512 BF16 CPU, docs/PERFORMANCE.md), checkpoints every 20 steps
_PROSE_TRAIN = dict(steps=4000, warmup_steps=20, batch_size=8, eval_examples=32, eval_every=100, save_every=20,
                    distill_answer=1.0, task_loss=0.0, distill_hidden=[15, 30], distill_hidden_weight=0.5,
                    mixed_precision="bf16")
_PROSE_TEXT = dict(text=PROSE_TEXT, prompt_tokens=256, continuation_tokens=32, min_prompt_tokens=256,
                   windows_per_text=0)

ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry(
        name="default-k2",
        summary="K = 2 merger for the embedded SmolLM2-135M-Instruct, pretrained on general English prose "
                "(Wikipedia and Project Gutenberg, 256-token prompts) by distilling the plain model's "
                "continuation distributions and hidden states; narrow encoder (hidden 256), LoRA rank 8",
        model=dict(k=2, encoder_hidden=256), train=_PROSE_TRAIN, text=_PROSE_TEXT,
    ),
    ZooEntry(
        name="default-k4",
        summary="K = 4 merger for the embedded SmolLM2-135M-Instruct, pretrained like default-k2 on general "
                "English prose; narrow encoder (hidden 256), LoRA rank 8",
        model=dict(k=4, encoder_hidden=256), train=_PROSE_TRAIN, text=_PROSE_TEXT,
    ),
]}


def get_entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise ValueError(f"no zoo entry {name!r}; known: {', '.join(sorted(ZOO))}")
    return ZOO[name]


# ---------------------------------------------------------------- slim copies
def write_slim(src, dst, dtype: str = "bfloat16", tokenizer: bool = False) -> Path:
    """Write ``dst``: saved ktm folder ``src`` with its floating-point weights cast to
    ``dtype`` and its tokenizer left out unless ``tokenizer`` (a model loaded from ``dst``
    then uses its base model's). The weight hashes of
    ``src`` are checked on reading; ``dst`` gets its own and is written atomically.
    ``ktm_config.json`` records the dtype as ``weights_dtype``; loading casts the weights to
    the model's dtype."""
    from ..loading import resolve_dtype

    src = resolve_folder(src)
    meta = read_config(src)
    torch_dtype = resolve_dtype(dtype, "cpu")

    def cast(tensors: dict) -> dict:
        return {k: (v.to(torch_dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}

    encoder = cast(load_weights(meta, src, ENCODER_NAME))
    adapter = cast(load_weights(meta, src, f"{ADAPTER_DIR}/{ADAPTER_FILE}"))
    adapter_config = src / ADAPTER_DIR / "adapter_config.json"
    if not adapter_config.is_file():
        raise CheckpointError(f"{adapter_config} is missing")

    def write(tmp: Path) -> None:
        (tmp / ADAPTER_DIR).mkdir()
        save_file(encoder, str(tmp / ENCODER_NAME))
        save_file(adapter, str(tmp / ADAPTER_DIR / ADAPTER_FILE), metadata={"format": "pt"})
        # peft records where the base model was loaded from, a folder of the machine that built the
        # merger: the copy names the base as another machine would (ktm loads the base itself)
        shutil.copy2(adapter_config, tmp / ADAPTER_DIR / adapter_config.name)
        portable_adapter(tmp / ADAPTER_DIR, meta["base"]["reference"])
        if tokenizer and (src / TOKENIZER_DIR).is_dir():
            shutil.copytree(src / TOKENIZER_DIR, tmp / TOKENIZER_DIR)
        kept = {k: v for k, v in meta.items() if k != "files"}
        save_json(tmp / CONFIG_NAME, {**kept, "weights_dtype": str(torch_dtype).removeprefix("torch."),
                                      "files": weight_hashes(tmp)})

    return write_dir(dst, write)


def folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# ---------------------------------------------------------------- build
def build(entry: ZooEntry | str, out, *, into=None, text=None, base=None, tokenizer=None, device=None,
          dtype="float32", resume: bool = False, overwrite: bool = False, log=print,
          command: str | None = None, steps: int | None = None, fidelity_text=FIDELITY_TEXT,
          fidelity_reviews=FIDELITY_REVIEWS, fidelity_windows: int = 200,
          train: dict | None = None) -> tuple[Path, dict]:
    """Build shipped merger ``entry`` (a :class:`ZooEntry` or a name in :data:`ZOO`).

    Pretrains in run folder ``out`` (``resume`` / ``overwrite`` as for ``ktm pretrain``) until
    step ``steps`` (default: the entry's; a long run is built in pieces, each resumed from the
    last; where ``out`` holds no checkpoint, ``resume`` continues from the published merger's
    weights and card, :func:`continue_shipped`), writes the slim copy to ``into / entry.name`` (default: the package's own
    ``ktm/mergers``) with its card, and returns that folder and the card. The card records the
    text's SHA-256, the tokens seen, the hours, the held-out perplexities and the fidelity of
    the slim copy (:func:`ktm.train.fidelity.fidelity`) on ``fidelity_windows`` windows of
    ``fidelity_text`` and as many reviews of ``fidelity_reviews`` (each skipped when missing
    or None). ``text`` replaces the entry's text sources (same settings otherwise); ``base`` /
    ``tokenizer`` replace the entry's base model (tests use a tiny one). ``train`` replaces some
    of the entry's training settings (a larger ``batch_size`` on a GPU, say): the card records the
    settings used, and its command the options that set them."""
    from .pretrain import pretrain_configs, pretrain_run

    entry = get_entry(entry) if isinstance(entry, str) else entry
    if train:
        entry = dataclasses.replace(entry, train={**entry.train, **train})
    out = Path(out)
    text_opts = text_options(entry, text)
    model_cfg, train_cfg = pretrain_configs(entry.recipe, entry.model,
                                            {**entry.train, **({"steps": steps} if steps else {})})
    has_checkpoint = (out / CHECKPOINT_DIR / STATE_NAME).is_file()
    start = continue_shipped(entry, into, log) if resume and not has_checkpoint else {}
    run, references = pretrain_run(model_cfg, train_cfg, text_opts, out, base=entry.base if base is None else base,
                                   tokenizer=tokenizer, device=device, dtype=dtype, resume=resume,
                                   overwrite=overwrite, log=log, record={"zoo": entry.name}, **start)
    slim = write_slim(run.path, out / "slim", dtype=entry.save_dtype)
    held = held_out_perplexities(run.model, slim, text_opts, train_cfg, entry.save_dtype)
    held.update(plain_perplexity=references["plain_perplexity"],
                no_prompt_perplexity=references["no_context_perplexity"])
    measured = measure_fidelity(run.model, fidelity_text, fidelity_reviews, text_opts, fidelity_windows, log)
    card = make_card(entry, run, text_opts, train_cfg, held, measured, folder_bytes(slim),
                     command or build_command(entry.name, out, resume, steps, train),
                     read_config(slim)["base"])

    def publish(tmp: Path) -> None:  # the measured slim copy itself, with its card
        shutil.copytree(slim, tmp, dirs_exist_ok=True)
        save_json(tmp / CARD_NAME, card)
        (tmp / README_NAME).write_text(model_card(read_config(tmp), {"fidelity": card.get("fidelity") or {},
                                                                    "held_out": card.get("held_out") or {}},
                                                  repo_id=f"zoo:{entry.name}"))

    shipped = write_dir(Path(into or checkpoint.MERGERS_DIR) / entry.name, publish)
    shutil.rmtree(slim, ignore_errors=True)
    log(f"zoo {entry.name}: held-out continuation perplexity {held['merged_perplexity_float32']:.3f} (float32), "
        f"{held[f'merged_perplexity_{entry.save_dtype}']:.3f} ({entry.save_dtype}); plain prompt "
        f"{held['plain_perplexity']:.3f}, no prompt {held['no_prompt_perplexity']:.3f}; "
        f"{card['bytes'] / 2**20:.1f} MiB in {shipped}")
    return shipped, card


def build_command(name: str, out, resume: bool = False, steps: int | None = None, train: dict | None = None) -> str:
    """The card's ``command``: the ``ktm zoo build`` line of the piece that made it (a ``zoo_publish`` run's its own)."""
    resumed, until = " --resume" if resume else "", f" --steps {steps}" if steps else ""
    return f"ktm zoo build {name} --out {portable_path(out)}{resumed}{until}{option_text(train)}"


def option_text(train: dict | None) -> str:  # the zoo build options that set training settings, " --batch-size 64"
    return "".join(f" --{k.replace('_', '-')} {v}" for k, v in (train or {}).items())


#: training settings that belong to one piece of a run, not to the merger it continues: how often it
#: checkpoints and evaluates, how long it ran, in how many micro-batches a step's batch was split (memory,
#: not arithmetic) and whether it anneals the rate at its end (``cooldown``)
PIECE_SETTINGS = ("save_every", "eval_every", "max_minutes", "grad_accum", "cooldown")


def continue_shipped(entry: ZooEntry, into=None, log=print) -> dict:
    """Where a build with ``resume`` has no checkpoint (a new machine, a fresh clone): continue
    from the published merger ``entry.name`` when its card was built with the entry's recipe,
    model and training settings, as ``pretrain_run``'s ``init_from`` and ``start`` (its step and
    evaluation history; :meth:`ktm.train.trainer.Trainer.continue_from`). ``{}`` otherwise."""
    folder = Path(into or checkpoint.MERGERS_DIR) / entry.name
    try:
        card = card_at(folder)
    except CheckpointError:  # a corrupt card: nothing to continue from
        return {}
    if not card:
        return {}

    def comparable(settings: dict) -> dict:  # settings of one piece, not of what it continues
        train = {k: v for k, v in (settings.get("train") or {}).items() if k not in PIECE_SETTINGS}
        return json.loads(json.dumps({"recipe": settings.get("recipe"), "model": settings.get("model"),
                                      "train": train}))

    wanted = comparable({"recipe": entry.recipe, "model": entry.model, "train": entry.train})
    if comparable(card.get("settings", {})) != wanted or not card.get("pretrain_steps") or \
            not card.get("history"):
        log(f"zoo: {folder} was built with other settings (or has no history): starting from scratch")
        return {}
    log(f"zoo: no checkpoint to resume; continuing from {folder} at step {card['pretrain_steps']}")
    return {"init_from": str(folder), "start": (card["pretrain_steps"], card["history"], card.get("restarts", []))}


def portable_path(path) -> str:
    """``path`` as the card may record it: relative to the working directory when it lies below it,
    else ``RUN`` (a shipped file never names a folder of the machine that built it)."""
    full = Path(path).resolve()
    return os.path.relpath(full) if full.is_relative_to(Path.cwd().resolve()) else "RUN"


def make_card(entry: ZooEntry, run, text_opts, train_cfg, held: dict, measured: dict | None, size: int,
              command: str, base: dict) -> dict:
    """The card (``zoo.json``) of a build: how it was made, on what, for how long, and what it measured."""
    history = run.trainer.history
    steps = history[-1]["step"] if history else 0
    compute = run.trainer.compute.before(history)  # what training used, each piece at its own threads
    hours = compute["elapsed_s"] / 3600
    card = {
        "name": entry.name, "summary": entry.summary, "command": command,
        "ktm_version": __version__, "built": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU threads, "
                   f"torch {torch.__version__}, device {run.model.device}",
        "base": base, "k": run.model.k,
        "settings": {"recipe": entry.recipe, "model": entry.model, "train": entry.train,
                     "text": dataclasses.asdict(text_opts)},
        "text_sha256": text_hashes(text_opts.text),
        "pretrain_steps": steps, "pretrain_minutes": round(hours * 60, 1),
        "tokens_seen": steps * train_cfg.batch_size * (text_opts.prompt_tokens + text_opts.continuation_tokens),
        "cpu_hours": round(compute["cpu_thread_s"] / 3600, 2), "gpu_hours": round(compute["gpu_s"] / 3600, 2),
        "held_out": held, "fidelity": measured, "weights_dtype": entry.save_dtype, "bytes": size,
        "restarts": run.trainer.extra_state.get("restarts", []), "history": history,
    }
    return json.loads(json.dumps(card))  # as it reads back: lists, not tuples


def text_hashes(sources) -> dict[str, str]:
    """SHA-256 of every local file the text sources name (a Hub dataset id has none)."""
    from ..tasks.hub import is_hub_id
    from ..tasks.text import source_files

    return {p.name: file_sha256(p) for s in sources if not is_hub_id(s) for p in source_files(Path(s))}


def file_sha256(path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def measure_fidelity(model, text, reviews, text_opts, windows: int, log=print) -> dict | None:
    """:func:`ktm.train.fidelity.fidelity` of ``model`` on ``windows`` held-out windows of ``text``
    (cut as the pretraining's) and as many reviews of ``reviews``; None (with a log line) when
    ``text`` is missing or its texts or the reviews do not fit."""
    from ..tasks.amazon import read_reviews
    from .fidelity import fidelity, fidelity_line, prose_windows

    if not text or not Path(text).is_file():
        log(f"zoo: no fidelity measured ({text} not found)")
        return None
    try:  # after hours of pretraining, a text that does not fit must not lose the build
        wins = prose_windows(text, model.tokenizer, text_opts.prompt_tokens, text_opts.continuation_tokens,
                             windows, text_opts.text_field)
        revs = read_reviews(Path(reviews))[:windows] if reviews and Path(reviews).is_file() else None
        result = fidelity(model, wins, revs)
    except ValueError as e:
        log(f"zoo: no fidelity measured: {e}")
        return None
    log("zoo fidelity: " + fidelity_line(result))
    return result


def text_options(entry: ZooEntry, text=None):
    """The entry's :class:`~ktm.tasks.text.TextOptions`, with ``text`` as its sources if given;
    ``FileNotFoundError`` for a source that is neither a path nor a Hub dataset id."""
    from ..tasks.hub import is_hub_id
    from ..tasks.text import TextOptions

    opts = TextOptions(**{**entry.text, **({"text": tuple(text)} if text else {})})
    missing = [s for s in opts.text if not Path(s).exists() and not is_hub_id(s)]
    if missing:
        raise FileNotFoundError(f"pretraining text not found: {', '.join(missing)} (run from the repository root, "
                                f"next to ../shared, or give --text)")
    return opts


def held_out_perplexities(model, slim, text_opts, train_cfg, save_dtype: str) -> dict:
    """Held-out continuation perplexity of ``model`` as trained, then with the weights of
    its slim copy ``slim`` loaded into it (left so): the pretraining's evaluation windows."""
    from .evaluate import evaluate
    from ..tasks.text import TextTask

    task = TextTask(text_opts.text, model.tokenizer, text_opts)
    n, seed = train_cfg.eval_examples, train_cfg.seed
    full = evaluate(model, task, max_examples=n, seed=seed, progress=False)
    model.load_trained(slim)
    cast = evaluate(model, task, max_examples=n, seed=seed, progress=False)
    return {"windows": full["n"], "merged_perplexity_float32": full["value"],
            f"merged_perplexity_{save_dtype}": cast["value"]}


# ---------------------------------------------------------------- what ships
def read_card(name: str) -> dict:
    """The card (``zoo.json``) of shipped merger ``name``; ``{}`` when it has none."""
    return card_at(resolve_folder(f"zoo:{name}"))


def card_at(folder) -> dict:
    """The card (``zoo.json``) in ``folder``; ``{}`` when it has none, ``CheckpointError`` when corrupt."""
    card = Path(folder) / CARD_NAME
    if not card.is_file():
        return {}
    try:
        return json.loads(card.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{card} is corrupt ({e})") from e


def hours_text(card: dict) -> str:
    """How long a card's pretraining ran, e.g. ``2.5 CPU hours``."""
    parts = [f"{card[k]:g} {name} hours" for k, name in (("cpu_hours", "CPU"), ("gpu_hours", "GPU")) if card.get(k)]
    return ", ".join(parts) or f"{card.get('pretrain_minutes', '?')} minutes"


def describe_shipped() -> list[dict]:
    """One row per shipped merger: name, K, base reference, size, dtype and the card's numbers."""
    rows = []
    for name in shipped_mergers():
        folder = resolve_folder(f"zoo:{name}")
        meta, card = read_config(folder), read_card(name)
        rows.append({"name": name, "k": meta["model"]["k"], "base": meta["base"]["reference"],
                     "weights_dtype": meta.get("weights_dtype", "float32"),
                     "bytes": folder_bytes(folder), "summary": card.get("summary", ""),
                     "held_out": card.get("held_out", {}), "command": card.get("command", ""),
                     "fidelity": card.get("fidelity"), "tokens_seen": card.get("tokens_seen"),
                     "pretrain_steps": card.get("pretrain_steps"), "text": sorted(card.get("text_sha256", {})),
                     "hours": hours_text(card)})
    return rows


__all__ = ["ZOO", "ZooEntry", "CARD_NAME", "build", "describe_shipped", "get_entry", "read_card", "write_slim"]
