"""A fake OpenAI-compatible chat-completions server on 127.0.0.1, for the label tests.

Explanation requests (the LABEL/DESCRIPTION prompt) are answered from a script of replies;
detection requests (max_tokens = 1) are answered like a careful reader would: "Yes" when the
excerpt contains one of the words the label stands for (`concepts`: label -> words), with
top_logprobs. Every request is recorded. The server shuts itself down after `lifetime_s`
seconds even if a test forgets to stop it.
"""

from __future__ import annotations

import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    def __init__(self, replies: list[str] | None = None, concepts: dict[str, tuple[str, ...]] | None = None,
                 api_key: str | None = None, logprobs: bool = True, lifetime_s: float = 60.0) -> None:
        self.replies = list(replies or [])  # explanation replies, in order; the last one repeats
        self.concepts = concepts or {}
        self.api_key = api_key
        self.logprobs = logprobs
        self.requests: list[dict] = []
        self.lifetime_s = lifetime_s
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def explanation_requests(self) -> list[dict]:
        return [r for r in self.requests if r.get("max_tokens", 0) > 1]

    def detection_requests(self) -> list[dict]:
        return [r for r in self.requests if r.get("max_tokens") == 1]

    def start(self) -> FakeOpenAI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # noqa: ANN002 - keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if fake.api_key and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    self._send(401, {"error": {"message": "Incorrect API key provided"}})
                    return
                if not self.path.endswith("/chat/completions"):
                    self._send(404, {"error": {"message": "not found"}})
                    return
                fake.requests.append(body)
                self._send(200, fake.answer(body))

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.shutdown()
            server.server_close()
            self._timer.cancel()

    # --- answers -------------------------------------------------------------------------
    def answer(self, body: dict) -> dict:
        if body.get("max_tokens") == 1:
            return self._detect(body)
        n_before = len(self.explanation_requests()) - 1
        text = self.replies[min(n_before, len(self.replies) - 1)] if self.replies else "LABEL: something"
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}

    def _detect(self, body: dict) -> dict:
        user = body["messages"][-1]["content"]
        feature = re.search(r"^Feature: (.*)$", user, re.MULTILINE).group(1)
        excerpt = user.split('"""')[1]
        words = next((w for label, w in self.concepts.items() if feature.startswith(label)), ())
        hit = any(re.search(rf"\b{re.escape(w)}\b", excerpt) for w in words)
        p_yes = 0.9 if hit else 0.1
        choice = {"index": 0, "message": {"role": "assistant", "content": "Yes" if hit else "No"}}
        if self.logprobs and body.get("logprobs"):
            choice["logprobs"] = {"content": [{"token": "Yes" if hit else "No", "logprob": math.log(max(p_yes, 1 - p_yes)),
                                               "top_logprobs": [{"token": "Yes", "logprob": math.log(p_yes)},
                                                                {"token": "No", "logprob": math.log(1 - p_yes)}]}]}
        return {"choices": [choice]}
