"""ktm.serve.serving: the client-side encoder equals merge_prompts, the payloads decode the way vLLM
decodes them (checked by a local fake server), what a server accepts is bounded, and
ktm encode / ktm serve build what they should."""

import base64
import io
import json
import os
import stat
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from conftest import trained_checkpoint
from ktm import KTokenMerging
from ktm.cli import main
from ktm.serve.export import ENCODER_FILE, SERVING_CONFIG, ExportError, export_model
from ktm.serve.serving import (
    PromptEncoder,
    check_prompt_embeds,
    completion_request,
    load_embedding_table,
    load_prompt_embeds,
    payload_limit,
    read_embeds,
    serve_command,
    tensor_to_base64,
)

PROMPTS = ["Review: fits well, Label:", "a", "0123456789" * 5, "  spaced  out  "]


@pytest.fixture(scope="module")
def exported(base_dir, tmp_path_factory):
    """(model, export folder, checkpoint folder) for K = 3."""
    root = tmp_path_factory.mktemp("serving")
    m = trained_checkpoint(root / "ck", base_dir, k=3)
    return m, export_model(root / "ck", root / "k3"), root / "ck"


def vllm_decode(payload: str) -> torch.Tensor:
    """How vLLM reads a Completions ``prompt_embeds`` (vllm safe_load_prompt_embeds)."""
    return torch.load(io.BytesIO(base64.b64decode(payload, validate=True)), weights_only=True,
                      map_location=torch.device("cpu"))


# ---------------------------------------------------------------- the client encoder
@pytest.mark.parametrize("options", [
    dict(k=1), dict(k=3), dict(k=4, encoder_stages=(2, 2), encoder_norm=True), dict(k=5, encoder_init="random"),
    dict(k=2, method="mean"), dict(k=3, method="keep-last"), dict(k=4, method="random-drop"),
    dict(k=2, encoder_layernorm=True),
], ids=["k1", "k3", "k4-stages-norm", "k5-random", "mean", "keep-last", "random-drop", "k2-layernorm"])
def test_the_client_encoder_gives_exactly_what_merge_prompts_gives(tmp_path, base_dir, options):
    m = trained_checkpoint(tmp_path / "ck", base_dir, **options)
    enc = PromptEncoder.from_export(export_model(tmp_path / "ck", tmp_path / "exp"))
    got = enc.encode(PROMPTS)
    for p, g in zip(PROMPTS, got):
        want, mask = m.merge_prompts([p])
        assert g.dtype == torch.float32 and g.shape == (m.compressed_length(p), 32)
        assert torch.equal(g, want[0]) and bool(mask.all())


def test_the_client_encoder_in_bfloat16_equals_a_bfloat16_model(tmp_path, base_dir):
    trained_checkpoint(tmp_path / "ck", base_dir, k=3)
    enc = PromptEncoder.from_export(export_model(tmp_path / "ck", tmp_path / "exp", dtype="bfloat16"))
    assert enc.table.dtype == torch.bfloat16
    m = KTokenMerging.from_pretrained(tmp_path / "ck", device="cpu", dtype="bfloat16").eval()
    for p, g in zip(PROMPTS, enc.encode(PROMPTS)):
        assert torch.equal(g, m.merge_prompts([p])[0][0].float())
    payload = enc.completion_request(PROMPTS[:1])["prompt_embeds"][0]  # sent as the server's dtype
    assert torch.equal(vllm_decode(payload), m.merge_prompts(PROMPTS[:1])[0][0])
    assert enc.embeds_prompts(PROMPTS[:1])[0]["prompt_embeds"].dtype == torch.bfloat16


def test_the_client_reads_only_the_embedding_tensor(exported, monkeypatch):
    import safetensors

    _, out, _ = exported
    read = []
    real = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **kw):
            self.f = real(*a, **kw)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.f.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    PromptEncoder.from_export(out)
    assert read == ["model.embed_tokens.weight"]


