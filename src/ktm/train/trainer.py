"""The one trainer: any task, any K, one process or many (``accelerate launch``).

Phases: ``setup`` (optimiser, accelerator, resume), ``fit`` (steps with periodic evaluation
and checkpoints), ``save``. Data order is a pure function of (seed, step), so a run resumed
from a checkpoint continues exactly as the uninterrupted run would.

Checkpoint folder ``OUTPUT/checkpoint`` (replaced atomically each time) holds the model
(:meth:`KTokenMerging.save_pretrained`), ``optimizer.safetensors`` (AdamW moments, RNG
state) and ``trainer_state.json`` (step, history, configs). No pickle.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..config import TrainConfig, save_json, to_dict
from .evaluate import evaluate
from ..checkpoint import CheckpointError, recover_dir, write_dir
from ..model import KTokenMerging, load_teacher
from ..model.io import write_into
from .batches import batch_indices, group_lr_factors, process_share
from .objectives import add_auxiliary
from .preflight import check_examples, check_splits  # noqa: F401 (check_examples: public here too)
from .reporting import finish_trackers, numbers_of, tracker_options
from .state import ComputeClock, compute_of, load_optimizer, optimizer_tensors, restore_rng, rng_states
from ..model.blocks import num_blocks
from ..tasks.base import Example, Task

CHECKPOINT_DIR = "checkpoint"
FINAL_DIR = "model"
STATE_NAME = "trainer_state.json"
OPTIM_NAME = "optimizer.safetensors"


def mixed_precision(setting: str, model) -> str:
    """accelerate's ``mixed_precision`` for a run: ``setting`` unless it is ``"auto"``, which
    takes accelerate's own setting (``ACCELERATE_MIXED_PRECISION``, which ``accelerate launch``
    sets from its config) when there is one, else bf16 for a float32 model on a GPU and no
    autocast on a CPU (where bf16 pays only on AVX-512 BF16 / AMX cores: measure first,
    ``docs/PERFORMANCE.md``)."""
    import os

    if setting != "auto":
        return setting
    chosen = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if chosen:
        return chosen
    cuda = model.device.type == "cuda"
    return "bf16" if cuda and model.dtype == torch.float32 else "no"


class Deadline:
    """``TrainConfig.max_minutes``: whether a run has trained that long since ``start`` (a
    ``time.perf_counter()``). With several processes one late process stops them all at the same step."""

    def __init__(self, minutes: float | None, accelerator, log=print, start: float | None = None):
        self.minutes, self.acc, self.log = minutes, accelerator, log
        self.at = None if minutes is None else (time.perf_counter() if start is None else start) + 60 * minutes

    def passed(self, step: int) -> bool:
        if self.at is None:
            return False
        late = time.perf_counter() > self.at
        if self.acc.num_processes > 1:
            late = bool(self.acc.gather(torch.tensor([int(late)], device=self.acc.device)).max())
        if late:
            self.log(f"stopping at step {step}: {self.minutes:g} minutes of training (max_minutes) are up")
        return late


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
    on_evaluate: object = None  # called with each evaluation's history row (e.g. to probe or stop early)
    restart: int | None = None  # the step a run continued from without its optimiser state (continue_from)
    report_to: str = "none"  # accelerate tracker: none, tensorboard (OUT/logs) or wandb (ktm.train.reporting)
    # runtime state, set up in __post_init__ and by fit
    accelerator: object = field(init=False, default=None, repr=False)
    optimizer: object = field(init=False, default=None, repr=False)
    wrapped: object = field(init=False, default=None, repr=False)  # the model as accelerate prepared it
    checked: set = field(init=False, default_factory=set, repr=False)  # (task id, split) already checked
    compute: ComputeClock = field(init=False, default_factory=ComputeClock)  # CPU thread- and GPU seconds
    tracking: bool = field(init=False, default=False)  # trackers started (report_to)

    # ------------------------------------------------------------------ setup
    def __post_init__(self):
        from accelerate import Accelerator

        self.output_dir = Path(self.output_dir) if self.output_dir else None
        if self.teacher is None and self.cfg.teacher == "auto":
            raise ValueError("teacher='auto' trains a K = 1 teacher first: use ktm.train.phases.train_run (which "
                             "resolves it), or pass the folder of a trained K = 1 model as teacher")
        if self.teacher is None and self.cfg.teacher:
            self.teacher = load_teacher(self.cfg.teacher, self.model)
        if self.model.config.keep and (self.cfg.distill or self.cfg.align):
            raise ValueError("distill and align match the teacher at block ends, which kept spans (keep) move: "
                             "train with keep without them")
        self.accelerator = Accelerator(mixed_precision=mixed_precision(self.cfg.mixed_precision, self.model),
                                       gradient_accumulation_steps=self.cfg.grad_accum,
                                       **tracker_options(self.report_to, self.output_dir))
        groups = self.model.trainable_parameters()
        lrs = self._base_lrs()
        self.optimizer = torch.optim.AdamW(
            [{"params": groups[name], "lr": lrs[name], "base_lr": lrs[name], "name": name}
             for name in ("lora", "encoder")],
            weight_decay=self.cfg.weight_decay,
        )
        self.wrapped, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        torch.manual_seed(self.cfg.seed)

    def _base_lrs(self) -> dict[str, float]:
        """The learning rate of each parameter group before the schedule's factor."""
        return {"lora": self.cfg.lr, "encoder": self.cfg.encoder_lr or self.cfg.lr}

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
        # every example is checked before the first step: a bad one must not end a run later
        check_splits(self.model, [(task, "train"), (eval_task or task, "test")], self.checked)
        labels = task.labels(train) if task.metric == "accuracy" else None
        world, rank = acc.num_processes, acc.process_index
        if self.report_to != "none" and not self.tracking:
            acc.init_trackers("ktm", config={k: v for k, v in to_dict(cfg).items()
                                             if isinstance(v, (int, float, str, bool))})
            self.tracking = True
        micro = cfg.batch_size // cfg.grad_accum
        self.model.train()
        bar = tqdm(total=end - self.step, desc=f"train {task.name} K={self.model.k}",
                   disable=not (self.progress and self.is_main), dynamic_ncols=True)
        seen, t0, ema = 0, time.perf_counter(), {}
        # wall time and compute count on across fit calls (curricula) and resumes, from the history
        self.compute.start(t0, self.history, next(self.model.parameters()).device.type == "cuda")
        deadline = Deadline(cfg.max_minutes, acc, self.log, start=t0)
        while self.step < end and not deadline.passed(self.step):
            factors = group_lr_factors(self.step, cfg, *self.schedule_cycle, restart=self.restart)
            for g in self.optimizer.param_groups:
                g["lr"] = g["base_lr"] * factors[g["name"]]
            # every process draws the same global batch and takes its own share
            idx = batch_indices(train, self.step, cfg, labels, size=cfg.batch_size * world)
            batch = [train[i] for i in process_share(idx, world, rank)]
            answer_tokens = sum(map(len, self.model.tokenize([train[i].answer for i in idx], what="answer")))
            targets = answer_tokens + (len(idx) if task.answer_end else 0)  # + the end tokens
            step_parts = self._train_step(batch, micro, task.answer_end, global_targets=targets)
            self.step += 1
            seen += len(batch) * world
            # "loss" is the task loss alone, comparable across runs with and without aux terms
            for name, value in step_parts.items():
                ema[name] = value if name not in ema else 0.9 * ema[name] + 0.1 * value
            if self.tracking:
                acc.log({**numbers_of({f"{n}_loss": v for n, v in step_parts.items()}, "train/"),
                         "train/lr": self.optimizer.param_groups[0]["lr"]}, step=self.step)
            bar.update(1)
            bar.set_postfix(loss=f"{ema['task']:.4f}",
                            **{n: f"{v:.3f}" for n, v in ema.items() if n != "task"},
                            ex_s=f"{seen / (time.perf_counter() - t0):.1f}")
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < end:
                self._evaluate(eval_task or task, ema)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < end:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()  # before the final evaluation: a failure there loses no training
        if not self.history or self.history[-1]["step"] != self.step:
            self._evaluate(eval_task or task, ema)
            self._save_state()
        return self.history

    def _train_step(self, batch: list[Example], micro: int, end_token: bool = True, *,
                    global_targets: int | None = None) -> dict[str, float]:
        """One optimiser step on ``batch`` in micro-batches of ``micro`` (gradient
        accumulation); returns each loss term, averaged over the micro-batches. ``end_token``:
        whether answers end with the end token (``Task.answer_end``).

        ``global_targets``: the target tokens of the global batch (every process). Each
        micro-batch's task loss (a mean over its own targets) is then weighted by its share of
        them, so the step's gradient is the mean over every target token of the global batch
        whatever the split into processes and micro-batches (accelerate divides the loss by
        ``grad_accum``, data parallel averages over processes); with one process and no
        accumulation the weight is exactly 1."""
        cfg, acc = self.cfg, self.accelerator
        weights = cfg.loss_weights()
        parts: dict[str, float] = {}
        for j in range(0, len(batch), micro):
            chunk = batch[j:j + micro]
            with acc.accumulate(self.wrapped), acc.autocast():
                out = self.wrapped([e.prompt for e in chunk], [e.answer for e in chunk], all_layers=weights.all_layers,
                                   end_token=end_token)
                if global_targets:
                    share = out.targets.numel() * cfg.grad_accum * acc.num_processes / global_targets
                    out = out if share == 1.0 else dataclasses.replace(out, loss=out.loss * share)
                out = add_auxiliary(self.model, out, weights, teacher=self.teacher)
                acc.backward(out.loss)
                if acc.sync_gradients and cfg.max_grad_norm:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            for name, value in out.parts.items():
                parts[name] = parts.get(name, 0.0) + value.item() / cfg.grad_accum
        return parts

    def _evaluate(self, task: Task, losses: dict | None = None) -> dict:
        from accelerate.utils import gather_object

        acc = self.accelerator  # each process scores its share of the examples, in the run's precision
        with acc.autocast():  # as training's forward passes, and as transformers' Trainer evaluates
            res = evaluate(self.model, task, max_examples=self.cfg.eval_examples, seed=self.cfg.seed,
                           progress=False, shard=(acc.process_index, acc.num_processes), gather=gather_object)
        res.pop("predictions", None)
        losses = losses or {}
        train_loss = losses.get("task")
        now = time.perf_counter()
        row = {"step": self.step, "task": task.name, "train_loss": train_loss,
               **{f"train_{n}_loss": v for n, v in losses.items() if n != "task"},
               "time": time.time(),
               **self.compute.seconds(self.history, now), **res}
        self.history.append(row)
        if self.tracking:
            self.accelerator.log(numbers_of({k: v for k, v in row.items() if k != "step"}, "eval/"), step=self.step)
        if self.is_main and self.output_dir is not None:
            # written at every evaluation, so a run stopped between checkpoints keeps its curve
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_json(self.output_dir / "history.json", {"history": self.history})
        if self.on_evaluate is not None:
            self.on_evaluate(row)
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
        rng = rng_states(self.accelerator)  # every process's, gathered (a collective: all call it)
        if not self.is_main:
            return None
        def write(tmp: Path) -> None:
            write_into(self.model, tmp)  # straight into the checkpoint's temporary folder
            tensors, _ = optimizer_tensors(self.optimizer)
            save_file({**tensors, **rng}, str(tmp / OPTIM_NAME))
            self._save_state(tmp)

        # the whole folder appears at once: never half a checkpoint
        ckpt = write_dir(self.output_dir / CHECKPOINT_DIR, write)
        save_json(self.output_dir / "history.json", {"history": self.history})
        return ckpt

    def _save_state(self, folder: Path | None = None) -> None:
        """Write ``trainer_state.json`` (step, history, optimiser groups, configuration) into
        ``folder`` (default: the current checkpoint, after an evaluation that followed it)."""
        if self.output_dir is None or not self.is_main:
            return
        folder = folder or self.output_dir / CHECKPOINT_DIR
        _, groups = optimizer_tensors(self.optimizer, with_state=False)
        save_json(folder / STATE_NAME, {"step": self.step, "history": self.history, "param_groups": groups,
                                        "train_config": to_dict(self.cfg), "extra": self.extra_state,
                                        **self.compute.seconds(self.history)})

    def resume(self) -> bool:
        """Continue from ``OUTPUT/checkpoint`` if there is one; returns whether it did."""
        if self.output_dir is None:
            return False
        ckpt = self.output_dir / CHECKPOINT_DIR
        if self.is_main and recover_dir(ckpt):
            self.log(f"{ckpt} was being replaced when the run stopped: continuing from the previous checkpoint")
        self.accelerator.wait_for_everyone()  # the other processes read what the first recovered
        if not (ckpt / STATE_NAME).is_file():
            return False
        try:
            state = json.loads((ckpt / STATE_NAME).read_text())
            missing = [k for k in ("step", "history", "param_groups") if k not in state]
            if missing or not isinstance(state["step"], int):
                raise ValueError(f"{STATE_NAME} has no integer 'step', 'history' and 'param_groups' "
                                 f"(missing: {missing})")
            tensors = load_file(str(ckpt / OPTIM_NAME))
        except Exception as e:  # noqa: BLE001 - any unreadable file is a corrupt checkpoint
            raise CheckpointError(f"checkpoint {ckpt} is unreadable ({e}); move it away to start over") from e
        self.model.load_trained(ckpt)
        load_optimizer(self.optimizer, tensors, state["param_groups"])
        restore_rng(tensors, self.accelerator.process_index)
        self.step, self.history = state["step"], state["history"]
        self.compute.saved = compute_of(state)  # wall time and compute up to the checkpoint
        self.extra_state = state.get("extra", {})
        self._apply_changed_settings(state.get("train_config", {}))
        if self.is_main:
            self.log(f"resumed from {ckpt} at step {self.step}")
        return True

    def continue_from(self, step: int, history: list[dict], restarts: list[int] = ()) -> None:
        """Continue a run at global ``step`` from weights alone (e.g. a shipped bf16 merger and its
        card's ``history``), without its optimiser state or random state: the batches are those
        the uninterrupted run would take from ``step`` on (they depend on the step only), the
        AdamW moments start from zero and the learning rate warms up again over
        ``cfg.warmup_steps``. Less exact than :meth:`resume`; ``docs/RECIPES.md`` measures it.
        ``restarts``: the steps at which the run being continued had already restarted so."""
        self.step, self.history, self.restart = step, list(history), step
        self.extra_state["restarts"] = [*restarts, step]
        if self.is_main:
            self.log(f"continuing at step {step} from weights alone: optimiser state restarts, "
                     f"learning rate warms up over {self.cfg.warmup_steps} steps")

    def _apply_changed_settings(self, saved: dict) -> None:
        """Settings given anew on resume win over the checkpoint's: the learning rates are
        applied to the restored optimiser (and the weight decay), and every change is logged and recorded in the
        checkpoint's ``extra.resumed`` (what really ran). The model's settings cannot change:
        :meth:`KTokenMerging.load_trained` refuses those."""
        now = to_dict(self.cfg)
        changed = {k: [saved[k], now[k]] for k in now if k in saved and saved[k] != now[k]}
        for g in self.optimizer.param_groups:  # the restored groups hold the checkpoint's values
            g["base_lr"] = self._base_lrs()[g["name"]]
            g["weight_decay"] = self.cfg.weight_decay
        if changed:
            self.extra_state.setdefault("resumed", []).append({"step": self.step, "changed": changed})
            if self.is_main:
                self.log("resume: settings changed since the checkpoint, applied from step "
                         f"{self.step}: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))

    def save_final(self) -> Path | None:
        """Write the trained model to ``OUTPUT/model`` (loadable with from_pretrained); the
        main process writes it, and every process returns its path once it is there."""
        if self.output_dir is None:
            return None
        path = self.output_dir / FINAL_DIR
        finish_trackers(self.accelerator)
        if self.is_main:
            last = self.history[-1] if self.history else {}
            shown = ("task", "metric", "value", "majority_rate", "step")
            path = self.model.save_pretrained(path, card={"evaluation": {k: last[k] for k in shown if k in last}})
        self.accelerator.wait_for_everyone()
        return path
