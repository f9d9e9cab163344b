"""A small fault-injecting OpenAI-compatible server on loopback (stdlib only), for the api judge's
and api generation's tests (test_api_judge.py, test_api_sample.py).

It answers /v1/chat/completions and /v1/completions with canned JSON (usage, optional log-probs,
any number of choices) and can be told to answer the first calls with 429 + Retry-After, 500, 400,
or to sleep past the client's timeout. It counts calls and requests in flight and keeps every
request body, so tests check retries, cost, --max-cost, --concurrency and the parameters sent by
what actually reached the wire.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeOpenAI:
    """A loopback OpenAI-compatible server. `script` holds one action per call, in call order
    (then `reply` for every later call): ("429", retry_after) | ("500",) | ("400",) | ("sleep", s).

    `reply(body)` -> {"text", "top": [(token, logprob), ...] | None} answers with one choice (the
    judge's shape), or {"choices": [{"text", "finish_reason"?, "logprobs"?: [(token, logprob), ...]}],
    "usage"?: (prompt, completion)} with any number. /chat/completions answers as chat, /completions
    as text completion. Every request body and path is kept (`bodies`, `paths`)."""

    def __init__(self) -> None:
        self.script: list[tuple] = []
        self.reply = lambda body: {"text": "a", "top": None}
        self.usage = (1000, 2)
        self.delay = 0.0
        self.calls = 0
        self.inflight = 0
        self.max_inflight = 0
        self.times: list[float] = []
        self.auth: list[str] = []
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.calls += 1
                    n = fake.calls
                    fake.inflight += 1
                    fake.max_inflight = max(fake.max_inflight, fake.inflight)
                    fake.times.append(time.monotonic())
                    fake.auth.append(self.headers.get("Authorization", ""))
                    fake.bodies.append(body)
                    fake.paths.append(self.path)
                try:
                    action = fake.script[n - 1] if n <= len(fake.script) else None
                    if action and action[0] == "sleep":
                        time.sleep(action[1])
                        return  # the client gave up long ago; say nothing
                    if action and action[0] == "429":
                        return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": str(action[1])})
                    if action and action[0] == "500":
                        return self._send(500, {"error": {"message": "boom"}})
                    if action and action[0] == "400":  # a server that echoes the credentials it got
                        return self._send(400, {"error": {"message": f"model not found; you sent {self.headers['Authorization']}"}})
                    time.sleep(fake.delay)
                    self._send(200, fake.completion(body, self.path))
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with fake.lock:
                        fake.inflight -= 1

            def _send(self, code: int, obj: dict, headers: dict | None = None) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def completion(self, body: dict, path: str = "/v1/chat/completions") -> dict:
        r = self.reply(body)
        if "choices" in r:
            choices = r["choices"]
        else:  # the judge's shape: one choice, log-probs from `top` when asked for
            top = r["top"] if r["top"] is not None and body.get("logprobs") else None
            choices = [{"text": r["text"], "top": top}]
        usage = r.get("usage", self.usage)
        chat = path.endswith("/chat/completions")
        out = []
        for i, c in enumerate(choices):
            lps = c.get("logprobs")
            if chat:
                logprobs = None
                if c.get("top") is not None:
                    tops = [{"token": t, "logprob": lp, "bytes": None} for t, lp in c["top"]]
                    logprobs = {"content": [{"token": c["top"][0][0], "logprob": c["top"][0][1], "bytes": None, "top_logprobs": tops}]}
                elif lps is not None:
                    logprobs = {"content": [{"token": t, "logprob": lp, "bytes": None, "top_logprobs": []} for t, lp in lps]}
                out.append({"index": i, "message": {"role": "assistant", "content": c["text"]},
                            "finish_reason": c.get("finish_reason", "stop"), "logprobs": logprobs})
            else:
                logprobs = None if lps is None else {"tokens": [t for t, _ in lps], "token_logprobs": [lp for _, lp in lps],
                                                     "top_logprobs": None, "text_offset": None}
                out.append({"index": i, "text": c["text"], "finish_reason": c.get("finish_reason", "stop"), "logprobs": logprobs})
        return {"id": "x", "object": "chat.completion" if chat else "text_completion", "created": 0, "model": body["model"],
                "choices": out, "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
