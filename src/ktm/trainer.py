"""The one trainer: any task, any K, one process or many (``accelerate launch``).

Phases: ``setup`` (optimiser, accelerator, resume), ``fit`` (steps with periodic evaluation
and checkpoints), ``save``. Data order is a pure function of (seed, step), so a run resumed
from a checkpoint continues exactly as the uninterrupted run would.

Checkpoint folder ``OUTPUT/checkpoint`` (replaced atomically each time) holds the model
(:meth:`KTokenMerging.save_pretrained`), ``optimizer.safetensors`` (AdamW moments, RNG
state) and ``trainer_state.json`` (step, history, configs). No pickle.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import ModelConfig, TrainConfig, save_json, to_dict
from .evaluate import evaluate
from .model import CheckpointError, KTokenMerging, replace_dir
from .tasks.base import Example, Task

CHECKPOINT_DIR = "checkpoint"
TEACHER_DIR = "teacher"
GROW_PREFIX = "grow-k"  # OUT/grow-k2: the smaller model that --grow-from auto trains
FINAL_DIR = "model"
STATE_NAME = "trainer_state.json"
OPTIM_NAME = "optimizer.safetensors"


def lr_factor(step: int, cfg: TrainConfig, start: int = 0, span: int | None = None) -> float:
    """Multiplier of the base learning rate at 0-based global ``step``: linear warm-up over
    the first ``cfg.warmup_steps`` steps of the run, then constant, or a cosine decay to 10%
    over the cycle of ``span`` steps that begins at ``start`` (default: the whole run,
    ``cfg.steps``; a curriculum makes each round a cycle of its own).

    >>> cfg = TrainConfig(steps=10, warmup_steps=0, decay="cosine")
    >>> [round(lr_factor(s, cfg, start=10, span=10), 2) for s in (10, 15, 20)]
    [1.0, 0.55, 0.1]
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay == "cosine":
        end = start + (span if span is not None else cfg.steps)
        begin = max(start, cfg.warmup_steps)
        t = min(1.0, max(0.0, (step - begin) / max(1, end - begin)))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def batch_indices(examples: list[Example], step: int, cfg: TrainConfig, labels: list[str] | None,
                  normalise=Task.normalise) -> list[int]:
    """The example indices of global ``step``'s batch: a pure function of (seed, step).

    With ``cfg.balance`` and ``labels``, each example's class is drawn uniformly first.
    """
    rng = random.Random(cfg.seed * 1_000_003 + step)
    if cfg.balance and labels:
        by_label = defaultdict(list)
        for i, e in enumerate(examples):
            by_label[normalise(e.answer)].append(i)
        pools = [by_label[label] for label in labels if by_label[label]]
        return [rng.choice(rng.choice(pools)) for _ in range(cfg.batch_size)]
    if cfg.batch_size <= len(examples):
        return rng.sample(range(len(examples)), cfg.batch_size)
    return [rng.randrange(len(examples)) for _ in range(cfg.batch_size)]


