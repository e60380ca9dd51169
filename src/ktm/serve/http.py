"""ktm's own OpenAI-compatible HTTP server for merged prompts (``ktm serve --export DIR`` on a
llama.cpp export).

Text in, text out: the client sends plain prompts or chat messages, the server merges them K
tokens at a time and answers through its engine (:class:`~ktm.serve.llamacpp.LlamaCppEngine`);
the compression is invisible to the client. Routes::

    GET  /health                 {"status": "ok"}
    GET  /v1/models              the one served model
    POST /v1/completions         "prompt" (a string, or a list of one), "max_tokens", "temperature",
                                 "top_p", "top_k", "seed", "stream"
    POST /v1/chat/completions    "messages" [{"role", "content"}], rendered with the model's chat
                                 template; the same options

``temperature`` defaults to 1 (sampling), as in OpenAI's API; 0 is greedy. Streaming answers are
server-sent events ending with ``data: [DONE]``. Options this server does not implement
(``stop``, ``n`` > 1, ``logprobs``, ``echo``, ``suffix``, tools, ...) are refused with 400 rather
than ignored. Bad requests get 4xx with an OpenAI-style ``{"error": {...}}`` body: 400 (bad JSON or
values, a prompt too long), 404 (unknown route or model), 411/413 (no or too large a body), 429
(more than ``max_concurrent`` requests at once). The server binds 127.0.0.1 unless told otherwise.

Example::

    server = make_server(LlamaCppEngine("exports/k2-gguf"), port=8080)
    server.serve_forever()
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..model.prompts import PromptError
from .llamacpp import Sampling

#: request fields this server reads; any other field that is set (not null) is refused
KNOWN = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
         "seed", "stream", "user", "stream_options"}
#: fields that may be present with their neutral value (clients often send them)
NEUTRAL = {"n": 1, "stop": None, "logprobs": None, "echo": False, "presence_penalty": 0, "frequency_penalty": 0,
           "best_of": 1, "suffix": None, "logit_bias": None, "tools": None, "tool_choice": None,
           "response_format": None}
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass
class Limits:
    """Request limits: tokens of one prompt (None: the model's positions decide), new tokens
    per request (``max_tokens`` above it is refused; its default when absent), requests in
    flight at once (more get 429), and request body bytes."""

    max_prompt_tokens: int | None = None
    max_tokens: int = 1024
    default_max_tokens: int = 16
    max_concurrent: int = 8
    max_body_bytes: int = 1 << 20


class RequestError(Exception):
    """A request refused with HTTP ``status`` and ``message``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.status}}


@dataclasses.dataclass
class Job:
    """A checked request: the prompt text, how many tokens, how to pick them, streamed or not."""

    prompt: str
    max_tokens: int
    sampling: Sampling
    stream: bool
    chat: bool


def _number(body: dict, key: str, kind, low=None, high=None, default=None):
    value = body.get(key, default)
    if value is None:
        return default
    ok_type = isinstance(value, kind) and not isinstance(value, bool)
    if not ok_type or (low is not None and value < low) or (high is not None and value > high):
        where = f" in [{low}, {high}]" if high is not None else (f" >= {low}" if low is not None else "")
        raise RequestError(400, f"'{key}' must be {'an integer' if kind is int else 'a number'}{where}, got {value!r}")
    return value


def _refuse_unknown(body: dict) -> None:
    for key, value in body.items():
        if key in KNOWN or (key in NEUTRAL and value == NEUTRAL[key]):
            continue
        if key in NEUTRAL:
            raise RequestError(400, f"'{key}' = {value!r} is not supported by this server (leave it out)")
        raise RequestError(400, f"unknown field '{key}'")


def _sampling(body: dict) -> Sampling:
    temperature = _number(body, "temperature", (int, float), 0, 2, 1.0)
    top_p = _number(body, "top_p", (int, float), 0, 1, None)
    top_k = _number(body, "top_k", int, -1, None, None)
    seed = _number(body, "seed", int, 0, None, None)
    if top_p is not None and top_p <= 0:
        raise RequestError(400, f"'top_p' must be in (0, 1], got {top_p!r}")
    if temperature == 0:
        return Sampling()
    return Sampling(True, float(temperature), None if top_k in (None, -1, 0) else top_k,
                    None if top_p in (None, 1) else float(top_p),
                    seed if seed is not None else uuid.uuid4().int & 0xFFFFFFFF)


def chat_prompt(messages, tokenizer) -> str:
    """The prompt text of chat ``messages`` under the model's chat template (generation prompt added)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RequestError(400, f"messages[{i}] must be {{\"role\": one of {', '.join(ROLES)}, "
                                    f"\"content\": a string}}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise RequestError(400, "this model has no chat template: use /v1/completions")
    return tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                         tokenize=False, add_generation_prompt=True)


def parse_request(body, *, chat: bool, name: str, limits: Limits, tokenizer=None) -> Job:
    """Check a decoded JSON request body; raises :class:`RequestError` (400 / 404)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    _refuse_unknown(body)
    if body.get("model") not in (None, name):
        raise RequestError(404, f"model {body['model']!r} is not served here (this server serves {name!r})",
                           "not_found_error")
    if chat:
        if "prompt" in body:
            raise RequestError(400, "/v1/chat/completions takes 'messages', not 'prompt'")
        prompt = chat_prompt(body.get("messages"), tokenizer)
    else:
        if "messages" in body:
            raise RequestError(400, "/v1/completions takes 'prompt', not 'messages' (see /v1/chat/completions)")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError(400, "'prompt' must be a string (or a list of one string)")
        if not prompt.strip():
            raise RequestError(400, "'prompt' is empty")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, int, 1, limits.max_tokens, limits.default_max_tokens)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, f"'stream' must be true or false, got {stream!r}")
    return Job(prompt, max_tokens, _sampling(body), stream, chat)


