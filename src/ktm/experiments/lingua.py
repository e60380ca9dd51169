"""The ``llmlingua2`` baseline: prompts compressed by LLMLingua-2 before a plain model reads them.

LLMLingua-2 (Pan et al., 2024; Microsoft's ``llmlingua`` package) is a token classifier
(XLM-RoBERTa or multilingual BERT) that scores each word of a prompt and keeps the
best-scored words, in order, until a kept fraction ``rate`` is reached. ktm compares it
with K-Token Merging at the same kept fraction ``rate = 1 / K``: every prompt is compressed
here once, then a plain (K = 1) LoRA model is trained and evaluated on the compressed
prompts by the usual trainer.

How ktm calls LLMLingua-2 (each choice is part of :attr:`LinguaCompressor.key`, so cached
prompts never mix settings):

* **The final cue is kept verbatim.** A prompt's last ``cue_words`` words (with the
  whitespace around them) are never compressed: ``Label:`` of a review, ``Answer:`` of a
  tree question, ``Content:`` of a commit are where the answer starts, and dropping them
  would test the prompt format rather than the compression. The rest (the body) gets a
  lower rate, so that the whole prompt still keeps about ``rate`` of its tokens. One word
  by default; ``cue_words=5`` keeps a tree question's ``Parent: AA, Child: BB, Answer:``.
  (``force_tokens`` would not do: it keeps a token wherever it occurs, not just at the end.)
* **Tokens are counted offline, with a tokenizer of ours.** ``llmlingua`` weighs each word
  by its GPT-3.5 token count (``tiktoken``, which downloads its table on first use). ktm
  counts with ``tokenizer`` instead: the LM's tokenizer, so that ``1 / K`` is a fraction
  of the LM's prompt tokens, or by default the compressor's own.
* **Whitespace is normalised.** The XLM-RoBERTa tokenizer reads newlines and runs of
  spaces as one space, so a compressed body is one line, as in LLMLingua-2 itself.
* Constructing ``llmlingua.PromptCompressor`` reseeds Python, NumPy and torch (seed 42);
  the caller's random states are restored afterwards.

Example::

    >>> split_cue("Review: great shoes, Label:", 1)
    ('Review: great shoes,', ' Label:')
    >>> body_rate(rate=0.25, n_prompt=100, n_body=96, n_cue=4)
    0.21875
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import types
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ..tasks.base import Example, ExamplesTask

DEFAULT_LINGUA_MODEL = "microsoft/llmlingua-2-xlm-roberta-large-meetingbank"

#: LLMLingua-2's word rules exist for these two encoders; they are chosen by model name
#: inside ``llmlingua``, so a model is named after its family whatever its folder is called
FAMILIES = {"xlm-roberta": "xlm-roberta-large", "bert": "bert-base-multilingual-cased"}

INSTALL_HINT = "pip install 'k-token-merging[llmlingua]'"

#: the cache is rewritten after every this many new prompts (an interrupted run keeps them)
CACHE_EVERY = 64


def available() -> bool:
    """Whether the ``llmlingua`` package can be imported."""
    try:
        import llmlingua  # noqa: F401
    except ImportError:
        return False
    return True


def check_rate(rate: float) -> float:
    """``rate`` (the kept fraction, ``1 / K``) as a float, or a ValueError if not in (0, 1]."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise ValueError(f"rate is the kept fraction 1/K and must be in (0, 1], got {rate!r}")
    return float(rate)


def split_cue(prompt: str, cue_words: int) -> tuple[str, str]:
    """``(body, cue)`` with ``body + cue == prompt``: the cue is the last ``cue_words``
    whitespace-separated words with the whitespace before and after them (all of the
    prompt when it has no more words than that).

    >>> split_cue("Tree: AA, Child: BB, Answer: ", 1)
    ('Tree: AA, Child: BB,', ' Answer: ')
    >>> split_cue("Label:", 1), split_cue("a b ", 0)
    (('', 'Label:'), ('a b', ' '))
    """
    if cue_words < 0:
        raise ValueError(f"cue_words must be >= 0, got {cue_words}")
    words = list(re.finditer(r"\S+", prompt))
    if len(words) <= cue_words:
        return "", prompt
    start = words[-cue_words - 1].end()
    return prompt[:start], prompt[start:]


