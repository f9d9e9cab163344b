"""`rlhf known`: the SliCK categories (Gekhman et al. 2024) by hand, then end to end through `run()` with
an injected generator whose answers are fixed by construction (so every P0 and P is a known ratio of
small counts), the input shapes, --drop, --shots 0, the few-shot exemplars, bad input through the CLI
(exit 2, file:line, nothing written), one real `builtin:tiny` run in a subprocess, and --plot.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import run_cli, write_jsonl

from rlhf_cli.cli import main
from rlhf_cli.commands.known import CATEGORIES, KnownConfig, category, drop_categories, run, shot_indices
from rlhf_cli.config import build
from rlhf_cli.errors import RlhfError
from rlhf_cli.generation import Completion, SamplingParams

# ---------------------------------------------------------------- the paper's definitions, by hand


def test_category_follows_the_paper_definitions() -> None:
    # highly_known: P0 == 1, whatever P is (the greedy answer is always right)
    assert category(1.0, 1.0) == "highly_known"
    assert category(1.0, 0.0) == "highly_known"
    # maybe_known: 0 < P0 < 1 (P does not matter)
    assert category(0.25, 0.0) == "maybe_known"
    assert category(0.75, 1.0) == "maybe_known"
    assert category(1 / 10, 0.5) == "maybe_known"
    # P0 == 0: P decides between weakly_known (some sample right) and unknown (none)
    assert category(0.0, 1 / 160) == "weakly_known"
    assert category(0.0, 1.0) == "weakly_known"
    assert category(0.0, 0.0) == "unknown"


def test_drop_categories_split_commas_and_refuse_unknown_names() -> None:
    assert drop_categories(["unknown,weakly_known"]) == {"unknown", "weakly_known"}
    assert drop_categories(["unknown", " maybe_known , "]) == {"unknown", "maybe_known"}
    assert drop_categories([]) == set()
    with pytest.raises(RlhfError, match="--drop unknwn: not a category"):
        drop_categories(["unknown,unknwn"])


@pytest.mark.parametrize("n_rows", [6, 200])  # few candidates (drawn from their list) and many (redrawn on a clash)
def test_shot_indices_never_pick_excluded_rows_and_are_seeded(n_rows) -> None:
    excluded = {0, 3}  # a row and its twin asking the same question
    draws = [shot_indices(n_rows, excluded, 3, 0, "k0", e) for e in range(8)]
    for got in draws:
        assert len(set(got)) == 3 and not set(got) & excluded and all(0 <= j < n_rows for j in got)
    assert draws == [shot_indices(n_rows, excluded, 3, 0, "k0", e) for e in range(8)]  # same (seed, key, set): same shots
    assert len({tuple(d) for d in draws}) > 1  # the prompts of one row differ
    assert [shot_indices(n_rows, excluded, 3, 1, "k0", e) for e in range(8)] != draws  # another seed
    assert [shot_indices(n_rows, excluded, 3, 0, "k1", e) for e in range(8)] != draws  # another row


def test_shot_indices_need_enough_other_questions() -> None:
    assert sorted(shot_indices(6, {0, 3}, 4, 0, "k0", 0)) == [1, 2, 4, 5]  # all of the free rows
    with pytest.raises(RlhfError, match="only 4 other rows ask a different question, fewer than --shots 5"):
        shot_indices(6, {0, 3}, 5, 0, "k0", 0)


# ---------------------------------------------------------------- a generator whose answers are known

FRANCE, AUSTRALIA, BHUTAN, TUVALU = "Capital of France?", "Capital of Australia?", "Capital of Bhutan?", "Capital of Tuvalu?"
ROWS: list[dict[str, Any]] = [
    {"id": "hk", "prompt": FRANCE, "answer": "Paris", "meta": {"src": "geo", "n": 1}},
    {"id": "mk", "prompt": AUSTRALIA, "answer": "Canberra"},
    {"id": "wk", "prompt": BHUTAN, "answer": "Thimphu"},
    {"id": "uk", "prompt": TUVALU, "answer": "Funafuti"},
    {"messages": [{"role": "user", "content": "Capital of Japan?"}, {"role": "assistant", "content": "Tokyo"}]},  # SFT conversation
    {"prompt": "Capital of Peru?", "completion": "Lima"},  # SFT row: the completion is the reference
    {"prompt": "Capital of Italy?", "completion": "It is Rome, of course.", "answer": "Rome"},  # the field wins
]
E, K, S = 4, 3, 2
GOOD = [{"prompt": f"q{i}?", "answer": f"a{i}"} for i in range(5)]  # plain prompt rows with a reference


def parse(prompt: str | list[dict[str, str]]) -> tuple[str, list[str]]:
    """(the question, the exemplars' questions) from a prompt in either layout of eval exact."""
    if isinstance(prompt, list):  # chat: shots are user/assistant turns, the question the last user turn
        users = [m["content"] for m in prompt if m["role"] == "user"]
        return users[-1], users[:-1]
    blocks = [b.removeprefix("Question: ").split("\nAnswer:")[0] for b in prompt.split("\n\n")]
    return blocks[-1], blocks[:-1]


class Oracle:
    """A `Generate` whose answers follow from the prompt text alone, except the Bhutan row, which is
    right in exactly one sample of the whole run (the first it is sampled). Greedy = temperature 0."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[Any], list[str], SamplingParams]] = []
        self.bhutan_sampled = 0

    def __call__(self, prompts: Sequence[Any], keys: Sequence[str], params: SamplingParams):
        self.calls.append((list(prompts), list(keys), params))
        for i, p in enumerate(prompts):
            q, shots = parse(p)
            yield i, [Completion(t, "stop", []) for t in self.answers(q, shots, params)]

    def answers(self, q: str, shots: list[str], params: SamplingParams) -> list[str]:
        greedy, n = params.temperature == 0, params.n
        if q == AUSTRALIA:  # right greedily only when France is an exemplar; 1 of 3 samples right
            return ["Canberra" if FRANCE in shots else "Sydney"] if greedy else ["Canberra", "Sydney", "Sydney"][:n]
        if q == BHUTAN:
            if greedy:
                return ["Paro"]
            self.bhutan_sampled += 1
            return (["Thimphu"] if self.bhutan_sampled == 1 else ["Paro"]) + ["Paro"] * (n - 1)
        if q == "Capital of Peru?":
            return ["Lima"] if greedy else ["Cusco"] * n
        if q == TUVALU and greedy:  # wrong, and different under each prompt: shows which prompt an answer came from
            return [f"Nauru, after {' and '.join(shots)}"]
        fixed = {FRANCE: " Paris\n", TUVALU: "Nauru", "Capital of Japan?": "Tokyo", "Capital of Italy?": "Rome"}
        return [fixed[q]] * n


def _cfg(tmp_path: Path, rows: list[Any] = ROWS, **kw: Any) -> KnownConfig:
    data = write_jsonl(tmp_path, "qa.jsonl", rows)
    return build(KnownConfig, **{"data": str(data), "n": K, "shots": S, "shot_sets": E, "output": str(tmp_path / "out.jsonl"), **kw})


def _read(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


def test_categories_end_to_end_with_exact_ratios(tmp_path) -> None:
    oracle = Oracle()
    summary = run(_cfg(tmp_path), generate=oracle)
    out = _read(tmp_path / "out.jsonl")

    # two calls, greedy then sampled, over the same rows x prompts (row i's prompt e at i*E + e)
    (g_prompts, g_keys, g), (s_prompts, s_keys, s) = oracle.calls
    assert (g.n, g.temperature, s.n, s.temperature) == (1, 0.0, K, 0.5)
    assert g_prompts == s_prompts and g_keys == s_keys and len(g_prompts) == len(ROWS) * E
    assert g.stop == s.stop == ()  # chat format: no stop strings by default
    parsed = [parse(p) for p in g_prompts]
    own = [r.get("prompt", "Capital of Japan?") for r in ROWS]
    for i in range(len(ROWS)):
        mine = parsed[i * E : (i + 1) * E]
        assert all(q == own[i] and len(shots) == S and q not in shots for q, shots in mine), mine  # never its own question
        assert len({tuple(shots) for _, shots in mine}) > 1  # the E prompts differ

    # Australia is right exactly under the prompts that show France: count them from the prompts
    aus = parsed[1 * E : 2 * E]
    hits = sum(FRANCE in shots for _, shots in aus)
    assert 0 < hits < E, "the seed must give a mixed case for this test to mean anything"

    known = [r["known"] for r in out]
    assert [k["category"] for k in known] == ["highly_known", "maybe_known", "weakly_known", "unknown",
                                                "highly_known", "highly_known", "highly_known"]
    assert [k["p_greedy"] for k in known] == [1.0, hits / E, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert [k["p_correct"] for k in known] == [1.0, 1 / 3, 1 / (E * K), 0.0, 1.0, 0.0, 1.0]
    assert [k["greedy_correct"] for k in known] == [True, hits / E >= 0.5, False, False, True, True, True]
    assert known[0]["greedy_answer"] == "Paris"  # stripped
    assert known[1]["greedy_answer"] == ("Canberra" if FRANCE in aus[0][1] else "Sydney")  # under the first prompt
    assert known[6]["greedy_answer"] == "Rome"
    tuvalu = parsed[3 * E : 4 * E]
    assert known[3]["greedy_answer"] == f"Nauru, after {' and '.join(tuvalu[0][1])}" != f"Nauru, after {' and '.join(tuvalu[-1][1])}"
    assert all((k["samples"], k["prompts"], k["model"]) == (E * K, E, "builtin:tiny") for k in known)
    assert known[0]["judge"] == {"kind": "rule", "name": "rule:exact", "reference": "answer"}

    # every input field passes through untouched, in order, and nothing else is added
    assert [{k: v for k, v in r.items() if k != "known"} for r in out] == ROWS
    assert summary["categories"] == {"highly_known": 4, "maybe_known": 1, "weakly_known": 1, "unknown": 1}
    assert (summary["written"], summary["dropped"]) == (7, 0)
    assert summary["mean_p_correct"] == pytest.approx((1 + 1 / 3 + 1 / 12 + 0 + 1 + 0 + 1) / 7)


def test_drop_writes_only_the_other_categories(tmp_path) -> None:
    run(_cfg(tmp_path, drop=("unknown",)), generate=Oracle())
    assert [r.get("id") for r in _read(tmp_path / "out.jsonl")] == ["hk", "mk", "wk", None, None, None]
    summary = run(_cfg(tmp_path, drop=("unknown,weakly_known",)), generate=Oracle())
    out = _read(tmp_path / "out.jsonl")
    assert [r.get("id") for r in out] == ["hk", "mk", None, None, None]
    assert all(r["known"]["category"] in ("highly_known", "maybe_known") for r in out)  # still annotated
    assert (summary["written"], summary["dropped"], summary["categories"]["unknown"]) == (5, 2, 1)


def test_n_0_answers_greedily_only(tmp_path) -> None:
    """-n 0: one greedy pass, no samples: P is null and a row never greedily right is unknown (Bhutan,
    weakly known with samples, cannot be told apart without them)."""
    oracle = Oracle()
    summary = run(_cfg(tmp_path, n=0), generate=oracle)
    assert [params.temperature for _, _, params in oracle.calls] == [0.0]
    known = [r["known"] for r in _read(tmp_path / "out.jsonl")]
    assert [k["category"] for k in known] == ["highly_known", "maybe_known", "unknown", "unknown", "highly_known", "highly_known", "highly_known"]
    assert all(k["p_correct"] is None and k["samples"] == 0 for k in known)
    assert summary["mean_of"] == "p_greedy" and summary["mean_p_correct"] == pytest.approx(sum(k["p_greedy"] for k in known) / 7)


def test_shots_0_is_one_bare_prompt_per_row(tmp_path) -> None:
    oracle = Oracle()
    run(_cfg(tmp_path, shots=0), generate=oracle)
    prompts = oracle.calls[0][0]
    assert prompts[:2] == [[{"role": "user", "content": FRANCE}], [{"role": "user", "content": AUSTRALIA}]]
    assert len(prompts) == len(ROWS)
    known = [r["known"] for r in _read(tmp_path / "out.jsonl")]
    assert all((k["prompts"], k["samples"]) == (1, K) for k in known)
    # no France exemplar: Australia's greedy answer is wrong, one of its 3 samples right
    assert (known[1]["category"], known[1]["p_greedy"], known[1]["p_correct"]) == ("weakly_known", 0.0, 1 / 3)
    assert (known[2]["category"], known[2]["p_correct"]) == ("weakly_known", 1 / 3)  # Bhutan: its one right sample of 3


def test_raw_format_uses_eval_exact_layout_and_stops(tmp_path) -> None:
    from rlhf_cli.evals.exact import STOP

    oracle = Oracle()
    run(_cfg(tmp_path, format="raw"), generate=oracle)
    prompts, _, params = oracle.calls[0]
    first = prompts[0]
    assert first.endswith(f"\n\nQuestion: {FRANCE}\nAnswer:") and first.count("Question: ") == S + 1
    q, shots = parse(first)
    answers = {r.get("prompt", "Capital of Japan?"): r.get("answer", r.get("completion", "Tokyo")) for r in ROWS}
    for shot in shots:  # each exemplar is another row's question and its reference answer
        assert f"Question: {shot}\nAnswer: {answers[shot]}" in first
    assert params.stop == (*STOP, "\n")
    assert [r["known"]["category"] for r in _read(tmp_path / "out.jsonl")][:4] == ["highly_known", "maybe_known", "weakly_known", "unknown"]


def test_greedy_correct_means_right_under_at_least_half_the_prompts(tmp_path) -> None:
    """A generator deciding by the prompt's key ("<row key>|<set>"): row a is right greedily under sets 0
    and 2 of 4 (P0 = 1/2 exactly), row b under set 0 only (1/4); every sample is wrong."""
    rows = [{"id": "a", "prompt": "qa?", "answer": "x"}, {"id": "b", "prompt": "qb?", "answer": "x"}, *GOOD]

    def gen(prompts: Sequence[Any], keys: Sequence[str], params: SamplingParams):
        for i, key in enumerate(keys):
            row, e = key.split("|")
            right = params.temperature == 0 and ((row == "a" and e in "02") or (row == "b" and e == "0"))
            yield i, [Completion("x" if right else "y", "stop", [])] * params.n

    run(_cfg(tmp_path, rows), generate=gen)
    a, b = (r["known"] for r in _read(tmp_path / "out.jsonl")[:2])
    assert (a["category"], a["p_greedy"], a["greedy_correct"], a["p_correct"]) == ("maybe_known", 0.5, True, 0.0)
    assert (b["category"], b["p_greedy"], b["greedy_correct"], b["p_correct"]) == ("maybe_known", 0.25, False, 0.0)


def test_threshold_and_a_scoring_function(tmp_path) -> None:
    """A rule:FILE.py:FN judge giving 0.5 to "Sydney": with --threshold 0.5 Australia is always right."""
    fn = tmp_path / "half.py"
    fn.write_text("def half(completion, row):\n    return 0.5 if completion == 'Sydney' else float(completion == row['answer'])\n")
    run(_cfg(tmp_path, judge=f"rule:{fn}:half", threshold=0.5), generate=Oracle())
    aus = _read(tmp_path / "out.jsonl")[1]["known"]
    assert (aus["category"], aus["p_greedy"], aus["p_correct"]) == ("highly_known", 1.0, 1.0)
    run(_cfg(tmp_path, judge=f"rule:{fn}:half"), generate=Oracle())  # threshold 1: only Canberra
    assert _read(tmp_path / "out.jsonl")[1]["known"]["p_correct"] == 1 / 3


def test_a_duplicate_question_is_never_its_twins_exemplar(tmp_path) -> None:
    rows = [*ROWS, {"id": "dup", "prompt": FRANCE, "answer": "Paris"}]
    oracle = Oracle()
    run(_cfg(tmp_path, rows, shots=len(rows) - 2), generate=oracle)  # a France prompt shows all six others, never its twin
    for p in oracle.calls[0][0]:
        q, shots = parse(p)
        assert q not in shots
    with pytest.raises(RlhfError, match=r"qa\.jsonl:1: only 6 other rows ask a different question.*--shots 7"):
        run(_cfg(tmp_path, rows, shots=len(rows) - 1), generate=Oracle())


def test_plot_writes_a_png(tmp_path) -> None:
    run(_cfg(tmp_path, plot=str(tmp_path / "known.png")), generate=Oracle())
    assert (tmp_path / "known.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- the CLI: help, config, bad input


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return (0 if e.value.code is None else e.value.code), out, " ".join(err.split())


def test_help_shows_the_contract_and_examples(capsys) -> None:
    code, out, _ = call(["known", "--help"], capsys)
    flat = " ".join(out.split())
    assert code == 0
    for text in ("Examples", "rlhf known qa.jsonl -m base/ -n 8 --judge rule:exact --reference answer", "--drop unknown,weakly_known",
                 "highly_known P0 = 1", "weakly_known P0 = 0, P > 0", "p_correct", "greedy_answer"):
        assert text in flat, text


def test_config_file_reaches_the_run_and_a_flag_beats_it(tmp_path, capsys, monkeypatch) -> None:
    import rlhf_cli.commands.known as known

    seen: dict[str, KnownConfig] = {}
    monkeypatch.setattr(known, "run", lambda cfg: seen.setdefault("cfg", cfg))
    (tmp_path / "k.yaml").write_text("drop: [unknown, weakly_known]\nshot-sets: 10\njudge: rule:contains\nn: 16\n")
    code, _, err = call(["known", "qa.jsonl", "--config", str(tmp_path / "k.yaml"), "-n", "4"], capsys)
    assert code == 0, err
    cfg = seen["cfg"]
    assert (cfg.drop, cfg.shot_sets, cfg.judge, cfg.n, cfg.temperature, cfg.stop) == (("unknown", "weakly_known"), 10, "rule:contains", 4, 0.5, None)


@pytest.mark.parametrize(("rows", "flags", "expected"), [
    ([*GOOD[:2], {"prompt": "q?"}, *GOOD[2:]], [], "qa.jsonl:3: no reference answer (no 'answer' field"),
    ([*GOOD, {"prompt": "q?", "completion": ""}], [], "qa.jsonl:6: no reference answer"),
    ([*GOOD, {"prompt": "q?", "gold": "x"}], ["--reference", "gold"], "qa.jsonl:1: no reference answer (no 'gold' field"),
    ([*GOOD[:3], {"prompt": "  ", "answer": "x"}, *GOOD[3:]], [], "qa.jsonl:4: the question is empty"),
    ([*GOOD, {"messages": [{"role": "assistant", "content": "x"}]}], [], "qa.jsonl:6: the question is empty"),
    ([*GOOD, {"text": "x"}], [], "qa.jsonl:6: no 'prompt' or 'messages' field"),
    (GOOD, ["--judge", "lm:builtin:tiny"], "--judge lm:builtin:tiny: known needs a score judge"),
    (GOOD, ["--judge", "human"], "--judge human: known needs a score judge"),
    (GOOD, ["--drop", "unknown,unknwn"], "--drop unknwn: not a category"),
    (GOOD, ["--shots", "5"], "qa.jsonl: 5 rows; --shots 5 needs at least 6"),
    (GOOD, ["-m", "api:gpt-4o-mini"], "--model api:gpt-4o-mini: known runs the model itself"),
    (GOOD, ["--temperature", "0"], "--temperature must be > 0"),
])
def test_bad_input_exits_2_naming_the_line_and_writes_nothing(tmp_path, capsys, rows, flags, expected) -> None:
    data = write_jsonl(tmp_path, "qa.jsonl", rows)
    code, out, err = call(["known", str(data), "-o", str(tmp_path / "out.jsonl"), "--plot", str(tmp_path / "k.png"), *flags], capsys)
    assert code == 2 and out == "" and "Traceback" not in err, err
    assert expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qa.jsonl"]


def test_too_few_rows_hint_names_the_fix(tmp_path, capsys) -> None:
    data = write_jsonl(tmp_path, "qa.jsonl", GOOD[:3])
    code, _, err = call(["known", str(data)], capsys)  # default --shots 4
    assert code == 2 and "3 rows; --shots 4 needs at least 5" in err and "lower --shots (at most 2)" in err, err


# ---------------------------------------------------------------- a real model


def test_builtin_tiny_end_to_end_stdout_is_pure_jsonl(tmp_path) -> None:
    rows = [{"prompt": f"{i}+{i}=", "completion": str(2 * i), "k": i} for i in range(4)]
    rows += [{"messages": [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]}, {"prompt": "2+3=", "answer": "5"}]
    data = write_jsonl(tmp_path, "qa.jsonl", rows)
    proc = run_cli(["known", str(data), "-m", "builtin:tiny", "-n", "2", "--shot-sets", "2", "--shots", "1",
                    "--max-new-tokens", "4", "--device", "cpu", "--seed", "3"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = [orjson.loads(line) for line in proc.stdout.splitlines()]  # every stdout line is one JSON object
    assert len(out) == len(rows) and proc.stdout.endswith("\n")
    for row, got in zip(rows, out, strict=True):
        k = got.pop("known")
        assert got == row
        assert (k["samples"], k["prompts"], k["model"]) == (4, 2, "builtin:tiny")
        assert k["category"] in CATEGORIES and k["category"] == category(k["p_greedy"], k["p_correct"])
        assert k["p_greedy"] in (0.0, 0.5, 1.0) and k["p_correct"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert k["greedy_correct"] == (k["p_greedy"] >= 0.5) and isinstance(k["greedy_answer"], str)
    assert "rlhf known" in proc.stderr and "mean p_correct" in proc.stderr  # the table is on stderr