@dataclass
class Trainer:
    """Trains a :class:`KTokenMerging` on a task.

    Args:
        model: the model to train (its LoRA adapters and encoder).
        cfg: :class:`TrainConfig`.
        output_dir: where checkpoints, the final model and ``history.json`` go (None: nowhere).
        progress: show a progress bar.
        log: a function taking one line of text.
    """

    model: KTokenMerging
    cfg: TrainConfig
    output_dir: str | Path | None = None
    progress: bool = True
    log: callable = tqdm.write  # prints above a running progress bar
    step: int = 0
    history: list = field(default_factory=list)
    extra_state: dict = field(default_factory=dict)
    teacher: object = None  # K = 1 KTokenMerging for distillation/alignment (default: cfg.teacher)
    schedule_cycle: tuple = (0, None)  # (start, span) of the cosine cycle: the whole run by default

    # ------------------------------------------------------------------ setup
    def __post_init__(self):
        from accelerate import Accelerator

        self.output_dir = Path(self.output_dir) if self.output_dir else None
        if self.teacher is None and self.cfg.teacher == "auto":
            raise ValueError("teacher='auto' is resolved by `ktm train`; from Python, call "
                             "ktm.trainer.train_teacher(...) and pass the folder it returns as teacher")
        if self.teacher is None and self.cfg.teacher:
            from .objectives import load_teacher

            self.teacher = load_teacher(self.cfg.teacher, self.model)
        cuda = torch.cuda.is_available() and self.model.device.type == "cuda"
        mp = "bf16" if cuda and self.model.dtype == torch.float32 else "no"
        self.accelerator = Accelerator(mixed_precision=mp, gradient_accumulation_steps=self.cfg.grad_accum)
        groups = self.model.trainable_parameters()
        enc_lr = self.cfg.encoder_lr or self.cfg.lr
        self.optimizer = torch.optim.AdamW(
            [{"params": groups["lora"], "lr": self.cfg.lr, "base_lr": self.cfg.lr, "name": "lora"},
             {"params": groups["encoder"], "lr": enc_lr, "base_lr": enc_lr, "name": "encoder"}],
            weight_decay=self.cfg.weight_decay,
        )
        self.wrapped, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        torch.manual_seed(self.cfg.seed)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # ------------------------------------------------------------------ fit
    def fit(self, task: Task, steps: int | None = None, eval_task: Task | None = None) -> list[dict]:
        """Train until global step ``self.step + steps`` (default: until ``cfg.steps``).

        Evaluates every ``cfg.eval_every`` steps and at the end (on ``eval_task`` or
        ``task``'s test split), checkpoints every ``cfg.save_every`` steps and at the end.
        Returns the evaluation history.
        """
        cfg, acc = self.cfg, self.accelerator
        end = self.step + steps if steps is not None else cfg.steps
        train = task.examples("train")
        labels = task.labels(train) if task.metric == "accuracy" else None
        world, rank = acc.num_processes, acc.process_index
        micro = cfg.batch_size // cfg.grad_accum
        self.model.train()
        bar = tqdm(total=end - self.step, desc=f"train {task.name} K={self.model.k}",
                   disable=not (self.progress and self.is_main), dynamic_ncols=True)
        seen, t0, ema = 0, time.perf_counter(), {}
        # wall time counts on across fit calls (curricula) and resumes: carried from the history
        self._fit_start = t0 - (self.history[-1].get("elapsed_s") or 0.0 if self.history else 0.0)
        while self.step < end:
            for g in self.optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(self.step, cfg, *self.schedule_cycle)
            # every process draws the same global batch and takes its own share
            idx = batch_indices(train, self.step * world + rank, cfg, labels)
            batch = [train[i] for i in idx]
            step_parts: dict[str, float] = {}
            for j in range(0, len(batch), micro):
                chunk = batch[j:j + micro]
                with acc.accumulate(self.wrapped), acc.autocast():
                    out = self.wrapped([e.prompt for e in chunk], [e.answer for e in chunk],
                                       reconstruct=cfg.reconstruct, distill=cfg.distill,
                                       reconstruct_rows=cfg.reconstruct_rows, align=cfg.align,
                                       align_mode=cfg.align_mode,
                                       teacher=self.teacher)
                    acc.backward(out.loss)
                    if acc.sync_gradients and cfg.max_grad_norm:
                        acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                for name, value in out.parts.items():
                    step_parts[name] = step_parts.get(name, 0.0) + value.item() / cfg.grad_accum
            self.step += 1
            seen += len(batch) * world
            # "loss" is the task loss alone, comparable across runs with and without aux terms
            for name, value in step_parts.items():
                ema[name] = value if name not in ema else 0.9 * ema[name] + 0.1 * value
            bar.update(1)
            bar.set_postfix(loss=f"{ema['task']:.4f}",
                            **{n: f"{v:.3f}" for n, v in ema.items() if n != "task"},
                            ex_s=f"{seen / (time.perf_counter() - t0):.1f}")
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < end:
                self._evaluate(eval_task or task, ema)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < end:
                self.save_checkpoint()
        bar.close()
        if not self.history or self.history[-1]["step"] != self.step:
            self._evaluate(eval_task or task, ema)
        self.save_checkpoint()
        return self.history

    def _evaluate(self, task: Task, losses: dict | None = None) -> dict:
        res = evaluate(self.model, task, max_examples=self.cfg.eval_examples, seed=self.cfg.seed,
                       progress=False)
        res.pop("predictions", None)
        losses = losses or {}
        train_loss = losses.get("task")
        row = {"step": self.step, "task": task.name, "train_loss": train_loss,
               **{f"train_{n}_loss": v for n, v in losses.items() if n != "task"},
               "time": time.time(),
               "elapsed_s": round(time.perf_counter() - getattr(self, "_fit_start", time.perf_counter()), 1),
               **res}
        self.history.append(row)
        if self.is_main and self.output_dir is not None:
            # written at every evaluation, so a run stopped between checkpoints keeps its curve
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_json(self.output_dir / "history.json", {"history": self.history})
        if self.is_main:
            extra = (f" (majority {res['majority_rate']:.3f})" if "majority_rate" in res else "")
            self.log(f"step {self.step}: {res['metric']} {res['value']:.4f}{extra}, "
                     f"train loss {train_loss if train_loss is None else round(train_loss, 4)}")
        self.model.train()
        return row

    # ------------------------------------------------------------------ save / resume
    def save_checkpoint(self) -> Path | None:
        """Write ``OUTPUT/checkpoint`` atomically (main process only)."""
        if self.output_dir is None:
            return None
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            return None
        ckpt = self.output_dir / CHECKPOINT_DIR
        tmp = self.output_dir / f".{CHECKPOINT_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        tensors, groups = _optimizer_tensors(self.optimizer)
        tensors["rng.cpu"] = torch.get_rng_state()
        save_file(tensors, str(tmp / OPTIM_NAME))
        save_json(tmp / STATE_NAME, {"step": self.step, "history": self.history, "param_groups": groups,
                                     "train_config": to_dict(self.cfg), "extra": self.extra_state})
        replace_dir(tmp, ckpt)  # the whole folder appears at once: never half a checkpoint
        save_json(self.output_dir / "history.json", {"history": self.history})
        return ckpt

    def resume(self) -> bool:
        """Continue from ``OUTPUT/checkpoint`` if there is one; returns whether it did."""
        if self.output_dir is None:
            return False
        ckpt = self.output_dir / CHECKPOINT_DIR
        if not (ckpt / STATE_NAME).is_file():
            return False
        try:
            state = json.loads((ckpt / STATE_NAME).read_text())
            tensors = load_file(str(ckpt / OPTIM_NAME))
        except Exception as e:  # noqa: BLE001 - any unreadable file is a corrupt checkpoint
            raise CheckpointError(f"checkpoint {ckpt} is unreadable ({e}); move it away to start over") from e
        self.model.load_trained(ckpt)
        _load_optimizer(self.optimizer, tensors, state["param_groups"])
        torch.set_rng_state(tensors["rng.cpu"])
        self.step, self.history = state["step"], state["history"]
        self.extra_state = state.get("extra", {})
        if self.is_main:
            self.log(f"resumed from {ckpt} at step {self.step}")
        return True

    def save_final(self) -> Path | None:
        """Write the trained model to ``OUTPUT/model`` (loadable with from_pretrained)."""
        if self.output_dir is None or not self.is_main:
            return None
        return self.model.save_pretrained(self.output_dir / FINAL_DIR)


