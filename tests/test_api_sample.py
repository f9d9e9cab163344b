"""`--model api:MODEL`: `rlhf sample` and `rlhf eval exact|code|winrate` generating on an OpenAI-compatible
server, against the fault-injecting fake of tests/api_fake.py (the real llama.cpp server: test_api_server.py).

The fake's replies are built from the request (`echo`: the prompt, the choice's index and the seed
come back in the text), so every row is checked against what it must be, and every request body
against what must have been sent.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from api_fake import FakeOpenAI
from conftest import write_jsonl

from rlhf_cli.api_client import ApiClient
from rlhf_cli.api_generation import request_seed
from rlhf_cli.cli import main

KEY = "sk-test-SECRET-93be1c04aa"  # recognisable: grep for it everywhere


@pytest.fixture
def server():
    fake = FakeOpenAI()
    fake.reply = echo
    yield fake
    fake.close()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(ApiClient, "backoff_base", 0.01)
    monkeypatch.setenv("RLHF_TEST_KEY", KEY)


def content_of(body: dict[str, Any]) -> str:
    return body["messages"][-1]["content"] if "messages" in body else body["prompt"]


def echo(body: dict[str, Any], cap: int | None = None) -> dict[str, Any]:
    """`n` choices (at most `cap`), choice k saying "<prompt> #k s<seed>"; "long" prompts hit the length limit."""
    text = content_of(body)
    n = min(body.get("n", 1), cap or 99)
    return {"choices": [{"text": f"{text} #{k} s{body['seed']}", "finish_reason": "length" if "long" in text else "stop"} for k in range(n)]}


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return (0 if e.value.code is None else e.value.code), out, " ".join(err.split())


def sample_argv(server: FakeOpenAI, prompts: Path, *extra: str) -> list[str]:
    return ["sample", str(prompts), "--model", "api:gen-x", "--base-url", server.url, "--api-key-env", "RLHF_TEST_KEY", *extra]


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


PROMPTS = [
    {"prompt": "hi", "answer": "1"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "yo"}], "id": "m"},
    {"prompt": "a long one", "id": 7},
    {"prompt": "cut END here"},
]


# ---------------------------------------------------------------------------------- rlhf sample


def test_rows_have_the_local_engines_fields_and_requests_carry_every_parameter(tmp_path, server, capsys):
    prompts = write_jsonl(tmp_path, "p.jsonl", PROMPTS)
    rc, _, err = cli(sample_argv(server, prompts, "-t", "0.7", "--top-p", "0.9", "--max-new-tokens", "12", "--stop", "END",
                                 "--seed", "5", "-o", str(tmp_path / "api.jsonl")), capsys)
    assert rc == 0, err
    rows = read_rows(tmp_path / "api.jsonl")
    # the same fields as the local engine's rows (sampling gains base_url), the same ids, inputs passed through
    rc, _, err = cli(["sample", str(prompts), "--model", "builtin:micro", "--max-new-tokens", "2", "-o", str(tmp_path / "hf.jsonl")], capsys)
    local = read_rows(tmp_path / "hf.jsonl")
    assert [set(r) for r in rows] == [set(r) for r in local]
    assert [r["id"] for r in rows] == [r["id"] for r in local] and rows[1]["id"] == "m" and rows[2]["id"] == 7
    assert set(rows[0]["sampling"]) == set(local[0]["sampling"]) | {"base_url"}
    assert rows[0]["sampling"] == {"model": "api:gen-x", "temperature": 0.7, "top_p": 0.9, "top_k": 0, "max_new_tokens": 12,
                                   "seed": 5, "n": 1, "stop": ["END"], "base_url": server.url}
    seeds = [request_seed(5, str(r["id"])) for r in rows]
    assert [r["completions"] for r in rows] == [[f"hi #0 s{seeds[0]}"], [f"yo #0 s{seeds[1]}"], [f"a long one #0 s{seeds[2]}"], ["cut "]]
    assert [r["finish_reasons"] for r in rows] == [["stop"], ["stop"], ["length"], ["stop"]]  # "cut END here": cut here at the stop
    assert [(r["completion_tokens"], r["prompt_tokens"]) for r in rows] == [([2], 1000)] * 4  # the server's usage, one choice
    assert rows[0]["answer"] == "1" and rows[1]["messages"] == PROMPTS[1]["messages"]

    # what went over the wire: chat messages (a prompt is one user turn), every sampling parameter, a seed per prompt
    by_seed = {b["seed"]: b for b in server.bodies}
    bodies = [by_seed[s] for s in seeds]
    assert set(server.paths) == {"/v1/chat/completions"}
    assert bodies[0] == {"model": "gen-x", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.7, "top_p": 0.9,
                         "max_tokens": 12, "n": 1, "stop": ["END"], "seed": seeds[0]}
    assert bodies[1]["messages"] == PROMPTS[1]["messages"]
    from rlhf_cli.generation import batch_seed

    assert seeds[0] == batch_seed(5, [str(rows[0]["id"])]) & 0x7FFF_FFFF  # the local engine's seed rule, per prompt


def test_raw_format_goes_to_completions_with_logprobs_and_top_k(tmp_path, server, capsys):
    server.reply = lambda body: {"choices": [{"text": "ab", "finish_reason": "length", "logprobs": [("a", -0.5), ("b", -1.25)]}]}
    prompts = write_jsonl(tmp_path, "p.jsonl", PROMPTS[:2])
    rc, out, err = cli(sample_argv(server, prompts, "--format", "raw", "--logprobs", "--top-k", "5", "--concurrency", "1"), capsys)
    assert rc == 0, err
    rows = [orjson.loads(x) for x in out.splitlines()]
    assert server.paths == ["/v1/completions", "/v1/chat/completions"]  # a messages row is a conversation in either format
    assert server.bodies[0]["prompt"] == "hi" and server.bodies[0]["logprobs"] == 1 and server.bodies[0]["top_k"] == 5
    assert server.bodies[1]["logprobs"] is True and server.bodies[1]["top_logprobs"] == 1 and server.bodies[1]["top_k"] == 5
    for r in rows:  # token ids are not part of the API: only the server's log-probs, counted per choice
        assert "completion_token_ids" not in r
        assert (r["completions"], r["finish_reasons"], r["logprobs"], r["completion_tokens"]) == (["ab"], ["length"], [[-0.5, -1.25]], [2])


def test_n_in_one_request_and_more_requests_when_the_server_gives_fewer(tmp_path, server, capsys):
    prompts = write_jsonl(tmp_path, "p.jsonl", PROMPTS[:2])
    rc, out, err = cli(sample_argv(server, prompts, "-n", "4"), capsys)
    assert rc == 0, err
    rows = [orjson.loads(x) for x in out.splitlines()]
    assert server.calls == 2 and all(b["n"] == 4 for b in server.bodies)
    seed = request_seed(0, str(rows[0]["id"]))
    assert rows[0]["completions"] == [f"hi #{k} s{seed}" for k in range(4)]
    assert rows[0]["completion_tokens"] == [None] * 4  # one reply, four choices, only their total: unknown per choice

    # a server that ignores n (llama.cpp's): asked again for the rest, each time with a new seed
    server.reply = lambda body: echo(body, cap=1)
    server.bodies.clear()
    rc, out, err = cli(sample_argv(server, prompts, "-n", "4"), capsys)
    assert rc == 0, err
    rows = [orjson.loads(x) for x in out.splitlines()]
    for r in rows:
        mine = [b for b in server.bodies if content_of(b) == ("hi" if r["id"] != "m" else "yo")]
        assert sorted(b["n"] for b in mine) == [1, 2, 3, 4]
        assert len({b["seed"] for b in mine}) == 4 and len(set(r["completions"])) == 4
        assert r["completion_tokens"] == [2] * 4 and r["prompt_tokens"] == 1000
    assert rows[1]["completions"][0] == f"yo #0 s{request_seed(0, 'm')}" and rows[1]["completions"][1] == f"yo #0 s{request_seed(0, 'm#1')}"


def test_429_and_500_are_retried_then_the_rows_come_out(tmp_path, server, capsys):
    server.script = [("429", 0.3), ("500",)]
    prompts = write_jsonl(tmp_path, "p.jsonl", PROMPTS[:2])
    rc, out, err = cli(sample_argv(server, prompts, "--concurrency", "1"), capsys)
    assert rc == 0, err
    assert server.calls == 4 and server.times[1] - server.times[0] >= 0.3  # Retry-After beats the 0.01 s backoff
    assert [orjson.loads(x)["completions"][0].split(" #")[0] for x in out.splitlines()] == ["hi", "yo"]


def test_a_400_is_a_clear_error_rows_before_it_are_kept_and_the_key_never_leaks(tmp_path, server, capsys):
    prompts = write_jsonl(tmp_path, "p.jsonl", [{"prompt": f"q{i}", "id": i} for i in range(4)])
    out_file = tmp_path / "s.jsonl"
    server.script = [("ok",), ("ok",), ("400",)]
    rc, out, err = cli(sample_argv(server, prompts, "--concurrency", "1", "-o", str(out_file)), capsys)
    assert rc == 2 and server.calls == 3  # not retried
    assert "answered HTTP 400: model not found; you sent Bearer [key]" in err and "a retry will not fix this request" in err
    assert server.auth[0] == f"Bearer {KEY}"  # the key reached the server, and its echo was blanked
    assert [r["id"] for r in read_rows(out_file)] == [0, 1]  # finished rows written before the error
    rc, _, err = cli(sample_argv(server, prompts, "--concurrency", "1", "-o", str(out_file), "--resume"), capsys)
    assert rc == 0 and [r["id"] for r in read_rows(out_file)] == [0, 1, 2, 3]
    assert KEY not in out + err and KEY.encode() not in out_file.read_bytes()


def test_max_cost_stops_with_exit_3_and_resume_finishes_without_duplicates(tmp_path, server, capsys):
    prompts = write_jsonl(tmp_path, "p.jsonl", [{"prompt": f"question {i:03d}", "id": i} for i in range(10)])
    out_file = tmp_path / "s.jsonl"
    argv = sample_argv(server, prompts, "--concurrency", "1", "--max-new-tokens", "8", "--prices", "1,1", "-o", str(out_file))
    rc, _, err = cli([*argv, "--max-cost", "0.0035"], capsys)
    # each request costs (1000 + 2) x $1/M = $0.001002; after 3 the 4th (estimate 1000 + 8 tokens) would pass $0.0035
    assert rc == 3 and server.calls == 3
    assert "max-cost reached ($0.0030 of $0.0035): 3 of 10 prompts written" in err and "--resume" in err
    assert [r["id"] for r in read_rows(out_file)] == [0, 1, 2]
    rc, _, err = cli([*argv, "--max-cost", "0.0035", "--resume"], capsys)
    assert rc == 3 and "3 of 7 prompts written" in err
    rc, _, err = cli([*argv, "--resume"], capsys)
    assert rc == 0 and server.calls == 10, err  # nothing asked twice
    assert [r["id"] for r in read_rows(out_file)] == list(range(10))


def test_rows_keep_input_order_under_concurrency(tmp_path, server, capsys):
    def slow_first(body):  # prompt i answers after (8 - i) x 40 ms: the last asked finish first
        time.sleep((8 - int(content_of(body).split()[1])) * 0.04)
        return echo(body)

    server.reply = slow_first
    prompts = write_jsonl(tmp_path, "p.jsonl", [{"prompt": f"q {i}", "id": i} for i in range(8)])
    argv = sample_argv(server, prompts, "--concurrency", "4")
    argv[argv.index(server.url)] = server.url.replace("http://", "http://user:hunter2@")  # credentials in the URL
    rc, out, err = cli(argv, capsys)
    assert rc == 0, err
    rows = [orjson.loads(x) for x in out.splitlines()]
    assert [r["id"] for r in rows] == list(range(8)) and all(r["completions"][0].startswith(f"q {r['id']} #0") for r in rows)
    assert server.max_inflight == 4
    assert rows[0]["sampling"]["base_url"] == server.url and "hunter2" not in out + err  # rows name the server, not the login


def test_bad_options_fail_before_anything_is_sent(tmp_path, server, capsys, monkeypatch):
    prompts = write_jsonl(tmp_path, "p.jsonl", PROMPTS[:1])
    out_file = tmp_path / "s.jsonl"
    base = ["sample", str(prompts), "-o", str(out_file)]
    monkeypatch.delenv("RLHF_NO_SUCH_KEY", raising=False)
    for argv, message in [
        (["--model", "api:m", "--base-url", "ftp://127.0.0.1/v1"], "--base-url 'ftp://127.0.0.1/v1' is not an http(s) URL"),
        (["--model", "api:m", "--base-url", "https://api.example.com/v1", "--api-key-env", "RLHF_NO_SUCH_KEY"],
         "the environment variable RLHF_NO_SUCH_KEY holding the API key is not set"),
        (["--model", "api:gpt-4o-mini", "--api-key-env", "RLHF_TEST_KEY", "--top-k", "5"], "--top-k is not an OpenAI API parameter"),
        (["--model", "api:my-model", "--base-url", "https://api.example.com/v1", "--api-key-env", "RLHF_TEST_KEY", "--max-cost", "1"],
         "--max-cost needs a price for model 'my-model'"),
        (["--model", "api:", "--base-url", server.url], "--model 'api:' names no model"),
        (["--model", "api:m", "--base-url", server.url, "--concurrency", "0"], "--concurrency must be >= 1"),
    ]:
        rc, out, err = cli([*base, *argv], capsys)
        assert rc == 2 and message in err and out == "", (argv, err)
    assert server.calls == 0 and not out_file.exists()
    # a model behind an API has no weights here: steps that need them say so
    rc, _, err = cli(["eval", "ppl", str(prompts), "--field", "text=prompt", "-m", "api:m"], capsys)
    assert rc == 2 and "a model behind an API can only generate" in err
    # --device / --dtype mean nothing to a server: a warning, and the run goes on
    rc, _, err = cli(sample_argv(server, prompts, "--device", "cuda", "--dtype", "bf16", "-o", str(out_file)), capsys)
    assert rc == 0 and "--device and --dtype do nothing for an api: model" in err and len(read_rows(out_file)) == 1


# ---------------------------------------------------------------------------------- rlhf eval


def arithmetic(body: dict[str, Any]) -> dict[str, Any]:
    """Answers "What is I+1?" with I+1, except I = 2 (answered 0): 3 of 4 right by construction."""
    i = int(content_of(body).split("What is ")[-1].split("+")[0])
    return {"choices": [{"text": f" The answer is {i + 1 if i != 2 else 0}.\n"} for _ in range(body.get("n", 1))]}


@pytest.mark.parametrize("fmt", ["chat", "raw"])
def test_eval_exact_scores_what_the_server_answers(tmp_path, server, capsys, fmt):
    server.reply = arithmetic
    data = write_jsonl(tmp_path, "d.jsonl", [{"id": i, "question": f"What is {i}+1?", "answer": f"#### {i + 1}"} for i in range(4)])
    log = tmp_path / "log.jsonl"
    rc, out, err = cli(["eval", "exact", str(data), "-m", "api:gen-x", "--base-url", server.url, "--format", fmt,
                        "--log-samples", str(log)], capsys)
    assert rc == 0, err
    (res,) = orjson.loads(out)["results"]
    assert (res["model"], res["n"], res["exact_match"], res["samples_per_question"]) == ("api:gen-x", 4, 0.75, 1)
    assert [(r["id"], r["extracted"], r["score"]) for r in read_rows(log)] == [(0, "1", 1.0), (1, "2", 1.0), (2, "0", 0.0), (3, "4", 1.0)]
    if fmt == "raw":  # lm-eval's prompt as text, its stop strings sent along
        assert set(server.paths) == {"/v1/completions"} and server.bodies[0]["stop"] == ["Question:", "</s>", "<|im_end|>"]
        assert server.bodies[0]["prompt"].endswith("Answer:") and server.bodies[0]["temperature"] == 0.0
    else:
        assert set(server.paths) == {"/v1/chat/completions"} and "stop" not in server.bodies[0]


def test_eval_exact_budget_stop_exits_3_with_nothing_scored(tmp_path, server, capsys):
    server.reply = arithmetic
    data = write_jsonl(tmp_path, "d.jsonl", [{"id": i, "question": f"What is {i}+1?", "answer": str(i + 1)} for i in range(4)])
    rc, out, err = cli(["eval", "exact", str(data), "-m", "api:gen-x", "--base-url", server.url, "--concurrency", "1",
                        "--prices", "1,1", "--max-cost", "0.0025", "--max-new-tokens", "8"], capsys)
    assert rc == 3 and out == "" and server.calls == 2
    assert "api:gen-x: max-cost reached ($0.0020 of $0.0025) after 2 of 4 prompts; nothing was scored" in err


def test_eval_code_raw_sends_four_stop_strings_and_cuts_the_fifth(tmp_path, server, capsys):
    problems = [
        {"task_id": "toy/add", "prompt": "def add(a, b):\n", "entry_point": "add", "test": "def check(f):\n    assert f(1, 2) == 3\n"},
        {"task_id": "toy/neg", "prompt": "def neg(a):\n", "entry_point": "neg", "test": "def check(f):\n    assert f(2) == -2\n"},
    ]
    server.reply = lambda body: {"choices": [{"text": "    return a + b\nprint('x')\n" if "add" in body["prompt"] else "    return a\n"}]}
    probs = write_jsonl(tmp_path, "p.jsonl", problems)
    log = tmp_path / "log.jsonl"
    rc, out, err = cli(["eval", "code", str(probs), "-m", "api:coder", "--base-url", server.url, "--allow-code-exec",
                        "--log-samples", str(log)], capsys)
    assert rc == 0, err
    (res,) = orjson.loads(out)["results"]
    assert res["pass@1"] == 0.5 and res["outcomes"] == {"passed": 1, "failed": 1}
    assert server.bodies[0]["stop"] == ["\nclass", "\ndef", "\n#", "\nif"]  # OpenAI's limit of 4; "\nprint" is cut here
    assert [(r["task_id"], r["output"], r["finish_reason"]) for r in read_rows(log)] == [
        ("toy/add", "    return a + b", "stop"), ("toy/neg", "    return a\n", "stop")]


def test_eval_winrate_generates_on_the_server_and_shares_the_judges_budget(tmp_path, server, capsys):
    import json

    refs = [{"instruction": q, "output": o, "generator": "ref", "answer": a} for q, o, a in [("2+3", "6", "5"), ("2+2", "4", "4"), ("3*3", "9", "9")]]
    (tmp_path / "ref.json").write_text(json.dumps(refs))
    answers = {"2+3": "5", "2+2": "4", "3*3": "9"}  # the policy is right everywhere; the reference only on rows 1 and 2

    def policy_or_judge(body):
        if body["model"] == "policy":
            return {"choices": [{"text": answers[content_of(body)]}]}
        return {"text": "a", "top": None}

    server.reply = policy_or_judge
    base = ["eval", "winrate", "-r", str(tmp_path / "ref.json"), "-m", "api:policy", "--base-url", server.url]
    rc, out, err = cli([*base, "--judge", "rule:exact"], capsys)
    assert rc == 0, err
    (res,) = orjson.loads(out)["results"]
    assert res["model"] == "api:policy" and res["win_rate"] == pytest.approx(200 / 3) and (res["n_wins"], res["n_draws"]) == (1, 2)
    assert sorted(b["messages"][0]["content"] for b in server.bodies) == sorted(answers)
    assert all(len(b["messages"]) == 1 and b["temperature"] == 0.0 and b["max_tokens"] == 512 for b in server.bodies)

    # an api judge: generating (3 x $0.001002) and judging draw on one --max-cost; alone, the judge would ask 5 times
    (tmp_path / "ref2.json").write_text(json.dumps([{**r, "output": f"not {r['output']}"} for r in refs]))  # no identical pair
    base[3] = str(tmp_path / "ref2.json")
    server.calls = 0
    rc, out, err = cli([*base, "--judge", "api:judge-x", "--prices", "1,1", "--max-cost", "0.0055", "--concurrency", "1",
                        "--max-new-tokens", "8", "--cache-dir", str(tmp_path / "cache")], capsys)
    assert rc == 3 and server.calls == 3 + 2, err
    (res,) = orjson.loads(out)["results"]
    assert res["n"] == 1 and res["n_dropped"] == 2 and res["stopped"].startswith("max-cost reached ($0.0050 of $0.0055)")