def body_rate(rate: float, n_prompt: int, n_body: int, n_cue: int) -> float:
    """The rate for a body of ``n_body`` tokens so that, with a verbatim cue of ``n_cue``
    tokens, about ``rate * n_prompt`` tokens are kept; clipped to [0, 1] (0: drop the body).

    >>> body_rate(0.5, 10, 8, 2), body_rate(0.1, 10, 8, 2), body_rate(1.0, 10, 8, 2)
    (0.375, 0.0, 1.0)
    """
    if n_body <= 0:
        return 1.0
    return min(1.0, max(0.0, (rate * n_prompt - n_cue) / n_body))


def join_cue(body: str, cue: str) -> str:
    """A compressed body and its verbatim cue, with the cue's own leading whitespace.

    >>> join_cue("Review: great ", " Label:"), join_cue("", " Label:")
    ('Review: great Label:', 'Label:')
    """
    body = body.strip()
    return body + cue if body else cue.lstrip()


class _Counter:
    """Stands in for ``llmlingua``'s tiktoken encoder: ``encode(text)`` gives ``text``'s
    tokens under a Hugging Face tokenizer (set once loaded). LLMLingua-2 passes
    SentencePiece words, where ``▁`` marks a word start: it is read as a space."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text.replace("▁", " "), add_special_tokens=False)["input_ids"]


@contextlib.contextmanager
def _random_state_kept():
    """Restore Python's, NumPy's and torch's random states, the cuDNN flags and
    ``PYTHONHASHSEED`` afterwards (``PromptCompressor`` seeds them all with 42)."""
    import numpy as np
    import torch

    py, npy = random.getstate(), np.random.get_state()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    hashseed = os.environ.get("PYTHONHASHSEED")
    try:
        with torch.random.fork_rng():
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        if hashseed is None:
            os.environ.pop("PYTHONHASHSEED", None)
        else:
            os.environ["PYTHONHASHSEED"] = hashseed


@contextlib.contextmanager
def _patched(module, name: str, value):
    """``module.name`` set to ``value`` inside the block."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _family(model: str) -> str:
    """The ``llmlingua`` family name of a token classifier folder or hub id, or a ValueError."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the LLMLingua-2 model {model!r} ({type(e).__name__}); "
                         "offline, download it once and pass its local folder") from e
    archs = config.architectures or []
    if config.model_type not in FAMILIES or not any("ForTokenClassification" in a for a in archs):
        raise ValueError(f"{model!r} is not an LLMLingua-2 model: expected an XLM-RoBERTa or BERT "
                         f"token classifier, got {config.model_type!r} {archs}")
    return FAMILIES[config.model_type]


class LinguaCompressor:
    """LLMLingua-2 with ktm's choices (see the module docstring); the model loads once.

    Args:
        model: a hub id or local folder of an LLMLingua-2 token classifier.
        device: where the classifier runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        cue_words: the prompt's last words kept verbatim (>= 0).
        tokenizer: counts the tokens that ``rate`` is a fraction of (the LM's tokenizer);
            None: the classifier's own.

    Example::

        >>> c = LinguaCompressor("microsoft/llmlingua-2-xlm-roberta-large-meetingbank")  # doctest: +SKIP
        >>> c.compress(["Review: the shoes fit well and look great, Label:"], rate=0.5)  # doctest: +SKIP
        ['shoes fit well look great, Label:']
    """

    def __init__(self, model: str = DEFAULT_LINGUA_MODEL, device: str = "cpu", cue_words: int = 1,
                 tokenizer=None):
        try:
            from llmlingua import prompt_compressor
        except ImportError as e:
            raise ImportError(f"the llmlingua2 baseline needs the llmlingua package: {INSTALL_HINT}") from e
        if isinstance(cue_words, bool) or not isinstance(cue_words, int) or cue_words < 0:
            raise ValueError(f"cue_words must be an integer >= 0, got {cue_words!r}")
        self.model, self.cue_words = str(model), cue_words
        family = _family(self.model)
        counter = _Counter(tokenizer)
        # tiktoken is replaced for the constructor only: it is where llmlingua gets its encoder
        fake_tiktoken = types.SimpleNamespace(encoding_for_model=lambda name: counter)
        with _random_state_kept(), _patched(prompt_compressor, "tiktoken", fake_tiktoken):
            try:
                self._pc = prompt_compressor.PromptCompressor(
                    model_name=self.model, device_map=device, use_llmlingua2=True,
                    model_config={"trust_remote_code": False})
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot load the LLMLingua-2 model {self.model!r}: {e}") from e
        self._pc.model_name = family  # llmlingua picks its word rules by name
        counter.tokenizer = counter.tokenizer or self._pc.tokenizer
        self._count = lambda text: len(counter.encode(text))
        counted_by = ("own" if tokenizer is None
                      else getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
        self.key = f"llmlingua2|{self.model}|cue_words={cue_words}|count={counted_by}"

    def compress_one(self, prompt: str, rate: float) -> str:
        """``prompt`` with about ``rate`` of its tokens kept, the final cue verbatim."""
        rate = check_rate(rate)
        body, cue = split_cue(prompt, self.cue_words)
        if rate == 1 or not body.strip():
            return prompt
        r = body_rate(rate, self._count(prompt), self._count(body), self._count(cue))
        if r == 0:
            return join_cue("", cue)
        if r == 1:
            return prompt
        out = self._pc.compress_prompt([body], rate=r, use_context_level_filter=False, force_tokens=[])
        return join_cue(out["compressed_prompt"], cue)

    def compress(self, prompts: Sequence[str], rate: float, progress: bool = True) -> list[str]:
        """Each prompt compressed to about ``rate`` of its tokens (see :meth:`compress_one`)."""
        from tqdm.auto import tqdm

        rate = check_rate(rate)
        return [self.compress_one(p, rate)
                for p in tqdm(prompts, desc="LLMLingua-2", unit="prompt", disable=not progress)]


def cache_key(prompt: str, rate: float, compressor_key: str) -> str:
    """The cache key of one compressed prompt: a hash of prompt, rate and compressor settings.

    >>> len(cache_key("p", 0.25, "m")), cache_key("p", 0.25, "m") == cache_key("p", 0.5, "m")
    (64, False)
    """
    return hashlib.sha256(json.dumps([prompt, float(rate), compressor_key]).encode()).hexdigest()


def read_cache(path: Path) -> dict[str, str]:
    """``{key: compressed prompt}`` from a JSONL cache (empty when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return {}
    out = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out[row["key"]] = row["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: not a cache line {{'key', 'prompt'}} ({e})") from e
    return out


def write_cache(path: Path, entries: dict[str, str]) -> None:
    """Write ``{key: compressed prompt}`` as JSONL atomically (a temporary file, then rename)."""
    from ..checkpoint import write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, "".join(json.dumps({"key": key, "prompt": prompt}, ensure_ascii=False) + "\n"
                             for key, prompt in entries.items()))


def compress_examples(examples: Sequence[Example], rate: float, compressor, cache: Path | None = None,
                      progress: bool = True) -> list[Example]:
    """The examples with their prompts compressed (answer, meta and source unchanged).

    ``compressor`` has ``compress(prompts, rate, progress)`` and a ``key`` naming its
    settings (a :class:`LinguaCompressor`). With ``cache`` (a JSONL file), prompts compressed
    before with the same rate and ``key`` are read back, and new ones are added to the file
    every :data:`CACHE_EVERY` prompts, so that an interrupted run resumes where it stopped.
    A prompt that occurs several times is compressed once.
    """
    from tqdm.auto import tqdm

    rate = check_rate(rate)
    keys = [cache_key(e.prompt, rate, compressor.key) for e in examples]
    done = read_cache(cache) if cache is not None else {}
    todo = {k: e.prompt for k, e in zip(keys, examples) if k not in done}
    items = list(todo.items())
    with tqdm(total=len(items), desc="LLMLingua-2", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(items), CACHE_EVERY):
            part = items[start:start + CACHE_EVERY]
            out = compressor.compress([p for _, p in part], rate, progress=False)
            done.update((k, c) for (k, _), c in zip(part, out))
            if cache is not None:
                write_cache(cache, done)
            bar.update(len(part))
    return [replace(e, prompt=done[k]) for k, e in zip(keys, examples)]


def compress_task(task, rate: float, *, model: str = DEFAULT_LINGUA_MODEL, tokenizer=None, device: str = "cpu",
                  cache: Path | None = None, progress: bool = True):
    """``task`` with every prompt of both splits compressed to about ``rate`` of its tokens
    (counted by ``tokenizer``, the LM's), keeping the task's final cue (``task.cue_words``);
    scored like ``task``. ``cache``: see :func:`compress_examples`."""
    compressor = LinguaCompressor(model, device=device, cue_words=task.cue_words, tokenizer=tokenizer)
    splits = {split: compress_examples(task.examples(split), rate, compressor, cache=cache, progress=progress)
              for split in ("train", "test")}
    return ExamplesTask(task, splits["train"], splits["test"], label=f"{task.label} (LLMLingua-2, rate {rate:.3g})")
