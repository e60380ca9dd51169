"""The one evaluator: scores any task's examples with its metric.

``accuracy`` tasks: greedy generation, normalised exact match, plus the majority-class
rate of the same examples. ``perplexity`` tasks: exp(mean NLL per answer token, end token
included) of the reference answers. Both report the mean prompt length in tokens before
and after merging. Numbers are returned as numbers; formatting happens in the CLI.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .blocks import num_blocks
from .tasks.base import Example, Task, majority_rate


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


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def evaluate(model, task: Task, examples: Sequence[Example] | None = None, *, split: str = "test",
             max_examples: int = 0, batch_size: int = 32, seed: int = 0,
             progress: bool = True, keep_predictions: int = 8) -> dict:
    """Score ``model`` (a :class:`ktm.KTokenMerging`) on a task.

    Returns a dict with ``metric``, ``value`` (accuracy in [0, 1] or perplexity),
    ``n``, ``prompt_tokens`` and ``merged_length`` (means), ``k``, and for accuracy tasks
    ``macro_f1``, ``majority_label`` / ``majority_rate`` and a few ``predictions`` (prompt,
    answer, prediction).
    """
    examples = subsample(examples if examples is not None else task.examples(split), max_examples, seed)
    if not examples:
        raise ValueError("no examples to evaluate")
    was_training = model.training
    model.eval()
    # longest first: batches hold prompts of similar length (results do not depend on it)
    lengths = [len(x) for x in model.tokenize([e.prompt for e in examples])]
    order = sorted(range(len(examples)), key=lambda i: -lengths[i])
    bar = tqdm(total=len(examples), desc=f"eval {task.name}", disable=not progress, leave=False)
    result = {"metric": task.metric, "n": len(examples), "k": model.k,
              "prompt_tokens": sum(lengths) / len(lengths),
              "merged_length": sum(num_blocks(n, model.k) for n in lengths) / len(lengths)}
    try:
        if task.metric == "accuracy":
            preds: dict[int, str] = {}
            # enough new tokens for the longest reference answer and its end token
            answer_tokens = max(len(a) for a in model.tokenize([e.answer for e in examples], what="answer"))
            new_tokens = max(task.max_new_tokens, answer_tokens + 1)
            for idx in _batches(order, batch_size):
                outs = model.generate([examples[i].prompt for i in idx], max_new_tokens=new_tokens)
                preds.update(zip(idx, outs))
                bar.update(len(idx))
            refs = [task.normalise(e.answer) for e in examples]
            got = [task.normalise(preds[i]) for i in range(len(examples))]
            label, rate = majority_rate(examples, task.normalise)
            result.update(value=sum(r == g for r, g in zip(refs, got)) / len(refs), macro_f1=macro_f1(refs, got),
                          majority_label=label, majority_rate=rate,
                          predictions=[{"prompt": e.prompt, "answer": e.answer, "prediction": preds[i]}
                                       for i, e in enumerate(examples[:keep_predictions])])
        elif task.metric == "perplexity":
            nll, count = 0.0, 0
            for idx in _batches(order, batch_size):
                out = model([examples[i].prompt for i in idx], [examples[i].answer for i in idx])
                nll += out.loss.item() * out.targets.numel()
                count += out.targets.numel()
                bar.update(len(idx))
            result.update(value=math.exp(nll / count), nll_per_token=nll / count, answer_tokens=count)
        else:
            raise ValueError(f"unknown metric {task.metric!r}")
    finally:
        bar.close()
        model.train(was_training)
    return result