def _optimizer_tensors(opt) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{pid}.{name}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def _load_optimizer(opt, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict] = defaultdict(dict)
    for key, value in tensors.items():
        if key.startswith("state."):
            _, pid, name = key.split(".", 2)
            state[int(pid)][name] = value
    current = opt.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in current]:
        raise CheckpointError("the checkpoint's optimiser state does not fit this model's parameters")
    opt.load_state_dict({"state": dict(state), "param_groups": groups})


def train_curriculum(trainer: Trainer, stages: list[tuple[Task, float | None]], steps_per_round: int,
                     max_rounds: int = 3, name: str = "curriculum") -> list[dict]:
    """Train stage after stage, in rounds of ``steps_per_round`` steps; a stage is repeated
    until its held-out accuracy reaches its threshold or ``max_rounds`` rounds were run
    (then a warning is logged and the next stage starts).

    ``stages``: list of (task, threshold); a threshold of None means one round, unchecked.
    The position (stage, round, and the step at which the running round ends) is kept in
    the checkpoint, so a resumed curriculum finishes an interrupted round and goes on.
    Serves both ``ktm train --stage A B C`` and the phases of a chain (teacher, smaller K).
    """
    for task, threshold in stages:
        if threshold is not None and task.metric != "accuracy":
            raise ValueError(f"a threshold is a held-out accuracy; task {task.name!r} is scored by {task.metric}")
    pos = trainer.extra_state.setdefault("curriculum", {"stage": 0, "round": 0})
    while pos["stage"] < len(stages):
        task, threshold = stages[pos["stage"]]
        pos.setdefault("end", trainer.step + steps_per_round)
        # each round is one cosine cycle: a later stage does not train at the floor rate
        trainer.schedule_cycle = (pos["end"] - steps_per_round, steps_per_round)
        if trainer.step < pos["end"]:
            trainer.fit(task, steps=pos["end"] - trainer.step)
        del pos["end"]
        pos["round"] += 1
        value = trainer.history[-1]["value"]
        passed = threshold is None or value >= threshold
        where = f"{name}: {task.name} (stage {pos['stage'] + 1} of {len(stages)}) round {pos['round']}"
        if passed or pos["round"] >= max_rounds:
            if not passed and trainer.is_main:
                trainer.log(f"{where}: WARNING: held-out accuracy {value:.4f} is still below {threshold} "
                            f"after {max_rounds} rounds; going on")
            elif threshold is not None and trainer.is_main:
                trainer.log(f"{where}: held-out accuracy {value:.4f} >= {threshold}")
            pos["stage"], pos["round"] = pos["stage"] + 1, 0
        elif trainer.is_main:
            trainer.log(f"{where}: held-out accuracy {value:.4f} < {threshold}, one more round "
                        f"(round {pos['round'] + 1} of {max_rounds})")
        trainer.save_checkpoint()
    return trainer.history


