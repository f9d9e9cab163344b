"""The OpenAI-compatible client machinery shared by the api judge (`--judge api:MODEL`) and api
generation (`--model api:MODEL` for `sample` and `eval exact|code|winrate`).

What both need, in one place:
  * key: read from the environment variable named by --api-key-env (default OPENAI_API_KEY), never
    from a flag, a file or a row. A server on a loopback address (127.0.0.1, localhost, ::1) gets a
    dummy key when the variable is unset (local servers ignore it). The key never reaches a log,
    a row or an error message: server text we show is scrubbed of it, and URLs are shown without
    user:password@ or a query string (`public_url`).
  * concurrency: at most --concurrency requests in flight (a thread pool; answers arrive in any order).
  * retries: 429, 5xx, timeouts and connection errors are retried up to --max-retries times with
    exponential backoff and jitter, waiting at least what a Retry-After header asks. Any other
    4xx is a mistake a retry cannot fix (a bad model name, a bad key): a clear error at once.
    The `openai` client's own retries are off (max_retries=0): ours know 429 from 400 and Retry-After.
  * cost: usage tokens x a price table ($ per million tokens): --prices IN,OUT or a JSON file
    {"model": {"input": IN, "output": OUT}}; else a built-in table of a few OpenAI models. A server
    on a loopback address costs 0 unless --prices says otherwise.
  * --max-cost: no new request is sent once spent + in-flight estimates + its own estimate would
    pass the budget; requests in flight finish, and `stopped` says why the answers ended early.
    One `Budget` may be shared by several clients (`eval winrate -m api:X --judge api:Y`).

    client = ApiClient("gpt-4o-mini", ApiOptions(max_cost=2.0), seed=0)
    for tag, result, cost, sent in client.stream(next_job):   # next_job() -> Job | None
        ...
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import random
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit, urlunsplit

from rlhf_cli.console import warn
from rlhf_cli.errors import RlhfError

OPENAI_URL = "https://api.openai.com/v1"
LOCAL_KEY = "sk-local-no-key"  # what a loopback server gets when the key variable is unset
R = TypeVar("R")


@dataclass(frozen=True)
class ApiOptions:
    """The client's knobs, as `sample` and the evals hold them (`pairwise` keeps them in JudgeOptions)."""

    base_url: str | None = None  # None: OpenAI
    api_key_env: str = "OPENAI_API_KEY"  # the *name* of the environment variable holding the key
    concurrency: int = 4  # requests in flight
    max_retries: int = 5  # on 429 / 5xx / timeouts, with exponential backoff
    timeout: float = 120.0  # seconds per request (a generation takes longer than a judge's 4 tokens)
    prices: str | None = None  # "IN,OUT" dollars per million tokens, or a JSON price-table file
    max_cost: float | None = None  # stop cleanly once this many dollars are spent

    LIMITS: ClassVar[dict[str, Any]] = {"concurrency": ">= 1", "max_retries": ">= 0", "timeout": "> 0", "max_cost": ">= 0"}


class ApiStopped(RlhfError):
    """An api run stopped cleanly before the end (--max-cost): exit 3, what was finished is kept."""

    exit_code = 3


# ---------------------------------------------------------------------------------- prices


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


@dataclass
class Budget:
    """Dollars allowed (None: no limit) and spent so far, shared by every client that holds it."""

    limit: float | None = None
    spent: float = 0.0


# ---------------------------------------------------------------------------------- URLs and errors


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


