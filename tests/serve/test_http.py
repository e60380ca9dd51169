"""ktm's OpenAI-compatible server without llama.cpp: request checking, the routes, streaming,
limits and 4xx errors, on a fake engine that answers by spelling the prompt backwards."""

import http.client
import json
import threading
import time

import numpy as np
import pytest

from ktm.model.prompts import PromptError
from ktm.serve.http import Limits, RequestError, make_server, parse_request
from ktm.serve.llamacpp import Completion, Sampling


class FakeTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class FakeEngine:
    """Answers the prompt reversed, one character per token; 'slow' prompts take 0.3 s."""

    name = "fake"

    def __init__(self):
        self.prompts = type("P", (), {"tokenizer": FakeTokenizer()})()
        self.seen = []

    def stream(self, prompt, max_new_tokens, sampling, *, max_prompt_tokens=None):
        if max_prompt_tokens is not None and len(prompt) > max_prompt_tokens:
            raise PromptError(0, f"has {len(prompt)} tokens; this server takes at most {max_prompt_tokens}")
        self.seen.append((prompt, max_new_tokens, sampling))
        return self._events(prompt, max_new_tokens)

    def _events(self, prompt, n):
        if "slow" in prompt:
            time.sleep(0.3)
        if "crash" in prompt:
            raise RuntimeError("llama_decode failed (1)")
        answer = prompt[::-1][:n]
        for ch in answer:
            yield ch, None
        yield "", Completion(answer, list(range(len(answer))), "length" if len(answer) == n else "stop",
                             len(prompt), -(-len(prompt) // 2), {})


LIMITS = Limits(max_prompt_tokens=50, max_tokens=20, max_concurrent=2, max_body_bytes=2000)


def parse(body, chat=False):
    return parse_request(body, chat=chat, name="fake", limits=LIMITS, tokenizer=FakeTokenizer())


def test_requests_are_checked_with_clear_reasons():
    job = parse({"prompt": "hi", "max_tokens": 5, "temperature": 0})
    assert (job.prompt, job.max_tokens, job.sampling, job.stream) == ("hi", 5, Sampling(), False)
    job = parse({"prompt": ["hi"], "temperature": 0.5, "top_p": 0.9, "top_k": 3, "seed": 7})
    assert job.sampling == Sampling(True, 0.5, 3, 0.9, 7) and job.max_tokens == LIMITS.default_max_tokens
    assert parse({"messages": [{"role": "user", "content": "yo"}]}, chat=True).prompt == "<user>yo<assistant>"
    assert parse({"prompt": "x", "n": 1, "stop": None, "model": "fake"}).prompt == "x"  # neutral values pass
    bad = [({"prompt": ""}, 400, "empty"), ({"prompt": 3}, 400, "string"), ({"prompt": ["a", "b"]}, 400, "string"),
           ({"prompt": "x", "max_tokens": 21}, 400, "max_tokens"), ({"prompt": "x", "max_tokens": 0}, 400, ">= 1|\\["),
           ({"prompt": "x", "temperature": -1}, 400, "temperature"), ({"prompt": "x", "top_p": 0}, 400, "top_p"),
           ({"prompt": "x", "stream": "yes"}, 400, "stream"), ({"prompt": "x", "n": 2}, 400, "not supported"),
           ({"prompt": "x", "stop": ["\n"]}, 400, "not supported"), ({"prompt": "x", "bogus": 1}, 400, "unknown"),
           ({"prompt": "x", "model": "other"}, 404, "not served"), ([1], 400, "JSON object"),
           ({"messages": []}, 400, "messages"), ({"prompt": "x", "max_tokens": True}, 400, "integer")]
    for body, status, words in bad:
        with pytest.raises(RequestError, match=words) as e:
            parse(body)
        assert e.value.status == status, body
    for body in ({"messages": [{"role": "robot", "content": "x"}]}, {"prompt": "x"}):
        with pytest.raises(RequestError) as e:
            parse(body, chat=True)
        assert e.value.status == 400


@pytest.fixture(scope="module")
def server():
    engine = FakeEngine()
    srv = make_server(engine, port=0, limits=LIMITS)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def call(server, method, path, body=None, raw=None, headers=None):
    conn = http.client.HTTPConnection(*server.server_address, timeout=10)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    return resp.status, text


def test_server_binds_this_machine_only_by_default(server):
    assert server.server_address[0] == "127.0.0.1"


def test_health_models_and_answers(server):
    assert call(server, "GET", "/health") == (200, '{"status": "ok"}')
    status, text = call(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(text)["data"]] == ["fake"]
    status, text = call(server, "POST", "/v1/completions", {"prompt": "abc", "max_tokens": 2, "temperature": 0})
    out = json.loads(text)
    assert status == 200 and out["object"] == "text_completion"
    assert out["choices"][0]["text"] == "cb" and out["choices"][0]["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    status, text = call(server, "POST", "/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "temperature": 0})
    out = json.loads(text)
    assert status == 200 and out["choices"][0]["message"] == {"role": "assistant", "content": ">tnatsissa<ih>resu<"}


def test_streaming_sends_deltas_then_done(server):
    for chat in (False, True):
        body = {"max_tokens": 3, "stream": True, "temperature": 0}
        body.update({"messages": [{"role": "user", "content": "xyz"}]} if chat else {"prompt": "xyz"})
        status, text = call(server, "POST", "/v1/chat/completions" if chat else "/v1/completions", body)
        events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
        assert status == 200 and events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        pieces = [c["choices"][0]["delta"].get("content", "") if chat else c["choices"][0]["text"] for c in chunks]
        assert "".join(pieces) == (">tn" if chat else "zyx")
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_bad_requests_get_4xx(server):
    assert call(server, "GET", "/nowhere")[0] == 404
    assert call(server, "POST", "/v1/nowhere", {"prompt": "x"})[0] == 404
    assert call(server, "POST", "/v1/completions", raw=b"{not json")[0] == 400
    assert call(server, "POST", "/v1/completions", raw=b"x" * 3000)[0] == 413
    status, text = call(server, "POST", "/v1/completions", {"prompt": "y" * 60})
    assert status == 400 and "at most 50" in json.loads(text)["error"]["message"]
    status, text = call(server, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 99})
    assert status == 400 and json.loads(text)["error"]["code"] == 400
    status, text = call(server, "POST", "/v1/completions", {"prompt": "crash", "temperature": 0})
    assert status == 500 and "llama_decode" in json.loads(text)["error"]["message"]
    assert call(server, "GET", "/health")[0] == 200  # and it keeps serving


