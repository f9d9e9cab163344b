"""Agreement with human labels: accuracy and Cohen's kappa against hand-computed tables, the
bootstrap interval, and the label adapters (PandaLM, LLMBar, our JSONL) on tiny hand-made files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import write_jsonl

from rlhf_cli.data.labels import read_items
from rlhf_cli.data.records import Item, content_id, parse_prompt_row
from rlhf_cli.errors import RlhfError
from rlhf_cli.judges.agreement import Label, LabelIndex, accuracy, agreement_report, bootstrap_ci, cohen_kappa, read_labels

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# 2x2 table, rows = human, columns = judge (0 = first answer better, 1 = second):
#              judge 0  judge 1
#   human 0       4        1        p_o = (4 + 3) / 10 = 0.7
#   human 1       2        3        P(human=0) = 0.5, P(judge=0) = 0.6
#   p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5   ->   kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
TABLE_2X2 = [(0, 0)] * 4 + [(1, 0)] + [(0, 1)] * 2 + [(1, 1)] * 3  # (judge, human)


def split(pairs: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    return [j for j, _ in pairs], [h for _, h in pairs]


def test_accuracy_and_kappa_2x2() -> None:
    judge, human = split(TABLE_2X2)
    assert accuracy(judge, human) == pytest.approx(0.7)
    assert cohen_kappa(judge, human, 2) == pytest.approx(0.4)


def test_kappa_three_classes() -> None:
    # human 0 0 0 0 1 1 1 2 2 2, judge 0 0 0 1 1 1 2 2 2 0: 7 agree -> p_o = 0.7
    # marginals human (.4, .3, .3), judge (.4, .3, .3): p_e = .16 + .09 + .09 = .34
    # kappa = (.7 - .34) / (1 - .34) = .36 / .66 = 0.54545...
    human = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    judge = [0, 0, 0, 1, 1, 1, 2, 2, 2, 0]
    assert cohen_kappa(judge, human, 3) == pytest.approx(0.36 / 0.66)
    # chance-level: a judge that always says 0 agrees 40% of the time, kappa exactly 0
    assert cohen_kappa([0] * 10, human, 3) == pytest.approx(0.0)
    # both raters use one class only: kappa is undefined
    assert math.isnan(cohen_kappa([1, 1], [1, 1], 2))


def test_bootstrap_interval_is_seeded_and_brackets_the_estimate() -> None:
    judge, human = split(TABLE_2X2)
    ci = bootstrap_ci(judge, human, 2, resamples=1000, seed=0)
    assert ci == bootstrap_ci(judge, human, 2, resamples=1000, seed=0)
    assert ci != bootstrap_ci(judge, human, 2, resamples=1000, seed=1)
    lo, hi = ci["accuracy_ci"]
    # n = 10, p = 0.7: binomial sd = sqrt(.21 / 10) = 0.145, so roughly 0.7 -/+ 0.28
    assert 0.3 <= lo <= 0.5 and 0.9 <= hi <= 1.0
    klo, khi = ci["kappa_ci"]
    assert -1.0 <= klo < 0.4 < khi <= 1.0
    # perfect agreement: every resample agrees perfectly (single-class resamples have no kappa)
    perfect = bootstrap_ci([0, 1] * 10, [0, 1] * 10, 2, resamples=200)
    assert perfect == {"accuracy_ci": [1.0, 1.0], "kappa_ci": [1.0, 1.0]}


def test_report_without_human_ties_scores_decided_pairs() -> None:
    pairs = TABLE_2X2 + [(2, 0), (2, 1)]  # the judge tied twice; humans never tie
    r = agreement_report(pairs, resamples=200)
    assert (r["classes"], r["matched"], r["n"], r["judge_ties"], r["human_ties"]) == (2, 12, 10, 2, 0)
    assert r["accuracy"] == pytest.approx(0.7) and r["kappa"] == pytest.approx(0.4)
    assert r["coverage"] == pytest.approx(10 / 12)
    assert r["accuracy_ties_half"] == pytest.approx((7 + 0.5 * 2) / 12)


def test_report_with_human_ties_uses_three_classes() -> None:
    pairs = [(0, 0), (1, 1), (2, 2), (2, 0), (0, 2)]
    r = agreement_report(pairs, resamples=200)
    # p_o = 3/5; judge marginals (2, 1, 2)/5, human (2, 1, 2)/5: p_e = (4 + 1 + 4)/25 = 0.36
    assert (r["classes"], r["n"]) == (3, 5)
    assert r["accuracy"] == pytest.approx(0.6)
    assert r["kappa"] == pytest.approx((0.6 - 0.36) / 0.64)
    assert "coverage" not in r
    assert agreement_report([], resamples=10)["accuracy"] is None


# ---------------------------------------------------------------------------------- adapters


def write_json(tmp_path: Path, name: str, rows: list[dict]) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(rows, indent=4))  # pretty-printed like the real files
    return path


def pandalm_row(idx: int, votes: tuple[int, int, int], r1: object = "first", r2: object = "second", inp: str = "ctx") -> dict:
    return {"idx": idx, "motivation_app": "app", "cmp_key": "a_b", "instruction": f"do {idx}", "input": inp,
            "response1": r1, "response2": r2, "annotator1": votes[0], "annotator2": votes[1], "annotator3": votes[2]}


def test_pandalm_adapter_majority_ties_and_lines(tmp_path: Path) -> None:
    path = write_json(tmp_path, "testset.json", [
        pandalm_row(0, (2, 2, 1)),          # majority 2: the second response is better -> 1
        pandalm_row(1, (1, 1, 1), inp=""),  # unanimous 1 -> 0; no input: the prompt is the instruction
        pandalm_row(2, (0, 0, 2)),          # majority tie
        pandalm_row(3, (0, 1, 2)),          # no majority -> tie
        pandalm_row(4, (1, 1, 2), r1=True, r2="True."),  # a JSON true answer, as in the real file
    ])
    fmt, items = read_items(str(path))
    assert fmt == "pandalm"
    assert [it.row["label"] for it in items] == [1, 0, "tie", "tie", 0]
    assert [it.id for it in items] == [0, 1, 2, 3, 4]
    assert items[0].prompt == "do 0\n\nctx" and items[1].prompt == "do 1"
    assert items[4].completions == ("True", "True.")
    # each element is reported at the line where it starts: "[" then 12 lines per element ({, 10 fields, })
    assert [it.where for it in items] == [f"{path}:{2 + 12 * k}" for k in range(5)]
    assert items[0].row["annotator3"] == 1 and "response1" not in items[0].row  # other fields pass through
    _, labels = read_labels(f"pandalm:{path}")
    assert [lab.cls for lab in labels] == [1, 0, 2, 2, 0]


def test_llmbar_adapter_and_content_ids(tmp_path: Path) -> None:
    rows = [{"input": "Say hi", "output_1": "hi", "output_2": "bye", "label": 1},
            {"input": "Count", "output_1": "1 2", "output_2": "1 2 3", "label": 2},
            {"input": "Say hi", "output_1": "hello", "output_2": "go", "label": 1}]
    path = write_json(tmp_path, "dataset.json", rows)
    fmt, labels = read_labels(str(path))
    assert fmt == "llmbar"
    assert [(lab.a, lab.b, lab.cls) for lab in labels] == [("hi", "bye", 0), ("1 2", "1 2 3", 1), ("hello", "go", 0)]
    # no ids in the file: the prompt's content hash, as `rlhf sample` assigns; a repeat gets -2
    hi = content_id(parse_prompt_row(_line({"prompt": "Say hi"})))
    assert [lab.id for lab in labels] == [hi, content_id(parse_prompt_row(_line({"prompt": "Count"}))), f"{hi}-2"]
    # as pairwise input the same rows become our labelled form
    _, items = read_items(str(path))
    assert items[1].row == {"prompt": "Count", "completions": ["1 2", "1 2 3"], "label": 1}


def _line(d: dict):
    from rlhf_cli.data.jsonl import Line

    return Line(d, "t", 1)


def test_our_jsonl_labels_and_errors(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, "labels.jsonl", [
        {"id": "a", "prompt": "p", "completions": ["x", "y"], "label": 0},
        {"id": "b", "messages": [{"role": "user", "content": "m"}], "completions": ["x", "y"], "label": "tie"},
    ])
    fmt, labels = read_labels(f"jsonl:{path}")
    assert fmt == "jsonl" and [(lab.id, lab.prompt, lab.cls) for lab in labels] == [("a", "p", 0), ("b", "m", 2)]
    bad = write_jsonl(tmp_path, "bad.jsonl", [{"prompt": "p", "completions": ["x", "y"], "label": 0},
                                              {"prompt": "q", "completions": ["x", "y"], "label": "A"}])
    with pytest.raises(RlhfError, match=r"bad.jsonl:2: 'label' must be 0"):
        read_labels(str(bad))
    three = write_jsonl(tmp_path, "three.jsonl", [{"prompt": "p", "completions": ["x", "y", "z"], "label": 0}])
    with pytest.raises(RlhfError, match=r"three.jsonl:1: a labelled row needs exactly 2 completions"):
        read_labels(str(three))
    unlabelled = write_jsonl(tmp_path, "s.jsonl", [{"prompt": "p", "completions": ["x", "y"]}])
    with pytest.raises(RlhfError, match="rows have no 'label'"):
        read_labels(str(unlabelled))


def test_adapter_errors_name_file_and_line(tmp_path: Path) -> None:
    path = write_json(tmp_path, "d.json", [{"input": "a", "output_1": "x", "output_2": "y", "label": 1},
                                           {"input": "b", "output_1": "x", "output_2": "y", "label": 3}])
    with pytest.raises(RlhfError, match=r"d.json:8: 'label' must be 1"):
        read_labels(str(path))
    pl = write_json(tmp_path, "p.json", [pandalm_row(0, (1, 1, 5))])
    with pytest.raises(RlhfError, match=r"p.json:2: annotator1..3 must each be"):
        read_labels(str(pl))
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"input": "a"},\n  {"input": oops}\n]')
    with pytest.raises(RlhfError, match=r"broken.json:3: malformed JSON"):
        read_items(str(broken))


def test_label_index_matches_by_id_or_content_in_either_order() -> None:
    labels = [Label("p1", "prompt one", "x", "y", 0, "l:1"), Label("other", "prompt two", "u", "v", 2, "l:2")]
    index = LabelIndex(labels)
    item = Item("p1", "a differently rendered prompt", ("y", "z", "x"), {})
    assert index.find(item, 2, 0) == 0  # by id: x (index 2) better than y
    assert index.find(item, 0, 2) == 1  # the same label seen from the other side
    assert index.find(item, 0, 1) is None  # y vs z: never labelled
    by_content = Item("zzz", "prompt two", ("v", "u"), {})
    assert index.find(by_content, 0, 1) == 2  # a tie stays a tie when swapped


@pytest.mark.skipif(not (SHARED / "pandalm").exists(), reason="shared datasets (../shared/data) are not on this machine")
def test_shared_label_sets_load_with_the_documented_counts() -> None:
    from collections import Counter

    _, pandalm = read_labels(str(SHARED / "pandalm" / "testset-v1.json"))
    # 999 items; majority of 3 annotators (README: 879 unanimous)
    assert len(pandalm) == 999
    assert Counter(lab.cls for lab in pandalm) == {0: 422, 1: 472, 2: 105}
    # LLMBar Natural: 100 items, label 1/2 = 42/58 (shared/data/README)
    _, natural = read_labels(str(SHARED / "llmbar" / "Dataset" / "LLMBar" / "Natural" / "dataset.json"))
    assert Counter(lab.cls for lab in natural) == {0: 42, 1: 58}
    _, mtbench = read_labels(str(SHARED / "llmbar" / "Dataset" / "Processed" / "MT-Bench" / "dataset.json"))
    assert Counter(lab.cls for lab in mtbench) == {0: 101, 1: 99}
