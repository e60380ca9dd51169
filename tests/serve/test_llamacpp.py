"""Merged prompts on llama.cpp with the embedded SmolLM2 and the shipped K = 2 merger: the f32
export reproduces ktm's PyTorch model (embeddings prefill, greedy tokens), decoding stops at the
end token, sampling follows its seed, and the CLI and the HTTP server answer through it.

Needs llama-cpp-python (skipped without it) and exports the model once (about a minute)."""

import http.client
import json
import threading

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from ktm.cli import main  # noqa: E402
from ktm.serve.gguf import export_gguf  # noqa: E402
from ktm.serve.llamacpp import LlamaCppEngine, Sampling  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = ["Review: These shoes are great, very comfortable. Label:", "The capital of France is",
           "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return export_gguf("zoo:default-k2", tmp_path_factory.mktemp("gguf") / "k2", gguf_type="f32")


@pytest.fixture(scope="module")
def engine(export):
    e = LlamaCppEngine(export, threads=2, n_ctx=1024)
    yield e
    e.close()


@pytest.fixture(scope="module")
def model():
    from ktm import KTokenMerging

    return KTokenMerging.from_pretrained("zoo:default-k2", device="cpu", dtype="float32").eval()


def test_the_export_names_its_source_gguf_by_name_and_hash(export):
    meta = json.loads((export / "ktm_serving.json").read_text())["gguf"]
    assert meta["source"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(meta["source_sha256"]) == 64


def test_token_embeddings_read_as_embd_give_the_logits_of_the_tokens(engine):
    ids = engine.prompts.merger.tokenize([PROMPTS[0]])[0]
    plain = engine.prefill_tokens(ids)
    embedded = engine.prefill_embeddings(engine.prompts.table[torch.tensor(ids)].numpy())
    assert np.array_equal(plain, embedded)


def test_f32_export_gives_ktms_greedy_tokens_and_close_logits(engine, model):
    want = model.generate(PROMPTS, max_new_tokens=12, return_tokens=True)
    got = [c.tokens for c in engine.generate(PROMPTS, max_new_tokens=12)]
    assert got == want
    embeds, mask = model.merge_prompts(PROMPTS[:1])
    with torch.no_grad():
        ours = model.logits(model.decode(embeds, mask).last_hidden_state)[0, -1].numpy()
    _, merged = engine.merge(PROMPTS[0])
    assert np.abs(engine.prefill_embeddings(merged) - ours).max() < 1e-2


def test_decoding_stops_at_the_end_token_and_sampling_follows_its_seed(engine):
    free = engine.complete(PROMPTS[1], 6)
    assert free.finish_reason == "length" and len(free.tokens) == 6
    eos = engine.eos_ids
    engine.eos_ids = {free.tokens[2]}  # the merger continues text and rarely ends: make its third token the end
    try:
        done = engine.complete(PROMPTS[1], 6)
    finally:
        engine.eos_ids = eos
    assert done.finish_reason == "stop" and done.tokens == free.tokens[:2]
    a, b, c = (engine.complete(PROMPTS[1], 8, Sampling(True, 1.0, top_k=50, seed=s)) for s in (1, 1, 2))
    assert a.tokens == b.tokens and len(a.tokens) >= 1
    assert a.tokens != c.tokens or a.finish_reason == "stop"


def test_cli_generate_and_the_server_answer_through_llama_cpp(export, engine, capsys):
    assert main(["generate", "--export", str(export), "--max-new-tokens", "6", "--threads", "2", PROMPTS[1]]) == 0
    assert capsys.readouterr().out.rstrip("\n") == engine.complete(PROMPTS[1], 6).text.replace("\n", "\\n")
    assert main(["generate", "--export", str(export), "--checkpoint", "zoo:default-k2", "x"]) == 2
    from ktm.serve.http import make_server

    server = make_server(engine, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        conn = http.client.HTTPConnection(*server.server_address, timeout=120)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0}),
                     {"Content-Type": "application/json"})
        out = json.loads(conn.getresponse().read())
        assert out["choices"][0]["text"] == engine.complete(PROMPTS[1], 6).text
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "x " * 5000, "max_tokens": 6}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 400 and "too long" in json.loads(resp.read())["error"]["message"]
    finally:
        server.shutdown()
        server.server_close()
