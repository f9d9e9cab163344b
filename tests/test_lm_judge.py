"""The lm judge on builtin:micro: P(A) is the softmax of the two choice logits (checked against a
direct model call), batching changes nothing, the two orders are separate questions, and the
pairwise template can be replaced (and is validated, naming the file)."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_cli.data.records import Item
from rlhf_cli.errors import RlhfError
from rlhf_cli.judges import build_judge
from rlhf_cli.judges.base import Ask, JudgeOptions
from rlhf_cli.judges.lm import LocalLMJudge
from rlhf_cli.judges.template import BUILTIN, load_template

ITEMS = [
    Item(id="p0", prompt="What is 2+2?", completions=("4", "The answer is five.", "2+2 = 4, since two and two make four."), row={}),
    Item(id="p1", prompt="Name a colour.", completions=("Blue.", "I like turtles"), row={}),
]


@pytest.fixture(scope="module")
def judge() -> LocalLMJudge:
    j = build_judge("lm:builtin:micro", JudgeOptions(batch_size=4, device="cpu"))
    assert isinstance(j, LocalLMJudge)
    return j


def hand_p_a(judge: LocalLMJudge, template, ask: Ask) -> float:
    """P(A) from one unpadded forward pass on hand-rendered text: the builtin tokenizer is
    byte-level, so the single-token choices are "a", "A" (ids 97, 65) and "b", "B" (98, 66);
    " a" is two bytes and does not count."""
    tok, model = judge.tok, judge.model
    text = tok.apply_chat_template(template.messages(ask.item.prompt, ask.a, ask.b), tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        z = model(input_ids=ids).logits[0, -1].double()  # (V,)
    mass_a = z[97].exp() + z[65].exp()
    mass_b = z[98].exp() + z[66].exp()
    return float(mass_a / (mass_a + mass_b))


def test_choice_tokens_and_describe(judge):
    d = judge.describe()
    assert d == {"kind": "lm", "name": "builtin:micro", "template": BUILTIN.hash, "choice_tokens": {"a": ["a", "A"], "b": ["b", "B"]}}
    assert [i for _, i in judge.choices["a"]] == [97, 65]


def test_p_a_is_the_softmax_of_the_choice_logits_in_both_orders(judge):
    ab, ba = Ask(ITEMS[0], 0, 1), Ask(ITEMS[0], 1, 0)
    got = dict(((a.first, a.second), v) for a, v in judge.judge([ab, ba]))
    p_ab, p_ba = got[(0, 1)].p_a, got[(1, 0)].p_a
    assert p_ab == pytest.approx(hand_p_a(judge, BUILTIN, ab), abs=1e-6)
    assert p_ba == pytest.approx(hand_p_a(judge, BUILTIN, ba), abs=1e-6)
    # two separate forward passes, not one number and its complement: an untrained model leans to
    # one letter whatever the order, so P(A|ab) + P(A|ba) is visibly off 1 (about 1.02 here)
    assert abs(p_ab + p_ba - 1) > 1e-3
    for v in got.values():
        assert v.winner == ("A" if v.p_a > 0.5 else "B")
        assert v.raw == f"p_a={v.p_a:.4f}" and v.cost == 0.0 and not v.cached
        assert v.usage["prompt_tokens"] > 100 and v.usage["completion_tokens"] == 0


def test_batched_equals_unbatched(judge):
    asks = [Ask(it, i, j) for it in ITEMS for i in range(len(it.completions)) for j in range(len(it.completions)) if i != j]
    batched = {(a.item.id, a.first, a.second): v.p_a for a, v in judge.judge(asks)}
    single = build_judge("lm:builtin:micro", JudgeOptions(batch_size=1, device="cpu"))
    one_by_one = {(a.item.id, a.first, a.second): v.p_a for a, v in single.judge(asks)}
    assert len(batched) == len(asks) == 8
    assert batched.keys() == one_by_one.keys()
    for k in batched:  # left padding, masks and positions leave each row's logits alone
        assert batched[k] == pytest.approx(one_by_one[k], abs=1e-5)


def test_template_override(tmp_path, judge):
    path = tmp_path / "tpl.txt"
    path.write_text("Q: {instruction}\n(a) {output_a}\n(b) {output_b}\nBetter, a or b?")
    j = build_judge("lm:builtin:micro", JudgeOptions(template=str(path), device="cpu"))
    tpl = load_template(str(path))
    assert tpl.system is None and j.describe()["template"] == tpl.hash != BUILTIN.hash
    ask = Ask(ITEMS[1], 1, 0)
    (_, v), = j.judge([ask])
    assert v.p_a == pytest.approx(hand_p_a(j, tpl, ask), abs=1e-6)

    js = tmp_path / "tpl.json"
    js.write_text(json.dumps({"system": "Judge {{fairly}}.", "user": "{instruction} | {output_a} | {output_b}"}))
    tj = load_template(str(js))
    assert tj.messages("i", "x{y}", "z") == [{"role": "system", "content": "Judge {fairly}."}, {"role": "user", "content": "i | x{y} | z"}]


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("missing.txt", "{instruction} {output_a}", r"never shows \{output_b\}"),
    ("unknown.txt", "{instruction} {output_a} {output_b} {reference}", r"unknown template field \{reference\}"),
    ("positional.txt", "{instruction} {output_a} {output_b} {}", r"unknown template field \{\}"),
    ("brace.txt", "{instruction} {output_a} {output_b} }", "bad template: Single '}'"),
    ("bad.json", '{"user": 3}', 'needs a "user" string'),
    ("broken.json", '{"user": ', "broken.json:1: not valid JSON"),
])
def test_bad_template_is_an_error_naming_the_file(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(RlhfError, match=expected) as err:
        build_judge("lm:builtin:micro", JudgeOptions(template=str(path)))  # fails before any model loads
    assert str(err.value).startswith(str(path))


def test_too_long_outputs_are_cut_to_fit(judge, monkeypatch):
    monkeypatch.setattr(judge, "max_len", 700)
    it = Item(id="long", prompt="Say hi.", completions=("hi " * 400, "hello " * 300), row={})
    (_, v), = judge.judge([Ask(it, 0, 1)])
    assert v.raw.endswith(" truncated") and 600 < v.usage["prompt_tokens"] <= 700
    monkeypatch.setattr(judge, "max_len", 50)  # not even the question fits
    with pytest.raises(RlhfError, match="longer than the judge's context"):
        list(judge.judge([Ask(it, 0, 1)]))
