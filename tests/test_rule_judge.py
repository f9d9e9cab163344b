"""`rule` judges: exact, last-number, gsm8k, regex and user-function rules on hand-made rows, their
errors, and that a rule judge never imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_cli.data.records import Item
from rlhf_cli.errors import RlhfError
from rlhf_cli.judges import JudgeOptions, build_judge
from rlhf_cli.judges.base import ScoreJudge
from rlhf_cli.judges.rule import gsm8k_number, last_number, normalise


def item(completions: list[str], **row) -> Item:
    return Item("x", "q", tuple(completions), {"prompt": "q", "completions": completions, **row}, where="in.jsonl:7")


def scores(spec: str, completions: list[str], reference: str = "answer", **row) -> list[float | None]:
    judge = build_judge(spec, JudgeOptions(reference_field=reference))
    assert isinstance(judge, ScoreJudge)
    return judge.score([item(completions, **row)])[0]


def test_exact_match_is_normalised() -> None:
    # case, surrounding space and quotes, collapsed inner space, one final period: all ignored
    comps = ["Paris", "  paris. ", '"PARIS"', "Paris,  France", "paris  france", "Lyon"]
    assert scores("rule:exact", comps, answer="paris france") == [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert scores("rule:exact", comps, answer="Paris") == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    # numbers compare as numbers, also against a JSON-number reference
    assert scores("rule:exact", ["3.50", "3.5", "35", "3,5"], answer=3.5) == [1.0, 1.0, 0.0, 0.0]
    assert normalise("3.5") == "3.5"  # unlike SQuAD's normaliser, keeps the decimal point


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 1,234.", "1234"),
        ("about 5.0 apples", "5"),
        ("it costs $18.00", "18"),
        ("from 3-5 days", "5"),  # a range, not minus five
        ("it dropped to -3", "-3"),
        ("\u22127 degrees", "-7"),  # unicode minus
        ("1, 2, 3", "3"),  # a list, not the number 123
        ("no digits here", None),
        ("0.5 or .25", "0.25"),
    ],
)
def test_last_number_extraction(text: str, expected: str | None) -> None:
    from decimal import Decimal

    assert last_number(text) == (None if expected is None else Decimal(expected))


def test_last_number_rule() -> None:
    comps = ["so 1234", "1,234", "1234.0 total", "12,34", "-1234", "1234 then 5"]
    assert scores("rule:last-number", comps, answer="The total is 1,234.") == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert scores("rule:last-number", ["5", "5.0", "6"], answer=5) == [1.0, 1.0, 0.0]


def test_gsm8k_rule_on_real_answer_format() -> None:
    # the GSM8K test-set answer layout: worked steps with <<calculator>> annotations, then "#### N"
    ref = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18"
    comps = [
        "She sells 9 eggs for $2 each.\n#### 18",  # the GSM8K format
        "9 eggs at $2 is 18 dollars.",  # no ####: last number
        "18 at first, then 20",  # no ####: last number is 20
        "#### 17\nactually 18",  # #### wins over a later number
        "####18.00",
    ]
    assert scores("rule:gsm8k", comps, answer=ref) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert gsm8k_number("#### 1,000") == 1000
    # a reference without "####" falls back to its last number
    assert scores("rule:gsm8k", ["#### 7", "8"], answer="seven: 7") == [1.0, 0.0]


def test_regex_rule_first_group_vs_reference() -> None:
    rx = r"rule:regex:answer is \(?([A-D])\)?"
    comps = ["The answer is (B).", "the answer is C", "B", "Answer is B"]
    # the pattern also matches the reference, so its group is compared
    assert scores(rx, comps, answer="The answer is B") == [1.0, 0.0, 0.0, 0.0]
    # the pattern does not match a bare reference: the group is compared with the whole reference
    assert scores(rx, comps, answer="B") == [1.0, 0.0, 0.0, 0.0]
    # no group: the whole match
    assert scores(r"rule:regex:\d+ apples", ["3 apples", "three apples"], answer="3 apples") == [1.0, 0.0]


def test_contains_finds_the_reference_as_whole_words() -> None:
    comps = ["The capital is Paris.", "PARIS", "paris, france", "Parisian food", "It is Lyon", "Comparison", "  'Paris' "]
    assert scores("rule:contains", comps, answer="Paris") == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    # multi-word references: case and inner whitespace normalised, whole words on both ends
    assert scores("rule:contains", ["It's in New  York City", "new yorker", "York, New"], answer="new york") == [1.0, 0.0, 0.0]
    # numbers: not inside a longer number, across a decimal point or a thousands comma; a JSON number works
    comps = ["it is 4", "42", "4.5", "1,400", "14", "4, then 5", "about 4."]
    assert scores("rule:contains", comps, answer="4") == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert scores("rule:contains", comps, answer=4) == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert scores("rule:contains", ["pi is 3.14 or so", "3.141"], answer=3.14) == [1.0, 0.0]
    # a list reference accepts any entry; an empty or boolean reference matches nothing
    assert scores("rule:contains", ["I live in NYC", "Boston"], answer=["New York", "NYC"]) == [1.0, 0.0]
    assert scores("rule:contains", ["anything", ""], answer=" . ") == [0.0, 0.0]
    assert scores("rule:contains", ["True", "true"], answer=True) == [0.0, 0.0]
    assert scores("rule:contains", ["a"]) == [None]  # no reference: unscored, as every rule


def test_list_reference_accepts_any_entry() -> None:
    assert scores("rule:exact", ["NYC", "New York", "Boston"], answer=["new york", "nyc"]) == [1.0, 1.0, 0.0]


def test_missing_reference_scores_none_and_reference_field_is_configurable() -> None:
    assert scores("rule:exact", ["a", "b"]) == [None, None]
    assert scores("rule:exact", ["a", "b"], answer=None) == [None, None]
    assert scores("rule:exact", ["a", "b"], reference="gold", gold="b") == [0.0, 1.0]


def test_user_function_file(tmp_path: Path) -> None:
    f = tmp_path / "checks.py"
    f.write_text(
        "def is_upper(completion, row):\n    return completion.isupper()\n\n"
        "def overlap(completion, row):\n    return len(set(completion) & set(row['gold'])) / len(set(row['gold']))\n"
    )
    assert scores(f"rule:{f}:is_upper", ["YES", "no", "No"]) == [1.0, 0.0, 0.0]
    # floats pass through: "abx" shares {a, b} with "abcd" -> 2/4
    assert scores(f"rule:{f}:overlap", ["abx", "zz"], gold="abcd") == [0.5, 0.0]
    judge = build_judge(f"rule:{f}:is_upper", JudgeOptions())
    assert judge.describe()["name"] == f"rule:{f}:is_upper"
    assert len(judge.describe()["file_sha256"]) == 16


def test_user_function_errors_name_the_file(tmp_path: Path) -> None:
    f = tmp_path / "checks.py"
    f.write_text("def boom(completion, row):\n    raise ValueError('bad row')\n\ndef text(completion, row):\n    return 'yes'\n")
    with pytest.raises(RlhfError, match=r"checks.py: no function 'nope'") as e:
        build_judge(f"rule:{f}:nope", JudgeOptions())
    assert "boom, text" in (e.value.hint or "")
    with pytest.raises(RlhfError, match=r"checks.py: boom\(\) raised ValueError: bad row on in.jsonl:7"):
        scores(f"rule:{f}:boom", ["a", "b"])
    with pytest.raises(RlhfError, match=r"checks.py: text\(\) returned str on in.jsonl:7"):
        scores(f"rule:{f}:text", ["a", "b"])
    with pytest.raises(RlhfError, match="missing.py: no such file"):
        build_judge(f"rule:{tmp_path}/missing.py:fn", JudgeOptions())
    bad = tmp_path / "broken.py"
    bad.write_text("def f(:\n")
    with pytest.raises(RlhfError, match=r"broken.py: failed to import \(SyntaxError"):
        build_judge(f"rule:{bad}:f", JudgeOptions())


@pytest.mark.parametrize(
    ("spec", "message"),
    [("rule:regex:(unclosed", "bad regular expression"), ("rule:fuzzy", "unknown rule"), ("rule:", "unknown rule"), ("nope:x", "is not a judge")],
)
def test_bad_rule_specs(spec: str, message: str) -> None:
    with pytest.raises(RlhfError, match=message):
        build_judge(spec, JudgeOptions())


def test_rule_judge_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom rlhf_cli.judges import build_judge, JudgeOptions\n"
        "j = build_judge('rule:gsm8k', JudgeOptions())\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
