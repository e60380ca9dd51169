"""Pre-flight checks of a run: every example fits the model before the first step, so that a
bad one cannot end a run hours later."""

from __future__ import annotations

from ..model.blocks import num_blocks
from ..tasks.base import Example

#: a prompt with more characters than this many per position the model reads cannot fit
#: (no token is that long), so it is refused before the tokenizer sees it
MAX_CHARS_PER_POSITION = 64


def check_examples(model, examples: list[Example], what: str, generate: int = 0) -> None:
    """Raise ``ValueError`` for the first example that cannot be trained on or scored: an
    empty prompt, one with no tokens, or a prompt + answer too long for the model once
    merged, or (``generate`` > 0: the new tokens the evaluator generates per prompt) a
    prompt that leaves fewer positions than that. The message names the example's
    ``file:line`` (or its index in ``what``)."""
    if not examples:
        raise ValueError(f"{what}: no examples")
    where = [e.source or f"{what} example {i}" for i, e in enumerate(examples)]
    limit = model.max_length
    for w, e in zip(where, examples):
        if not e.prompt.strip():
            raise ValueError(f"{w}: the prompt is empty")
        if limit and len(e.prompt) + len(e.answer) > limit * MAX_CHARS_PER_POSITION:
            raise ValueError(f"{w}: the example has {len(e.prompt) + len(e.answer):,} characters, far more "
                             f"than the {limit} positions the model reads can hold")
    for start in range(0, len(examples), 512):
        chunk = examples[start:start + 512]
        prompts = model.tokenizer([e.prompt for e in chunk], add_special_tokens=False)["input_ids"]
        answers = model.tokenizer([e.answer for e in chunk], add_special_tokens=False)["input_ids"]
        # positions read: ceil(n / K), or with kept spans (ModelConfig.keep) what they leave
        reads = model.merged_lengths([e.prompt for e in chunk]) if model.config.keep and all(prompts) else None
        for i, (w, p, a) in enumerate(zip(where[start:], prompts, answers)):
            if not p:
                raise ValueError(f"{w}: the prompt has no tokens")
            read = reads[i] if reads else num_blocks(len(p), model.k)
            need = read + len(a)  # merged prompt + answer (+ end, - last input)
            if limit and need > limit:
                raise ValueError(f"{w}: the prompt's {len(p)} tokens merge to {read} "
                                 f"embeddings, + {len(a)} answer tokens = {need} > {limit} positions the "
                                 f"model reads")
            if limit and read + generate > limit:
                raise ValueError(f"{w}: the prompt's {len(p)} tokens merge to {read} embeddings, + {generate} "
                                 f"tokens the evaluator generates = {read + generate} > {limit} positions "
                                 f"the model reads")


def check_splits(model, splits, checked: set) -> None:
    """:func:`check_examples` on each ``(task, split)`` not in ``checked`` (then added to it); the
    test split of an accuracy task with the new tokens the evaluator will generate."""
    from .evaluate import answer_budget

    for task, split in splits:
        if (id(task), split) in checked:
            continue
        examples = task.examples(split)
        new = answer_budget(model, task, examples) if split == "test" and task.metric == "accuracy" else 0
        check_examples(model, examples, f"{task.label} {split}", generate=new)
        checked.add((id(task), split))
