"""`--judge api:MODEL`: any OpenAI-compatible chat-completions server as a pair judge (OpenAI, vLLM,
llama.cpp's server, Ollama), through the `openai` client.

Each ordered ask renders the pairwise template (template.py) into chat messages and is sent with
temperature 0, max_tokens 4 and `logprobs=True, top_logprobs=5`. When the server returns log-probs,
P(A) comes from the top alternatives at the reply's first "a"/"b" token, like the lm judge:
P(A) = p(a-tokens) / (p(a-tokens) + p(b-tokens)), where "a", " a", "A", "(a" ... all count as a.
If only one letter is among the top alternatives, the other is given the smallest listed
probability (an upper bound on its true mass), so P(A) stays strictly inside (0, 1). Without
log-probs the first standalone a/b in the text decides; a reply naming neither gives winner None.

Operations:
  * key: read from the environment variable named by --api-key-env (default OPENAI_API_KEY), never
    from a flag, a file or a row. A server on a loopback address (127.0.0.1, localhost, ::1) gets a
    dummy key when the variable is unset (local servers ignore it). The key never reaches a log,
    a row, describe() or an error message: server text we show is scrubbed of it.
  * concurrency: at most --concurrency requests in flight (a thread pool; answers arrive in any order).
  * retries: 429, 5xx, timeouts and connection errors are retried up to --max-retries times with
    exponential backoff and jitter, waiting at least what a Retry-After header asks. Any other
    4xx is a mistake a retry cannot fix (a bad model name, a bad key): a clear error at once.
  * cache: an sqlite3 file (no pickle) keyed by sha256 of (model, template hash, prompt, output
    shown as A, output shown as B), so a rerun of the same asks sends nothing and costs nothing.
    The key names the model, not the server: point --cache-dir elsewhere to keep two servers that
    serve different weights under one model name apart.
  * cost: usage tokens x a price table ($ per million tokens): --prices IN,OUT or a JSON file
    {"model": {"input": IN, "output": OUT}}; else a built-in table of a few OpenAI models. A server
    on a loopback address costs 0 unless --prices says otherwise.
  * --max-cost: no new request is sent once spent + in-flight estimates + its own estimate would
    pass the budget; requests in flight finish, and `stopped` says why the answers ended early.

    OPENAI_API_KEY=... rlhf pairwise samples.jsonl --judge api:gpt-4o-mini --max-cost 2 > pairs.jsonl
    python -m llama_cpp.server --model SmolLM2-135M-Instruct.Q4_1.gguf --port 8080 &
    rlhf pairwise samples.jsonl --judge api:smollm2 --base-url http://127.0.0.1:8080/v1 > pairs.jsonl
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from rlhf_cli.console import warn
from rlhf_cli.errors import RlhfError
from rlhf_cli.judges.base import Ask, JudgeOptions, Verdict, Winner
from rlhf_cli.judges.template import load_template

OPENAI_URL = "https://api.openai.com/v1"
LOCAL_KEY = "sk-local-no-key"  # what a loopback server gets when the key variable is unset
MAX_TOKENS = 4
TOP_LOGPROBS = 5
CACHE_FILE = "api-judge.sqlite3"


@dataclass(frozen=True)
class Price:
    """Dollars per million tokens."""

    input: float
    output: float

    def cost(self, usage: dict[str, int]) -> float:
        return (usage.get("prompt_tokens", 0) * self.input + usage.get("completion_tokens", 0) * self.output) / 1e6


# Published list prices (standard tier, $ / 1M tokens) at the time of writing; check before relying
# on them, or pass --prices. Longest matching prefix wins, so dated snapshots find their family.
PRICES: dict[str, Price] = {
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-3.5-turbo": Price(0.50, 1.50),
}


def lookup_price(model: str, table: dict[str, Price]) -> Price | None:
    if model in table:
        return table[model]
    prefixes = [k for k in table if model.startswith(k)]
    return table[max(prefixes, key=len)] if prefixes else None


def resolve_price(model: str, prices: str | None, local: bool) -> Price | None:
    """The price for `model`: --prices (IN,OUT or a JSON file), else 0 for a local server, else the
    built-in table; None when unknown."""
    if prices:
        parts = prices.split(",")
        if len(parts) == 2 and not Path(prices).exists():
            try:
                price = Price(float(parts[0]), float(parts[1]))
            except ValueError:
                price = Price(-1, -1)
            if not (price.input >= 0 and price.output >= 0 and math.isfinite(price.input + price.output)):
                raise RlhfError(f"--prices {prices!r}: need two numbers >= 0", "e.g. --prices 0.15,0.60 ($ per million input, output tokens)")
            return price
        try:
            obj = json.loads(Path(prices).read_text(encoding="utf-8"))
        except OSError:
            raise RlhfError(f"--prices {prices!r} is neither IN,OUT nor a readable file", "e.g. --prices 0.15,0.60 or --prices prices.json") from None
        except json.JSONDecodeError as e:
            raise RlhfError(f"{prices}:{e.lineno}: not valid JSON: {e.msg}", '{"model": {"input": 0.15, "output": 0.60}}') from None
        try:
            table = {str(k): Price(float(v["input"]), float(v["output"])) for k, v in obj.items()}
        except (AttributeError, KeyError, TypeError, ValueError):
            raise RlhfError(f"{prices}: every entry needs numeric input and output prices",
                            '{"model": {"input": 0.15, "output": 0.60}} ($ per million tokens)') from None
        found = lookup_price(model, table)
        if found is None:
            raise RlhfError(f"{prices}: no price for model {model!r}", f'add "{model}": {{"input": ..., "output": ...}}')
        return found
    if local:
        return Price(0.0, 0.0)
    return lookup_price(model, PRICES)


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def public_url(url: str) -> str:
    """The URL without user:password@ or a query string: safe to write into rows."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


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