class Handler(BaseHTTPRequestHandler):
    """One request; ``self.server`` is a :class:`KtmServer`."""

    protocol_version = "HTTP/1.1"
    server_version = "ktm"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        if self.server.verbose:
            super().log_message(format, *args)

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 429:
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path.rstrip("/") == "/health":
            return self._send_json(200, {"status": "ok"})
        if self.path.rstrip("/") == "/v1/models":
            return self._send_json(200, {"object": "list", "data": [
                {"id": self.server.name, "object": "model", "created": self.server.started, "owned_by": "ktm"}]})
        self._send_json(404, RequestError(404, f"no route GET {self.path}", "not_found_error").body())

    def do_POST(self):  # noqa: N802
        routes = {"/v1/completions": False, "/v1/chat/completions": True}
        path = self.path.rstrip("/")
        try:
            if path not in routes:
                raise RequestError(404, f"no route POST {self.path}", "not_found_error")
            body = self._read_body()
            if not self.server.slots.acquire(blocking=False):
                raise RequestError(429, f"too many requests in flight (at most {self.server.limits.max_concurrent})",
                                   "rate_limit_error")
        except RequestError as e:
            self.close_connection = True  # an unread body may remain
            return self._send_json(e.status, e.body())
        try:
            self._answer(body, routes[path])
        finally:
            self.server.slots.release()

    def _read_body(self):
        size = self.headers.get("Content-Length")
        if size is None:
            raise RequestError(411, "a Content-Length header is required")
        if not size.isdigit():
            raise RequestError(400, f"bad Content-Length {size!r}")
        if int(size) > self.server.limits.max_body_bytes:
            raise RequestError(413, f"the request body is {size} bytes; at most {self.server.limits.max_body_bytes}")
        raw = self.rfile.read(int(size))
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON ({e})") from e

    def _answer(self, body, chat: bool) -> None:
        server = self.server
        try:
            job = parse_request(body, chat=chat, name=server.name, limits=server.limits,
                                tokenizer=server.engine.prompts.tokenizer)
            events = server.engine.stream(job.prompt, job.max_tokens, job.sampling,
                                          max_prompt_tokens=server.limits.max_prompt_tokens)
        except RequestError as e:
            return self._send_json(e.status, e.body())
        except (PromptError, ValueError) as e:
            detail = e.detail if isinstance(e, PromptError) else str(e)
            return self._send_json(400, RequestError(400, f"the prompt {detail}" if isinstance(e, PromptError)
                                                     else detail).body())
        if job.stream:
            return self._stream(job, events)
        try:
            done = None
            for _, done in events:
                pass
        except Exception as e:  # the engine failed: say so, keep serving
            self.log_error("engine error: %r", e)
            return self._send_json(500, RequestError(500, f"the engine failed: {e}", "server_error").body())
        self._send_json(200, response(job, server.name, done))

    def _stream(self, job: Job, events) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        ident, created = _ident(job), int(time.time())
        try:
            for delta, done in events:
                chunk = stream_chunk(job, self.server.name, ident, created, delta,
                                     done.finish_reason if done else None)
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client left: stop generating
        finally:
            events.close()


def _ident(job: Job) -> str:
    return ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex[:24]


def _usage(done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": len(done.tokens),
            "total_tokens": done.prompt_tokens + len(done.tokens)}


def response(job: Job, name: str, done) -> dict:
    """The JSON answer of a request that is not streamed."""
    if job.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": done.text},
                  "finish_reason": done.finish_reason}
    else:
        choice = {"index": 0, "text": done.text, "finish_reason": done.finish_reason, "logprobs": None}
    return {"id": _ident(job), "object": "chat.completion" if job.chat else "text_completion",
            "created": int(time.time()), "model": name, "choices": [choice], "usage": _usage(done)}


def stream_chunk(job: Job, name: str, ident: str, created: int, delta: str, finish: str | None) -> dict:
    """One server-sent event of a streamed answer."""
    if job.chat:
        choice = {"index": 0, "delta": {"role": "assistant", "content": delta} if delta else {},
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
    return {"id": ident, "object": "chat.completion.chunk" if job.chat else "text_completion",
            "created": created, "model": name, "choices": [choice]}


class KtmServer(ThreadingHTTPServer):
    """A threaded HTTP server around one engine (requests share it; the engine serialises them)."""

    daemon_threads = True

    def __init__(self, engine, host: str, port: int, limits: Limits, name: str | None = None,
                 verbose: bool = False):
        self.engine, self.limits, self.verbose = engine, limits, verbose
        self.name = name or engine.name
        self.started = int(time.time())
        self.slots = threading.BoundedSemaphore(limits.max_concurrent)
        super().__init__((host, port), Handler)


def make_server(engine, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
                name: str | None = None, verbose: bool = False) -> KtmServer:
    """A :class:`KtmServer` bound to ``host:port`` (port 0: any free port, see ``server_address``);
    call ``serve_forever()`` (or run it in a thread) and ``shutdown()``."""
    return KtmServer(engine, host, port, limits or Limits(), name, verbose)
