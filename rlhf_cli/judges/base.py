"""What every judge of `rlhf pairwise` implements: the questions it is asked and the answers it gives.

Judges work on `Item`s: a sample row and its K completions (the record lives in data/records.py).

Two kinds of judge:

* a **score judge** gives every completion of a sample row a number on its own (`rule`: 1.0 correct /
  0.0 wrong against a reference field; `rm:PATH`: the reward model's scalar). Pairs and rankings
  follow from the numbers; equal numbers are a tie.
* a **pair judge** answers ordered questions "is the answer shown first (A) better than the one
  shown second (B)?" (`lm:MODEL`, `api:MODEL`, `human`). `pairwise` decides which pairs to ask, in
  which order(s), and how two orders combine; the judge only answers what it is asked.

A pair judge's `judge(asks)` is an iterator of `(ask, verdict)`: it may answer in any order
(`api` runs requests concurrently), hold one back (`human` can undo the last answer until the next
is given), or stop early (`api` at `--max-cost`, `human` at quit). It sets `stopped` to a reason
when it stops early, so `pairwise` can tell the user that a rerun with `--resume` continues.

    from rlhf_cli.judges import build_judge
    judge = build_judge("rule:last-number", JudgeOptions(reference_field="answer"))
    judge.score([item])            # -> [[1.0, 0.0, 1.0]]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from rlhf_cli.data.records import Item

Winner = Literal["A", "B", "tie"]


@dataclass(frozen=True)
class Ask:
    """One ordered question to a pair judge: completion `first` is shown as A, `second` as B."""

    item: Item
    first: int
    second: int

    @property
    def a(self) -> str:
        return self.item.completions[self.first]

    @property
    def b(self) -> str:
        return self.item.completions[self.second]


@dataclass
class Verdict:
    """A pair judge's answer to one Ask.

    winner: "A" / "B" / "tie", or None when the judge gave no usable answer (a human's skip, an
        API reply that names neither answer); None never becomes a preference.
    p_a: the judge's probability that A is better, where it has one (lm: from choice-token log-probs).
    raw: the judge's raw output (the API's text, the key a human pressed), for provenance.
    cost: dollars spent on this answer (0 when cached or local); cached: answered from the cache.
    usage: token counts as reported by the judge ({"prompt_tokens", "completion_tokens"}).
    """

    winner: Winner | None
    p_a: float | None = None
    raw: str | None = None
    cost: float = 0.0
    cached: bool = False
    usage: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class JudgeOptions:
    """Everything a judge may need from the command line; each judge reads the fields it uses.

    `pairwise` and `eval winrate` hold one as `judge_options` and fill it from their flags (their
    names are these fields; the flags are declared once in options.py).
    """

    reference_field: str = "answer"  # rule / human: the row field holding the reference answer
    template: str | None = None  # lm / api: a pairwise prompt template file (None = built-in)
    base_url: str | None = None  # api: an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1
    api_key_env: str = "OPENAI_API_KEY"  # api: the *name* of the environment variable holding the key
    concurrency: int = 4  # api: requests in flight
    max_retries: int = 5  # api: on 429 / 5xx / timeouts, with exponential backoff
    timeout: float = 60.0  # api: seconds per request
    cache_dir: str | None = None  # api: on-disk verdict cache (None = the default under ~/.cache/rlhf)
    prices: str | None = None  # api: "IN,OUT" dollars per million tokens, or a JSON price-table file
    max_cost: float | None = None  # api: stop cleanly once this many dollars are spent
    device: str = "auto"  # lm / rm
    dtype: str = "fp32"  # lm / rm
    batch_size: int = 8  # lm / rm
    trust_remote_code: bool = False
    seed: int = 0

    LIMITS: ClassVar[dict[str, Any]] = {
        "concurrency": ">= 1", "max_retries": ">= 0", "timeout": "> 0", "max_cost": ">= 0", "batch_size": ">= 1",
        "dtype": ("fp32", "bf16", "fp16"),
    }


@runtime_checkable
class ScoreJudge(Protocol):
    kind: str

    def describe(self) -> dict[str, Any]:
        """Provenance recorded in every output row's "judge" object: kind, rule or model, ..."""
        ...

    def score(self, items: list[Item]) -> list[list[float | None]]:
        """One number per completion (higher is better; None = cannot be scored, e.g. no reference)."""
        ...


@runtime_checkable
class PairJudge(Protocol):
    kind: str
    stopped: str | None  # why judge() ended before answering every ask (budget, quit), else None

    def describe(self) -> dict[str, Any]:
        ...

    def judge(self, asks: Iterable[Ask]) -> Iterator[tuple[Ask, Verdict]]:
        """Answer asks, in any order, each at most once; may end early (then set `stopped`)."""
        ...

    def close(self) -> None:
        """Release models, clients, caches and terminals."""
        ...
