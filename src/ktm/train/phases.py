"""A training run and its phases: one entry point for the CLI, the demo and scripts.

:func:`train_run` builds the model from its configurations, trains the phases a recipe
asks for first (a K = 1 teacher for ``teacher="auto"``, the smaller models for
``grow_from="auto"``), then trains on one task or a curriculum of tasks, and saves the final
model. A stopped run continues with ``resume=True``: every phase resumes from its own
checkpoint and a finished phase is reused, so the chain ends as an uninterrupted one would.

Layout of a run folder ``OUT``: ``run_config.json``, ``history.json``, ``checkpoint/``,
``model/`` and, for chains, ``teacher/`` and ``grow-k<K'>/`` (each a run folder itself).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..checkpoint import clean_stale, recover_dir
from ..config import MERGE_ONLY_DEFAULTS, ModelConfig, Runtime, TrainConfig, save_json, to_dict
from ..model import KTokenMerging, load_teacher
from ..model.segments import task_keep_pattern
from ..tasks.base import Task
from .runlock import LOCK_NAME, main_first, process_rank, run_lock  # noqa: F401 - public here too
from .trainer import CHECKPOINT_DIR, FINAL_DIR, Trainer

TEACHER_DIR = "teacher"
GROW_PREFIX = "grow-k"  # OUT/grow-k2: the smaller model that grow_from="auto" trains


@dataclass
class RunResult:
    """What :func:`train_run` returns: the trained model, its trainer (with the history) and
    the folder of the saved final model."""

    model: KTokenMerging
    trainer: Trainer
    path: Path | None


def check_init_options(init_from, given: dict) -> None:
    """Refuse model options given explicitly (``given``: field -> value) that differ from the
    saved model ``init_from`` starts from: that model's own settings are what it loads with,
    so such an option would be silently ignored."""
    from ..checkpoint import read_config
    from ..hub import resolve

    saved = read_config(resolve(init_from))["model"]  # a folder, zoo:NAME or hub id
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731 (JSON lists = tuples)
    clash = {k: (saved.get(k), v) for k, v in given.items() if k in saved and norm(saved[k]) != norm(v)}
    if clash:
        diff = ", ".join(f"{k} = {v!r} (the saved model has {s!r})" for k, (s, v) in sorted(clash.items()))
        raise ValueError(f"--init-from {init_from} loads the saved model with its own settings, so these options "
                         f"would be ignored: {diff}; leave them out, or start from the base model instead")


def build_model(model_cfg: ModelConfig, runtime: Runtime | None = None, *, seed: int = 0,
                init_from=None, init_adapter_from=None, grow_from=None) -> KTokenMerging:
    """The model a run starts from: a saved model (``init_from``, which must be for
    ``model_cfg.k``), or a fresh one on ``runtime.base`` whose LoRA may start from a saved model
    of any K (``init_adapter_from``) and whose encoder may grow from a smaller K (``grow_from``)."""
    runtime = runtime or Runtime()
    if init_from:
        m = KTokenMerging.from_pretrained(init_from, base=runtime.base, **runtime.load_options())
        if m.k != model_cfg.k:
            raise ValueError(f"init_from {init_from} is for K = {m.k}, not K = {model_cfg.k}")
        return m
    m = KTokenMerging.from_config(model_cfg, runtime.base, seed=seed, **runtime.load_options())
    if init_adapter_from:
        m.load_trained(init_adapter_from, adapter_only=True)
    if grow_from:
        m.grow_from(grow_from)
    return m


def train_run(model_cfg: ModelConfig, train_cfg: TrainConfig, tasks: Task | list[Task], out, *,
              runtime: Runtime | None = None, base=None, device=None, dtype=None,
              trust_remote_code: bool | None = None, resume: bool = False, overwrite: bool = False,
              init_from=None, init_adapter_from=None, thresholds: list[float | None] | None = None,
              threshold: float | None = None, final_threshold: float | None = None, max_rounds: int = 3,
              record: dict | None = None, log=tqdm.write, given: dict | None = None,
              start: tuple[int, list] | None = None, report_to: str = "none") -> RunResult:
    """Train one run in folder ``out``; returns the model, the trainer and the final model's folder.

    ``tasks``: one task, or several for a curriculum (``train_cfg.steps`` steps per round;
    a stage is repeated while its held-out accuracy is below its entry of ``thresholds``, at
    most ``max_rounds`` rounds; None: one round each; or ``threshold`` for every stage but the
    last and ``final_threshold`` for the last). ``teacher="auto"`` and
    ``grow_from="auto"`` in ``train_cfg`` train those phases first, in ``out``. A folder that
    already holds a checkpoint needs ``resume`` (continue it) or ``overwrite`` (start over).
    ``record``: extra entries for ``run_config.json`` (the CLI stores its argv).
    ``runtime`` (or its fields ``base``, ``device``, ``dtype``, ``trust_remote_code`` given one
    by one) is how every model of the run loads, teacher and smaller models included.
    ``given``: the model options the caller set explicitly (the CLI's flags), refused when they
    differ from the settings of the model ``init_from`` loads (:func:`check_init_options`).
    ``start``: ``(step, history)`` where a run without a checkpoint continues from the weights of
    ``init_from`` alone (:meth:`Trainer.continue_from`; a checkpoint in ``out`` wins with ``resume``).
    ``report_to``: the experiment tracker of the main run (:mod:`ktm.train.reporting`).
    """
    runtime = runtime or Runtime(base, device, dtype, trust_remote_code)
    tasks = [tasks] if isinstance(tasks, Task) else list(tasks)
    if init_from and given:
        check_init_options(init_from, given)
    if thresholds is None and (threshold, final_threshold) != (None, None):
        thresholds = [threshold] * (len(tasks) - 1) + [final_threshold]
    model_cfg = dataclasses.replace(model_cfg, keep=task_keep_pattern(model_cfg.keep, tasks[-1]))  # "cue"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def setup() -> None:  # the first process alone, while the others wait (main_first)
        recover_dir(out / CHECKPOINT_DIR)
        if not resume and (out / CHECKPOINT_DIR).exists():
            if not overwrite:
                raise ValueError(f"{out} already holds a checkpoint: pass --resume (resume=True) to continue it, "
                                 f"or --overwrite (overwrite=True) to start over")
            clear_output(out)
        for name in (CHECKPOINT_DIR, FINAL_DIR):
            clean_stale(out, name)

    with main_first(out, setup):
        return _train_in(out, model_cfg, train_cfg, tasks, runtime, resume=resume, init_from=init_from,
                         init_adapter_from=init_adapter_from, thresholds=thresholds, max_rounds=max_rounds,
                         record=record, log=log, start=start, report_to=report_to)


def _train_in(out: Path, model_cfg, train_cfg, tasks, runtime: Runtime, *, resume, init_from,
              init_adapter_from, thresholds, max_rounds, record, log, start=None, report_to="none") -> RunResult:
    model_cfg, train_cfg = prepare_phases(tasks, out, model_cfg, train_cfg, runtime, log=log)
    if process_rank() == 0:
        save_json(out / "run_config.json", {"model": to_dict(model_cfg), "train": to_dict(train_cfg),
                                            "argv": sys.argv[1:], **(record or {})})
    model = build_model(model_cfg, runtime, seed=train_cfg.seed, init_from=init_from,
                        init_adapter_from=init_adapter_from, grow_from=train_cfg.grow_from)
    trainer = Trainer(model, train_cfg, output_dir=out, log=log, teacher=load_run_teacher(train_cfg, model, runtime),
                      report_to=report_to)
    resumed = resume and trainer.resume()
    if start and not resumed:
        trainer.continue_from(*start)
    elif resume and not resumed:
        log(f"no checkpoint in {out}; starting from scratch")
    if len(tasks) > 1:
        stages = list(zip(tasks, thresholds or [None] * len(tasks)))
        train_curriculum(trainer, stages, train_cfg.steps, max_rounds)
    else:
        trainer.fit(tasks[0])
    return RunResult(model, trainer, trainer.save_final())


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


def train_phase(model, cfg: TrainConfig, folder: Path, tasks: list[Task], steps_per_task: int,
                log, name: str = "phase", teacher=None) -> tuple[Path, "Trainer"]:
    """Train ``model`` in ``folder`` for ``steps_per_task`` steps on each task in turn,
    resuming from the folder's checkpoint; returns the final model folder and the trainer.

    With ``cfg.phase_threshold``, rounds of ``steps_per_task`` more steps on the last task
    follow while its held-out accuracy is below the threshold, up to ``cfg.phase_rounds``
    rounds on it in all (:func:`train_curriculum`). ``teacher``: the loaded teacher of ``cfg``."""
    trainer = Trainer(model, cfg, output_dir=folder, log=log, teacher=teacher)
    trainer.resume()
    stages = [(task, None) for task in tasks[:-1]] + [(tasks[-1], cfg.phase_threshold)]
    train_curriculum(trainer, stages, steps_per_task, cfg.phase_rounds, name)
    return trainer.save_final(), trainer


def load_run_teacher(train_cfg: TrainConfig, student: KTokenMerging, runtime: Runtime):
    """The teacher a run's losses compare with: the K = 1 model saved in ``train_cfg.teacher``
    (a folder), loaded as ``runtime`` says; None without one."""
    if not train_cfg.teacher:
        return None
    return load_teacher(train_cfg.teacher, student, trust_remote_code=runtime.trust_remote_code)


def train_teacher(tasks: list[Task], output_dir: str | Path, model_cfg: ModelConfig,
                  train_cfg: TrainConfig, runtime: Runtime, *, log=print) -> Path:
    """Train the K = 1 teacher of a run with ``teacher="auto"``; returns its model folder.

    The teacher is the same base model and LoRA settings at K = 1 (no encoder stages, no
    norm matching), trained with ``train_cfg``'s optimiser settings for
    ``train_cfg.teacher_steps`` steps per task, without auxiliary losses. It lives in
    ``OUTPUT/teacher`` and is reused if already finished there; an interrupted teacher
    resumes from its own checkpoint.
    """
    folder = Path(output_dir) / TEACHER_DIR
    if (folder / FINAL_DIR / "ktm_config.json").is_file():
        log(f"teacher: reusing {folder / FINAL_DIR}")
        return folder / FINAL_DIR
    t_model = dataclasses.replace(model_cfg, k=1, **MERGE_ONLY_DEFAULTS)
    t_train = dataclasses.replace(train_cfg, steps=train_cfg.teacher_steps * len(tasks), teacher=None,
                                  align=0.0, distill=0.0, reconstruct=0.0, distill_answer=0.0, task_loss=1.0)
    model = KTokenMerging.from_config(t_model, runtime.base, seed=t_train.seed, **runtime.load_options())
    log(f"teacher: training K = 1 for {t_train.steps} steps in {folder}")
    path, trainer = train_phase(model, t_train, folder, tasks, train_cfg.teacher_steps, log, "teacher")
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
                  train_cfg: TrainConfig, runtime: Runtime, *, log=print) -> Path:
    """Train the model a hierarchical run grows from (``grow_from="auto"``); returns its folder.

    For stages (s_1, ..., s_n) this is the model of K' = s_1 * ... * s_(n-1) with stages
    (s_1, ..., s_(n-1)), itself grown the same way when it has two stages or more (K = 8 as
    2 2 2 trains K = 2, then K = 4, then K = 8). Each smaller model trains with ``train_cfg``
    (same optimiser and teacher; ``grow_steps`` steps per task, default ``steps``) on each
    task in turn, in ``OUTPUT/grow-k<K'>``; a finished one is reused and an interrupted one
    resumes.
    """
    import math

    stages = tuple(model_cfg.encoder_stages)
    sub_stages = stages[:-1]
    sub_k = math.prod(sub_stages)
    folder = Path(output_dir) / f"{GROW_PREFIX}{sub_k}"
    if (folder / FINAL_DIR / "ktm_config.json").is_file():
        log(f"grow: reusing the K = {sub_k} model in {folder / FINAL_DIR}")
        return folder / FINAL_DIR
    sub_cfg = dataclasses.replace(model_cfg, k=sub_k, encoder_stages=sub_stages if len(sub_stages) > 1 else None)
    start = train_smaller(tasks, output_dir, sub_cfg, train_cfg, runtime, log=log) if len(sub_stages) > 1 else None
    model = KTokenMerging.from_config(sub_cfg, runtime.base, seed=train_cfg.seed, **runtime.load_options())
    if start is not None:
        model.grow_from(start)
    per_task = train_cfg.grow_steps or train_cfg.steps
    cfg = dataclasses.replace(train_cfg, steps=per_task * len(tasks), grow_from=None)
    log(f"grow: training K = {sub_k} (stages {list(sub_stages)}) for {cfg.steps} steps in {folder}")
    path, trainer = train_phase(model, cfg, folder, tasks, per_task, log, f"grow K = {sub_k}",
                                load_run_teacher(cfg, model, runtime))
    if trainer.history:
        last = trainer.history[-1]
        log(f"grow: K = {sub_k} held-out {last['metric']} {last['value']:.4f}")
    return path


def prepare_phases(tasks: list[Task], output_dir: str | Path, model_cfg: ModelConfig,
                   train_cfg: TrainConfig, runtime: Runtime, *, log=print) -> tuple[ModelConfig, TrainConfig]:
    """Run the phases a recipe asks for before the main run and return the configs with them
    resolved: ``teacher="auto"`` trains the K = 1 teacher (:func:`train_teacher`) and
    ``grow_from="auto"`` the smaller models (:func:`train_smaller`); both become folders."""
    if train_cfg.teacher == "auto":
        if model_cfg.k == 1:
            raise ValueError("teacher 'auto' trains a K = 1 teacher for a merged model; this run has K = 1")
        teacher = train_teacher(tasks, output_dir, model_cfg, train_cfg, runtime, log=log)
        train_cfg = dataclasses.replace(train_cfg, teacher=str(teacher))
    if train_cfg.grow_from == "auto":
        model_cfg = with_default_stages(model_cfg)
        smaller = train_smaller(tasks, output_dir, model_cfg, train_cfg, runtime, log=log)
        train_cfg = dataclasses.replace(train_cfg, grow_from=str(smaller))
    return model_cfg, train_cfg