def test_the_embedding_table_is_found_in_sharded_weights(tmp_path, exported):
    from transformers import AutoModelForCausalLM

    _, out, _ = exported
    lm = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    lm.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    table = load_embedding_table(tmp_path / "sharded", "model.embed_tokens.weight")
    assert torch.equal(table, lm.get_input_embeddings().weight)
    with pytest.raises(ExportError, match="does not name the file"):
        load_embedding_table(tmp_path / "sharded", "no.such.tensor")


def test_the_client_refuses_a_damaged_export(tmp_path, exported):
    import shutil

    _, out, ck = exported
    with pytest.raises(ExportError, match="export it first with ktm export"):
        PromptEncoder.from_export(ck)
    bad = Path(shutil.copytree(out, tmp_path / "bad"))
    data = bytearray((bad / ENCODER_FILE).read_bytes())
    data[-1] ^= 1
    (bad / ENCODER_FILE).write_bytes(bytes(data))
    with pytest.raises(ExportError, match="SHA-256"):
        PromptEncoder.from_export(bad)
    shutil.copy(out / ENCODER_FILE, bad / ENCODER_FILE)
    meta = json.loads((bad / SERVING_CONFIG).read_text())
    meta["embedding"]["fingerprint"] = "0" * 32
    (bad / SERVING_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="fingerprint"):
        PromptEncoder.from_export(bad)


def test_the_client_rejects_prompts_as_the_model_does(exported):
    _, out, _ = exported
    enc = PromptEncoder.from_export(out)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        enc.encode(["ok", ""])
    with pytest.raises(ValueError, match="prompt 0 is too long"):
        enc.encode(["x" * (3 * 512 + 1)])
    assert enc.encode(["x" * (3 * 512)])[0].shape == (512, 32)
    with pytest.raises(TypeError, match="single string"):
        enc.encode("one prompt")


# ---------------------------------------------------------------- payloads
def test_offline_inputs_are_embeds_prompts(exported):
    m, out, _ = exported
    prompts = PromptEncoder.from_export(out).embeds_prompts(PROMPTS[:2])
    assert [sorted(p) for p in prompts] == [["prompt_embeds"]] * 2
    assert torch.equal(prompts[0]["prompt_embeds"], m.merge_prompts(PROMPTS[:1])[0][0])


def test_a_base64_payload_decodes_the_way_vllm_decodes_it_and_holds_only_its_tensor():
    big = torch.randn(100, 64)
    view = big[10:13]
    payload = tensor_to_base64(view)
    got = vllm_decode(payload)
    assert torch.equal(got, view) and got.dtype == torch.float32 and got.shape == (3, 64)
    assert len(payload) < payload_limit(64, 3)  # not the 100 x 64 storage the view lives in
    assert len(base64.b64decode(payload)) < 3 * 64 * 4 + 4096


def test_the_completions_request_body(exported):
    m, out, _ = exported
    enc = PromptEncoder.from_export(out)
    body = enc.completion_request(PROMPTS[:2], max_tokens=5, temperature=0.0)
    assert body["model"] == "k3" and body["max_tokens"] == 5 and "prompt" not in body
    assert len(body["prompt_embeds"]) == 2
    for p, payload in zip(PROMPTS, body["prompt_embeds"]):
        assert torch.equal(vllm_decode(payload), m.merge_prompts([p])[0][0])
    json.dumps(body)  # plain JSON
    with pytest.raises(ValueError, match="no prompts"):
        completion_request([], "k3")


