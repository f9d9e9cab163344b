"""Best-of-n at eval time (`eval exact|code|winrate -n K --select JUDGE`): the estimator against brute
force over subsets and against pass@k for an oracle judge, then each eval kind with a judge whose
choice is known by construction (curve values by hand), the --plot curve, and the usage errors."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import write_jsonl

from rlhf_cli.config import build
from rlhf_cli.evals import exact
from rlhf_cli.evals.best_of import best_of, best_of_curve, sizes
from rlhf_cli.evals.code import pass_at_k
from rlhf_cli.evals.exact import ExactConfig


def brute_force(scores: list[float], values: list[float], n: int) -> float:
    """Mean over every n-subset of the kept sample's value, ties among the subset's top scores split evenly."""
    total = 0.0
    subsets = list(itertools.combinations(range(len(scores)), n))
    for sub in subsets:
        top = max(scores[j] for j in sub)
        best = [values[j] for j in sub if scores[j] == top]
        total += sum(best) / len(best)
    return total / len(subsets)


def test_best_of_equals_brute_force_over_subsets_with_ties() -> None:
    rng = random.Random(0)
    for _ in range(200):
        k = rng.randint(1, 7)
        scores = [float(rng.randint(0, 3)) for _ in range(k)]  # few levels: many ties
        values = [rng.random() for _ in range(k)]
        for n in range(1, k + 1):
            assert best_of(scores, values, n) == pytest.approx(brute_force(scores, values, n), abs=1e-12)


def test_an_oracle_judge_gives_pass_at_k_and_a_blind_one_the_mean() -> None:
    for k, c in ((8, 0), (8, 3), (5, 5), (6, 1)):
        correct = [1.0] * c + [0.0] * (k - c)
        for n in range(1, k + 1):
            assert best_of(correct, correct, n) == pytest.approx(pass_at_k(k, c, n))  # judge = the metric
            assert best_of([0.0] * k, correct, n) == pytest.approx(c / k)  # judge can tell nothing apart
            # a judge that always prefers wrong answers keeps a right one only if all n are right
            assert best_of([-x for x in correct], correct, n) == pytest.approx(math.comb(c, n) / math.comb(k, n))


def test_sizes_and_curve_keys() -> None:
    assert sizes(8) == [1, 2, 4, 8] and sizes(6) == [1, 2, 4, 6] and sizes(1) == [1] and sizes(2) == [1, 2]
    curve = best_of_curve([([1.0, 0.0], [1.0, 0.0]), ([0.0, 1.0], [0.0, 0.0])], 2)
    assert curve["best_of_1"] == 0.25 and curve["best_of_2"] == 0.5  # question 1: 1/2 then 1; question 2: 0
    assert curve["best_of_2_stderr"] == pytest.approx(0.5)  # std of (1, 0) is 0.707, / sqrt(2)
    with pytest.raises(ValueError):
        best_of([1.0, 2.0], [1.0, 0.0], 3)


# ------------------------------------------------------------------------------- each eval kind


@pytest.fixture
def longest(tmp_path: Path) -> str:
    """A rule judge that prefers the longest answer (a stand-in reward model with a known choice)."""
    rule = tmp_path / "rules.py"
    rule.write_text("def longest(completion, row):\n    return float(len(completion))\n")
    return f"rule:{rule}:longest"


TABLE = {0: ["1", "01", "7", "5"], 1: ["9", "2", "002", "8"], 2: ["3", "33", "3", "4"], 3: ["4", "44", "444", "5"]}
RIGHT = [[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0], [1, 0, 0, 0]]  # TABLE's answers against 1, 2, 3, 4


@pytest.fixture
def fixed_answers(tmp_path: Path, monkeypatch) -> Path:
    """Questions "q0?" .. "q3?" (answers 1 .. 4) whose 4 samples are TABLE's, whatever the model."""
    from rlhf_cli import generation
    from rlhf_cli.generation import Completion

    def fake_generate(model: Any, tok: Any, prompts: Any, params: Any, device: Any, seed: Any, logprobs: bool = False) -> Any:
        return [[Completion(t, "stop", [1]) for t in TABLE[int(tok.decode(p).split("q")[-1].split("?")[0])]] for p in prompts]

    monkeypatch.setattr(generation, "generate", fake_generate)
    return write_jsonl(tmp_path, "d.jsonl", [{"id": i, "prompt": f"q{i}?", "answer": str(i + 1)} for i in range(4)])


def exact_cfg(data: Path, select: str, **kw: Any) -> ExactConfig:
    return ExactConfig(data=str(data), models=("builtin:micro",), extract="exact", format="chat", n=4, temperature=1.0, select=select,
                       max_new_tokens=4, device="cpu", **kw)


