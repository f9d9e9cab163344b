"""`rlhf pairwise`: the command driven through fake pair and score judges (the judge interface of
rlhf_cli/judges/base.py), the pair/ranking row contract, bias controls, --flip-prob, --resume after
a judge that stops half way, --against, and the CLI tier (--help, pure JSONL stdout, exit codes).

Most tests call `pairwise.run(cfg, judge=...)` in-process with a fake judge; the stdout test runs
the real `python -m rlhf_cli` with a rule judge.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import run_cli, write_jsonl

from rlhf_cli.cli import main
from rlhf_cli.commands.pairwise import PairwiseConfig, run
from rlhf_cli.config import build
from rlhf_cli.data.records import Item
from rlhf_cli.judges.base import Ask, PairJudge, ScoreJudge, Verdict


class FakePairJudge:
    """A pair judge answering with `decide(a, b)`; `p_a(a, b)` gives P(A); stops after `stop_after` answers."""

    def __init__(self, decide: Callable[[str, str], str | None], kind: str = "fake", stop_after: int | None = None,
                 p_a: Callable[[str, str], float] | None = None) -> None:
        self.decide, self.kind, self.stop_after, self.p_a = decide, kind, stop_after, p_a
        self.stopped: str | None = None
        self.asked: list[tuple[Any, int, int]] = []
        self.closed = False

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": "fake-judge"}

    def judge(self, asks: Iterable[Ask]) -> Iterator[tuple[Ask, Verdict]]:
        for ask in asks:
            if self.stop_after is not None and len(self.asked) >= self.stop_after:
                self.stopped = "budget"
                return
            self.asked.append((ask.item.id, ask.first, ask.second))
            p = self.p_a(ask.a, ask.b) if self.p_a else None
            yield ask, Verdict(self.decide(ask.a, ask.b), p_a=p, raw=f"raw:{ask.first}{ask.second}", cost=0.01)  # type: ignore[arg-type]

    def close(self) -> None:
        self.closed = True


class LengthScoreJudge:
    """A score judge: a completion's score is its length."""

    kind = "fake-score"

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": "length"}

    def score(self, items: list[Item]) -> list[list[float | None]]:
        return [[float(len(c)) for c in it.completions] for it in items]


def longer(a: str, b: str) -> str:
    return "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"


def always_a(a: str, b: str) -> str:
    return "A"


def sample_row(pid: str, completions: list[str], **extra: Any) -> dict[str, Any]:
    """A row as `rlhf sample` writes it."""
    k = len(completions)
    return {"id": pid, "prompt": f"question {pid}", "answer": f"ref-{pid}", **extra, "completions": completions,
            "finish_reasons": ["stop"] * k, "completion_tokens": [len(c) for c in completions], "prompt_tokens": 3,
            "sampling": {"model": "m", "n": k}}


SAMPLES = [
    sample_row("p1", ["aa", "b", "cc", "ddd"]),  # 6 pairs: aa-cc tie by length
    sample_row("p2", ["x" * 5, "y" * 2, "z" * 9]),  # 3 pairs, all decided by length
    {**sample_row("p3", ["one", "three"]), "prompt": None},
]
del SAMPLES[2]["prompt"]
SAMPLES[2]["messages"] = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def pairwise(tmp_path: Path, rows: list[dict] | Path, judge: Any, name: str = "out.jsonl", **kw: Any) -> tuple[list[dict], dict]:
    """Run pairwise in-process on `rows` with `judge`; -> (output rows, report)."""
    src = rows if isinstance(rows, Path) else write_jsonl(tmp_path, f"in-{name}", rows)
    out = tmp_path / name
    report = run(build(PairwiseConfig, samples=str(src), judge="fake", output=str(out), **kw), judge=judge)
    return read_rows(out), report


