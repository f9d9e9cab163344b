"""`--model api:MODEL --base-url URL`: completions from any OpenAI-compatible server (OpenAI, vLLM,
llama.cpp's server, Ollama) for `sample` and `eval exact|code|winrate`, through the client shared
with the api judge (rlhf_cli/api_client.py: key, concurrency, retries, prices, --max-cost).

A prompt that is a list of messages goes to /chat/completions (the server applies its chat
template); a prompt that is text goes to /completions (`--format raw`). Each request asks for the
prompt's remaining completions with `n`; a server that returns fewer choices (llama.cpp's ignores
`n`) is asked again for the rest, with a new seed. Parameters sent: temperature, top_p, max_tokens
(= --max-new-tokens), n, stop, seed, logprobs when asked, and top_k (not an OpenAI parameter) in
the request body only when --top-k > 0: vLLM, llama.cpp and Ollama read it, api.openai.com is
refused before anything is sent. Where these differ from the local engine:
  * seed: one per request, from the run seed and the prompt's id (`request_seed`), so reruns ask
    the same questions; whether the server's sampling is reproducible is up to the server.
  * stop: at most 4 strings go to the server (OpenAI's limit); every stop string is also cut out of
    the text here, so the text is the same whichever the server honoured.
  * finish_reason: the server's "length" stays "length"; anything else ("stop", a content filter)
    is "stop", and so is a text cut here at a stop string.
  * completion tokens: the server's count per choice when it gives one (its log-probs, or the
    usage of a one-choice reply); None when one reply holds several choices and only their total.
    Prompt tokens: the server's usage (its own chat template's tokens).
  * log-probs: the server's per-token numbers (chat `logprobs` + `top_logprobs=1`, completions
    `logprobs=1`: the sampled token's, plus the top one, which is dropped); servers
    differ in whether temperature is applied first. Token ids are not part of the API.

    sampler = ApiSampler("gpt-4o-mini", ApiOptions(max_cost=1.0), seed=0)
    for i, got in sampler.sample(prompts, ids, n=4, temperature=0.7, max_tokens=256): ...
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from typing import Any

from rlhf_cli.api_client import ApiClient, ApiOptions, ApiStopped, Budget, Job
from rlhf_cli.errors import RlhfError

Prompt = str | list[dict[str, str]]  # text: /completions; messages: /chat/completions
MAX_STOP = 4  # OpenAI takes at most 4 stop strings


@dataclass
class ApiCompletion:
    text: str
    finish_reason: str  # "stop" | "length"
    tokens: int | None  # completion tokens, when the server reports them per choice
    logprobs: list[float | None] | None = None  # None inside: a token the server gave no number for


@dataclass
class Sampled:
    """One prompt's completions and its prompt tokens (None if the server sent no usage)."""

    completions: list[ApiCompletion]
    prompt_tokens: int | None


def request_seed(seed: int, key: str) -> int:
    """`generation.batch_seed(seed, [key])` folded to 31 bits, which every server accepts."""
    digest = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF


