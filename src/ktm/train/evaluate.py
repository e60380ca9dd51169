"""The one evaluator: scores any task's examples with its metric.

``accuracy`` tasks: greedy generation, normalised exact match, plus the majority-class
rate of the same examples. ``perplexity`` tasks: exp(mean NLL per answer token, end token
included) of the reference answers, and, on request, greedy generation on a fixed subset
scored by exact match and chrF (:func:`generation_scores`). Both report the mean prompt
length in tokens before and after merging. Numbers are returned as numbers; formatting
happens in the CLI.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..tasks.base import Example, Task, majority_rate


def subsample(examples: Sequence[Example], n: int, seed: int = 0) -> list[Example]:
    """A fixed random subset of ``n`` examples (all of them if n == 0 or n >= len)."""
    if n <= 0 or n >= len(examples):
        return list(examples)
    return random.Random(seed).sample(list(examples), n)


def macro_f1(references: Sequence[str], predictions: Sequence[str]) -> float:
    """Mean over the reference labels of each label's F1 (a prediction outside the labels
    counts as wrong for every label). A model that always answers the majority label
    gets 1 / (number of labels) x its F1 on that label, so imbalanced data cannot hide it.

    >>> macro_f1(["a", "a", "b", "b"], ["a", "a", "a", "a"])  # F1(a) = 2/3, F1(b) = 0
    0.3333333333333333
    >>> macro_f1(["a", "b"], ["a", "b"])
    1.0
    """
    if len(references) != len(predictions) or not references:
        raise ValueError("macro-F1 needs equally many references and predictions, at least one")
    scores = []
    for label in sorted(set(references)):
        tp = sum(r == label and p == label for r, p in zip(references, predictions))
        fp = sum(r != label and p == label for r, p in zip(references, predictions))
        fn = sum(r == label and p != label for r, p in zip(references, predictions))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def generation_scores(references: Sequence[str], predictions: Sequence[str]) -> dict:
    """``exact_match`` (the share of predictions equal to their reference once trailing
    whitespace is stripped from both), ``chrf`` (corpus chrF of sacrebleu's ``CHRF()``,
    character 6-grams, beta 2, 0-100) and ``generated`` (how many).

    >>> s = generation_scores(["x = 1\\n", "y = 2"], ["x = 1", "y = 3"])
    >>> s["exact_match"], s["generated"], 0 < s["chrf"] < 100
    (0.5, 2, True)
    """
    from sacrebleu.metrics import CHRF

    if len(references) != len(predictions) or not references:
        raise ValueError("generation scores need equally many references and predictions, at least one")
    refs, preds = [r.rstrip() for r in references], [p.rstrip() for p in predictions]
    return {"exact_match": sum(r == p for r, p in zip(refs, preds)) / len(refs),
            "chrf": CHRF().corpus_score(preds, [refs]).score, "generated": len(refs)}


#: generation on a perplexity task: new tokens = the reference's tokens + this margin ...
GENERATE_MARGIN = 16
#: ... and never more than this
GENERATE_CAP = 2048


def generate_answers(model, examples: Sequence[Example], batch_size: int = 32, progress: bool = False) -> list[str]:
    """Greedy answers of ``examples``, longest reference first. Each batch may generate its
    longest reference's token count + :data:`GENERATE_MARGIN` new tokens, at most
    :data:`GENERATE_CAP` and at most what the model's positions leave after the prompt."""
    answer_lengths = [len(a) for a in model.tokenize([e.answer for e in examples], what="answer")]
    prompt_blocks = model.merged_lengths([e.prompt for e in examples])
    order = sorted(range(len(examples)), key=lambda i: -answer_lengths[i])
    preds: dict[int, str] = {}
    for idx in tqdm(list(_batches(order, batch_size)), desc="generate", disable=not progress, leave=False):
        new = min(max(answer_lengths[i] for i in idx) + GENERATE_MARGIN, GENERATE_CAP)
        if model.max_length is not None:
            new = min(new, model.max_length - max(prompt_blocks[i] for i in idx))
        outs = model.generate([examples[i].prompt for i in idx], max_new_tokens=max(new, 1))
        preds.update(zip(idx, outs))
    return [preds[i] for i in range(len(examples))]


def answer_budget(model, task: Task, examples: Sequence[Example]) -> int:
    """The new tokens :func:`evaluate` generates per prompt on an accuracy task: enough for
    the longest reference answer of ``examples`` and its end token, at least
    ``task.max_new_tokens``. The trainer's pre-flight check uses it too, with every test
    example, so that a prompt the evaluator cannot run is refused before training."""
    answer_tokens = max((len(a) for a in model.tokenize([e.answer for e in examples], what="answer")), default=0)
    return max(task.max_new_tokens, answer_tokens + 1)


