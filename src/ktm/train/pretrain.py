"""``ktm pretrain``: a task-agnostic merger for one base model and K, trained on plain text.

Merged prompts learn slowly from a task's answers (about one bit per example,
``docs/RECIPES.md``). Pretraining gives the LoRA and the encoder a dense, label-free signal
first: each text is cut into a prompt, which the model reads merged, and its continuation
(:class:`ktm.tasks.text.TextTask`), and at every continuation token the model's next-token
distribution moves towards the base model's reading the *plain* prompt and the continuation
so far (``distill_answer``, :mod:`ktm.train.objectives`). The merged prefix must let the model
continue the text as the plain model would. The continuation's cross-entropy
(``task_loss``) and the other auxiliary losses (``reconstruct``, ``distill``, ``align``) can
be added.

It is an ordinary run of the one trainer (:func:`ktm.train.phases.train_run`): checkpoints,
``--resume`` and progress bars work as for ``ktm train``, and ``OUT/model`` is an ordinary
ktm model that ``ktm train --init-from OUT/model`` starts a task from.

Example::

    ktm pretrain --text ../shared/data/amazon/train.jsonl --k 4 --steps 200 --out runs/pre-k4
    ktm train --task amazon --reviews ../shared/data/amazon --k 4 --init-from runs/pre-k4/model --out runs/k4
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..config import ModelConfig, TrainConfig, save_json, to_dict
from .evaluate import subsample
from .fidelity import plain_answer_logits
from .phases import RunResult, train_run
from .recipes import get_recipe
from ..tasks.text import TextOptions, TextTask

#: what pretraining changes in a recipe's training settings (explicit options still win)
PRETRAIN_TRAIN = dict(distill_answer=1.0, task_loss=0.0, batch_size=8, eval_examples=64)


def pretrain_configs(recipe: str | None = None, model: dict | None = None,
                     train: dict | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The model and training settings of a pretraining run: ``recipe``'s, then
    :data:`PRETRAIN_TRAIN`, then the explicit ``model`` / ``train`` overrides."""
    r = get_recipe(recipe)
    return r.model_config(**(model or {})), r.train_config(**{**PRETRAIN_TRAIN, **(train or {})})


def pretrain_run(model_cfg: ModelConfig, train_cfg: TrainConfig, text: TextOptions, out, *, base=None,
                 tokenizer=None, device=None, dtype=None, resume: bool = False, overwrite: bool = False,
                 log=print, record: dict | None = None, **load_options) -> tuple[RunResult, dict[str, float]]:
    """Pretrain in folder ``out`` on ``text.text`` (see :func:`ktm.train.phases.train_run` for
    ``resume``, ``overwrite`` and ``record``). ``tokenizer`` cuts the texts (default: the base model's,
    loaded without its weights). Returns the run and the held-out perplexities of the base
    model reading the plain prompts and reading none (:func:`plain_perplexity`), as
    ``{"plain_perplexity", "no_context_perplexity"}``, which ``OUT/pretrain.json`` records
    with the text options and the evaluation history."""
    from ..loading import base_tokenizer

    if tokenizer is None:
        tokenizer = base_tokenizer(base, trust_remote_code=load_options.get("trust_remote_code"))
    task = TextTask(text.text, tokenizer, text)
    log(f"pretrain: {len(task.examples('train'))} training windows, {len(task.examples('test'))} held out, "
        f"from {task.label}")
    run = train_run(model_cfg, train_cfg, task, out, base=base, device=device, dtype=dtype, resume=resume,
                    overwrite=overwrite, record={**(record or {}), "pretrain": to_dict(text)}, log=log, **load_options)
    held_out = subsample(task.examples("test"), train_cfg.eval_examples, train_cfg.seed)
    references = {"plain_perplexity": plain_perplexity(run.model, held_out),
                  "no_context_perplexity": plain_perplexity(run.model, held_out, context=False)}
    if run.trainer.is_main:
        save_json(Path(out) / "pretrain.json", {"text": to_dict(text), **references,
                                                "history": run.trainer.history})
    return run, references


def plain_perplexity(model, examples, batch_size: int = 16, context: bool = True) -> float:
    """Perplexity of the examples' answers (no end token) under the base model reading the
    plain prompts (``model``'s adapters off, nothing merged): the target of pretraining.

    With ``context=False`` the base model reads no prompt at all, only a start token before
    each continuation (:func:`ktm.train.fidelity.plain_answer_logits`): the perplexity that a
    merged prefix carrying no information would get at best, so a merged model has learned
    to read its prompt only as far as it gets below it."""
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            answers = [e.answer for e in chunk]
            logits = plain_answer_logits(model, [e.prompt for e in chunk], answers, context=context)
            for lg, a in zip(logits, model.tokenize(answers, what="answer")):
                target = torch.tensor(a, device=lg.device)
                nll += torch.nn.functional.cross_entropy(lg, target, reduction="sum").item()
                count += len(a)
    finally:
        model.train(was_training)
    return math.exp(nll / max(count, 1))


__all__ = ["PRETRAIN_TRAIN", "pretrain_configs", "pretrain_run", "plain_perplexity"]
