"""`rlhf select`: the keep rules by hand (selection.choose), the command on real rule judges and a
fake pair judge (rows that `sft`, `train-rm` and `dpo` read, pass-through fields, what is dropped
and counted), a judge that stops half way then `--resume`, a reward-model judge, and the CLI tier
(pure JSONL stdout, exit 2 naming file:line with nothing written, exit 3 at a budget stop)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import run_cli, write_jsonl

from rlhf_cli.commands.select import SelectConfig, run
from rlhf_cli.config import build
from rlhf_cli.data.jsonl import Line
from rlhf_cli.data.pref_data import parse_pref_row
from rlhf_cli.data.records import parse_sft_row
from rlhf_cli.judges.base import Ask, Verdict
from rlhf_cli.judges.selection import choose, parse_keep, ranks


def rows_of(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines() if x.strip()]


def cfg(samples: Path, out: Path, **kw: Any) -> SelectConfig:
    return build(SelectConfig, samples=str(samples), output=str(out), **{"judge": "rule:exact", "reference_field": "answer", **kw})


@pytest.fixture
def samples(tmp_path: Path) -> Path:
    """Four prompts, K = 4: two right answers, all right, all wrong, and one right answer among repeats."""
    rows = [
        {"id": "a", "prompt": "2+2=", "answer": "4", "completions": ["5", "4", "4.0", "3"], "finish_reasons": ["stop", "stop", "length", "stop"],
         "sampling": {"n": 4}, "source": "toy"},
        {"id": "b", "prompt": "1+1=", "answer": "2", "completions": ["2", "2.", "02", " 2"]},
        {"id": "c", "prompt": "3+3=", "answer": "6", "completions": ["7", "8", "9", "5"]},
        {"id": "d", "messages": [{"role": "user", "content": "9-3="}], "answer": "6", "completions": ["5", "5", "6", "5"]},
    ]
    return write_jsonl(tmp_path, "samples.jsonl", rows)


# ------------------------------------------------------------------------------- the rules by hand


def test_keep_modes_by_hand() -> None:
    comps, s = ["w", "x", "y", "z"], [0.2, 0.9, 0.5, 0.9]
    assert choose(comps, s, "best").kept == (1,)  # 0.9 twice: the first index ranks higher
    assert choose(comps, s, "top-3").kept == (1, 3, 2)
    assert choose(comps, s, "all-passing", threshold=0.5).kept == (1, 3, 2)
    assert choose(comps, s, "best-worst").kept == (1, 0)
    assert choose(comps, s, "best", threshold=0.95).dropped == "all-fail"
    assert choose(comps, s, "best-worst", threshold=0.95).dropped == "all-fail"  # the chosen one must pass
    assert ranks(s, [0, 1, 2, 3]) == {0: 4, 1: 1, 2: 3, 3: 1}
    # identical texts count once: the repeat of "x" (index 2) is never kept, the top-2 skips it
    assert choose(["x", "y", "x"], [0.1, 0.5, 0.9], "top-2").kept == (1, 0)
    assert choose(["x", "y", "x"], [0.1, 0.5, 0.9], "best").candidates == 2


def test_ties_and_failures_by_hand() -> None:
    tie = [0.3, 0.3, 0.3]
    assert choose("abc", tie, "best").dropped == "all-tie"  # no pass mark: a tie says nothing
    kept = choose("abc", tie, "best", keep_ties=True)
    assert (kept.kept, kept.tie) == ((0,), True)
    assert choose("abc", tie, "best-worst").dropped == "all-tie"
    assert choose("abc", tie, "best-worst", keep_ties=True).kept == (0, 1)
    assert choose("aaa", tie, "best-worst", keep_ties=True).dropped == "all-tie"  # one distinct text: no pair at all
    # with a pass mark, a tie among passing answers is fine (every one is good enough) ...
    assert choose("abc", [1.0, 1.0, 1.0], "best", threshold=1.0).kept == (0,)
    assert choose("abc", [1.0, 1.0, 1.0], "all-passing", threshold=1.0).kept == (0, 1, 2)
    # ... and a tie among failing answers is a failure, kept ties or not
    assert choose("abc", [0.0, 0.0, 0.0], "best", threshold=1.0, keep_ties=True).dropped == "all-fail"
    # a completion that may not be kept (cut at the token limit, --drop-truncated) counts as failing
    assert choose("abc", [0.9, 0.5, 0.1], "best", allowed=[False, True, True]).kept == (1,)
    assert choose("abc", [0.9, 0.5, 0.1], "best-worst", allowed=[False, True, True]).kept == (1, 2)
    assert choose("abc", [0.9, 0.1, 0.1], "best-worst", allowed=[False, True, True]).dropped == "all-tie"
    assert choose("ab", [1.0, 1.0], "best", threshold=1.0, allowed=[False, False]).dropped == "all-fail"
    assert parse_keep("top-12") == ("top", 12)
    for bad in ("top-0", "top", "worst", "top-k"):
        with pytest.raises(ValueError):
            parse_keep(bad)


# ------------------------------------------------------------------------------- the command, rule judges


def test_best_with_a_rule_judge_gives_sft_rows(samples: Path, tmp_path: Path) -> None:
    out = tmp_path / "sft2.jsonl"
    report = run(cfg(samples, out, keep="best"))
    rows = rows_of(out)
    assert [r["id"] for r in rows] == ["a:1", "b:0", "d:2"]  # c: every answer wrong
    a, b, d = rows
    assert (a["prompt"], a["completion"], a["finish_reason"]) == ("2+2=", "4", "stop")
    assert a["judge"] == {"kind": "rule", "name": "rule:exact", "reference": "answer", "score": 1.0, "rank": 1, "candidates": 4, "cost": 0.0}
    assert a["answer"] == "4" and a["source"] == "toy" and a["sampling"] == {"n": 4}  # pass-through
    assert not {"completions", "finish_reasons"} & set(a)
    assert d["messages"] == [{"role": "user", "content": "9-3="}, {"role": "assistant", "content": "6"}] and "completion" not in d
    assert d["judge"]["candidates"] == 2  # "5" three times counts once
    for r in rows:  # what `rlhf sft` reads
        parse_sft_row(Line(r, "x", 1))
    assert (report["prompts_kept"], report["dropped_all_fail"], report["dropped_all_tie"], report["rows"]) == (3, 1, 0, 3)
    assert report["passing"] == pytest.approx(7 / 16)  # a: 2, b: 4, c: 0, d: 1
    assert report["scores"]["mean"] == pytest.approx(7 / 16) and report["kept_scores"]["min"] == 1.0


def test_all_passing_top_n_and_threshold(samples: Path, tmp_path: Path) -> None:
    run(cfg(samples, tmp_path / "all.jsonl", keep="all-passing"))
    assert [r["id"] for r in rows_of(tmp_path / "all.jsonl")] == ["a:1", "a:2", "b:0", "b:1", "b:2", "b:3", "d:2"]
    run(cfg(samples, tmp_path / "top.jsonl", keep="top-3"))
    assert [r["id"] for r in rows_of(tmp_path / "top.jsonl")] == ["a:1", "a:2", "b:0", "b:1", "b:2", "d:2"]  # wrong answers never kept
    # a pass mark of 0 lets wrong answers through: top-3 then fills up with them
    run(cfg(samples, tmp_path / "t0.jsonl", keep="top-3", threshold=0.0))
    got = rows_of(tmp_path / "t0.jsonl")
    assert [r["id"] for r in got if r["id"].startswith("c")] == ["c:0", "c:1", "c:2"]
    assert [r["judge"]["rank"] for r in got if r["id"].startswith("a")] == [1, 1, 3]


def test_best_worst_gives_pairs_that_train_rm_and_dpo_read(samples: Path, tmp_path: Path) -> None:
    out = tmp_path / "prefs.jsonl"
    report = run(cfg(samples, out, keep="best-worst"))
    rows = rows_of(out)
    assert [r["id"] for r in rows] == ["a:1-3", "d:2-0"]  # b all right, c all wrong: no order in either
    assert (rows[0]["chosen"], rows[0]["rejected"], rows[0]["margin"]) == ("4", "3", 1.0)
    assert rows[0]["judge"]["scores"] == [1.0, 0.0] and rows[1]["messages"][0]["content"] == "9-3="
    for r in rows:
        pref = parse_pref_row(Line(r, "x", 1))
        assert pref.layout == "pair" and pref.groups == ((r["chosen"],), (r["rejected"],)) and pref.margin == 1.0
    assert (report["dropped_all_fail"], report["dropped_all_tie"]) == (1, 1)
    run(cfg(samples, tmp_path / "ties.jsonl", keep="best-worst", keep_ties=True))
    tied = [r for r in rows_of(tmp_path / "ties.jsonl") if r.get("tie")]
    assert [(r["id"], r["chosen"], r["rejected"]) for r in tied] == [("b:0-1", "2", "2.")]


def test_drop_truncated_never_keeps_a_completion_cut_at_the_limit(samples: Path, tmp_path: Path) -> None:
    run(cfg(samples, tmp_path / "all.jsonl", keep="all-passing", drop_truncated=True))
    assert [r["id"] for r in rows_of(tmp_path / "all.jsonl")] == ["a:1", "b:0", "b:1", "b:2", "b:3", "d:2"]  # a:2 ended in "length"
    assert all(r["finish_reason"] == "stop" for r in rows_of(tmp_path / "all.jsonl") if "finish_reason" in r)


def test_one_completion_per_prompt_is_a_filter(tmp_path: Path) -> None:
    """K = 1 (rejection sampling with one sample): keep it if it passes."""
    data = write_jsonl(tmp_path, "s.jsonl", [{"prompt": "p", "answer": "1", "completions": ["1"]}, {"prompt": "q", "answer": "1", "completions": ["2"]}])
    run(cfg(data, tmp_path / "o.jsonl", keep="all-passing"))
    assert [r["prompt"] for r in rows_of(tmp_path / "o.jsonl")] == ["p"]


# ------------------------------------------------------------------------------- pair judges, budget, resume


class LongerWins:
    """A pair judge preferring the longer answer; stops (a budget) after `stop_after` answers."""

    kind = "fake"

    def __init__(self, stop_after: int | None = None) -> None:
        self.stop_after, self.stopped, self.asked = stop_after, None, 0

    def describe(self) -> dict[str, Any]:
        return {"kind": "fake", "name": "longer-wins"}

    def judge(self, asks: Iterable[Ask]) -> Iterator[tuple[Ask, Verdict]]:
        for ask in asks:
            if self.stop_after is not None and self.asked >= self.stop_after:
                self.stopped = "--max-cost reached"
                return
            self.asked += 1
            winner = "A" if len(ask.a) > len(ask.b) else "B" if len(ask.b) > len(ask.a) else "tie"
            yield ask, Verdict(winner, cost=0.01)  # type: ignore[arg-type]

    def close(self) -> None:
        pass


def test_a_pair_judge_ranks_by_copeland_points(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path, "s.jsonl", [{"id": i, "prompt": f"p{i}", "completions": ["bb", "a", "dddd", "ccc"]} for i in range(3)])
    report = run(cfg(data, tmp_path / "o.jsonl", keep="top-2", judge="fake"), judge=LongerWins())
    rows = rows_of(tmp_path / "o.jsonl")
    assert [r["completion"] for r in rows[:2]] == ["dddd", "ccc"]
    # dddd beats all 3 others: (3 - 0) / 2; ccc: (2 - 1) / 2; both orders asked (kind "fake" is not lm/api: one order)
    assert [r["judge"]["score"] for r in rows[:2]] == [1.5, 0.5] and rows[0]["judge"]["method"] == "copeland"
    assert rows[0]["judge"]["cost"] == pytest.approx(0.06)  # C(4,2) = 6 asks of one order at $0.01
    assert report["cost"] == pytest.approx(0.18) and report["prompts_kept"] == 3


def test_a_budget_stop_exits_3_and_resume_finishes_the_same_rows(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path, "s.jsonl", [{"id": f"q{i}", "prompt": f"p{i}", "completions": ["bb", "a", "ccc"][: 2 + i % 2]} for i in range(6)])
    whole = tmp_path / "whole.jsonl"
    run(cfg(data, whole, keep="best", judge="fake"), judge=LongerWins())
    out = tmp_path / "o.jsonl"
    first = run(cfg(data, out, keep="best", judge="fake"), judge=LongerWins(stop_after=5))
    assert first["stopped"] and 0 < first["prompts_judged"] < 6
    assert len(rows_of(out)) == first["prompts_judged"]
    second = run(cfg(data, out, keep="best", judge="fake", resume=True), judge=LongerWins())
    assert second["prompts_resumed"] == first["prompts_judged"] and second["stopped"] is None
    assert rows_of(out) == rows_of(whole)


def test_pair_judges_refuse_a_threshold_and_all_passing(samples: Path, tmp_path: Path) -> None:
    from rlhf_cli.errors import RlhfError

    for kw in ({"threshold": 0.5}, {"keep": "all-passing"}):
        with pytest.raises(RlhfError):
            run(cfg(samples, tmp_path / "o.jsonl", judge="fake", **kw), judge=LongerWins())
    assert not (tmp_path / "o.jsonl").exists()


def test_a_reward_model_judge(samples: Path, tmp_path: Path) -> None:
    """rm:PATH: the reward decides; best is each prompt's highest reward, so no prompt is dropped
    (rewards of different texts do not tie), and all-passing needs a --threshold."""
    from rlhf_cli.commands.train_rm import RmConfig
    from rlhf_cli.commands.train_rm import run as train_rm
    from rlhf_cli.errors import RlhfError

    data = write_jsonl(tmp_path, "prefs.jsonl", [{"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 3)} for i in range(16)])
    train_rm(build(RmConfig, data=str(data), out=str(tmp_path / "rm"), model="builtin:micro", max_steps=2, batch_size=8, lr=1e-2,
                   save_every=0, device="cpu", max_len=64))
    out = tmp_path / "o.jsonl"
    report = run(cfg(samples, out, keep="best", judge=f"rm:{tmp_path / 'rm'}"))
    rows = rows_of(out)
    assert len(rows) == 4 and report["threshold"] is None
    from rlhf_cli.data.labels import read_items
    from rlhf_cli.judges.base import JudgeOptions
    from rlhf_cli.judges.rm import RewardModelJudge

    items = read_items(str(samples))[1]
    scores = RewardModelJudge(str(tmp_path / "rm"), JudgeOptions(device="cpu")).score(items)
    for row, it, s in zip(rows, items, scores, strict=True):
        best = max(range(4), key=lambda k: (s[k], -k))
        assert row["judge"]["score"] == pytest.approx(s[best], abs=1e-5) and row["id"] == f"{it.id}:{best}"
    with pytest.raises(RlhfError, match="--threshold"):
        run(cfg(samples, tmp_path / "p.jsonl", keep="all-passing", judge=f"rm:{tmp_path / 'rm'}"))


# ------------------------------------------------------------------------------- CLI tier


def test_cli_stdout_is_pure_jsonl(samples: Path) -> None:
    res = run_cli(["select", str(samples), "--judge", "rule:exact", "--reference", "answer"])
    assert res.returncode == 0, res.stderr
    assert [orjson.loads(x)["id"] for x in res.stdout.splitlines()] == ["a:1", "b:0", "d:2"]
    assert "dropped: all fail / all tie" in res.stderr


@pytest.mark.parametrize(
    ("rows", "args", "message"),
    [
        ([{"prompt": "p", "answer": "1"}], [], "s.jsonl:1: no 'completions' field"),
        ([{"prompt": "p", "answer": "1", "completions": ["1"]}, {"prompt": "q", "completions": ["1"]}], [], "s.jsonl:2: no reference field 'answer'"),
        ([{"prompt": "p", "answer": "1", "completions": ["1"]}], ["--keep", "top-k"], "--keep 'top-k' is not a keep mode"),
        ([{"prompt": "p", "answer": "1", "completions": []}], [], "s.jsonl:1: 'completions' has 0 string(s)"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path: Path, rows: list[Any], args: list[str], message: str) -> None:
    data = write_jsonl(tmp_path, "s.jsonl", rows)
    out = tmp_path / "o.jsonl"
    res = run_cli(["select", str(data), "--judge", "rule:exact", "-o", str(out), *args])
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not out.exists()


def test_cli_api_judge_budget_stop_exits_3_and_resume_matches_one_run(tmp_path: Path) -> None:
    """The real api judge against a loopback OpenAI-compatible server: --max-cost stops the run (exit 3),
    the rows so far stay, and --resume with a bigger budget ends with the rows one run would write."""
    from api_fake import FakeOpenAI

    server = FakeOpenAI()
    server.reply = lambda body: {"text": "A", "top": None}  # always the answer shown first
    try:
        data = write_jsonl(tmp_path, "s.jsonl", [{"id": f"q{i}", "prompt": f"p{i}", "completions": ["x", "yy", "zzz"]} for i in range(4)])
        env = {"RLHF_TEST_KEY": "sk-test"}

        def select(out: Path, cost: str, *extra: str) -> Any:
            return run_cli(["select", str(data), "--judge", "api:judge-x", "--base-url", server.url, "--api-key-env", "RLHF_TEST_KEY",
                            "--one-order", "--prices", "1,1", "--max-cost", cost, "--concurrency", "1", "--cache-dir",
                            str(tmp_path / f"cache-{out.stem}"), "-o", str(out), "--keep", "best-worst", *extra], env=env)

        whole = select(tmp_path / "whole.jsonl", "1")
        assert whole.returncode == 0, whole.stderr
        # each ask costs (1000 + 2) x $1/M: a budget of 7 asks stops inside the third prompt (3 asks each)
        first = select(tmp_path / "o.jsonl", "0.0071")
        assert first.returncode == 3 and "--resume" in first.stderr, first.stderr
        assert len((tmp_path / "o.jsonl.progress").read_bytes().splitlines()) == 2  # two prompts finished (a cycle gives no row)
        second = select(tmp_path / "o.jsonl", "1", "--resume")
        assert second.returncode == 0, second.stderr
        got, want = rows_of(tmp_path / "o.jsonl"), rows_of(tmp_path / "whole.jsonl")
        assert len(want) >= 2
        assert [(r["id"], r["chosen"], r["rejected"]) for r in got] == [(r["id"], r["chosen"], r["rejected"]) for r in want]
        assert all(r["judge"]["method"] == "copeland" and r["judge"]["kind"] == "api" for r in got)
    finally:
        server.close()
