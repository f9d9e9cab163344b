"""`rlhf eval winrate`: AlpacaEval's win rate and standard error on a hand-made table, the
length-controlled GLM on synthetic judges, both-order ties, the readers (JSON arrays, JSONL,
annotations) with file:line errors, --log-samples, generation with -m, and the published
AlpacaEval 2 leaderboard row for alpaca-7b (skipped when ../shared/data is absent).

Most tests call `winrate.run(cfg, judge=...)` in-process with a fake judge; the CLI tests run
`rlhf_cli.cli.main` in-process, and one runs the real `python -m rlhf_cli` with a rule judge.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import run_cli, write_jsonl

from rlhf_cli.cli import main
from rlhf_cli.config import build
from rlhf_cli.data.records import Item
from rlhf_cli.evals.length_control import length_controlled
from rlhf_cli.evals.winrate import WinrateConfig, run, winrate_stats
from rlhf_cli.judges.base import Ask, PairJudge, ScoreJudge, Verdict

ALPACA = Path("/work/shared/data/alpaca_eval")
ANNOTATIONS = ALPACA / "results/alpaca-7b/weighted_alpaca_eval_gpt4_turbo/annotations.json"
LEADERBOARD = ALPACA / "leaderboards/data_AlpacaEval_2/weighted_alpaca_eval_gpt4_turbo_leaderboard.csv"


class FakePairJudge:
    """A pair judge answering `decide(a, b)` -> "A" / "B" / "tie"; stops after `stop_after` answers."""

    kind = "fake"

    def __init__(self, decide: Callable[[str, str], str], stop_after: int | None = None,
                 p_a: Callable[[str, str], float] | None = None) -> None:
        self.decide, self.stop_after, self.p_a = decide, stop_after, p_a
        self.stopped: str | None = None
        self.asked: list[tuple[str, str]] = []

    def describe(self) -> dict[str, Any]:
        return {"kind": "fake", "name": "fake-judge"}

    def judge(self, asks: Iterable[Ask]) -> Iterator[tuple[Ask, Verdict]]:
        for ask in asks:
            if self.stop_after is not None and len(self.asked) >= self.stop_after:
                self.stopped = "budget"
                return
            self.asked.append((ask.a, ask.b))
            p = self.p_a(ask.a, ask.b) if self.p_a else None
            yield ask, Verdict(self.decide(ask.a, ask.b), p_a=p, cost=0.01)  # type: ignore[arg-type]

    def close(self) -> None:
        pass


class LengthScoreJudge:
    """A score judge: an output's score is its length."""

    kind = "fake-score"

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": "length"}

    def score(self, items: list[Item]) -> list[list[float | None]]:
        return [[float(len(c)) for c in it.completions] for it in items]


def write_json(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))  # AlpacaEval's layout: an indented JSON array
    return path


def outputs(texts: list[str], generator: str, instructions: list[str] | None = None) -> list[dict[str, Any]]:
    instructions = instructions or [f"task {k}" for k in range(len(texts))]
    return [{"instruction": i, "output": t, "generator": generator, "dataset": "toy"} for i, t in zip(instructions, texts, strict=True)]


def cfg_for(tmp_path: Path, cand: list[str], ref: list[str], **kw: Any) -> WinrateConfig:
    c = write_json(tmp_path / "cand.json", outputs(cand, "cand"))
    r = write_json(tmp_path / "ref.json", outputs(ref, "ref"))
    return build(WinrateConfig, outputs=(str(c),), reference=str(r), judge=kw.pop("judge", "fake"), **kw)


