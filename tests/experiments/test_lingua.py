"""The llmlingua2 baseline: LLMLingua-2 runs through llmlingua's own code on a tiny random
XLM-RoBERTa token classifier (offline), keeps the final cue, and caches its prompts."""

import random
import string
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ktm.experiments import lingua
from ktm.tasks.base import Example

WORDS = ("the shoes were very good and great but the size was small so I sent them back "
         "after a week of use the color is nice").split()


def tiny_classifier(folder):
    """A random 1-layer XLM-RoBERTa token classifier (2 labels) and a Unigram tokenizer of
    ``WORDS`` plus single characters, saved like an LLMLingua-2 model folder."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForTokenClassification, XLMRobertaTokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [(t, 0.0) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")]  # XLM-R's ids 0-3
    vocab += [("▁" + w, -2.0) for w in sorted(set(WORDS))] + [("▁", -3.0)]
    vocab += [(c, -5.0) for c in chars] + [("▁" + c, -5.0) for c in chars]
    tok = XLMRobertaTokenizer(vocab=vocab)
    torch.manual_seed(0)
    cfg = XLMRobertaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=514 + 2, num_labels=2,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2)
    XLMRobertaForTokenClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def review(n_words, seed=0):
    rng = random.Random(seed)
    return "Review: " + " ".join(rng.choice(WORDS) for _ in range(n_words)) + ", Label:"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pytest.importorskip("llmlingua", reason="the llmlingua2 baseline needs: pip install 'k-token-merging[llmlingua]'")
    return tiny_classifier(tmp_path_factory.mktemp("lingua") / "tiny-classifier")


@pytest.fixture(scope="module")
def compressor(model_dir):
    return lingua.LinguaCompressor(model_dir)


class Counting:
    """A compressor that records which prompts it was asked to compress."""

    def __init__(self, inner):
        self.inner, self.key, self.seen = inner, inner.key, []

    def compress(self, prompts, rate, progress=True):
        self.seen.extend(prompts)
        return self.inner.compress(prompts, rate, progress)


# --- pure parts ---------------------------------------------------------------------------

@given(st.text(alphabet=" \nab,:", max_size=30), st.integers(0, 4))
def test_split_cue_parts_make_the_prompt(prompt, n):
    body, cue = lingua.split_cue(prompt, n)
    assert body + cue == prompt
    assert len(cue.split()) == min(n, len(prompt.split()))
    assert body == "" or not body[-1].isspace()


def test_body_rate_keeps_the_whole_prompt_at_the_rate():
    for rate in (0.1, 0.25, 0.5, 0.9):
        r = lingua.body_rate(rate, 100, 90, 10)
        assert 0 <= r <= 1 and (r == 0 or abs(r * 90 + 10 - rate * 100) < 1e-9)


@pytest.mark.parametrize("rate", [0, -0.5, 1.5, float("nan"), "0.5", True])
def test_bad_rate(rate):
    with pytest.raises(ValueError, match="rate is the kept fraction"):
        lingua.check_rate(rate)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llmlingua", None)
    assert not lingua.available()
    with pytest.raises(ImportError, match=r"pip install 'k-token-merging\[llmlingua\]'"):
        lingua.LinguaCompressor("any")


# --- the real llmlingua code path ---------------------------------------------------------

def test_compresses_to_about_the_rate_and_keeps_the_cue(compressor):
    assert lingua.available() and compressor.key.endswith("cue_words=1|count=own")
    prompts = [review(120, seed) for seed in range(3)]
    for rate in (0.25, 0.5):
        for p, c in zip(prompts, compressor.compress(prompts, rate, progress=False)):
            assert c.endswith(", Label:") or c.endswith(" Label:")
            assert abs(len(c.split()) / len(p.split()) - rate) < 0.1, (rate, c)
    once = compressor.compress(prompts, 0.25, progress=False)
    assert compressor.compress(prompts, 0.25, progress=False) == once  # deterministic


def test_rate_one_and_short_prompts_are_unchanged(compressor):
    tree = "Tree: AA\n+BB, Task: Parent/Child Relationship, Parent: AA, Child: BB, Answer: "
    assert compressor.compress([tree, "Label:"], 1.0, progress=False) == [tree, "Label:"]
    assert compressor.compress_one("Label:", 0.25) == "Label:"
    assert compressor.compress_one(tree, 0.5).endswith(" Answer: ")


def test_cue_words_keep_a_longer_tail(model_dir):
    c = lingua.LinguaCompressor(model_dir, cue_words=5)
    tree = "Tree: " + " ".join(WORDS) + ", Task: Parent/Child Relationship, Parent: AA, Child: BB, Answer: "
    out = c.compress_one(tree, 0.5)
    assert out.endswith(" Parent: AA, Child: BB, Answer: ") and len(out) < len(tree)
    assert "cue_words=5" in c.key


def test_construction_keeps_the_callers_random_state(model_dir):
    import torch

    torch.manual_seed(123)
    random.seed(123)
    lingua.LinguaCompressor(model_dir)
    after = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(123)
    assert torch.equal(after[0], torch.rand(3)) and after[1] == random.random()


def test_counts_with_the_given_tokenizer(model_dir, tokenizer):
    c = lingua.LinguaCompressor(model_dir, tokenizer=tokenizer)  # the character tokenizer
    assert c.key.endswith("count=" + type(tokenizer).__name__)  # it has no name_or_path
    p = review(80)
    out = c.compress_one(p, 0.25)
    assert out.endswith(" Label:") and abs(len(out) / len(p) - 0.25) < 0.1  # characters kept


def test_model_that_cannot_load(tmp_path):
    pytest.importorskip("llmlingua")
    with pytest.raises(ValueError, match="no-such-model.*local folder"):
        lingua.LinguaCompressor("ktm-test/no-such-model")
    with pytest.raises(ValueError, match="missing-folder"):
        lingua.LinguaCompressor(str(tmp_path / "missing-folder"))


def test_model_that_is_not_a_token_classifier(base_dir):
    pytest.importorskip("llmlingua")
    with pytest.raises(ValueError, match="not an LLMLingua-2 model.*'llama'"):
        lingua.LinguaCompressor(base_dir)


def test_bad_cue_words(model_dir):
    with pytest.raises(ValueError, match="cue_words"):
        lingua.LinguaCompressor(model_dir, cue_words=-1)


# --- examples and the cache ---------------------------------------------------------------

def test_examples_keep_answer_meta_source_and_the_cache_resumes(compressor, tmp_path, monkeypatch):
    examples = [Example(review(60, i), "positive" if i % 2 else "negative", {"i": i}, f"f.jsonl:{i}")
                for i in range(5)]
    examples.append(examples[0])  # a repeated prompt is compressed once
    cache = tmp_path / "cache" / "lingua.jsonl"
    monkeypatch.setattr(lingua, "CACHE_EVERY", 2)

    first = Counting(compressor)
    out = lingua.compress_examples(examples, 0.25, first, cache=cache, progress=False)
    assert len(first.seen) == 5 and len(lingua.read_cache(cache)) == 5
    assert [o.answer for o in out] == [e.answer for e in examples]
    assert [o.meta for o in out] == [e.meta for e in examples]
    assert [o.source for o in out] == [e.source for e in examples]
    assert all(len(o.prompt) < len(e.prompt) for o, e in zip(out, examples))
    assert list(cache.parent.iterdir()) == [cache]  # no temporary files left

    again = Counting(compressor)
    assert lingua.compress_examples(examples, 0.25, again, cache=cache, progress=False) == out
    assert again.seen == []

    other_rate = Counting(compressor)
    lingua.compress_examples(examples[:2], 0.5, other_rate, cache=cache, progress=False)
    assert len(other_rate.seen) == 2 and len(lingua.read_cache(cache)) == 7


def test_a_broken_cache_line_is_named(tmp_path):
    cache = tmp_path / "c.jsonl"
    cache.write_text('{"key": "a", "prompt": "b"}\nnot json\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2"):
        lingua.read_cache(cache)
