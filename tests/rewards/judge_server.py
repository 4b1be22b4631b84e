"""A deterministic OpenAI-compatible chat-completions server for judge tests (stdlib only).

Answers are computed from the request (the prompt layout of ``rewards.judge``/``rewards.rubric``):
- ``<reference_answer>`` present (verifier): ``{"score": 1.0}`` iff the reference string appears
  in the ``<response>``, else ``{"score": 0.0}``.
- ``<rubric>`` present: an item is *satisfied* iff the first quoted keyword of its criterion
  (``'x'`` or ``"x"``) appears in the response (no keyword: not satisfied).
  - system prompt mentions ``"items"`` (explicit): ``{"items": [{"id": i, "satisfied": b}, ...]}``.
  - otherwise (implicit): ``{"score": k / P}`` with k satisfied of the P non-pitfall items, halved
    when any pitfall is satisfied, rounded to 4 decimals.

Switches: ``mode`` ("ok"; "garbage": prose instead of JSON; "invalid": ``{"score": 1.5}`` or, when
explicit, ``{"items": [{"id": 1, "satisfied": "yes"}]}``; "fenced": the ok answer in a ```json
block), ``fail_next(n, status)`` (answer ``status`` n times, then normally), ``delay_s`` (sleep
before answering, e.g. past the client's timeout). Counters: ``requests`` (chat requests),
``max_in_flight``, ``bodies`` (request JSON), ``auth`` (last Authorization header).
``GET /v1/models`` lists ``model``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_TAG = r"<{0}>\n(.*?)\n</{0}>"
_ITEM = re.compile(r"^\[(\d+)\] \((\w+), weight [^)]*\) (.*)$")
_KEYWORD = re.compile(r"""['"]([^'"]+)['"]""")


def _tag(text: str, name: str) -> str | None:
    m = re.search(_TAG.format(name), text, re.DOTALL)
    return m.group(1) if m else None


def _satisfied(criterion: str, response: str) -> bool:
    m = _KEYWORD.search(criterion)
    return bool(m) and m.group(1) in response


def compute_answer(messages: list[dict[str, Any]]) -> dict:
    """The deterministic judge answer for a chat request (see module docstring)."""
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    response = _tag(user, "response") or ""
    reference = _tag(user, "reference_answer")
    if reference is not None:
        return {"score": 1.0 if reference in response else 0.0}
    items = [_ITEM.match(line) for line in (_tag(user, "rubric") or "").splitlines()]
    verdicts = [(int(m[1]), m[2], _satisfied(m[3], response)) for m in items if m]
    if '"items"' in system:
        return {"items": [{"id": i, "satisfied": s} for i, _, s in verdicts]}
    positives = [s for _, kind, s in verdicts if kind != "pitfall"]
    score = sum(positives) / max(len(positives), 1)
    if any(s for _, kind, s in verdicts if kind == "pitfall"):
        score *= 0.5
    return {"score": round(score, 4)}


class JudgeServer:
    """The server, run in a daemon thread on 127.0.0.1 (free port). Use as a context manager."""

    def __init__(self, model: str = "test-judge", delay_s: float = 0.0, mode: str = "ok"):
        self.model = model
        self.delay_s = delay_s
        self.mode = mode
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []
        self.auth: str | None = None
        self._fail_left = 0
        self._fail_status = 500
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def fail_next(self, n: int, status: int = 500) -> None:
        """Answer the next ``n`` chat requests with HTTP ``status``."""
        with self._lock:
            self._fail_left, self._fail_status = n, status

    def start(self) -> JudgeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> JudgeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def handle_chat(self, body: dict, auth: str | None) -> tuple[int, dict]:
        """Status and JSON body for one chat request (called in the handler thread)."""
        with self._lock:
            self.requests += 1
            self.bodies.append(body)
            self.auth = auth
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            failing = self._fail_left > 0
            self._fail_left -= failing
        try:
            if failing:
                return self._fail_status, {"error": {"message": "injected failure"}}
            if self.delay_s:
                time.sleep(self.delay_s)
            return 200, self._completion(self._content(body["messages"]))
        finally:
            with self._lock:
                self.in_flight -= 1

    def _content(self, messages: list[dict]) -> str:
        if self.mode == "garbage":
            return "The response looks pretty good to me, I'd say 8/10."
        if self.mode == "invalid":
            if '"items"' in messages[0]["content"]:
                return json.dumps({"items": [{"id": 1, "satisfied": "yes"}]})
            return json.dumps({"score": 1.5})
        answer = json.dumps(compute_answer(messages))
        return f"```json\n{answer}\n```" if self.mode == "fenced" else answer

    def _completion(self, content: str) -> dict:
        return {
            "id": f"chatcmpl-{self.requests}",
            "object": "chat.completion",
            "created": 0,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }


def _make_handler(server: JudgeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout test)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(
                    200, {"object": "list", "data": [{"id": server.model, "object": "model"}]}
                )
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                self._send(400, {"error": {"message": "body is not JSON"}})
                return
            self._send(*server.handle_chat(body, self.headers.get("Authorization")))

    return Handler
