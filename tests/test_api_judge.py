"""The api judge against a small fault-injecting OpenAI-compatible server on loopback (stdlib only).

The server (tests/api_fake.py) answers /v1/chat/completions with canned JSON (usage, optional
log-probs) and can be told to answer the first calls with 429 + Retry-After, 500, 400, or to sleep
past the client's timeout. It counts calls and requests in flight, so the tests check retries, the
cache, cost, --max-cost and --concurrency by what actually reached the wire. The real server
(llama.cpp) is in test_api_server.py.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import pytest
from api_fake import FakeOpenAI

from rlhf_cli.data.records import Item
from rlhf_cli.errors import RlhfError
from rlhf_cli.judges import build_judge
from rlhf_cli.judges.api import ApiJudge, p_a_from_logprobs
from rlhf_cli.judges.base import Ask, JudgeOptions

KEY = "sk-test-SECRET-5f3c9a1e77"  # recognisable: grep for it everywhere


@pytest.fixture
def server():
    fake = FakeOpenAI()
    yield fake
    fake.close()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(ApiJudge, "backoff_base", 0.01)
    monkeypatch.setenv("RLHF_TEST_KEY", KEY)


def judge_for(server: FakeOpenAI, tmp_path, **kw: Any) -> ApiJudge:
    opts = JudgeOptions(base_url=server.url, api_key_env="RLHF_TEST_KEY", cache_dir=str(tmp_path / "cache"), **kw)
    j = build_judge("api:judge-x", opts)
    assert isinstance(j, ApiJudge)
    return j


def asks(n: int, first: int = 0, second: int = 1) -> list[Ask]:
    """n asks on n prompts whose completions have equal lengths (so cost estimates are alike)."""
    items = [Item(id=i, prompt=f"question {i:03d}", completions=(f"good {i:03d}", f"bad! {i:03d}"), row={}) for i in range(n)]
    return [Ask(it, first, second) for it in items]


def test_logprobs_give_p_a_and_text_is_the_fallback(server, tmp_path):
    server.reply = lambda body: {"text": "a", "top": [("a", math.log(0.6)), (" B", math.log(0.3)), ("The", math.log(0.1))]}
    (_, v), = judge_for(server, tmp_path).judge(asks(1))
    assert v.p_a == pytest.approx(0.6 / 0.9)  # 0.667: a vs b mass, "The" ignored; " B" counts as b
    assert (v.winner, v.raw, v.cached) == ("A", "a", False)
    assert v.usage == {"prompt_tokens": 1000, "completion_tokens": 2}

    # only "a" in the top list: b gets the smallest listed probability, 0.1 -> 0.7 / 0.8
    assert p_a_from_logprobs([{"token": "a", "logprob": math.log(0.7), "top_logprobs": [
        {"token": "a", "logprob": math.log(0.7)}, {"token": "It", "logprob": math.log(0.2)}, {"token": "X", "logprob": math.log(0.1)}]}]) == pytest.approx(0.875)

    server.reply = lambda body: {"text": "Output (b)", "top": None}  # a server without log-probs
    (_, v), = judge_for(server, tmp_path).judge(asks(1, 1, 0))
    assert (v.winner, v.p_a, v.raw) == ("B", None, "Output (b)")

    server.reply = lambda body: {"text": "Both are fine", "top": None}
    (_, v), = judge_for(server, tmp_path).judge(asks(2)[1:])
    assert (v.winner, v.p_a, v.raw) == (None, None, "Both are fine")  # unparseable: no preference, raw kept


def test_429_500_and_timeout_are_retried_honouring_retry_after(server, tmp_path):
    server.script = [("429", 0.4), ("500",), ("sleep", 1.5)]
    j = judge_for(server, tmp_path, timeout=0.5, max_retries=3)
    (_, v), = j.judge(asks(1))
    assert v.winner == "A"
    assert server.calls == 4 and j.retries == 3 and j.requests == 4
    assert server.times[1] - server.times[0] >= 0.4  # Retry-After: 0.4 beats the 0.01 s backoff


def test_retries_run_out_with_a_clear_error(server, tmp_path):
    server.script = [("500",)] * 5
    with pytest.raises(RlhfError, match=r"still failing after 2 retries: HTTP 500"):
        list(judge_for(server, tmp_path, max_retries=2).judge(asks(1)))
    assert server.calls == 3  # 1 try + 2 retries


def test_400_is_not_retried_and_the_key_never_leaks(server, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    server.script = [("400",)]
    j = judge_for(server, tmp_path)
    with pytest.raises(RlhfError, match="HTTP 400") as err:
        list(j.judge(asks(1)))
    assert server.calls == 1
    assert server.auth[0] == f"Bearer {KEY}"  # the key did reach the server...
    assert "[key]" in str(err.value)  # ...and the server's echo of it was blanked in our error
    server.script = []
    verdicts = list(judge_for(server, tmp_path).judge(asks(2)))
    out = capsys.readouterr()
    seen = [str(err.value), repr(err.value), json.dumps(j.describe()), caplog.text, out.out, out.err,
            *(repr(v) for _, v in verdicts), (tmp_path / "cache" / "api-judge.sqlite3").read_bytes().decode("latin-1")]
    assert all(KEY not in s for s in seen)
    assert caplog.text  # debug logging was on, so the check above looked at something


def test_cache_makes_a_rerun_free_and_order_is_part_of_the_key(server, tmp_path):
    first = list(judge_for(server, tmp_path, prices="2,8").judge(asks(3) + asks(3, 1, 0)))
    assert server.calls == 6  # A|B and B|A of one pair are different questions
    j = judge_for(server, tmp_path, prices="2,8")
    again = list(j.judge(asks(3) + asks(3, 1, 0)))
    assert server.calls == 6 and j.cache_hits == 6 and j.spent == 0.0
    assert all(v.cached and v.cost == 0.0 for _, v in again)
    assert [v.winner for _, v in again] == [v.winner for _, v in first]


def test_cost_from_usage_and_prices(server, tmp_path):
    j = judge_for(server, tmp_path, prices="2,8")
    costs = [v.cost for _, v in j.judge(asks(3))]
    # 1000 prompt tokens x $2/M + 2 completion tokens x $8/M = 0.002 + 0.000016
    assert costs == pytest.approx([0.002016] * 3)
    assert j.spent == pytest.approx(3 * 0.002016)
    table = tmp_path / "prices.json"
    table.write_text(json.dumps({"judge": {"input": 1.0, "output": 3.0}}))  # a prefix of "judge-x"
    (_, v), = judge_for(server, tmp_path, prices=str(table)).judge(asks(4)[3:])
    assert v.cost == pytest.approx(0.001006)  # 1000 x 1 + 2 x 3, per million
    assert judge_for(server, tmp_path).price.input == 0.0  # loopback server, no --prices: free
    with pytest.raises(RlhfError, match="no price for model 'judge-x'"):
        table.write_text(json.dumps({"other": {"input": 1.0, "output": 3.0}}))
        judge_for(server, tmp_path, prices=str(table))
    with pytest.raises(RlhfError, match="need two numbers"):
        judge_for(server, tmp_path, prices="1,x")


def test_max_cost_stops_cleanly_after_the_right_number_of_asks(server, tmp_path):
    j = judge_for(server, tmp_path, prices="1,1", max_cost=0.0035, concurrency=1)
    got = list(j.judge(asks(10)))
    # each ask costs (1000 + 2) x $1/M = $0.001002; after 3 the 4th would bring 0.004008 > 0.0035
    assert len(got) == 3 and server.calls == 3
    assert j.spent == pytest.approx(0.003006)
    assert j.stopped == "max-cost reached ($0.0030 of $0.0035)"
    j2 = judge_for(server, tmp_path, prices="1,1", max_cost=0.0035, concurrency=1)
    assert len(list(j2.judge(asks(10)))) == 6 and server.calls == 6  # rerun: 3 cached for free, 3 new


def test_concurrency_limit_is_never_exceeded(server, tmp_path):
    server.delay = 0.2
    got = list(judge_for(server, tmp_path, concurrency=3).judge(asks(9)))
    assert len(got) == 9 and len({a.item.id for a, _ in got}) == 9
    assert server.max_inflight == 3


def test_missing_key_is_an_error_naming_the_variable(monkeypatch, tmp_path, server):
    monkeypatch.delenv("RLHF_NO_SUCH_KEY", raising=False)
    with pytest.raises(RlhfError, match="RLHF_NO_SUCH_KEY"):
        build_judge("api:gpt-4o-mini", JudgeOptions(base_url="https://api.example.com/v1", api_key_env="RLHF_NO_SUCH_KEY"))
    # a loopback server needs no key: it gets a dummy one
    j = build_judge("api:judge-x", JudgeOptions(base_url=server.url, api_key_env="RLHF_NO_SUCH_KEY", cache_dir=str(tmp_path)))
    list(j.judge(asks(1)))
    assert server.auth == ["Bearer sk-local-no-key"]
    with pytest.raises(RlhfError, match="--max-cost needs a price"):
        build_judge("api:my-model", JudgeOptions(base_url="https://api.example.com/v1", api_key_env="RLHF_TEST_KEY", max_cost=1.0))
