"""A small scripted OpenAI-compatible chat server on 127.0.0.1, for the judge's error paths.

A real HTTP server (``http.server`` in a thread) so the real ``openai`` client, its retries,
timeouts and ``Retry-After`` handling are what the tests exercise. The test gives a
``script(request, n)`` function: ``request`` is the parsed JSON body, ``n`` how many times
this same prompt was asked before (0 the first time); it returns an :class:`Action`. Every
request is recorded (arrival time, headers, body) so tests count what the server received.

``Action`` with ``text`` answers a normal chat completion; ``status``/``body`` send anything
else (a 429 with ``Retry-After``, a 500, a body that is not JSON); ``delay`` sleeps first (a
client timeout).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Action:
    text: str | None = None
    status: int = 200
    body: bytes | None = None
    headers: dict = field(default_factory=dict)
    delay: float = 0.0
    refusal: str | None = None
    usage: bool = True


@dataclass
class Received:
    at: float
    path: str
    headers: dict
    body: dict | None


def completion(text: str | None, model: str, *, refusal: str | None = None,
               usage: bool = True) -> dict:
    out = {"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
           "model": model,
           "choices": [{"index": 0, "finish_reason": "stop",
                        "message": {"role": "assistant", "content": text,
                                    "refusal": refusal}}]}
    if usage:
        out["usage"] = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
    return out


class ScriptedServer:
    def __init__(self, script):
        self.script = script
        self.received: list[Received] = []
        self._asked: Counter = Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # keep pytest output clean
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                with server._lock:
                    server.received.append(Received(time.monotonic(), self.path,
                                                    dict(self.headers), body))
                    prompt = (body or {}).get("messages", [{}])[-1].get("content", "")
                    n = server._asked[prompt]
                    server._asked[prompt] += 1
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, json.dumps({"error": {"message": "no route"}}).encode())
                action = server.script(body, n)
                if action.delay:
                    time.sleep(action.delay)
                if action.body is not None or action.status != 200:
                    payload = action.body if action.body is not None else json.dumps(
                        {"error": {"message": f"scripted {action.status}",
                                   "type": "server_error"}}).encode()
                    return self._send(action.status, payload, action.headers)
                payload = json.dumps(completion(action.text, body.get("model", "?"),
                                                refusal=action.refusal,
                                                usage=action.usage)).encode()
                self._send(200, payload, action.headers)

            def _send(self, status, payload, headers=None):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def prompts(self) -> list[str]:
        return [(r.body or {}).get("messages", [{}])[-1].get("content", "")
                for r in self.received]


def answer_of(prompt: str) -> str:
    """The answer text inside a filled judge prompt of the shipped samples' layout."""
    start = prompt.index("[ANSWER START]\n") + len("[ANSWER START]\n")
    return prompt[start:prompt.index("\n[ANSWER END]")]