def call(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------------------- the math


def test_win_rate_and_standard_error_on_a_hand_made_table() -> None:
    # p:  1   2   1.5  2   2   1   1.9  1.25  2   0 (legacy tie -> 1.5)   None (no answer: left out)
    # y = p - 1: 0, 1, .5, 1, 1, 0, .9, .25, 1, .5 -> sum 6.15, mean .615 -> win_rate 61.5
    # squared deviations from .615: 2 x .378225 + 4 x .148225 + 2 x .013225 + .081225 + .133225 = 1.59025
    # sem = sqrt(1.59025 / 9 / 10) = 0.132926 -> 13.2926
    # wins (y > .5): 1, 1, 1, .9, 1 = 5; losses (y < .5): 0, 0, .25 = 3; draws (p == 1.5): 2
    # discrete (rounded): 0, 1, .5, 1, 1, 0, 1, 0, 1, .5 -> 6 / 10 -> 60.0
    s = winrate_stats([1, 2, 1.5, 2, 2, 1, 1.9, 1.25, 2, 0, None])
    assert s["win_rate"] == pytest.approx(61.5)
    assert s["standard_error"] == pytest.approx(100 * math.sqrt(1.59025 / 9 / 10)) == pytest.approx(13.2926, abs=1e-4)
    assert (s["n_wins"], s["n_losses"], s["n_draws"], s["n_total"], s["n_dropped"]) == (5, 3, 2, 10, 1)
    assert s["discrete_win_rate"] == pytest.approx(60.0)


def test_glm_recovers_known_weights_and_sets_the_length_term_to_zero() -> None:
    # noiseless soft labels from the GLM itself: y = sigmoid(-2 tanh(delta / sd) + 1.0 d + 0.3)
    rng = random.Random(0)
    n = 400
    ref_len = [rng.randint(100, 2000) for _ in range(n)]
    cand_len = [rng.randint(100, 2000) for _ in range(n)]
    diff = [rng.gauss(0, 1) for _ in range(n)]
    delta = [r - c for r, c in zip(ref_len, cand_len, strict=True)]
    mu = sum(delta) / n
    sd = math.sqrt(sum((x - mu) ** 2 for x in delta) / (n - 1))
    y = [1 / (1 + math.exp(-(-2 * math.tanh(x / sd) + 1.0 * d + 0.3))) for x, d in zip(delta, diff, strict=True)]
    lc = length_controlled([1 + p for p in y], cand_len, ref_len, diff)
    w = lc["weights"]
    assert (w["length"], w["difficulty"], w["bias"]) == pytest.approx((-2.0, 1.0, 0.3), abs=0.01)
    expected = 100 * sum(1 / (1 + math.exp(-(d + 0.3))) for d in diff) / n  # the length term at 0
    assert lc["lc_win_rate"] == pytest.approx(expected, abs=0.05)
    assert lc["predicted"][0] == pytest.approx(1 / (1 + math.exp(-(diff[0] + 0.3))), abs=1e-3)


def synthetic(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Reference and candidate texts: the candidate is 0.6x to 2.4x as long (longer in ~78% of rows)."""
    rng = random.Random(seed)
    ref, cand = [], []
    for _ in range(n):
        r = rng.randint(50, 400)
        ref.append("r" * r)
        cand.append("c" * int(r * rng.uniform(0.6, 2.4)))
    return ref, cand


def likes_length(a: str, b: str) -> str:
    """A noisy judge that only looks at length: the longer answer wins with probability
    sigmoid(3 |log(len a / len b)|), by a coin seeded on the pair, so both orders agree."""
    longer, shorter = (a, b) if len(a) >= len(b) else (b, a)
    p = 1 / (1 + math.exp(-3 * abs(math.log(len(a) / len(b)))))
    winner = longer if random.Random("|".join(sorted((a, b)))).random() < p else shorter
    return "A" if winner == a else "B"


def test_a_judge_that_only_likes_length_wins_raw_but_not_length_controlled(tmp_path: Path) -> None:
    ref, cand = synthetic(200)
    judge = FakePairJudge(likes_length)
    (r,) = run(cfg_for(tmp_path, cand, ref), judge=judge)
    m = r.metrics
    assert len(judge.asked) == 400 and m["n_draws"] == 0  # consistent in both orders: no ties
    assert m["win_rate"] > 60  # the candidate is usually longer, so it usually wins
    assert abs(m["lc_win_rate"] - 50) < 2 * m["lc_win_rate_stderr"] < 12  # ... but not once length is held equal
    assert m["win_rate"] - m["lc_win_rate"] > 10
    assert r.extra["lc_weights"]["length"] < -1  # delta = len(ref) - len(cand): a longer candidate wins


def test_length_control_keeps_a_win_that_is_not_about_length() -> None:
    # the candidate wins 70% of the rows at random, whatever the lengths: LC stays near the raw rate
    ref, cand = synthetic(400, seed=1)
    rng = random.Random(2)
    prefs = [2.0 if rng.random() < 0.7 else 1.0 for _ in ref]
    raw = winrate_stats(prefs)["win_rate"]
    lc = length_controlled(prefs, [len(c) for c in cand], [len(r) for r in ref])
    assert abs(lc["lc_win_rate"] - raw) < 4
    assert 0 < lc["lc_standard_error"] < 6


def test_a_position_biased_judge_gives_all_ties_in_both_orders(tmp_path: Path) -> None:
    ref, cand = synthetic(10)
    always_a = FakePairJudge(lambda a, b: "A")
    (r,) = run(cfg_for(tmp_path, cand, ref), judge=always_a)
    assert len(always_a.asked) == 20  # every pair in both orders
    assert r.metrics["win_rate"] == 50.0 and r.metrics["n_draws"] == 10 and r.metrics["n_wins"] == 0
    assert r.metrics["win_rate_stderr"] == 0.0


def test_weighted_preferences_average_p_over_both_orders(tmp_path: Path) -> None:
    # P(candidate better) = 0.8, plus a +0.1 bias towards whatever is shown first:
    # reference first: p_a = 0.2 + 0.1 = 0.3; candidate first: p_a = 0.8 + 0.1 = 0.9
    # P(reference better) = mean(0.3, 1 - 0.9) = 0.2 -> preference 1.8 -> weighted win rate 80
    judge = FakePairJudge(lambda a, b: "A", p_a=lambda a, b: (0.9 if a.startswith("c") else 0.3))
    (r,) = run(cfg_for(tmp_path, ["c1", "c2"], ["r1", "r2"], weighted=True), judge=judge)
    assert [s["preference"] for s in r.samples] == pytest.approx([1.8, 1.8])
    assert r.metrics["win_rate"] == pytest.approx(80.0) and r.metrics["n_wins"] == 2
    assert r.samples[0]["judge"]["p_a"] == [0.3, 0.9] and r.samples[0]["judge"]["shown"] == [[0, 1], [1, 0]]
    (plain,) = run(cfg_for(tmp_path, ["c1", "c2"], ["r1", "r2"]), judge=judge)  # the verdicts disagree: ties
    assert plain.metrics["win_rate"] == 50.0


def test_identical_outputs_tie_without_asking(tmp_path: Path) -> None:
    judge = FakePairJudge(lambda a, b: "B" if "good" in b else "A")
    (r,) = run(cfg_for(tmp_path, ["same", "good answer", "bad"], ["same", "meh", "good ref"]), judge=judge)
    assert len(judge.asked) == 4  # the identical pair is never shown
    assert [s["preference"] for s in r.samples] == [1.5, 2.0, 1.0]
    assert r.samples[0]["judge"] == {"identical": True}


def test_a_judge_that_stops_early_leaves_pairs_out_and_says_so(tmp_path: Path) -> None:
    ref, cand = synthetic(6)
    judge = FakePairJudge(lambda a, b: "A" if len(a) > len(b) else "B", stop_after=5)  # 2 pairs done, the 3rd half
    (r,) = run(cfg_for(tmp_path, cand, ref), judge=judge)
    assert r.n == 2 and r.extra["n_dropped"] == 4 and r.extra["stopped"] == "budget"
    assert r.extra["cost"] == pytest.approx(0.04)


# ---------------------------------------------------------------------------------- reading


def test_matching_by_instruction_jsonl_and_sample_rows(tmp_path: Path) -> None:
    ref = write_json(tmp_path / "ref.json", outputs(["r0", "r1", "r2"], "ref"))
    # JSONL from `rlhf sample` in another order, one instruction missing
    cand = write_jsonl(tmp_path, "s.jsonl", [{"prompt": "task 2", "completions": ["c2long", "x"]}, {"prompt": "task 0", "completions": ["c0"]}])
    (r,) = run(WinrateConfig(outputs=(str(cand),), reference=str(ref), judge="fake"), judge=LengthScoreJudge())
    assert [(s["id"], s["output"], s["target"], s["preference"]) for s in r.samples] == [(0, "c0", "r0", 1.5), (2, "c2long", "r2", 2.0)]
    assert r.model == "s.jsonl" and r.metrics["avg_length"] == 4.0 and r.metrics["ref_avg_length"] == 2.0
    # --limit 2 keeps reference rows 0 and 1: "task 2" is beyond it (skipped, not an error)
    (r,) = run(WinrateConfig(outputs=(str(cand),), reference=str(ref), judge="fake", limit=2), judge=LengthScoreJudge())
    assert [s["id"] for s in r.samples] == [0]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"ref.json": [{"instruction": "a", "output": "x"}, {"instruction": "b"}]}, "ref.json:6: output field 'output' is missing"),
        ({"cand.jsonl": ['{"instruction": "a", "output": "x"}', '{"instruction": "zzz", "output": "y"}']}, "cand.jsonl:2: instruction is not in the reference"),
        ({"cand.jsonl": ['{"instruction": "a", "output": "x"}', "{not json"]}, "cand.jsonl:2: malformed JSON"),
        ({"cand.jsonl": ['{"instruction": "a", "output": 3}']}, "cand.jsonl:1: output field 'output' is int"),
    ],
)
def test_bad_input_is_one_line_exit_2_naming_file_line(tmp_path: Path, capsys, files, message) -> None:
    (tmp_path / "ref.json").write_bytes(orjson.dumps([{"instruction": "a", "output": "r"}, {"instruction": "b", "output": "s"}], option=orjson.OPT_INDENT_2))
    (tmp_path / "cand.jsonl").write_text('{"instruction": "a", "output": "x"}\n')
    for name, content in files.items():
        if name.endswith(".json"):
            (tmp_path / name).write_bytes(orjson.dumps(content, option=orjson.OPT_INDENT_2))
        else:
            (tmp_path / name).write_text("\n".join(content) + "\n")
    log = tmp_path / "samples.jsonl"
    code, out, err = call(["eval", "winrate", str(tmp_path / "cand.jsonl"), "--reference", str(tmp_path / "ref.json"),
                           "--judge", "rule:exact", "--log-samples", str(log)], capsys)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") <= 2
    assert not log.exists()


def test_annotations_errors_and_usage_errors(tmp_path: Path, capsys) -> None:
    ann = write_json(tmp_path / "ann.json", [
        {"instruction": "a", "output_1": "r", "output_2": "c", "generator_2": "m", "preference": 1.0},
        {"instruction": "b", "output_1": "r", "output_2": "c", "generator_2": "m", "preference": "2"},
    ])
    code, _, err = call(["eval", "winrate", "--annotations", str(ann)], capsys)
    assert code == 2 and "ann.json:9: preference must be a number in [1, 2] or null" in err
    code, _, err = call(["eval", "winrate", "--annotations", str(ann), "--reference", str(ann)], capsys)
    assert code == 2 and "--annotations already holds both" in err
    code, _, err = call(["eval", "winrate", str(ann)], capsys)
    assert code == 2 and "--reference FILE is required" in err


def test_annotations_file_with_nulls_and_legacy_ties(tmp_path: Path) -> None:
    rows = [{"instruction": f"i{k}", "output_1": "ref" * 3, "output_2": "c" * k, "generator_2": "m", "preference": p}
            for k, p in enumerate([1.0, 2.0, 0, None, 1.8])]
    (r,) = run(WinrateConfig(annotations=(str(write_json(tmp_path / "a.json", rows)),)))
    # y = 0, 1, .5, (none), .8 -> 57.5; n 4, one dropped; wins 2, draws 1, losses 1
    assert r.model == "m" and r.n == 4 and r.extra["n_dropped"] == 1
    assert r.metrics["win_rate"] == pytest.approx(57.5)
    assert (r.metrics["n_wins"], r.metrics["n_draws"], r.metrics["n_losses"]) == (2, 1, 1)
    assert r.samples[3]["preference"] is None and r.samples[3]["score"] is None


def test_instruction_difficulty_csv(tmp_path: Path, capsys) -> None:
    rows = [{"instruction": f"i{k}", "output_1": "r" * (10 + k), "output_2": "c" * (12 - k), "generator_2": "m", "preference": 1 + (k % 3) / 2}
            for k in range(6)]
    ann = write_json(tmp_path / "a.json", rows)
    good = tmp_path / "difficulty.csv"
    with good.open("w", newline="") as f:
        csv.writer(f).writerows([["index", "instruction_difficulty"], *[[k, k / 3 - 1] for k in range(6)]])
    (r,) = run(WinrateConfig(annotations=(str(ann),), difficulty=str(good)))
    assert set(r.extra["lc_weights"]) == {"length", "difficulty", "bias"}
    short = tmp_path / "short.csv"
    short.write_text("index,instruction_difficulty\n0,0.1\n1,x\n")
    code, _, err = call(["eval", "winrate", "--annotations", str(ann), "--instruction-difficulty", str(short)], capsys)
    assert code == 2 and "short.csv:3: expected INDEX,DIFFICULTY" in err


# ---------------------------------------------------------------------------------- CLI and models


def test_help(capsys) -> None:
    code, out, _ = call(["eval", "winrate", "--help"], capsys)
    assert code == 0 and "--reference" in out and "--annotations" in out and "Examples" in out


def test_api_options_reach_the_judge_and_an_early_stop_exits_3(tmp_path: Path, monkeypatch, capsys) -> None:
    import rlhf_cli.judges

    seen = {}

    def fake_build(spec: str, opts: Any) -> FakePairJudge:
        seen.update(spec=spec, opts=opts)
        return FakePairJudge(lambda a, b: "A", stop_after=2)

    monkeypatch.setattr(rlhf_cli.judges, "build_judge", fake_build)
    cfg = cfg_for(tmp_path, ["c1", "c2"], ["r1", "r2"])
    code, out, err = call(["eval", "winrate", cfg.outputs[0], "-r", cfg.reference, "--judge", "api:gpt-x", "--base-url", "http://127.0.0.1:9/v1",
                           "--api-key-env", "MY_KEY", "--max-cost", "0.5", "--concurrency", "2", "--cache-dir", str(tmp_path / "c"),
                           "--template", "t.txt", "--prices", "1,2", "--seed", "7"], capsys)
    o = seen["opts"]
    assert seen["spec"] == "api:gpt-x" and (o.base_url, o.api_key_env, o.max_cost, o.concurrency, o.cache_dir, o.template, o.prices, o.seed) == (
        "http://127.0.0.1:9/v1", "MY_KEY", 0.5, 2, str(tmp_path / "c"), "t.txt", "1,2", 7)
    assert code == 3 and "stopped early (budget)" in err
    (res,) = orjson.loads(out)["results"]
    assert res["n"] == 1 and res["n_dropped"] == 1 and res["stopped"] == "budget"  # one pair got both orders


def test_cli_rule_judge_end_to_end_pure_jsonl_and_log_samples(tmp_path: Path) -> None:
    # a rule judge scores each output against the reference row's answer: only the candidate is right
    # on rows 0 and 1, only the reference on row 2, both on row 3 -> y = 1, 1, 0, .5 -> 62.5
    ref = outputs(["6", "no idea", "9", "4"], "ref", ["2+3", "2+5", "3*3", "2+2"])
    for row, ans in zip(ref, ["5", "7", "9", "4"], strict=True):
        row["answer"] = ans
    r = write_json(tmp_path / "ref.json", ref)
    c = write_jsonl(tmp_path, "cand.jsonl", [{"instruction": i, "output": o} for i, o in [("2+2", "4"), ("3*3", "6"), ("2+5", "7"), ("2+3", "5")]])
    log = tmp_path / "samples.jsonl"
    proc = run_cli(["eval", "winrate", str(c), "-r", str(r), "--judge", "rule:exact", "--log-samples", str(log)])
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    summary = orjson.loads(line)
    (res,) = summary["results"]
    assert summary["kind"] == "winrate" and res["model"] == "cand.jsonl" and res["n"] == 4
    assert res["win_rate"] == pytest.approx(62.5) and (res["n_wins"], res["n_draws"], res["n_losses"]) == (2, 1, 1)
    samples = [orjson.loads(x) for x in log.read_bytes().splitlines()]
    assert [s["id"] for s in samples] == [0, 1, 2, 3]  # reference order
    assert samples[1] == {**samples[1], "model": "cand.jsonl", "input": "2+5", "output": "7", "target": "no idea", "score": 1.0, "preference": 2.0}
    assert samples[1]["judge"] == {"scores": [0.0, 1.0]}


def test_generate_with_a_builtin_model(tmp_path: Path) -> None:
    ref = write_json(tmp_path / "ref.json", outputs(["a reference answer", "b", "c c c"], "ref"))
    cfg = build(WinrateConfig, reference=str(ref), models=("builtin:micro",), judge="fake", max_new_tokens=4, batch_size=2, device="cpu")
    (r,) = run(cfg, judge=LengthScoreJudge())
    assert r.model == "builtin:micro" and r.n == 3
    assert [s["input"] for s in r.samples] == ["task 0", "task 1", "task 2"]
    assert all(isinstance(s["output"], str) and len(s["output"].encode()) <= 4 for s in r.samples)  # byte tokens
    (again,) = run(cfg, judge=LengthScoreJudge())
    assert [s["output"] for s in again.samples] == [s["output"] for s in r.samples]  # greedy, seeded


def test_fakes_implement_the_judge_protocols() -> None:
    assert isinstance(FakePairJudge(lambda a, b: "A"), PairJudge) and isinstance(LengthScoreJudge(), ScoreJudge)


# ---------------------------------------------------------------------------------- fidelity


@pytest.mark.skipif(not (ANNOTATIONS.is_file() and LEADERBOARD.is_file()), reason="AlpacaEval data not in ../shared/data")
def test_alpaca_7b_reproduces_the_alpaca_eval_2_leaderboard_row() -> None:
    with LEADERBOARD.open() as f:
        row = next(r for r in csv.DictReader(f) if r[""] == "alpaca-7b")
    (r,) = run(WinrateConfig(annotations=(str(ANNOTATIONS),)))
    assert r.model == "alpaca-7b" and r.n == int(row["n_total"]) == 805
    assert r.metrics["win_rate"] == pytest.approx(float(row["win_rate"]), abs=1e-9)  # 2.591450540223603
    assert r.metrics["win_rate_stderr"] == pytest.approx(float(row["standard_error"]), abs=1e-9)  # 0.4870855382635108
    assert r.extra["discrete_win_rate"] == pytest.approx(float(row["discrete_win_rate"]), abs=1e-9)  # 2.298136645962733
    assert (r.metrics["n_wins"], r.metrics["n_losses"], r.metrics["n_draws"]) == (int(row["n_wins"]), int(row["n_wins_base"]), int(row["n_draws"]))
    assert int(r.metrics["avg_length"]) == int(row["avg_length"])  # 396 characters
    # LC: the published 5.875 uses instruction difficulties and gamed-baseline annotations that live only on
    # the HF hub; the single-model GLM (length term + bias) gives 19.83 here (see the module docstring)
    assert float(row["length_controlled_winrate"]) == pytest.approx(5.875, abs=1e-3)
    assert r.metrics["lc_win_rate"] == pytest.approx(19.83, abs=0.01)