class FakeVLLM(BaseHTTPRequestHandler):
    """POST /v1/completions: decodes each prompt_embeds as vLLM does, checks it against what
    the test expects, and answers one choice per prompt (in reverse order, as a server may)."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append((self.path, dict(self.headers), body))
        mode = getattr(self.server, "mode", None)
        if mode and mode.startswith("redirect "):  # to another server, e.g. another host
            self.send_response(307)
            self.send_header("Location", mode.split(" ", 1)[1])
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if mode == "n2":  # n = 2: two choices per prompt
            n = len(body["prompt_embeds"])
            return self.answer(200, {"choices": [{"index": i, "text": "x"} for i in range(2 * n)]})
        if mode == "huge":
            return self.answer(200, {"choices": [], "padding": "x" * 3000})
        try:
            tensors = [vllm_decode(s) for s in body["prompt_embeds"]]
            for t, want in zip(tensors, self.server.expected, strict=True):
                assert t.dtype == torch.float32 and t.shape == want.shape and torch.equal(t, want)
                check_prompt_embeds(t, hidden_size=32, max_length=512)
        except (AssertionError, ValueError, KeyError) as e:
            return self.answer(400, {"error": {"message": f"bad prompt_embeds: {e!r}"}})
        choices = [{"index": i, "text": f"{tuple(t.shape)}"} for i, t in enumerate(tensors)]
        self.answer(200, {"object": "text_completion", "choices": choices[::-1]})

    def answer(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLM)
    server.seen, server.expected = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_a_completions_request_reaches_a_server_that_decodes_it_as_vllm_does(exported, fake_server):
    m, out, _ = exported
    enc = PromptEncoder.from_export(out)
    fake_server.expected = [m.merge_prompts([p])[0][0] for p in PROMPTS]
    url = f"http://127.0.0.1:{fake_server.server_address[1]}"
    answers = enc.complete(url, PROMPTS, api_key="secret", max_tokens=3)
    assert answers == [f"({m.compressed_length(p)}, 32)" for p in PROMPTS]
    path, headers, body = fake_server.seen[-1]
    assert path == "/v1/completions" and headers["Authorization"] == "Bearer secret"
    assert body["model"] == "k3" and body["max_tokens"] == 3
    fake_server.expected = [torch.zeros(1, 32)]  # the server now expects something else: HTTP 400
    with pytest.raises(ValueError, match="HTTP 400.*bad prompt_embeds"):
        enc.complete(url + "/", PROMPTS[:1])


def test_the_openai_client_recipe_of_docs_serving_reaches_the_server_the_same_way(exported, fake_server):
    openai = pytest.importorskip("openai", reason="the openai package is not installed")
    m, out, _ = exported
    enc = PromptEncoder.from_export(out)
    fake_server.expected = [m.merge_prompts([p])[0][0] for p in PROMPTS[:2]]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{fake_server.server_address[1]}/v1", api_key="EMPTY")
    completion = client.completions.create(
        model=enc.name, prompt=None, max_tokens=4,
        extra_body={"prompt_embeds": [tensor_to_base64(t) for t in enc.encode(PROMPTS[:2])]})
    assert sorted(c.text for c in completion.choices) == sorted(
        f"({m.compressed_length(p)}, 32)" for p in PROMPTS[:2])
    assert fake_server.seen[-1][2]["model"] == "k3"


# ---------------------------------------------------------------- what a server accepts
def test_check_prompt_embeds_accepts_a_good_tensor_and_says_what_is_wrong_with_a_bad_one():
    good = torch.randn(5, 32)
    assert check_prompt_embeds(good, 32, 8) is good
    assert check_prompt_embeds(good.bfloat16(), 32, 5).dtype == torch.bfloat16
    bad = [
        ([[1.0] * 32], "not a tensor"),
        (good.to_sparse(), "dense"),
        (good.long(), "dtype torch.int64"),
        (good.double(), "dtype torch.float64"),
        (good[None], "2-D"),
        (good[:, :16], "hidden size 16"),
        (good[:0], "0 positions"),
        (torch.randn(9, 32), "9 positions; accepted: 1 to 8"),
        (torch.where(torch.arange(32) == 3, float("nan"), good), "NaN"),
        (good * float("inf"), "infinite"),
    ]
    for tensor, message in bad:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            check_prompt_embeds(tensor, 32, 8)


def test_load_prompt_embeds_bounds_the_payload_before_reading_it():
    good = torch.randn(4, 32)
    assert torch.equal(load_prompt_embeds(tensor_to_base64(good), 32, 8), good)
    with pytest.raises(ValueError, match="characters long"):
        load_prompt_embeds(tensor_to_base64(torch.randn(400, 32)), 32, 8)
    with pytest.raises(ValueError, match="not valid base64"):
        load_prompt_embeds("not base64!", 32, 8)
    with pytest.raises(ValueError, match="could not be read as a torch tensor"):
        load_prompt_embeds(base64.b64encode(b"just bytes").decode(), 32, 8)
    buf = io.BytesIO()
    torch.save({"a": good}, buf)
    with pytest.raises(ValueError, match="is a dict"):
        load_prompt_embeds(base64.b64encode(buf.getvalue()).decode(), 32, 8)
    with pytest.raises(ValueError, match="base64 string"):
        load_prompt_embeds(None, 32, 8)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    buf = io.BytesIO()
    torch.save(Evil(), buf)
    with pytest.raises(ValueError, match="could not be read"):  # weights_only: no code runs
        load_prompt_embeds(base64.b64encode(buf.getvalue()).decode(), 32, 8)


# ---------------------------------------------------------------- ktm encode
def test_ktm_encode_writes_one_tensor_per_prompt_in_order(tmp_path, exported, capsys, monkeypatch):
    m, out, ck = exported
    assert main(["encode", "--checkpoint", str(out), "--out", str(tmp_path / "a.safetensors"), *PROMPTS]) == 0
    assert "wrote 4 prompt embeddings" in capsys.readouterr().out
    from_args = read_embeds(tmp_path / "a.safetensors")
    for p, t in zip(PROMPTS, from_args, strict=True):
        assert torch.equal(t, m.merge_prompts([p])[0][0])
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(p + "\n" for p in PROMPTS)))
    assert main(["encode", "--checkpoint", str(ck), "--out", str(tmp_path / "b.safetensors")]) == 0
    from_stdin = read_embeds(tmp_path / "b.safetensors")  # from the checkpoint (whole model), stdin
    assert all(torch.equal(a, b) for a, b in zip(from_args, from_stdin, strict=True))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["0", "1", "2", "3"] and f.metadata()["k"] == "3"
    assert stat.S_IMODE(os.stat(tmp_path / "a.safetensors").st_mode) & 0o044  # not mkstemp's private mode


def test_ktm_encode_records_the_source_by_name_and_hash_never_its_path(tmp_path, exported, monkeypatch):
    from safetensors import safe_open

    from ktm.checkpoint import file_sha256

    _, out, ck = exported
    for folder, config in [(out, "ktm_serving.json"), (ck, "ktm_config.json")]:
        dest = tmp_path / f"{Path(folder).name}.safetensors"
        assert main(["encode", "--checkpoint", str(Path(folder).resolve()), "--out", str(dest), "x"]) == 0
        with safe_open(str(dest), framework="pt") as f:
            meta = f.metadata()
        assert meta["source"] == Path(folder).name
        assert meta["source_sha256"] == file_sha256(Path(folder) / config)
        assert not any(str(Path(folder).resolve().parent) in v or v.startswith("/") for v in meta.values()), meta
    monkeypatch.chdir(Path(out).parent)  # a relative reference gives the same record
    assert main(["encode", "--checkpoint", Path(out).name, "--out", str(tmp_path / "r.safetensors"), "x"]) == 0
    with safe_open(str(tmp_path / "r.safetensors"), framework="pt") as f:
        assert f.metadata()["source"] == Path(out).name


def test_ktm_encode_errors_name_the_prompt(tmp_path, exported, capsys, monkeypatch):
    _, out, _ = exported
    dest = str(tmp_path / "e.safetensors")
    capsys.readouterr()
    assert main(["encode", "--checkpoint", str(out), "--out", dest, "ok", ""]) == 2
    assert capsys.readouterr().err == "ktm: error: prompt argument 2: is empty: nothing to merge\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["encode", "--checkpoint", str(out), "--out", dest]) == 2
    assert "no prompts to encode" in capsys.readouterr().err
    assert main(["encode", "--checkpoint", str(tmp_path), "--out", dest, "x"]) == 2
    assert "neither an export folder" in capsys.readouterr().err
    assert not Path(dest).exists()


# ---------------------------------------------------------------- ktm serve
def test_ktm_serve_builds_the_vllm_command_line(exported, capsys):
    _, out, _ = exported
    assert serve_command(out) == ["vllm", "serve", str(out), "--enable-prompt-embeds", "--served-model-name", "k3",
                                  "--host", "127.0.0.1", "--port", "8000", "--max-model-len", "512",
                                  "--dtype", "float32"]
    capsys.readouterr()
    assert main(["serve", "--export", str(out), "--name", "tree", "--port", "8011", "--max-model-len", "256",
                 "--dry-run", "--", "--dtype", "bfloat16", "--gpu-memory-utilization", "0.5"]) == 0
    assert capsys.readouterr().out.split() == [
        "vllm", "serve", str(out), "--enable-prompt-embeds", "--served-model-name", "tree", "--host", "127.0.0.1",
        "--port", "8011", "--max-model-len", "256", "--dtype", "bfloat16", "--gpu-memory-utilization", "0.5"]


@pytest.mark.parametrize("argv, message", [
    (["--max-model-len", "513"], "more than the model's 512 positions"),
    (["--", "--enable-lora"], "LoRA merged into the weights"),
    (["--", "--max-model-len=100"], "use ktm serve --max-model-len"),
    (["--", "--port", "1"], "use ktm serve --port"),
    (["--", "--max_model_len=100"], "use ktm serve --max-model-len"),  # vLLM's underscore spelling
    (["--", "--served_model_name", "x"], "use ktm serve --name"),
    (["--", "--enable_lora"], "LoRA merged into the weights"),
])
def test_ktm_serve_refuses_what_it_sets_itself(exported, capsys, argv, message):
    _, out, _ = exported
    capsys.readouterr()
    assert main(["serve", "--export", str(out), "--dry-run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ktm: error:") and message in err


def test_ktm_serve_without_vllm_says_how_to_install_it(exported, capsys, monkeypatch, tmp_path):
    import ktm.serve.serving

    _, out, ck = exported
    monkeypatch.setattr(ktm.serve.serving, "vllm_installed", lambda: False)
    capsys.readouterr()
    assert main(["serve", "--export", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vLLM is not installed" in err and "pip install 'k-token-merging[serve]'" in err
    assert main(["serve", "--export", str(ck), "--dry-run"]) == 2
    assert "export it first with ktm export" in capsys.readouterr().err


def test_ktm_serve_runs_the_vllm_command_with_its_arguments(exported, monkeypatch, tmp_path, capsys):
    """The launch itself, with a stand-in `vllm` on PATH that records its arguments (no vLLM here)."""
    import ktm.serve.serving

    _, out, _ = exported
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "vllm"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path / 'args'}\nexit 3\n")
    script.chmod(0o755)
    monkeypatch.setattr(ktm.serve.serving, "vllm_installed", lambda: True)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert main(["serve", "--export", str(out), "--", "--seed", "7"]) == 3  # vllm's own exit status
    assert (tmp_path / "args").read_text().split() == serve_command(out, extra=["--seed", "7"])[1:]
    assert "ktm: running" in capsys.readouterr().err


# ---------------------------------------------------------------- a real vLLM (skipped here)
def _vllm_and_gpu() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


@pytest.mark.skipif(not _vllm_and_gpu(), reason="needs vLLM and a CUDA GPU; neither is on this machine, so this "
                                               "test has never run here")
def test_vllm_offline_on_an_export_answers_as_ktm_generate(tmp_path, base_dir):
    from vllm import LLM, SamplingParams

    m = trained_checkpoint(tmp_path / "ck", base_dir, k=3)
    out = export_model(tmp_path / "ck", tmp_path / "exp")
    llm = LLM(model=str(out), enable_prompt_embeds=True, dtype="float32", enforce_eager=True,
              max_model_len=512, gpu_memory_utilization=0.2)
    inputs = PromptEncoder.from_export(out).embeds_prompts(PROMPTS)
    outputs = llm.generate(inputs, SamplingParams(temperature=0.0, max_tokens=8))
    want = m.generate(PROMPTS, max_new_tokens=8, return_tokens=True)
    assert [list(o.outputs[0].token_ids)[:len(w)] for o, w in zip(outputs, want)] == want


def test_the_client_merges_with_the_models_own_prompt_merger(exported):
    """One implementation of prompt merging: the client's PromptEncoder runs a PromptMerger on
    the export's table and encoder, the same class KTokenMerging merges with."""
    from ktm.model import PromptMerger, PromptTooLong

    _, out, _ = exported
    enc = PromptEncoder.from_export(out)
    assert type(enc.merger) is PromptMerger and enc.merger.encoder is enc.encoder
    with pytest.raises(PromptTooLong) as e:
        enc.encode(["x" * (3 * 512 + 1)])
    assert (e.value.index, e.value.merged, e.value.limit) == (0, 513, 512)


