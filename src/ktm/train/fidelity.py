"""``ktm fidelity``: how closely a merged model reads like the plain base model, with no task training.

Fine-tuning on a task adds its own noise (seeds, label priors, a few hundred steps), so a
merger is first judged against the model it should imitate: the base model with its LoRA
off, reading the *plain* prompt. On held-out prose windows (``prompt_tokens`` tokens read
merged, then ``continuation_tokens`` tokens teacher-forced) it measures

* the continuation perplexity of the merged model and of the plain model, and their ratio;
* top-1 agreement: the share of continuation positions where the merged model's next-token
  argmax equals the plain model's;
* the mean KL(plain || merged) per continuation token;

and, on reviews in the amazon task's prompt (``Review: ..., Label:``), how often the merged
model's answer (``positive`` or ``negative``, by the larger of the two labels' first-token
logits) equals the plain model's, and each one's accuracy against the reviews' ratings.

Windows are cut from the start of each text (one per text, so they spread over documents),
exactly ``prompt_tokens + continuation_tokens`` tokens, and only as many texts are read as
the windows need.

Example::

    >>> from ktm import KTokenMerging                                         # doctest: +SKIP
    >>> m = KTokenMerging.from_pretrained("zoo:default-k2")                   # doctest: +SKIP
    >>> fidelity(m, prose_windows("../shared/data/text/dev.jsonl", m.tokenizer, windows=64))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..model.blocks import pad_sequences
from ..tasks.base import Example


def _opt(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class FidelityOptions:
    """What ``ktm fidelity`` measures on (each field is a ``--field-name`` flag)."""

    prompt_tokens: int = _opt("tokens of each prose window that the merged model reads merged", 256)
    continuation_tokens: int = _opt("tokens after them, teacher-forced and compared", 32)
    windows: int = _opt("prose windows (one from the start of each text)", 200)
    review_windows: int = _opt("reviews for the answer agreement (0: none)", 200)
    review_chars: int = _opt("characters of each review kept (0: all)", 0)
    batch_size: int = _opt("windows per forward pass", 8)

    def __post_init__(self):
        from ..config import check_types

        check_types(self)
        for name in ("prompt_tokens", "continuation_tokens", "windows", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.review_windows < 0 or self.review_chars < 0:
            raise ValueError("review_windows and review_chars must be >= 0")


def prose_windows(source, tokenizer, prompt_tokens: int = 256, continuation_tokens: int = 32,
                  windows: int = 200, text_field: Sequence[str] = ("text",)) -> list[Example]:
    """The first ``windows`` windows of ``source`` (a ``.jsonl`` / ``.txt`` file or a folder,
    as ``ktm pretrain`` reads it): from each text long enough, its first
    ``prompt_tokens + continuation_tokens`` tokens, cut at the tokens' character offsets.
    Texts are read one at a time and reading stops when enough windows are cut."""
    from ..tasks.text import TextOptions, TextTask, read_texts

    opts = TextOptions(text=(str(source),), text_field=tuple(text_field), prompt_tokens=prompt_tokens,
                       continuation_tokens=continuation_tokens, min_prompt_tokens=prompt_tokens,
                       windows_per_text=1)
    cutter = TextTask(str(source), tokenizer, opts)
    out: list[Example] = []
    for where, text in read_texts(source, opts):
        out += cutter.windows(where, text)[:1]
        if len(out) >= windows:
            break
    if not out:
        raise ValueError(f"{source}: no text has {prompt_tokens} + {continuation_tokens} tokens")
    return out


@torch.no_grad()
def plain_answer_logits(model, prompts: list[str], answers: list[str], context: bool = True) -> list[torch.Tensor]:
    """Per example, the vocabulary logits (a_i, V) of the *plain* base model (``model``'s adapters
    off, nothing merged) at the positions that predict each of the answer's a_i tokens
    (tokenised as :meth:`KTokenMerging.forward` tokenises them, without the end token).

    ``context=False``: the base model reads no prompt, only a start token (the tokenizer's BOS,
    else its end token) before each answer: what a prefix that carries nothing gets at best."""
    if context:
        p_ids = model.tokenize(prompts)
    else:
        start = model.tokenizer.bos_token_id
        p_ids = [[model.tokenizer.eos_token_id if start is None else start]] * len(prompts)
    a_ids = model.tokenize(answers, what="answer")
    seqs = model.embed_each([p + a[:-1] for p, a in zip(p_ids, a_ids)])
    embeds, mask = pad_sequences(seqs, side="right")
    with model.lm.disable_adapter():
        hidden = model.decode(embeds, mask).last_hidden_state
    return [model.logits(hidden[row, len(p) - 1:len(p) - 1 + len(a)]) for row, (p, a) in enumerate(zip(p_ids, a_ids))]


@torch.no_grad()
def merged_answer_logits(model, prompts: list[str], answers: list[str]) -> list[torch.Tensor]:
    """As :func:`plain_answer_logits` for the merged model (LoRA on, prompt merged)."""
    out = model(prompts, answers, end_token=False)
    counts = torch.bincount(out.rows.cpu(), minlength=len(prompts)).tolist()
    return list(out.logits.split(counts))


def compare_continuations(model, windows: list[Example], batch_size: int = 8, progress: bool = True) -> dict:
    """Perplexities, top-1 agreement and KL of the merged against the plain model on ``windows``."""
    nll_m = nll_p = kl = 0.0
    agree = count = 0
    for i in tqdm(range(0, len(windows), batch_size), desc="fidelity: prose", disable=not progress,
                  dynamic_ncols=True):
        chunk = windows[i:i + batch_size]
        prompts, answers = [e.prompt for e in chunk], [e.answer for e in chunk]
        plain = plain_answer_logits(model, prompts, answers)
        merged = merged_answer_logits(model, prompts, answers)
        for a, lp, lm in zip(model.tokenize(answers, what="answer"), plain, merged):
            target = torch.tensor(a, device=lp.device)
            nll_p += F.cross_entropy(lp, target, reduction="sum").item()
            nll_m += F.cross_entropy(lm, target, reduction="sum").item()
            logp, logm = F.log_softmax(lp, -1), F.log_softmax(lm, -1)
            kl += F.kl_div(logm, logp, log_target=True, reduction="sum").item()
            agree += int((lp.argmax(-1) == lm.argmax(-1)).sum())
            count += len(a)
    merged_ppl, plain_ppl = math.exp(nll_m / count), math.exp(nll_p / count)
    return {"windows": len(windows), "tokens": count, "merged_perplexity": merged_ppl,
            "plain_perplexity": plain_ppl, "perplexity_ratio": merged_ppl / plain_ppl,
            "top1_agreement": agree / count, "kl_per_token": kl / count}


def compare_answers(model, reviews: list[Example], batch_size: int = 8, progress: bool = True) -> dict:
    """How often the merged model's sentiment answer equals the plain model's on ``reviews``
    (amazon examples), each answer the label whose first token has the larger logit."""
    from ..tasks.amazon import NEGATIVE, POSITIVE

    pos, neg = (ids[0] for ids in model.tokenize([POSITIVE, NEGATIVE], what="answer"))
    same = right_m = right_p = said_pos_m = said_pos_p = 0
    for i in tqdm(range(0, len(reviews), batch_size), desc="fidelity: reviews", disable=not progress,
                  dynamic_ncols=True):
        chunk = reviews[i:i + batch_size]
        prompts, answers = [e.prompt for e in chunk], [POSITIVE] * len(chunk)
        plain = plain_answer_logits(model, prompts, answers)
        merged = merged_answer_logits(model, prompts, answers)
        for e, lp, lm in zip(chunk, plain, merged):
            say_p, say_m = bool(lp[0, pos] > lp[0, neg]), bool(lm[0, pos] > lm[0, neg])
            gold = e.answer == POSITIVE
            same += say_p == say_m
            right_p += say_p == gold
            right_m += say_m == gold
            said_pos_p += say_p
            said_pos_m += say_m
    n = len(reviews)
    return {"reviews": n, "answer_agreement": same / n, "merged_accuracy": right_m / n,
            "plain_accuracy": right_p / n, "merged_positive_rate": said_pos_m / n,
            "plain_positive_rate": said_pos_p / n}


def fidelity(model, windows: list[Example], reviews: list[Example] | None = None, batch_size: int = 8,
             progress: bool = True) -> dict:
    """Everything ``ktm fidelity`` reports for ``model`` (a :class:`~ktm.model.KTokenMerging`):
    :func:`compare_continuations` on the prose ``windows``, and :func:`compare_answers` on the
    amazon ``reviews`` when given (under ``"reviews"``). The model is left in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        result = {"k": model.k, **compare_continuations(model, windows, batch_size, progress)}
        if reviews:
            result["amazon"] = compare_answers(model, reviews, batch_size, progress)
    finally:
        model.train(was_training)
    return result


def fidelity_line(result: dict) -> str:
    """One line of the numbers, for the CLI and the demo."""
    text = (f"K = {result['k']}: continuation perplexity {result['merged_perplexity']:.2f} merged vs "
            f"{result['plain_perplexity']:.2f} plain ({result['perplexity_ratio']:.3f}x), top-1 agreement "
            f"{100 * result['top1_agreement']:.1f}% over {result['tokens']} tokens of {result['windows']} windows")
    if "amazon" in result:
        a = result["amazon"]
        text += (f"; review answers agree {100 * a['answer_agreement']:.1f}% of {a['reviews']} "
                 f"(accuracy {100 * a['merged_accuracy']:.1f}% merged, {100 * a['plain_accuracy']:.1f}% plain)")
    return text


__all__ = ["FidelityOptions", "compare_answers", "compare_continuations", "fidelity", "fidelity_line",
           "merged_answer_logits", "plain_answer_logits", "prose_windows"]