def read_rows(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def call(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return (0 if e.value.code is None else e.value.code), out, err


# ---------------------------------------------------------------------------------- combine.py units


def test_combine_orders() -> None:
    from rlhf_cli.judges.combine import combine_orders

    a, b, tie, skip = Verdict("A", p_a=0.8), Verdict("B", p_a=0.4), Verdict("tie"), Verdict(None)
    # (0,1) says A = 0, (1,0) says B = 0: agreement; P(0) = (0.8 + (1 - 0.4)) / 2 = 0.7
    d = combine_orders(0, 1, [((0, 1), a), ((1, 0), b)])
    assert (d.winner, d.tie, d.dropped, d.p_i) == (0, False, False, pytest.approx(0.7))
    assert combine_orders(0, 1, [((0, 1), a), ((1, 0), a)]).tie  # A both times: position bias
    assert combine_orders(0, 1, [((0, 1), a), ((1, 0), tie)]).tie  # one order undecided
    assert combine_orders(0, 1, [((0, 1), tie), ((1, 0), tie)]).tie
    assert combine_orders(0, 1, [((0, 1), a), ((1, 0), skip)]).dropped  # a skip drops the pair
    assert combine_orders(0, 1, [((1, 0), a)]).winner == 1  # one order: the shown-first answer won
    assert combine_orders(0, 1, [((1, 0), Verdict("B"))]).p_i is None


def test_plan_pairs_and_copeland() -> None:
    from rlhf_cli.judges.combine import Decision, copeland_groups, plan_pairs

    assert plan_pairs("p", ["a", "b", "c"], None, 0) == [(0, 1), (0, 2), (1, 2)]
    assert plan_pairs("p", ["a", "a", "a"], None, 0) == []
    sub = plan_pairs("p", list("abcdef"), 5, 0)
    assert len(sub) == 5 and sub == sorted(sub) and sub == plan_pairs("p", list("abcdef"), 5, 0)
    # 0 beats 1, 1 beats 2, 2 beats 0 (a cycle) and 3 loses to everyone: 0, 1, 2 share the top
    ds = [Decision(0, 1, 0), Decision(1, 2, 1), Decision(0, 2, 2), Decision(0, 3, 0), Decision(1, 3, 1), Decision(2, 3, 2),
          Decision(0, 1, dropped=True)]
    assert copeland_groups([0, 1, 2, 3], ds) == [[0, 1, 2], [3]]


# ---------------------------------------------------------------------------------- CLI tier


def test_fakes_implement_the_judge_protocols() -> None:
    assert isinstance(FakePairJudge(longer), PairJudge) and not isinstance(FakePairJudge(longer), ScoreJudge)
    assert isinstance(LengthScoreJudge(), ScoreJudge)


def test_help(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = call(["pairwise", "--help"], capsys)
    assert code == 0
    for text in ("Examples", "rlhf pairwise samples.jsonl --judge rule:gsm8k", "--both-orders", "--against", "Exit codes"):
        assert text in out


def test_stdout_is_pure_jsonl_and_the_summary_goes_to_stderr(tmp_path: Path) -> None:
    rows = [sample_row("p1", ["it is 42", "41", "42.0", "#### 42"], answer="#### 42"),
            sample_row("p2", ["7", "seven", "1,007"], answer="7")]
    path = write_jsonl(tmp_path, "s.jsonl", rows)
    proc = run_cli(["pairwise", str(path), "--judge", "rule:gsm8k", "--report", str(tmp_path / "r.json")], timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = [orjson.loads(line) for line in proc.stdout.splitlines()]
    # p1: 3 correct x 1 wrong = 3 pairs; p2: "7" beats the other two = 2 pairs
    assert [r["id"] for r in out] == ["p1:0-1", "p1:2-1", "p1:3-1", "p2:0-1", "p2:0-2"]
    assert all(r["margin"] == 1.0 and r["judge"]["scores"] == [1.0, 0.0] for r in out)
    # ties: the 3 pairs among p1's correct answers, and p2's two wrong ones
    assert "decided / ties / dropped" in proc.stderr and "5 / 4 / 0" in proc.stderr
    report = orjson.loads((tmp_path / "r.json").read_bytes())
    assert (report["pairs"], report["decided"], report["ties"], report["rows"], report["asks"]) == (9, 5, 4, 5, 7)


def test_stdin_json_array_with_a_user_rule(tmp_path: Path) -> None:
    rule = tmp_path / "prefer.py"
    rule.write_text("def longer(completion, row):\n    return len(completion)\n")
    data = '[\n {"input": "q", "output_1": "ab", "output_2": "abc", "label": 2},\n {"input": "r", "output_1": "x", "output_2": "", "label": 1}\n]'
    proc = run_cli(["pairwise", "-", "--judge", f"rule:{rule}:longer"], input=data, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = [orjson.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["prompt"], r["chosen"], r["rejected"], r["margin"], r["label"]) for r in rows] == [("q", "abc", "ab", 1.0, 1), ("r", "x", "", 1.0, 0)]


def test_sample_rows_without_ids_get_the_ids_sample_assigns(tmp_path: Path) -> None:
    from rlhf_cli.data.jsonl import Line
    from rlhf_cli.data.records import assign_ids, assign_item_ids, parse_prompt_row, parse_sample_row

    rows = [{"prompt": "same", "completions": ["a", "bb"]}, {"prompt": "same", "completions": ["c", "dd"]},
            {"messages": [{"role": "user", "content": "hi"}], "completions": ["e", "ff"]}]
    lines = [Line(r, "in.jsonl", k + 1) for k, r in enumerate(rows)]
    items = assign_item_ids([parse_sample_row(ln) for ln in lines])
    assert [it.id for it in items] == [r.id for r in assign_ids([parse_prompt_row(ln) for ln in lines])]
    assert items[1].id == f"{items[0].id}-2" and items[2].prompt == "hi" and items[2].messages == ({"role": "user", "content": "hi"},)
    long = parse_sample_row(Line({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "completions": ["a", "b"]}, "f", 1))
    assert long.prompt == "System: s\n\nUser: u"


@pytest.mark.parametrize(
    ("rows", "judge", "message"),
    [
        ([{"prompt": "a", "completions": ["x", "y"]}, {"prompt": "b"}], "rule:exact", "in.jsonl:2: no 'completions' field"),
        ([{"prompt": "a", "completions": ["x"]}], "rule:exact", "in.jsonl:1: 'completions' has 1 string(s)"),
        ([{"completions": ["x", "y"]}], "rule:exact", "in.jsonl:1: no 'prompt' or 'messages' field"),
        ([{"prompt": "a", "completions": ["x", 3]}], "rule:exact", "in.jsonl:1: 'completions' must be a list of strings"),
        ([{"prompt": "a", "completions": ["x", "y"], "answer": "x"}, {"prompt": "b", "completions": ["x", "y"]}],
         "rule:exact", "in.jsonl:2: no reference field 'answer', so the judge cannot score this row (1 of 2 rows lack it)"),
        ([{"prompt": "a", "completions": ["x", "y"]}], "rule:exact", "in.jsonl:1: no reference field 'answer', and no other row has one either"),
        ([{"prompt": "a", "completions": ["x", "y"], "answer": "x"}], "rule:nope", "unknown rule"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_output_file(tmp_path: Path, rows, judge, message, capsys) -> None:
    path = write_jsonl(tmp_path, "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    code, stdout, err = call(["pairwise", str(path), "--judge", judge, "--output", str(out)], capsys)
    assert (code, stdout) == (2, "")
    assert message in " ".join(err.split())
    assert not out.exists() and not Path(f"{out}.progress").exists()


def test_missing_reference_everywhere_hints_at_the_field(tmp_path: Path, capsys) -> None:
    path = write_jsonl(tmp_path, "in.jsonl", [{"prompt": "a", "completions": ["x", "y"], "gold": "x"}])
    code, _, err = call(["pairwise", str(path), "--judge", "rule:exact"], capsys)
    assert code == 2 and "the rows have: gold, prompt" in err and "--reference FIELD" in err
    code, out, _ = call(["pairwise", str(path), "--judge", "rule:exact", "--reference", "gold"], capsys)
    assert code == 0 and orjson.loads(out)["chosen"] == "x"


# ---------------------------------------------------------------------------------- pair judges, orders, bias


def test_both_orders_turn_a_position_biased_judge_into_ties(tmp_path: Path) -> None:
    judge = FakePairJudge(always_a)
    rows, report = pairwise(tmp_path, SAMPLES, judge, both_orders=True)
    # 6 + 3 + 1 pairs, each asked twice; "A" both times names a different completion -> a tie
    assert rows == []
    assert (report["pairs"], report["asks"], report["decided"], report["ties"]) == (10, 20, 0, 10)
    assert report["position_consistency"] == 0.0 and report["two_order_pairs"] == 10
    assert report["first_position_win_rate"] == 1.0
    assert judge.closed
    kept, _ = pairwise(tmp_path, SAMPLES, FakePairJudge(always_a), name="ties.jsonl", both_orders=True, keep_ties=True)
    assert len(kept) == 10 and all(r["tie"] is True for r in kept)
    assert kept[0]["id"] == "p1:0-1" and kept[0]["judge"]["verdicts"] == ["A", "A"] and kept[0]["judge"]["shown"] == [[0, 1], [1, 0]]


def test_a_consistent_judge_has_consistency_1(tmp_path: Path) -> None:
    rows, report = pairwise(tmp_path, SAMPLES, FakePairJudge(longer), both_orders=True)
    assert report["position_consistency"] == 1.0
    assert report["first_position_win_rate"] == 0.5  # each decided pair won once as A, once as B
    assert (report["decided"], report["ties"], report["longer_won"]) == (9, 1, 1.0)  # aa-cc tie
    assert all(len(r["chosen"]) > len(r["rejected"]) for r in rows)
    assert [r["id"] for r in rows[:5]] == ["p1:0-1", "p1:3-0", "p1:2-1", "p1:3-1", "p1:3-2"]


def test_one_order_shows_a_seeded_random_order_and_records_it(tmp_path: Path) -> None:
    rows, report = pairwise(tmp_path, SAMPLES, FakePairJudge(always_a), both_orders=False)
    assert (report["asks"], report["decided"], report["position_consistency"]) == (10, 10, None)
    for r in rows:
        (first, second), = r["judge"]["shown"]
        assert r["id"].endswith(f":{first}-{second}")  # the answer shown first always wins
        assert r["judge"]["orders"] == 1
    # the per-pair coin shows the lower index first about half the time, the same on every run
    firsts = [r["judge"]["shown"][0][0] < r["judge"]["shown"][0][1] for r in rows]
    again, _ = pairwise(tmp_path, SAMPLES, FakePairJudge(always_a), name="again.jsonl", both_orders=False)
    assert again == rows and 0 < sum(firsts) < len(firsts)


def test_default_orders_follow_the_judge_kind(tmp_path: Path) -> None:
    _, lm = pairwise(tmp_path, SAMPLES, FakePairJudge(longer, kind="lm"), name="lm.jsonl")
    _, human = pairwise(tmp_path, SAMPLES, FakePairJudge(longer, kind="human"), name="human.jsonl")
    assert (lm["asks"], human["asks"]) == (20, 10)


def test_pair_rows_contract_and_pass_through(tmp_path: Path) -> None:
    rows, _ = pairwise(tmp_path, SAMPLES, FakePairJudge(longer), both_orders=True)
    by_prompt = {s["id"]: s for s in SAMPLES}
    for r in rows:
        pid, _, ij = r["id"].rpartition(":")
        c, rj = (int(x) for x in ij.split("-"))
        src = by_prompt[pid]
        assert (r["chosen"], r["rejected"]) == (src["completions"][c], src["completions"][rj])
        assert r["answer"] == src["answer"]  # the reference field reaches every pair row
        assert r["prompt_tokens"] == 3 and r["sampling"] == src["sampling"]
        for per_completion in ("completions", "finish_reasons", "completion_tokens"):
            assert per_completion not in r
        j = r["judge"]
        assert (j["kind"], j["name"], j["orders"], j["cached"], j["p_chosen"]) == ("fake", "fake-judge", 2, False, None)
        assert j["cost"] == pytest.approx(0.02) and len(j["verdicts"]) == 2 and len(j["raw"]) == 2
        assert "margin" not in r  # no probability, no margin
    chat = [r for r in rows if r["id"].startswith("p3:")]
    assert chat[0]["messages"] == SAMPLES[2]["messages"] and "prompt" not in chat[0]
    assert list(chat[0])[:4] == ["id", "messages", "chosen", "rejected"]


def test_probabilities_average_over_orders_into_p_chosen_and_margin(tmp_path: Path) -> None:
    # P(A) = 0.9 when A is longer, else 0.3 (a judge that leans towards A). For a pair where i is
    # longer: order (i, j) says P(i) = 0.9, order (j, i) says P(j) = 0.3 -> P(i) = 0.7; mean 0.8,
    # so p_chosen = 0.8 and margin = 2 * 0.8 - 1 = 0.6
    judge = FakePairJudge(longer, p_a=lambda a, b: 0.9 if len(a) > len(b) else 0.3)
    rows, _ = pairwise(tmp_path, [sample_row("q", ["long answer", "short"])], judge, both_orders=True)
    (row,) = rows
    assert row["chosen"] == "long answer"
    assert row["judge"]["p_chosen"] == pytest.approx(0.8) and row["margin"] == pytest.approx(0.6)
    assert row["judge"]["p_a"] == [0.9, 0.3]


def test_skipped_verdicts_drop_the_pair(tmp_path: Path) -> None:
    def skip_b(a: str, b: str) -> str | None:
        return None if "b" in (a, b) else longer(a, b)

    rows, report = pairwise(tmp_path, SAMPLES[:1], FakePairJudge(skip_b), both_orders=True)
    # p1 ["aa", "b", "cc", "ddd"]: the 3 pairs with "b" are dropped, aa-cc ties, 2 decided
    assert (report["dropped"], report["ties"], report["decided"]) == (3, 1, 2)
    assert [r["id"] for r in rows] == ["p1:3-0", "p1:3-2"]


def test_duplicate_completions_are_never_compared_with_themselves(tmp_path: Path) -> None:
    judge = FakePairJudge(longer)
    rows, _ = pairwise(tmp_path, [sample_row("d", ["x", "yy", "x", "yy", "zzz"])], judge, both_orders=False)
    # distinct texts at 0, 1, 4 -> pairs (0,1) (0,4) (1,4)
    assert sorted(tuple(sorted((f, s))) for _, f, s in judge.asked) == [(0, 1), (0, 4), (1, 4)]
    assert sorted(r["id"] for r in rows) == ["d:1-0", "d:4-0", "d:4-1"]
    ranked, _ = pairwise(tmp_path, [sample_row("d", ["x", "yy", "x", "yy", "zzz"])], FakePairJudge(longer), name="r.jsonl", ranking=True)
    assert ranked[0]["ranking"] == [["zzz"], ["yy"], ["x"]]


def test_max_pairs_is_a_seeded_subset_per_prompt(tmp_path: Path) -> None:
    rows_in = [sample_row(f"m{k}", ["a" * n for n in range(1, 7)]) for k in range(3)]  # K = 6: 15 pairs each
    judge = FakePairJudge(longer)
    _, report = pairwise(tmp_path, rows_in, judge, max_pairs=4, both_orders=False)
    assert report["pairs"] == 12
    per_prompt = {}
    for pid, f, s in judge.asked:
        per_prompt.setdefault(pid, set()).add(tuple(sorted((f, s))))
    assert all(len(p) == 4 for p in per_prompt.values())
    assert len({frozenset(p) for p in per_prompt.values()}) > 1  # seeded per prompt, not one subset for all
    judge2 = FakePairJudge(longer)
    pairwise(tmp_path, rows_in, judge2, name="again.jsonl", max_pairs=4, both_orders=False)
    assert judge2.asked == judge.asked


# ---------------------------------------------------------------------------------- score judges and rankings


def test_score_judge_pairs_margin_and_ranking(tmp_path: Path) -> None:
    rows, report = pairwise(tmp_path, SAMPLES[:1], LengthScoreJudge())
    # lengths aa=2 b=1 cc=2 ddd=3: 5 decided, aa-cc tie; margin = length difference
    assert {r["id"]: r["margin"] for r in rows} == {"p1:0-1": 1.0, "p1:3-0": 1.0, "p1:2-1": 1.0, "p1:3-1": 2.0, "p1:3-2": 1.0}
    assert rows[3]["judge"]["scores"] == [3.0, 1.0]
    assert (report["asks"], report["ties"]) == (4, 1)
    ranked, _ = pairwise(tmp_path, SAMPLES[:1], LengthScoreJudge(), name="rank.jsonl", ranking=True)
    (row,) = ranked
    assert row["ranking"] == [["ddd"], ["aa", "cc"], ["b"]]
    assert (row["judge"]["method"], row["judge"]["points"]) == ("scores", [3.0, 2.0, 1.0])
    assert row["id"] == "p1" and row["answer"] == "ref-p1" and "completions" not in row


def test_copeland_ranking_from_a_pair_judge(tmp_path: Path) -> None:
    ranked, _ = pairwise(tmp_path, SAMPLES[:1], FakePairJudge(longer), ranking=True, both_orders=True)
    # ddd beats 3 -> (3 - 0)/2 = 1.5; aa and cc: 1 win, 1 loss, 1 tie -> 0; b loses 3 -> -1.5
    assert ranked[0]["ranking"] == [["ddd"], ["aa", "cc"], ["b"]]
    assert (ranked[0]["judge"]["method"], ranked[0]["judge"]["points"]) == ("copeland", [1.5, 0.0, -1.5])
    tied, _ = pairwise(tmp_path, SAMPLES[:1], FakePairJudge(always_a), name="t.jsonl", ranking=True, both_orders=True)
    assert tied[0]["ranking"] == [["aa", "b", "cc", "ddd"]]  # all ties: one group


def test_flip_prob_flips_about_half_reproducibly(tmp_path: Path) -> None:
    rows_in = [sample_row(f"f{k}", ["a" * n for n in range(1, 6)]) for k in range(8)]  # 8 x C(5,2) = 80 pairs
    rows, report = pairwise(tmp_path, rows_in, LengthScoreJudge(), flip_prob=0.5, seed=0)
    flipped = [r for r in rows if r["judge"].get("flipped")]
    assert report["flipped"] == len(flipped) == 37  # seed 0; Binomial(80, 0.5): mean 40, sd 4.5
    assert all(len(r["chosen"]) < len(r["rejected"]) and "margin" not in r for r in flipped)
    assert all(len(r["chosen"]) > len(r["rejected"]) and r["margin"] > 0 for r in rows if r not in flipped)
    again, _ = pairwise(tmp_path, rows_in, LengthScoreJudge(), name="again.jsonl", flip_prob=0.5, seed=0)
    assert again == rows
    _, other = pairwise(tmp_path, rows_in, LengthScoreJudge(), name="other.jsonl", flip_prob=0.5, seed=1)
    assert other["flipped"] != 37
    _, none = pairwise(tmp_path, rows_in, LengthScoreJudge(), name="none.jsonl", flip_prob=0.0)
    _, every = pairwise(tmp_path, rows_in, LengthScoreJudge(), name="all.jsonl", flip_prob=1.0)
    assert (none["flipped"], every["flipped"], every["longer_won"]) == (0, 80, 0.0)


# ---------------------------------------------------------------------------------- stopping and --resume


RESUME_ROWS = [sample_row("r1", ["a", "bb", "ccc"]),
               sample_row("r2", ["xx", "yy", "zz"]),  # all ties: finishes with no row
               *(sample_row(f"r{k}", ["a" * k, "b", "c" * (k + 3)]) for k in range(3, 7))]


def test_resume_after_a_budget_stop_gives_the_uninterrupted_rows(tmp_path: Path) -> None:
    full, _ = pairwise(tmp_path, RESUME_ROWS, FakePairJudge(longer), name="full.jsonl", both_orders=False)
    src = write_jsonl(tmp_path, "in.jsonl", RESUME_ROWS)
    # 6 prompts x 3 pairs, one order: 18 asks; stop after 8 -> r1, r2 done, r3 cut after 2 of 3 asks
    first = FakePairJudge(longer, stop_after=8)
    part, report = pairwise(tmp_path, src, first, name="part.jsonl", both_orders=False)
    assert report["stopped"] == "budget" and report["prompts_judged"] == 2
    assert part == full[:3]
    second = FakePairJudge(longer)
    _, report2 = pairwise(tmp_path, src, second, name="part.jsonl", both_orders=False, resume=True)
    assert report2["prompts_resumed"] == 2 and report2["stopped"] is None
    assert len(second.asked) == 12  # r3..r6 only: the all-tie r2 is not asked again
    assert read_rows(tmp_path / "part.jsonl") == full
    assert (tmp_path / "part.jsonl.progress").read_text().split() == ['"r1"', '"r2"', *(f'"r{k}"' for k in range(3, 7))]


def test_resume_removes_rows_of_a_prompt_cut_by_a_kill(tmp_path: Path) -> None:
    full, _ = pairwise(tmp_path, RESUME_ROWS, FakePairJudge(longer), name="full.jsonl", both_orders=False)
    out = tmp_path / "killed.jsonl"
    pairwise(tmp_path, RESUME_ROWS, FakePairJudge(longer), name="killed.jsonl", both_orders=False)
    # a kill after r3's rows were written but before r3 was marked done, mid-way through r4's first row
    progress = Path(f"{out}.progress")
    progress.write_text('"r1"\n"r2"\n')
    text = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(text[:6]) + text[6][:20])
    pairwise(tmp_path, RESUME_ROWS, FakePairJudge(longer), name="killed.jsonl", both_orders=False, resume=True)
    assert read_rows(out) == full


def test_a_stopped_judge_exits_3_and_says_how_to_resume(tmp_path: Path, monkeypatch, capsys) -> None:
    import rlhf_cli.judges

    monkeypatch.setattr(rlhf_cli.judges, "build_judge", lambda spec, opts: FakePairJudge(longer, kind="api", stop_after=3))
    src = write_jsonl(tmp_path, "in.jsonl", RESUME_ROWS)
    out = tmp_path / "pairs.jsonl"
    code, stdout, err = call(["pairwise", str(src), "--judge", "api:m", "--output", str(out)], capsys)
    assert code == 3 and stdout == ""
    assert "stopped early (budget)" in err and f"--output {out} --resume" in " ".join(err.split())
    assert len(read_rows(out)) == 0  # r1 needs 6 asks both orders: nothing finished after 3

    # the new spelling finishes the run; the old `--resume FILE` still works for a release, with a warning
    monkeypatch.setattr(rlhf_cli.judges, "build_judge", lambda spec, opts: FakePairJudge(longer, kind="api", stop_after=8))
    code, stdout, err = call(["pairwise", str(src), "--judge", "api:m", "-o", str(out), "--resume"], capsys)
    assert code == 3 and stdout == "" and read_rows(out), err
    n = len(read_rows(out))
    monkeypatch.setattr(rlhf_cli.judges, "build_judge", lambda spec, opts: FakePairJudge(longer, kind="api"))
    code, stdout, err = call(["pairwise", str(src), "--judge", "api:m", "--resume", str(out)], capsys)
    assert code == 0 and stdout == "" and len(read_rows(out)) > n, err
    assert "--resume FILE is deprecated" in " ".join(err.split())


# ---------------------------------------------------------------------------------- --against


LABELLED = [
    {"id": "L1", "prompt": "p1", "completions": ["long one", "short"], "label": 0},  # judge agrees: 0
    {"id": "L2", "prompt": "p2", "completions": ["tiny", "much longer"], "label": 1},  # agrees: 1
    {"id": "L3", "prompt": "p3", "completions": ["a", "bbbb"], "label": 0},  # judge says 1: disagree
    {"id": "L4", "prompt": "p4", "completions": ["same", "size"], "label": "tie"},  # judge ties: agree
]


def test_against_labels_used_as_input(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, "labels.jsonl", LABELLED)
    rows, report = pairwise(tmp_path, path, FakePairJudge(longer), both_orders=True, against=str(path), resamples=200)
    a = report["agreement"]
    # judge (0, 1, 1, 2) vs human (0, 1, 0, 2): p_o = 3/4; marginals judge (1, 2, 1)/4, human (2, 1, 1)/4
    # p_e = (2 + 2 + 1)/16 = 5/16; kappa = (12/16 - 5/16) / (11/16) = 7/11
    assert (a["matched"], a["n"], a["classes"]) == (4, 4, 3)
    assert a["accuracy"] == pytest.approx(0.75) and a["kappa"] == pytest.approx(7 / 11)
    lo, hi = a["kappa_ci"]
    assert lo <= 7 / 11 <= hi
    assert rows[0]["label"] == 0 and rows[0]["id"] == "L1:0-1"  # the label passes through


def test_against_matches_sample_rows_by_content(tmp_path: Path) -> None:
    samples = [sample_row("s1", ["short", "a longer one", "mid size"])]
    del samples[0]["id"]
    labels = write_jsonl(tmp_path, "labels.jsonl", [
        {"prompt": "question s1", "completions": ["a longer one", "short"], "label": 1},  # humans: short is better
        {"prompt": "question s1", "completions": ["mid size", "a longer one"], "label": 1},
        {"prompt": "another prompt", "completions": ["x", "y"], "label": 0},
    ])
    _, report = pairwise(tmp_path, samples, FakePairJudge(longer), both_orders=False, against=str(labels), resamples=100)
    a = report["agreement"]
    assert (a["n_labels"], a["matched"], a["n"]) == (3, 2, 2)
    assert a["accuracy"] == pytest.approx(0.5)  # disagrees on short-vs-longer, agrees on the second


def test_pandalm_file_as_input_and_labels(tmp_path: Path) -> None:
    import json

    items = [{"idx": k, "instruction": f"task {k}", "input": "", "response1": r1, "response2": r2,
              "annotator1": v, "annotator2": v, "annotator3": 1} for k, (r1, r2, v) in enumerate(
                  [("a long answer", "short", 1), ("x", "a longer answer", 2), ("tiny", "a much longer answer", 1)])]
    path = tmp_path / "testset-v1.json"
    path.write_text(json.dumps(items, indent=2))
    rows, report = pairwise(tmp_path, path, FakePairJudge(longer), both_orders=True, against=f"pandalm:{path}", resamples=100)
    assert report["format"] == "pandalm" and [r["id"] for r in rows] == ["0:0-1", "1:1-0", "2:1-0"]
    # humans: 0, 1, 0 (majority); judge: 0, 1, 1
    assert report["agreement"]["accuracy"] == pytest.approx(2 / 3)