class Retryable(Exception):
    """A failure a later try may not have: 429, 5xx, a timeout, a dropped connection."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.wait = reason, wait


def error_text(e: Any) -> str:
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


# ---------------------------------------------------------------------------------- the client


@dataclass
class Job:
    """One unit of work for `ApiClient.stream`: `send` runs in a worker thread and returns a dict
    with "usage"; a job without `send` is already answered (`ready`, e.g. a cache hit) and costs 0."""

    tag: Any
    send: Callable[[], dict[str, Any]] | None = None
    estimate: float = 0.0  # dollars `send` may cost at most
    ready: Any = None


@dataclass
class _Counters:
    requests: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    spent: float = 0.0  # dollars, this client
    chars: int = 0  # prompt characters and tokens seen so far: the chars-per-token ratio for estimates
    tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class ApiClient:
    """One model on one OpenAI-compatible server; see the module docstring.

    Validates everything (URL, key, prices, ranges) on construction, before any network.
    `rerun_hint` is what the caller tells the user after retries run out.
    """

    backoff_base = 1.0  # seconds before the first retry (doubles each time); tests lower it
    backoff_cap = 60.0

    def __init__(self, model: str, opts: ApiOptions, seed: int = 0, budget: Budget | None = None,
                 rerun_hint: str = "raise --max-retries or the timeout") -> None:
        if opts.concurrency < 1 or opts.max_retries < 0 or not opts.timeout > 0:
            raise RlhfError("need --concurrency >= 1, --max-retries >= 0 and --timeout > 0")
        if opts.max_cost is not None and not opts.max_cost >= 0:
            raise RlhfError(f"--max-cost must be >= 0; got {opts.max_cost}")
        self.model = model
        self.opts = opts
        self.rerun_hint = rerun_hint
        self.url = opts.base_url or OPENAI_URL
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RlhfError(f"--base-url {public_url(self.url)!r} is not an http(s) URL", "e.g. --base-url http://127.0.0.1:8080/v1")
        self.local = is_loopback(parts.hostname)
        self.host = parts.hostname
        key = os.environ.get(opts.api_key_env, "")
        if not key:
            if not self.local:
                raise RlhfError(f"the environment variable {opts.api_key_env} holding the API key is not set",
                                f"export {opts.api_key_env}=... (or name another variable with --api-key-env); keys are never taken from flags")
            key = LOCAL_KEY
        self._secret = key
        self.price = resolve_price(model, opts.prices, self.local)
        self.budget = budget if budget is not None else Budget(opts.max_cost)
        if self.price is None:
            if self.budget.limit is not None:
                raise RlhfError(f"--max-cost needs a price for model {model!r}", "give --prices IN,OUT ($ per million tokens) or a JSON price file")
            warn(f"no price known for {model!r}: costs are reported as 0 (give --prices IN,OUT to count them)")
        self.stopped: str | None = None
        self.n = _Counters()
        self._abort = threading.Event()
        self._rng = random.Random(seed)

        try:
            import openai  # imported here so `rlhf --help` and the local engines never pay for it
        except ImportError:
            raise RlhfError("api models and judges need the `openai` package", "pip install openai") from None

        self.openai = openai
        self.client = openai.OpenAI(base_url=self.url, api_key=key, timeout=opts.timeout, max_retries=0)

    @property
    def public_url(self) -> str:
        return public_url(self.url)

    def close(self) -> None:
        self._abort.set()
        self.client.close()

    # -- many requests: concurrency and the budget ------------------------------------------------

    def stream(self, next_job: Callable[[], Job | None]) -> Generator[tuple[Any, Any, float, bool], None, None]:
        """Run jobs with at most --concurrency in flight; -> (tag, result, cost, sent) as each finishes.

        `next_job()` is asked for work whenever a slot is free (it may return new work after an
        answer came back, e.g. a follow-up request); None means nothing more for now, and the
        stream ends when nothing is in flight either. A job that would pass the budget is dropped
        unsent and no later job is asked for: `stopped` says why.
        """
        from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

        budget = self.budget
        pending: dict[Future, Job] = {}
        over_budget = False
        self._abort.clear()
        pool = ThreadPoolExecutor(self.opts.concurrency, thread_name_prefix="rlhf-api")
        try:
            while True:
                # 1. fill the pool up to --concurrency; answered jobs go straight out, for free
                while not over_budget and len(pending) < self.opts.concurrency:
                    job = next_job()
                    if job is None:
                        break
                    if job.send is None:
                        yield job.tag, job.ready, 0.0, False
                        continue
                    in_flight = sum(j.estimate for j in pending.values())
                    if budget.limit is not None and budget.spent + in_flight + job.estimate > budget.limit:
                        over_budget = True  # this job stays undone; a rerun picks it up
                        break
                    pending[pool.submit(job.send)] = job
                if not pending:
                    break
                # 2. hand out whatever finished first
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    job = pending.pop(fut)
                    result = fut.result()  # an RlhfError from the worker surfaces here
                    cost = self.price.cost(result["usage"]) if self.price else 0.0
                    self.n.spent += cost
                    budget.spent += cost
                    yield job.tag, result, cost, True
            if over_budget:
                self.stopped = f"max-cost reached (${budget.spent:.4f} of ${budget.limit:.4f})"
        finally:
            if pending:  # an error or an abandoned iterator: wake sleeping retries and drop queued jobs
                self._abort.set()
            pool.shutdown(wait=True, cancel_futures=True)

    def estimate(self, prompt_chars: int, output_tokens: int) -> float:
        """Dollars one request will cost at most: prompt tokens from the chars-per-token ratio seen
        so far (4 before any answer) + `output_tokens`."""
        if self.price is None:
            return 0.0
        with self.n.lock:
            per_token = self.n.chars / self.n.tokens if self.n.tokens else 4.0
        return self.price.cost({"prompt_tokens": math.ceil(prompt_chars / per_token), "completion_tokens": output_tokens})

    def observe(self, prompt_chars: int, prompt_tokens: int) -> None:
        """Learn the chars-per-token ratio from a reply's usage (worker threads call this)."""
        with self.n.lock:
            self.n.chars += prompt_chars
            self.n.tokens += prompt_tokens

    # -- one request, in a worker thread ----------------------------------------------------------

    def call(self, send: Callable[[], R], fix_400: Callable[[str], bool] | None = None) -> R:
        """`send()` (one `openai` call), retrying what a retry can fix. `fix_400(message)` may adjust
        the caller's request after an HTTP 400 and return True to try again (e.g. without logprobs)."""
        attempt = 0
        while True:
            if self._abort.is_set():
                raise RlhfError("api: stopped")
            try:
                with self.n.lock:
                    self.n.requests += 1
                return self._send(send, fix_400)
            except Retryable as e:
                if attempt >= self.opts.max_retries:
                    raise RlhfError(f"api: {self.public_url} still failing after {self.opts.max_retries} retries: {e.reason}",
                                    self.rerun_hint) from None
                backoff = min(self.backoff_cap, self.backoff_base * 2**attempt) * self._rng.uniform(0.5, 1.0)
                attempt += 1
                with self.n.lock:
                    self.n.retries += 1
                if self._abort.wait(max(backoff, e.wait or 0.0)):
                    raise RlhfError("api: stopped") from None

    def _send(self, send: Callable[[], R], fix_400: Callable[[str], bool] | None) -> R:
        openai = self.openai
        try:
            return send()
        except openai.APIStatusError as e:
            status, message = e.status_code, self.scrub(error_text(e))
            if status == 429 or status >= 500:
                raise Retryable(f"HTTP {status}: {message}", retry_after(e.response.headers)) from None
            if status == 400 and fix_400 is not None and fix_400(message):
                raise Retryable(f"HTTP 400: {message}", 0.0) from None
            hint = {401: f"check the key in ${self.opts.api_key_env}", 403: f"check the key in ${self.opts.api_key_env}",
                    404: "check the model name and --base-url (it usually ends in /v1)"}.get(status, "a retry will not fix this request")
            raise RlhfError(f"api: {self.public_url} answered HTTP {status}: {message}", hint) from None
        except openai.APITimeoutError:
            raise Retryable(f"no answer within the timeout ({self.opts.timeout:g}s)") from None
        except openai.APIConnectionError as e:
            raise Retryable(f"connection failed: {self.scrub(str(e))}") from None

    def scrub(self, text: str) -> str:
        """Server text with the key blanked out, in case a server echoes what it was sent."""
        return text.replace(self._secret, "[key]") if self._secret else text