def test_more_requests_than_the_limit_get_429(server):
    results = []

    def slow():
        results.append(call(server, "POST", "/v1/completions", {"prompt": "slow", "temperature": 0})[0])

    threads = [threading.Thread(target=slow) for _ in range(LIMITS.max_concurrent)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    status, _ = call(server, "POST", "/v1/completions", {"prompt": "quick", "temperature": 0})
    for t in threads:
        t.join()
    assert status == 429 and results == [200] * LIMITS.max_concurrent


def test_sampling_picks_argmax_when_greedy_and_is_reproducible():
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert Sampling().picker()(logits) == 1
    assert Sampling(True, 1.0, top_k=1).picker()(logits) == 1
    assert Sampling(True, 1.0, top_p=0.01).picker()(logits) == 1
    draws = [Sampling(True, 1.0, seed=3).picker() for _ in range(2)]
    assert [draws[0](logits) for _ in range(20)] == [draws[1](logits) for _ in range(20)]
    picked = {Sampling(True, 5.0, top_k=2, seed=s).picker()(logits) for s in range(40)}
    assert picked == {1, 2}  # top-k keeps the two likeliest, and a high temperature reaches both
    with pytest.raises(ValueError):
        Sampling(False, temperature=0.5)


def test_serve_picks_ktms_server_for_a_llama_cpp_export(tmp_path, capsys):
    from ktm.cli import main

    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / "ktm_serving.json").write_text(json.dumps({
        "format": "ktm-export", "format_version": 1, "hidden_size": 8, "engine": "llama.cpp",
        "embedding": {"key": "token_embd.weight", "fingerprint": "x"}, "gguf": {"file": "model.gguf"}}))
    assert main(["serve", "--export", str(folder), "--dry-run", "--max-concurrent", "3"]) == 0
    out = capsys.readouterr().out
    assert "ktm's own OpenAI-compatible server" in out and "127.0.0.1" in out and "max_concurrent=3" in out
    assert main(["serve", "--export", str(folder), "--max-model-len", "9"]) == 2
    assert "--n-ctx" in capsys.readouterr().err