def test_ktm_serve_warns_when_it_listens_beyond_this_machine_without_an_api_key(exported, capsys, monkeypatch):
    _, out, _ = exported
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    capsys.readouterr()
    assert main(["serve", "--export", str(out), "--dry-run", "--host", "0.0.0.0"]) == 0
    assert capsys.readouterr().err == (
        "ktm: warning: serving on 0.0.0.0 without an API key: anyone who can reach it can send prompt embeddings; "
        "pass -- --api-key KEY (or set VLLM_API_KEY), or listen on 127.0.0.1\n")
    for argv in (["--host", "0.0.0.0", "--", "--api_key", "k"], ["--host", "::1"], ["--host", "localhost"]):
        assert main(["serve", "--export", str(out), "--dry-run", *argv]) == 0
        assert capsys.readouterr().err == ""


def test_the_serving_extra_pins_vllm_past_the_prompt_embeds_advisory():
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert 'serve = ["vllm>=0.11.1"]' in text  # CVE-2025-62164
    import re

    from packaging.version import Version

    torch_floor = re.search(r'"torch>=([\d.]+)"', text).group(1)
    assert Version(torch_floor) >= Version("2.6")  # CVE-2025-32434: weights_only loading is safe from 2.6


def test_the_client_checks_one_answer_per_prompt_refuses_redirects_and_bounds_the_answer(exported, fake_server):
    from ktm.serve.serving import post_json

    _, out, _ = exported
    enc = PromptEncoder.from_export(out)
    url = f"http://127.0.0.1:{fake_server.server_address[1]}"
    fake_server.mode = "n2"
    with pytest.raises(ValueError, match=r"answered 4 choices \(indices \[0, 1, 2, 3\]\) for 2 prompts: one answer "
                                         r"per prompt is needed \(leave n and best_of at 1\)"):
        enc.complete(url, PROMPTS[:2], n=2)
    other = ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLM)  # where a redirect would lead
    other.seen, other.expected = [], []
    thread = threading.Thread(target=other.serve_forever, daemon=True)
    thread.start()
    try:
        fake_server.mode = f"redirect http://localhost:{other.server_address[1]}/v1/completions"
        with pytest.raises(ValueError, match=r"redirected \(HTTP 307\) to http://localhost:\d+/v1/completions: ktm "
                                             r"does not follow redirects"):
            enc.complete(url, PROMPTS[:1], api_key="secret")
        assert other.seen == []  # the key never reached the other server
    finally:
        other.shutdown()
        other.server_close()
        thread.join(5)
    fake_server.mode = "huge"
    with pytest.raises(ValueError, match=r"answered with more than 2,000 bytes: not read"):
        post_json(url + "/v1/completions", {"prompt_embeds": []}, max_bytes=2000)