def clear_output(output_dir: str | Path) -> None:
    """Remove a previous run's checkpoint and automatic teacher (``ktm train --overwrite``)."""
    shutil.rmtree(Path(output_dir) / CHECKPOINT_DIR, ignore_errors=True)
    shutil.rmtree(Path(output_dir) / TEACHER_DIR, ignore_errors=True)
    for smaller in Path(output_dir).glob(f"{GROW_PREFIX}*"):
        shutil.rmtree(smaller, ignore_errors=True)


def _train_phase(model, cfg: TrainConfig, folder: Path, tasks: list[Task], steps_per_task: int,
                 log, name: str = "phase") -> tuple[Path, "Trainer"]:
    """Train ``model`` in ``folder`` for ``steps_per_task`` steps on each task in turn,
    resuming from the folder's checkpoint; returns the final model folder and the trainer.

    With ``cfg.phase_threshold``, rounds of ``steps_per_task`` more steps on the last task
    follow while its held-out accuracy is below the threshold, up to ``cfg.phase_rounds``
    rounds on it in all (:func:`train_curriculum`)."""
    trainer = Trainer(model, cfg, output_dir=folder, log=log)
    trainer.resume()
    stages = [(task, None) for task in tasks[:-1]] + [(tasks[-1], cfg.phase_threshold)]
    train_curriculum(trainer, stages, steps_per_task, cfg.phase_rounds, name)
    return trainer.save_final(), trainer


def train_teacher(tasks: list[Task], output_dir: str | Path, model_cfg: ModelConfig,
                  train_cfg: TrainConfig, base=None, *, device=None, dtype=None,
                  log=print) -> Path:
    """Train the K = 1 teacher of a run with ``teacher="auto"``; returns its model folder.

    The teacher is the same base model and LoRA settings at K = 1 (no encoder stages, no
    norm matching), trained with ``train_cfg``'s optimiser settings for
    ``train_cfg.teacher_steps`` steps per task, without auxiliary losses. It lives in
    ``OUTPUT/teacher`` and is reused if already finished there; an interrupted teacher
    resumes from its own checkpoint.
    """
    import dataclasses

    folder = Path(output_dir) / TEACHER_DIR
    if (folder / FINAL_DIR / "ktm_config.json").is_file():
        log(f"teacher: reusing {folder / FINAL_DIR}")
        return folder / FINAL_DIR
    t_model = dataclasses.replace(model_cfg, k=1, encoder_stages=None, encoder_norm=False)
    t_train = dataclasses.replace(train_cfg, steps=train_cfg.teacher_steps * len(tasks), teacher=None,
                                  align=0.0, distill=0.0, reconstruct=0.0)
    options = {k: v for k, v in to_dict(t_model).items() if k != "k"}
    model = KTokenMerging.from_base(base, k=1, device=device, dtype=dtype, seed=t_train.seed, **options)
    log(f"teacher: training K = 1 for {t_train.steps} steps in {folder}")
    path, trainer = _train_phase(model, t_train, folder, tasks, train_cfg.teacher_steps, log, "teacher")
    last = trainer.history[-1] if trainer.history else {}
    if "value" in last:
        note = f" (majority {last['majority_rate']:.4f})" if "majority_rate" in last else ""
        log(f"teacher: held-out {last['metric']} {last['value']:.4f}{note}")
        if last.get("majority_rate") is not None and last["value"] <= last["majority_rate"]:
            log("teacher: WARNING: the teacher did not beat the majority class; consider more --teacher-steps")
    return path


