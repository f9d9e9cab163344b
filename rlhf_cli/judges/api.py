"""`--judge api:MODEL`: any OpenAI-compatible chat-completions server as a pair judge (OpenAI, vLLM,
llama.cpp's server, Ollama), through the `openai` client.

Each ordered ask renders the pairwise template (template.py) into chat messages and is sent with
temperature 0, max_tokens 4 and `logprobs=True, top_logprobs=5`. When the server returns log-probs,
P(A) comes from the top alternatives at the reply's first "a"/"b" token, like the lm judge:
P(A) = p(a-tokens) / (p(a-tokens) + p(b-tokens)), where "a", " a", "A", "(a" ... all count as a.
If only one letter is among the top alternatives, the other is given the smallest listed
probability (an upper bound on its true mass), so P(A) stays strictly inside (0, 1). Without
log-probs the first standalone a/b in the text decides; a reply naming neither gives winner None.

Operations (key, concurrency, retries, cost, --max-cost: rlhf_cli/api_client.py, shared with
`--model api:MODEL` generation):
  * cache: an sqlite3 file (no pickle) keyed by sha256 of (model, template hash, prompt, output
    shown as A, output shown as B), so a rerun of the same asks sends nothing and costs nothing.
    The key names the model, not the server: point --cache-dir elsewhere to keep two servers that
    serve different weights under one model name apart.
  * --max-cost: no new ask is sent once spent + in-flight estimates + its own estimate would pass
    the budget; asks in flight finish, and `stopped` says why the answers ended early.

    OPENAI_API_KEY=... rlhf pairwise samples.jsonl --judge api:gpt-4o-mini --max-cost 2 > pairs.jsonl
    python -m llama_cpp.server --model SmolLM2-135M-Instruct.Q4_1.gguf --port 8080 &
    rlhf pairwise samples.jsonl --judge api:smollm2 --base-url http://127.0.0.1:8080/v1 > pairs.jsonl
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rlhf_cli.api_client import ApiClient, ApiOptions, Budget, Job, Price
from rlhf_cli.errors import RlhfError
from rlhf_cli.judges.base import Ask, JudgeOptions, Verdict, Winner
from rlhf_cli.judges.template import load_template

MAX_TOKENS = 4
TOP_LOGPROBS = 5
CACHE_FILE = "api-judge.sqlite3"


class VerdictCache:
    """Answers on disk: sqlite3, key -> JSON {text, p_a, usage}. Used from the judge's thread only."""

    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(path), timeout=30, check_same_thread=False)
            self.db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.db.commit()
        except (OSError, sqlite3.Error) as e:
            raise RlhfError(f"{path}: cannot open the judge cache: {e}", "give a writable --cache-dir") from None
        self.path = path

    def get(self, key: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT value FROM verdicts WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.db.execute("INSERT OR REPLACE INTO verdicts (key, value) VALUES (?, ?)", (key, json.dumps(value)))
        self.db.commit()

    def close(self) -> None:
        self.db.close()


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlhf"


_LETTER = re.compile(r"(?<![A-Za-z])([ABab])(?![A-Za-z])")


def choice_letter(token: str) -> str | None:
    """'a' / 'b' for tokens that spell a choice ("a", " A", "(b", "b)"), else None."""
    t = token.strip().strip("()[]*.:'\"").lower()
    return t if t in ("a", "b") else None


def p_a_from_logprobs(content: list[dict[str, Any]] | None) -> float | None:
    """P(A) at the first reply position whose token is a choice letter (else the first position),
    from that position's top alternatives; None when neither letter is among them."""
    if not content:
        return None
    at = next((c for c in content if choice_letter(c.get("token") or "")), content[0])
    tops = at.get("top_logprobs") or [{"token": at.get("token") or "", "logprob": at.get("logprob")}]
    mass = {"a": 0.0, "b": 0.0}
    floor = math.inf
    for t in tops:
        lp = t.get("logprob")
        if lp is None:
            continue
        floor = min(floor, lp)
        letter = choice_letter(t.get("token") or "")
        if letter:
            mass[letter] += math.exp(lp)
    if mass["a"] == mass["b"] == 0.0:
        return None
    for letter in ("a", "b"):  # the absent letter: at most as likely as the least likely listed token
        if mass[letter] == 0.0:
            mass[letter] = math.exp(floor)
    return mass["a"] / (mass["a"] + mass["b"])


def winner_of(p_a: float | None, text: str) -> Winner | None:
    if p_a is not None:
        return "A" if p_a > 0.5 else "B" if p_a < 0.5 else "tie"
    m = _LETTER.search(text)
    if m is None:
        return None
    return "A" if m.group(1).upper() == "A" else "B"


class ApiJudge:
    """A pair judge that asks an OpenAI-compatible server; see the module docstring."""

    kind = "api"
    backoff_base = 1.0  # seconds before the first retry (doubles each time); tests lower it
    backoff_cap = 60.0

    def __init__(self, model: str, opts: JudgeOptions) -> None:
        self.template = load_template(opts.template)
        self.model = model
        self.opts = opts
        api = ApiOptions(opts.base_url, opts.api_key_env, opts.concurrency, opts.max_retries, opts.timeout, opts.prices, opts.max_cost)
        self.api = ApiClient(model, api, opts.seed, rerun_hint="answers so far are cached, so a rerun resumes for free; or raise --max-retries / --timeout")
        self.api.backoff_base, self.api.backoff_cap = self.backoff_base, self.backoff_cap
        try:
            self.cache = VerdictCache(Path(opts.cache_dir or default_cache_dir()) / CACHE_FILE)
        except RlhfError:
            self.api.close()
            raise
        self.cache_hits = 0
        self.stopped: str | None = None  # why judge() ended before answering every ask (the budget)
        self._logprobs = True  # switched off if the server rejects the logprobs parameters

    # counters and the budget live on the shared client
    @property
    def price(self) -> Price | None:
        return self.api.price

    @property
    def budget(self) -> Budget:
        return self.api.budget

    @property
    def spent(self) -> float:
        return self.api.n.spent

    @property
    def requests(self) -> int:
        return self.api.n.requests

    @property
    def retries(self) -> int:
        return self.api.n.retries

    def describe(self) -> dict[str, Any]:
        return {"kind": "api", "name": self.model, "base_url": self.api.public_url, "template": self.template.hash,
                "prices": None if self.price is None else {"input": self.price.input, "output": self.price.output},
                "max_tokens": MAX_TOKENS}

    def close(self) -> None:
        self.cache.close()
        self.api.close()

    # -- the loop -------------------------------------------------------------------------------

    def judge(self, asks: Iterable[Ask]) -> Iterator[tuple[Ask, Verdict]]:
        source = iter(asks)

        def next_job() -> Job | None:
            ask = next(source, None)
            if ask is None:
                return None
            key = self.cache_key(ask)
            hit = self.cache.get(key)
            if hit is not None:  # answered on the spot, for free
                self.cache_hits += 1
                return Job((ask, key), ready=hit)
            msgs = self.template.messages(ask.item.prompt, ask.a, ask.b)
            return Job((ask, key), lambda: self._request(msgs), self._estimate(msgs))

        for (ask, key), result, cost, sent in self.api.stream(next_job):
            if sent:
                self.cache.put(key, result)
            yield ask, self._verdict(result, cost=cost, cached=not sent)
        self.stopped = self.api.stopped

    def cache_key(self, ask: Ask) -> str:
        """sha256 over what decides the answer; A and B are positional, so each order has its own key."""
        parts = {"v": 1, "model": self.model, "template": self.template.hash, "prompt": ask.item.prompt, "A": ask.a, "B": ask.b}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _verdict(self, result: dict[str, Any], cost: float, cached: bool) -> Verdict:
        return Verdict(winner_of(result["p_a"], result["text"]), p_a=result["p_a"], raw=result["text"],
                       cost=cost, cached=cached, usage=dict(result["usage"]))

    def _estimate(self, msgs: list[dict[str, str]]) -> float:
        """Dollars one ask will cost at most: its prompt + MAX_TOKENS output tokens."""
        return self.api.estimate(sum(len(m["content"]) for m in msgs), MAX_TOKENS)

    # -- one ask, in a worker thread --------------------------------------------------------------

    def _request(self, msgs: list[dict[str, str]]) -> dict[str, Any]:
        """Send one ask (retries: ApiClient.call); -> {"text", "p_a", "usage"}."""

        def send() -> Any:
            extra: dict[str, Any] = {"logprobs": True, "top_logprobs": TOP_LOGPROBS} if self._logprobs else {}
            return self.api.client.chat.completions.create(
                model=self.model, messages=msgs, temperature=0, max_tokens=MAX_TOKENS, **extra,  # type: ignore[arg-type]  # role/content dicts, as the API takes them
            )

        return self._parse(self.api.call(send, self._without_logprobs), msgs)

    def _without_logprobs(self, message: str) -> bool:
        """An HTTP 400 about log-probs: a server without them; fall back to reading the text."""
        if self._logprobs and "logprob" in message.lower():
            self._logprobs = False
            return True
        return False

    def _parse(self, resp: Any, msgs: list[dict[str, str]]) -> dict[str, Any]:
        choice = resp.choices[0] if resp.choices else None
        text = self.api.scrub((choice.message.content if choice and choice.message else None) or "")
        usage: dict[str, int] = {}
        if resp.usage is not None:
            usage = {"prompt_tokens": int(resp.usage.prompt_tokens or 0), "completion_tokens": int(resp.usage.completion_tokens or 0)}
            self.api.observe(sum(len(m["content"]) for m in msgs), usage["prompt_tokens"])
        content = None
        if choice is not None and choice.logprobs is not None and choice.logprobs.content:
            content = [c.model_dump() for c in choice.logprobs.content]
        return {"text": text, "p_a": p_a_from_logprobs(content), "usage": usage}