class _Retryable(Exception):
    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.wait = reason, wait


class ApiJudge:
    """A pair judge that asks an OpenAI-compatible server; see the module docstring."""

    kind = "api"
    backoff_base = 1.0  # seconds before the first retry (doubles each time); tests lower it
    backoff_cap = 60.0

    def __init__(self, model: str, opts: JudgeOptions) -> None:
        self.template = load_template(opts.template)
        if opts.concurrency < 1 or opts.max_retries < 0 or not opts.timeout > 0:
            raise RlhfError("need --concurrency >= 1, --max-retries >= 0 and --timeout > 0")
        if opts.max_cost is not None and not opts.max_cost >= 0:
            raise RlhfError(f"--max-cost must be >= 0; got {opts.max_cost}")
        self.model = model
        self.opts = opts
        self.url = opts.base_url or OPENAI_URL
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RlhfError(f"--base-url {public_url(self.url)!r} is not an http(s) URL", "e.g. --base-url http://127.0.0.1:8080/v1")
        self.local = is_loopback(parts.hostname)
        key = os.environ.get(opts.api_key_env, "")
        if not key:
            if not self.local:
                raise RlhfError(f"the environment variable {opts.api_key_env} holding the API key is not set",
                                f"export {opts.api_key_env}=... (or name another variable with --api-key-env); keys are never taken from flags")
            key = LOCAL_KEY
        self._secret = key
        self.price = resolve_price(model, opts.prices, self.local)
        if self.price is None:
            if opts.max_cost is not None:
                raise RlhfError(f"--max-cost needs a price for model {model!r}", "give --prices IN,OUT ($ per million tokens) or a JSON price file")
            warn(f"no price known for {model!r}: costs are reported as 0 (give --prices IN,OUT to count them)")
        self.cache = VerdictCache(Path(opts.cache_dir or default_cache_dir()) / CACHE_FILE)
        self.stopped: str | None = None
        self.spent = 0.0  # dollars, this run
        self.requests = 0  # HTTP requests sent, retries included
        self.retries = 0
        self.cache_hits = 0
        self._logprobs = True  # switched off if the server rejects the logprobs parameters
        self._chars = 0  # prompt characters and tokens seen so far: the chars-per-token ratio for estimates
        self._tokens = 0
        self._abort = threading.Event()
        self._rng = random.Random(opts.seed)
        self._lock = threading.Lock()

        try:
            import openai  # imported here so `rlhf --help` and the other judges never pay for it
        except ImportError:
            raise RlhfError("the api judge needs the `openai` package", "pip install openai") from None

        self._openai = openai
        # our own retry loop (below) knows 429 vs 4xx and Retry-After; the client's is switched off
        self._client = openai.OpenAI(base_url=self.url, api_key=key, timeout=opts.timeout, max_retries=0)

    def describe(self) -> dict[str, Any]:
        return {"kind": "api", "name": self.model, "base_url": public_url(self.url), "template": self.template.hash,
                "prices": None if self.price is None else {"input": self.price.input, "output": self.price.output},
                "max_tokens": MAX_TOKENS}

    def close(self) -> None:
        self._abort.set()
        self.cache.close()
        self._client.close()

    # -- the loop -------------------------------------------------------------------------------

    def judge(self, asks: Iterable[Ask]) -> Iterator[tuple[Ask, Verdict]]:
        from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

        budget = self.opts.max_cost
        pending: dict[Future, tuple[Ask, str, float]] = {}  # future -> (ask, cache key, cost estimate)
        source = iter(asks)
        exhausted = over_budget = False
        self._abort.clear()
        pool = ThreadPoolExecutor(self.opts.concurrency, thread_name_prefix="rlhf-api")
        try:
            while True:
                # 1. fill the pool up to --concurrency; cache hits are answered on the spot, for free
                while not (exhausted or over_budget) and len(pending) < self.opts.concurrency:
                    ask = next(source, None)
                    if ask is None:
                        exhausted = True
                        break
                    key = self.cache_key(ask)
                    hit = self.cache.get(key)
                    if hit is not None:
                        self.cache_hits += 1
                        yield ask, self._verdict(hit, cost=0.0, cached=True)
                        continue
                    msgs = self.template.messages(ask.item.prompt, ask.a, ask.b)
                    est = self._estimate(msgs)
                    if budget is not None and self.spent + sum(e for _, _, e in pending.values()) + est > budget:
                        over_budget = True  # this ask stays unanswered; a rerun picks it up
                        break
                    pending[pool.submit(self._request, msgs)] = (ask, key, est)
                if not pending:
                    break
                # 2. answer whatever finished first
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    ask, key, _ = pending.pop(fut)
                    result = fut.result()  # an RlhfError from the worker surfaces here
                    cost = self.price.cost(result["usage"]) if self.price else 0.0
                    self.spent += cost
                    self.cache.put(key, result)
                    yield ask, self._verdict(result, cost=cost, cached=False)
            if over_budget:
                self.stopped = f"max-cost reached (${self.spent:.4f} of ${budget:.4f})"
        finally:
            if pending:  # an error or an abandoned iterator: wake sleeping retries and drop queued asks
                self._abort.set()
            pool.shutdown(wait=True, cancel_futures=True)

    def cache_key(self, ask: Ask) -> str:
        """sha256 over what decides the answer; A and B are positional, so each order has its own key."""
        parts = {"v": 1, "model": self.model, "template": self.template.hash, "prompt": ask.item.prompt, "A": ask.a, "B": ask.b}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _verdict(self, result: dict[str, Any], cost: float, cached: bool) -> Verdict:
        return Verdict(winner_of(result["p_a"], result["text"]), p_a=result["p_a"], raw=result["text"],
                       cost=cost, cached=cached, usage=dict(result["usage"]))

    def _estimate(self, msgs: list[dict[str, str]]) -> float:
        """Dollars one request will cost at most: prompt tokens from the chars-per-token ratio seen
        so far (4 before any answer) + MAX_TOKENS output tokens."""
        if self.price is None:
            return 0.0
        chars = sum(len(m["content"]) for m in msgs)
        with self._lock:
            per_token = self._chars / self._tokens if self._tokens else 4.0
        return self.price.cost({"prompt_tokens": math.ceil(chars / per_token), "completion_tokens": MAX_TOKENS})

    # -- one request, in a worker thread ----------------------------------------------------------

    def _request(self, msgs: list[dict[str, str]]) -> dict[str, Any]:
        """Send one ask, retrying what a retry can fix; -> {"text", "p_a", "usage"}."""
        attempt = 0
        while True:
            if self._abort.is_set():
                raise RlhfError("api: stopped")
            try:
                with self._lock:
                    self.requests += 1
                return self._send(msgs)
            except _Retryable as e:
                if attempt >= self.opts.max_retries:
                    raise RlhfError(f"api: {public_url(self.url)} still failing after {self.opts.max_retries} retries: {e.reason}",
                                    "answers so far are cached, so a rerun resumes for free; or raise --max-retries / --timeout") from None
                backoff = min(self.backoff_cap, self.backoff_base * 2**attempt) * self._rng.uniform(0.5, 1.0)
                attempt += 1
                with self._lock:
                    self.retries += 1
                if self._abort.wait(max(backoff, e.wait or 0.0)):
                    raise RlhfError("api: stopped") from None

    def _send(self, msgs: list[dict[str, str]]) -> dict[str, Any]:
        openai = self._openai
        extra: dict[str, Any] = {"logprobs": True, "top_logprobs": TOP_LOGPROBS} if self._logprobs else {}
        try:
            resp = self._client.chat.completions.create(
                model=self.model, messages=msgs, temperature=0, max_tokens=MAX_TOKENS, **extra,  # type: ignore[arg-type]  # role/content dicts, as the API takes them
            )
        except openai.APIStatusError as e:
            status, message = e.status_code, self._scrub(_error_text(e))
            if status == 429 or status >= 500:
                raise _Retryable(f"HTTP {status}: {message}", retry_after(e.response.headers)) from None
            if status == 400 and self._logprobs and "logprob" in message.lower():
                self._logprobs = False  # a server without log-probs: fall back to reading the text
                raise _Retryable(f"HTTP 400: {message}", 0.0) from None
            hint = {401: f"check the key in ${self.opts.api_key_env}", 403: f"check the key in ${self.opts.api_key_env}",
                    404: "check the model name and --base-url (it usually ends in /v1)"}.get(status, "a retry will not fix this request")
            raise RlhfError(f"api: {public_url(self.url)} answered HTTP {status}: {message}", hint) from None
        except openai.APITimeoutError:
            raise _Retryable(f"no answer within --timeout {self.opts.timeout:g}s") from None
        except openai.APIConnectionError as e:
            raise _Retryable(f"connection failed: {self._scrub(str(e))}") from None
        return self._parse(resp, msgs)

    def _parse(self, resp: Any, msgs: list[dict[str, str]]) -> dict[str, Any]:
        choice = resp.choices[0] if resp.choices else None
        text = self._scrub((choice.message.content if choice and choice.message else None) or "")
        usage: dict[str, int] = {}
        if resp.usage is not None:
            usage = {"prompt_tokens": int(resp.usage.prompt_tokens or 0), "completion_tokens": int(resp.usage.completion_tokens or 0)}
            with self._lock:
                self._chars += sum(len(m["content"]) for m in msgs)
                self._tokens += usage["prompt_tokens"]
        content = None
        if choice is not None and choice.logprobs is not None and choice.logprobs.content:
            content = [c.model_dump() for c in choice.logprobs.content]
        return {"text": text, "p_a": p_a_from_logprobs(content), "usage": usage}

    def _scrub(self, text: str) -> str:
        """Server text with the key blanked out, in case a server echoes what it was sent."""
        return text.replace(self._secret, "[key]") if self._secret else text


def _error_text(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        msg = inner.get("message") if isinstance(inner, dict) else inner
        if msg:
            return str(msg)[:300]
    return str(getattr(e, "message", "") or e)[:300]


def retry_after(headers: Any) -> float | None:
    """Seconds a 429/503 asks us to wait: Retry-After (seconds or an HTTP date) or retry-after-ms."""
    try:
        if headers.get("retry-after-ms"):
            return min(600.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if not value:
            return None
        try:
            return min(600.0, max(0.0, float(value)))
        except ValueError:
            return min(600.0, max(0.0, parsedate_to_datetime(value).timestamp() - time.time()))
    except (TypeError, ValueError, AttributeError):
        return None