def test_exact_select_picks_the_judges_favourite(tmp_path: Path, fixed_answers: Path, longest: str, capsys) -> None:
    """The longest sample is right for questions 0 and 1, wrong for 2 and 3."""
    plot = tmp_path / "curve.png"
    (r,) = exact.run(exact_cfg(fixed_answers, longest, log_samples=str(tmp_path / "s.jsonl"), plot=str(plot)))
    m = r.metrics
    # the judge keeps q0 "01" (right), q1 "002" (right), q2 "33" (wrong), q3 "444" (wrong)
    assert m["best_of_1"] == pytest.approx(m["sample_accuracy"]) == pytest.approx(7 / 16)
    assert m["best_of_4"] == 0.5 and r.primary == "best_of_4" and set(m) >= {"best_of_2", "exact_match"}
    by_hand = sum(best_of([len(t) for t in TABLE[i]], v, 2) for i, v in enumerate(RIGHT)) / 4
    assert m["best_of_2"] == pytest.approx(by_hand)
    rows = [orjson.loads(x) for x in (tmp_path / "s.jsonl").read_bytes().splitlines()]
    assert [row["select"]["kept"] for row in rows] == [1, 2, 1, 2] and rows[0]["select"]["scores"] == [1.0, 2.0, 1.0, 1.0]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert orjson.loads(capsys.readouterr().out)["results"][0]["best_of_4"] == 0.5


def test_exact_select_with_the_reference_is_an_oracle(fixed_answers: Path) -> None:
    """rule:exact against the reference keeps a right answer whenever there is one: best_of_n == pass@n."""
    (r,) = exact.run(exact_cfg(fixed_answers, "rule:exact"))
    for n in (1, 2, 4):
        assert r.metrics[f"best_of_{n}"] == pytest.approx(sum(pass_at_k(4, sum(v), n) for v in RIGHT) / 4)
    assert r.metrics["best_of_4"] == 1.0


def test_code_select_with_an_oracle_judge_is_pass_at_k(tmp_path: Path) -> None:
    from test_eval_code import PLAN, PROBLEMS

    from rlhf_cli.evals import code
    from rlhf_cli.evals.code import CodeConfig

    rule = tmp_path / "rules.py"  # right answers use + or ==, wrong ones * or a bare % 2
    rule.write_text("def looks_right(completion, row):\n    return float('+' in completion or '==' in completion)\n")
    probs = write_jsonl(tmp_path, "p.jsonl", PROBLEMS)
    samples = write_jsonl(tmp_path, "s.jsonl", [{"task_id": t, "completion": plan[t]} for t, plans in PLAN.items() for plan in plans])
    (r,) = code.run(CodeConfig(problems=str(probs), completions=(str(samples),), allow_code_exec=True, ks=(1, 2),
                               select=f"rule:{rule}:looks_right", timeout=2, log_samples=str(tmp_path / "log.jsonl")))
    assert r.metrics["best_of_1"] == pytest.approx(r.metrics["pass@1"]) == pytest.approx(0.5)
    assert r.metrics["best_of_2"] == pytest.approx(r.metrics["pass@2"]) == pytest.approx(5 / 6)
    assert r.metrics["best_of_3"] == 1.0 and r.primary == "best_of_3"
    assert [row["select_score"] for row in r.samples] == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]


def test_winrate_select_judges_every_output_and_reports_the_kept_one(tmp_path: Path, longest: str) -> None:
    """The main judge prefers the shorter output over the reference's 2 characters; the select judge
    keeps the longest: so the kept output loses wherever some output is longer than 2 bytes."""
    from rlhf_cli.evals.winrate import WinrateConfig, run

    class ShorterWins:
        kind = "fake"

        def describe(self) -> dict[str, Any]:
            return {"kind": "fake", "name": "shorter"}

        def score(self, items: list[Any]) -> list[list[float | None]]:
            return [[-float(len(c.encode())) for c in it.completions] for it in items]

    ref = tmp_path / "ref.json"
    ref.write_bytes(orjson.dumps([{"instruction": f"task {i}", "output": "xy", "generator": "ref"} for i in range(5)]))
    cfg = build(WinrateConfig, reference=str(ref), models=("builtin:micro",), judge="fake", n=4, temperature=1.5, select=longest,
                max_new_tokens=4, batch_size=4, device="cpu", log_samples=str(tmp_path / "s.jsonl"))
    (r,) = run(cfg, judge=ShorterWins())
    assert r.n == 5 and r.primary == "best_of_4"
    kept = [s["output"] for s in r.samples]
    wins = [100.0 * (1.0 if len(o.encode()) < 2 else 0.5 if len(o.encode()) == 2 else 0.0) for o in kept]
    assert r.metrics["win_rate"] == pytest.approx(sum(wins) / 5) == pytest.approx(r.metrics["best_of_4"])
    assert all(s["judge"]["select"]["kept"] == max(range(4), key=lambda j: (s["judge"]["select"]["scores"][j], -j)) for s in r.samples)
    assert all(len(s["output"]) == max(s["judge"]["select"]["scores"]) for s in r.samples)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "exact", "D", "-m", "builtin:micro", "--select", "rule:exact"], "--select chooses among samples: it needs -n K >= 2"),
        (["eval", "exact", "D", "-m", "builtin:micro", "-n", "2", "-t", "1", "--select", "lm:builtin:micro"], "a pair judge"),
        (["eval", "winrate", "--reference", "D", "-m", "builtin:micro", "-n", "2", "-t", "1", "--judge", "rule:exact"], "-n > 1 generates K outputs"),
        (["eval", "winrate", "--reference", "D", "-m", "builtin:micro", "-n", "2", "--select", "rule:exact", "--judge", "rule:exact"], "--temperature 0"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    from rlhf_cli.cli import main

    data = write_jsonl(tmp_path, "d.jsonl", [{"prompt": "p", "answer": "1", "instruction": "p", "output": "o"}])
    with pytest.raises(SystemExit) as e:
        main([str(data) if a == "D" else a for a in argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
