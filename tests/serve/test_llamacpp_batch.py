"""Batched decoding on llama.cpp (several sequences per llama_batch, one KV stream each): the
answers equal one-by-one decoding, greedy and sampled, whatever the group size and however the
prefill rows fall into llama_batches; end tokens stop one sequence, not its group.

On a tiny random llama converted from a Hugging Face folder (tests/serve/test_gguf_convert.py),
1 llama.cpp thread."""

import pytest

from conftest import trained_checkpoint
from ktm.model import PromptError
from ktm.serve.gguf import export_gguf
from test_gguf_convert import bpe_tokenizer, hf_base

llama_cpp = pytest.importorskip("llama_cpp")
from ktm.serve.llamacpp import LlamaCppEngine, Sampling  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Review: great shoes, Label:", "The quick brown fox jumps over the lazy dog. " * 3, "It's",
           "Prompt compression merges K tokens into one embedding.", "don't can't won't I'm you're 12345"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    base = hf_base(root / "base", bpe_tokenizer("gpt-2"))
    model = trained_checkpoint(root / "ckpt", base, k=2)
    out = export_gguf(root / "ckpt", root / "gguf", gguf_type="f32")
    engine = LlamaCppEngine(out, threads=1, n_ctx=256, n_batch=16)  # 16 rows: prefills span several batches
    yield engine, model
    engine.close()


@pytest.mark.parametrize("batch_size", [2, 3, 5])
def test_batched_greedy_answers_equal_one_by_one(setup, batch_size):
    engine, model = setup
    alone = engine.generate(PROMPTS, max_new_tokens=10)
    together = engine.generate(PROMPTS, max_new_tokens=10, batch_size=batch_size)
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    assert [c.text for c in together] == [c.text for c in alone]
    assert [c.merged_length for c in together] == [c.merged_length for c in alone] == [
        -(-len(engine.prompts.merger.tokenize([p])[0]) // 2) for p in PROMPTS]
    assert [c.tokens for c in alone] == model.generate(PROMPTS, max_new_tokens=10, return_tokens=True)
    assert all(set(c.timings) == {"merge", "prefill", "first_token", "total"} for c in together)


def test_batched_sampling_follows_each_prompts_seed_and_ends_stop_one_sequence(setup):
    engine, _ = setup
    sampling = Sampling(True, 1.0, top_k=20, seed=7)
    alone = [c.tokens for c in engine.generate(PROMPTS, 8, sampling)]
    assert [c.tokens for c in engine.generate(PROMPTS, 8, sampling, batch_size=4)] == alone
    assert len({tuple(t) for t in alone}) > 1
    eos = engine.eos_ids
    engine.eos_ids = {alone[1][2]}  # the second prompt's third token ends it; the others go on
    try:
        alone_eos = engine.generate(PROMPTS, 8, sampling)
        together = engine.generate(PROMPTS, 8, sampling, batch_size=5)
    finally:
        engine.eos_ids = eos
    assert [c.tokens for c in together] == [c.tokens for c in alone_eos]
    assert [c.finish_reason for c in together] == [c.finish_reason for c in alone_eos]
    assert together[1].finish_reason == "stop" and together[1].tokens == alone[1][:2]


def test_a_bad_prompt_in_a_group_is_named_by_its_index(setup):
    engine, _ = setup
    with pytest.raises(PromptError, match="prompt 3 ") as e:
        engine.generate(PROMPTS[:3] + ["word " * 400], max_new_tokens=4, batch_size=2)
    assert e.value.index == 3
    with pytest.raises(ValueError, match="batch_size"):
        engine.generate(PROMPTS, batch_size=0)


def test_cli_generate_answers_in_batches_as_one_by_one(setup, capsys):
    import json

    from ktm.cli import main
    from ktm.cli.generate import escape_line

    engine, _ = setup
    args = ["generate", "--export", str(engine.path), "--threads", "1", "--max-new-tokens", "6", "--json"]
    prompts = [PROMPTS[0], "  ", *PROMPTS[1:4]]  # a blank prompt keeps its line and its seed index
    assert main(args + ["--batch-size", "3", "--sample", "--top-k", "20", "--seed", "5", *prompts]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = [engine.complete(p, 6, Sampling(True, 1.0, top_k=20, seed=5 + i)).text if p.strip() else ""
            for i, p in enumerate(prompts)]
    assert [g["output"] for g in got] == want and got[1]["finish_reason"] is None
    assert main(args[:-1] + ["--batch-size", "2", *PROMPTS]) == 0
    assert capsys.readouterr().out.splitlines() == [escape_line(c.text) for c in engine.generate(PROMPTS, 6)]