def _perplexity(model, examples: Sequence[Example], order: list[int], batch_size: int, bar,
                end_token: bool = True, gather=None) -> dict:
    nll, count = 0.0, 0
    for idx in _batches(order, batch_size):
        out = model([examples[i].prompt for i in idx], [examples[i].answer for i in idx], end_token=end_token)
        nll += out.loss.item() * out.targets.numel()
        count += out.targets.numel()
        bar.update(len(idx))
    if gather is not None:  # every process's sums
        parts = gather([(nll, count)])
        nll, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return {"value": math.exp(nll / count), "nll_per_token": nll / count, "answer_tokens": count}


def _answers(model, task: Task, examples: Sequence[Example], order: list[int], batch_size: int, bar,
             gather=None) -> dict[int, str]:
    """Greedy answers of ``examples[i]`` for ``i`` in ``order`` (and, with ``gather``, those
    of every process's share), with enough new tokens for the longest reference + end."""
    preds: dict[int, str] = {}
    new_tokens = answer_budget(model, task, examples)
    for idx in _batches(order, batch_size):
        outs = model.generate([examples[i].prompt for i in idx], max_new_tokens=new_tokens)
        preds.update(zip(idx, outs))
        bar.update(len(idx))
    return dict(gather(list(preds.items()))) if gather is not None else preds


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def evaluate(model, task: Task, examples: Sequence[Example] | None = None, *, split: str = "test",
             max_examples: int = 0, batch_size: int = 32, seed: int = 0,
             progress: bool = True, keep_predictions: int = 8, generate_examples: int = 0,
             shard: tuple[int, int] = (0, 1), gather=None) -> dict:
    """Score ``model`` (a :class:`ktm.KTokenMerging`) on a task.

    Returns a dict with ``metric``, ``value`` (accuracy in [0, 1] or perplexity),
    ``n``, ``prompt_tokens`` and ``merged_length`` (means), ``k``, and for accuracy tasks
    ``macro_f1``, ``majority_label`` / ``majority_rate`` and a few ``predictions`` (prompt,
    answer, prediction). For perplexity tasks, ``generate_examples`` > 0 also generates
    (greedy, :func:`generate_answers`) the answers of a fixed random subset of that many
    evaluated examples and adds ``exact_match``, ``chrf`` and ``generated``
    (:func:`generation_scores`).

    Under several processes each scores a share of the examples: ``shard`` is ``(this
    process's index, number of processes)`` and ``gather`` a collective that returns every
    process's list concatenated (``accelerate.utils.gather_object``); every process then
    returns the same result as one process scoring them all.
    """
    examples = subsample(examples if examples is not None else task.examples(split), max_examples, seed)
    if not examples:
        raise ValueError("no examples to evaluate")
    if generate_examples < 0:
        raise ValueError(f"generate_examples must be >= 0, got {generate_examples}")
    was_training = model.training
    model.eval()
    # longest first: batches hold prompts of similar length (results do not depend on it)
    lengths = [len(x) for x in model.tokenize([e.prompt for e in examples])]
    order = sorted(range(len(examples)), key=lambda i: -lengths[i])
    rank, world = shard
    mine = order[rank::world]  # by length: every share gets long and short prompts alike
    gather = gather if world > 1 else None
    bar = tqdm(total=len(mine), desc=f"eval {task.name}", disable=not progress, leave=False)
    result = {"metric": task.metric, "n": len(examples), "k": model.k,
              "prompt_tokens": sum(lengths) / len(lengths),
              "merged_length": sum(model.merged_lengths([e.prompt for e in examples])) / len(lengths)}
    try:
        if task.metric == "accuracy":
            preds = _answers(model, task, examples, mine, batch_size, bar, gather)
            refs = [task.normalise(e.answer) for e in examples]
            got = [task.normalise(preds[i]) for i in range(len(examples))]
            label, rate = majority_rate(examples, task.normalise)
            result.update(value=sum(r == g for r, g in zip(refs, got)) / len(refs), macro_f1=macro_f1(refs, got),
                          majority_label=label, majority_rate=rate,
                          predictions=[{"prompt": e.prompt, "answer": e.answer, "prediction": preds[i]}
                                       for i, e in enumerate(examples[:keep_predictions])])
        elif task.metric == "perplexity":
            result.update(_perplexity(model, examples, mine, batch_size, bar, task.answer_end, gather))
            if generate_examples:
                chosen = subsample(examples, generate_examples, seed)
                got = generate_answers(model, chosen, batch_size, progress)
                result.update(generation_scores([e.answer for e in chosen], got))
        else:
            raise ValueError(f"unknown metric {task.metric!r}")
    finally:
        bar.close()
        model.train(was_training)
    return result