class ApiSampler:
    """Completions from one `api:MODEL`; validates URL, key and prices on construction, offline."""

    def __init__(self, spec: str, opts: ApiOptions, seed: int = 0, budget: Budget | None = None,
                 rerun_hint: str = "raise max-retries or timeout (keys of a --config file)") -> None:
        self.spec = spec
        self.model = spec.removeprefix("api:")
        self.api = ApiClient(self.model, opts, seed, budget, rerun_hint)

    @property
    def stopped(self) -> str | None:
        return self.api.stopped

    @property
    def base_url(self) -> str:
        """The server without credentials or query: what rows record."""
        return self.api.public_url

    def close(self) -> None:
        self.api.close()

    def check(self, top_k: int = 0) -> None:
        """Refuse what the server is known not to take, before anything is sent."""
        if top_k > 0 and self.api.host == "api.openai.com":
            raise RlhfError("--top-k is not an OpenAI API parameter", "leave --top-k at 0 for api.openai.com (vLLM, llama.cpp and Ollama servers take it)")

    def sample(self, prompts: Sequence[Prompt], keys: Sequence[str], *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
               top_k: int = 0, max_tokens: int = 256, stop: Sequence[str] = (), seed: int = 0,
               logprobs: bool = False) -> Iterator[tuple[int, Sampled]]:
        """`n` completions per prompt; -> (index, Sampled) in input order as answers come in.

        `keys` (the prompts' ids) seed each request. Up to --concurrency requests are in flight, so
        answers arrive out of order and wait here for the ones before them. When the run ends
        early (--max-cost: `stopped` is set; or an error, raised afterwards) every prompt already
        finished is still handed out, in input order, so nothing paid for is lost.
        """
        self.check(top_k)
        stops = [s for s in stop if s]
        sent = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "stop": stops[:MAX_STOP] or None,
                "extra_body": {"top_k": top_k} if top_k > 0 else None}
        todo = deque(range(len(prompts)))  # first requests, in input order
        again: deque[int] = deque()  # prompts the server gave fewer than n choices: their rest goes first
        drawn: dict[int, Sampled] = {}
        finished: dict[int, Sampled] = {}

        def next_job() -> Job | None:
            i = again.popleft() if again else todo.popleft() if todo else None
            if i is None:
                return None
            have = len(drawn[i].completions) if i in drawn else 0
            want = n - have
            key = keys[i] if have == 0 else f"{keys[i]}#{have}"  # a follow-up must not repeat the first draw
            send = partial(self._request, prompts[i], want, request_seed(seed, key), sent, stops, logprobs)
            return Job(i, send, self.api.estimate(_chars(prompts[i]), want * max_tokens))

        nxt = 0
        try:
            with closing(self.api.stream(next_job)) as answers:
                for i, result, _, _ in answers:
                    got = drawn.setdefault(i, Sampled([], result["prompt_tokens"]))
                    got.completions += result["choices"][: n - len(got.completions)]
                    if len(got.completions) < n:
                        again.append(i)
                        continue
                    finished[i] = drawn.pop(i)
                    while nxt in finished:
                        yield nxt, finished.pop(nxt)
                        nxt += 1
        except Exception:
            for i in sorted(finished):  # paid for: hand them out before the error
                yield i, finished.pop(i)
            raise
        for i in sorted(finished):
            yield i, finished.pop(i)

    def sample_all(self, prompts: Sequence[Prompt], keys: Sequence[str], **params: Any) -> Iterator[tuple[int, Sampled]]:
        """`sample`, for an eval: a budget stop is an `ApiStopped` (exit 3), since a score needs every answer."""
        count = 0
        for i, got in self.sample(prompts, keys, **params):
            count += 1
            yield i, got
        if self.stopped:
            raise ApiStopped(f"{self.spec}: {self.stopped} after {count} of {len(prompts)} prompts; nothing was scored",
                             "raise --max-cost, or evaluate fewer examples with --limit N")

    # -- one request, in a worker thread ----------------------------------------------------------

    def _request(self, prompt: Prompt, want: int, seed: int, sent: dict[str, Any], stops: list[str], logprobs: bool) -> dict[str, Any]:
        """One request for `want` completions; -> {"choices": [ApiCompletion], "prompt_tokens", "usage"}."""
        chat = not isinstance(prompt, str)
        create: Any = self.api.client.chat.completions.create if chat else self.api.client.completions.create
        kw: dict[str, Any] = {k: v for k, v in sent.items() if v is not None}
        kw.update(model=self.model, n=want, seed=seed)
        if chat:
            kw["messages"] = prompt
            if logprobs:  # top_logprobs too: llama.cpp's server returns no log-probs without it
                kw.update(logprobs=True, top_logprobs=1)
        else:
            kw["prompt"] = prompt
            if logprobs:
                kw["logprobs"] = 1  # the sampled token's log-prob (+ the top one)
        resp = self.api.call(lambda: create(**kw))
        if not resp.choices:
            raise RlhfError(f"api: {self.base_url} returned no choices for {self.model!r}", "check that the server serves this model")
        usage: dict[str, int] = {}
        if resp.usage is not None:
            usage = {"prompt_tokens": int(resp.usage.prompt_tokens or 0), "completion_tokens": int(resp.usage.completion_tokens or 0)}
            self.api.observe(_chars(prompt), usage["prompt_tokens"])
        one = usage.get("completion_tokens") if len(resp.choices) == 1 else None
        choices = [self._completion(c, chat, stops, one) for c in sorted(resp.choices, key=lambda c: c.index or 0)]
        return {"choices": choices, "prompt_tokens": usage.get("prompt_tokens"), "usage": usage}

    def _completion(self, choice: Any, chat: bool, stops: list[str], tokens: int | None) -> ApiCompletion:
        lp: list[float | None] | None = None
        if chat:
            text = (choice.message.content if choice.message else None) or ""
            if choice.logprobs is not None and choice.logprobs.content is not None:
                lp = [None if c.logprob is None else round(c.logprob, 6) for c in choice.logprobs.content]
        else:
            text = choice.text or ""
            if choice.logprobs is not None and choice.logprobs.token_logprobs is not None:
                lp = [x if x is None else round(x, 6) for x in choice.logprobs.token_logprobs]
        reason = "length" if choice.finish_reason == "length" else "stop"
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut >= 0:  # a stop string the server did not get, or did not honour
            text, reason = text[:cut], "stop"
        return ApiCompletion(self.api.scrub(text), reason, len(lp) if lp is not None else tokens, lp)


def api_samplers(models: Sequence[str], opts: ApiOptions, seed: int, budget: Budget | None = None) -> dict[str, ApiSampler]:
    """An ApiSampler per `api:` model of an eval, sharing one --max-cost budget; validated, nothing sent."""
    budget = budget if budget is not None else Budget(opts.max_cost)
    return {m: ApiSampler(m, opts, seed, budget) for m in dict.fromkeys(models) if m.startswith("api:")}


def _chars(prompt: Prompt) -> int:
    return len(prompt) if isinstance(prompt, str) else sum(len(m.get("content") or "") for m in prompt)