def with_default_stages(model_cfg: ModelConfig) -> ModelConfig:
    """The model config with hierarchical stages: as given, or pairs (2, 2, ...) when K is a
    power of two >= 4. Raises ``ValueError`` when there are fewer than two stages."""
    import dataclasses

    stages = model_cfg.encoder_stages
    if stages is None:
        k = model_cfg.k
        if k < 4 or k & (k - 1):
            raise ValueError(f"growing needs encoder stages: give --encoder-stages for K = {k} "
                             f"(pairs are the default only for K = 4, 8, 16, ...)")
        stages = (2,) * (k.bit_length() - 1)
    if len(stages) < 2:
        raise ValueError(f"growing needs at least two encoder stages, got {tuple(stages)}")
    return dataclasses.replace(model_cfg, encoder_stages=tuple(stages))


def train_smaller(tasks: list[Task], output_dir: str | Path, model_cfg: ModelConfig,
                  train_cfg: TrainConfig, base=None, *, device=None, dtype=None, log=print) -> Path:
    """Train the model a hierarchical run grows from (``grow_from="auto"``); returns its folder.

    For stages (s_1, ..., s_n) this is the model of K' = s_1 * ... * s_(n-1) with stages
    (s_1, ..., s_(n-1)), itself grown the same way when it has two stages or more (K = 8 as
    2 2 2 trains K = 2, then K = 4, then K = 8). Each smaller model trains with ``train_cfg``
    (same optimiser and teacher; ``grow_steps`` steps per task, default ``steps``) on each
    task in turn, in ``OUTPUT/grow-k<K'>``; a finished one is reused and an interrupted one
    resumes.
    """
    import dataclasses
    import math

    stages = tuple(model_cfg.encoder_stages)
    sub_stages = stages[:-1]
    sub_k = math.prod(sub_stages)
    folder = Path(output_dir) / f"{GROW_PREFIX}{sub_k}"
    if (folder / FINAL_DIR / "ktm_config.json").is_file():
        log(f"grow: reusing the K = {sub_k} model in {folder / FINAL_DIR}")
        return folder / FINAL_DIR
    sub_cfg = dataclasses.replace(model_cfg, k=sub_k, encoder_stages=sub_stages if len(sub_stages) > 1 else None)
    start = train_smaller(tasks, output_dir, sub_cfg, train_cfg, base, device=device, dtype=dtype,
                          log=log) if len(sub_stages) > 1 else None
    options = {k: v for k, v in to_dict(sub_cfg).items() if k != "k"}
    model = KTokenMerging.from_base(base, k=sub_k, device=device, dtype=dtype, seed=train_cfg.seed, **options)
    if start is not None:
        model.grow_from(start)
    per_task = train_cfg.grow_steps or train_cfg.steps
    cfg = dataclasses.replace(train_cfg, steps=per_task * len(tasks), grow_from=None)
    log(f"grow: training K = {sub_k} (stages {list(sub_stages)}) for {cfg.steps} steps in {folder}")
    path, trainer = _train_phase(model, cfg, folder, tasks, per_task, log, f"grow K = {sub_k}")
    if trainer.history:
        last = trainer.history[-1]
        log(f"grow: K = {sub_k} held-out {last['metric']} {last['value']:.4f}")
    return path


def prepare_phases(tasks: list[Task], output_dir: str | Path, model_cfg: ModelConfig,
                   train_cfg: TrainConfig, base=None, *, device=None, dtype=None,
                   log=print) -> tuple[ModelConfig, TrainConfig]:
    """Run the phases a recipe asks for before the main run and return the configs with them
    resolved: ``teacher="auto"`` trains the K = 1 teacher (:func:`train_teacher`) and
    ``grow_from="auto"`` the smaller models (:func:`train_smaller`); both become folders."""
    import dataclasses

    if train_cfg.teacher == "auto":
        if model_cfg.k == 1:
            raise ValueError("teacher 'auto' trains a K = 1 teacher for a merged model; this run has K = 1")
        teacher = train_teacher(tasks, output_dir, model_cfg, train_cfg, base, device=device, dtype=dtype, log=log)
        train_cfg = dataclasses.replace(train_cfg, teacher=str(teacher))
    if train_cfg.grow_from == "auto":
        model_cfg = with_default_stages(model_cfg)
        smaller = train_smaller(tasks, output_dir, model_cfg, train_cfg, base, device=device, dtype=dtype, log=log)
        train_cfg = dataclasses.replace(train_cfg, grow_from=str(smaller))
    return model_cfg, train_cfg
