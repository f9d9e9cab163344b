"""`rlhf eval mc`: lm-eval's MMLU prompts, the shared-context log-likelihood against a naive
full-sequence reference, acc / acc_norm, MMLU CSV + JSONL input, and the CLI end to end.

Models: `lively`, builtin:micro re-initialised with larger weights so log-probs differ clearly
between tokens (a fresh builtin:micro is close to uniform, which would hide indexing mistakes).
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch
from conftest import write_jsonl

from rlhf_cli.cli import main
from rlhf_cli.errors import RlhfError
from rlhf_cli.evals import loglik, mc
from rlhf_cli.evals.loglik import Request
from rlhf_cli.evals.mc import McConfig, Question, build_prompt, choose, encode_pair, load_questions

HEADER = "question,choice0,choice1,choice2,choice3,answer\n"


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return (0 if e.value.code is None else e.value.code), out, err


def q(question: str, choices: list[str], answer: int, subject: str = "high_school_physics") -> Question:
    return Question(0, subject, question, tuple(choices), answer, "t:1")


@pytest.fixture(scope="module")
def lively(tok: Any) -> Any:
    from rlhf_cli.models.builtin import build_model

    model = build_model("micro", len(tok), tok).eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name else 2 / p.shape[1] ** 0.5)
    return model


def mmlu_dir(root: Path) -> tuple[Path, Path]:
    """test/ and dev/ with two subjects; one question quotes a comma and spans two lines."""
    test, dev = root / "test", root / "dev"
    test.mkdir(parents=True)
    dev.mkdir(parents=True)
    (test / "anatomy_test.csv").write_text(HEADER + '"Which bone, if any, is in the ear?",stapes,femur,ulna,tibia,0\n'
                                           '"Two\nlines?",a,b,c,d,3\nWhat is 2+2?,3,4,5,6,1\n')
    (test / "virology_test.csv").write_text(HEADER + "What is a virus?,a cell,a particle,a plant,a fungus,1\n")
    for s in ("anatomy", "virology"):
        (dev / f"{s}_dev.csv").write_text(HEADER + f"{s} one?,w,x,y,z,2\n{s} two?,w,x,y,z,0\n{s} three?,w,x,y,z,1\n")
    return test, dev


# ---------------------------------------------------------------- prompts


def test_two_shot_prompt_is_lm_eval_mmlu_exactly():
    # lm_eval/tasks/mmlu/default/_default_template_yaml:
    #   doc_to_text: "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
    #   doc_to_choice: ["A", "B", "C", "D"]; fewshot_split: dev, sampler first_n; target_delimiter " ", fewshot_delimiter "\n\n"
    # mmlu_high_school_physics.yaml: description "The following are multiple choice questions (with answers) about high school physics.\n\n"
    shots = [q("  What is the unit of force? ", ["joule", "newton", "watt", "pascal"], 1),
             q("Light is a", ["wave", "particle", "both", "neither"], 2)]
    query = q("What is g on Earth?\n", ["9.8 m/s^2", "1 m/s^2", "0 m/s^2", "98 m/s^2"], 0)
    expected = (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "What is the unit of force?\nA. joule\nB. newton\nC. watt\nD. pascal\nAnswer: B\n\n"
        "Light is a\nA. wave\nB. particle\nC. both\nD. neither\nAnswer: C\n\n"
        "What is g on Earth?\nA. 9.8 m/s^2\nB. 1 m/s^2\nC. 0 m/s^2\nD. 98 m/s^2\nAnswer:"
    )
    assert build_prompt(query, shots, "letter") == expected
    # lm_eval/tasks/mmlu/continuation/_continuation_template_yaml: "Question: {{question.strip()}}\nAnswer:",
    # doc_to_choice "{{choices}}"; description "The following are questions (with answers) about ...\n\n"
    assert build_prompt(query, shots[:1], "cloze") == (
        "The following are questions (with answers) about high school physics.\n\n"
        "Question: What is the unit of force?\nAnswer: newton\n\n"
        "Question: What is g on Earth?\nAnswer:"
    )
    assert build_prompt(q("Hi?", ["x", "y"], 0, subject=""), [], "letter") == "Hi?\nA. x\nB. y\nAnswer:"


def test_encode_pair_moves_trailing_whitespace_like_lm_eval(tok):
    # byte-level tokenizer: one id per byte. "Answer: " + "A" -> context "Answer:", continuation " A"
    ctx, conts = encode_pair(tok, "Answer: ", ["A", "BC"])
    assert ctx == list(b"Answer:") and conts == [[32, 65], [32, 66, 67]]
    ctx, conts = encode_pair(tok, "Q\nAnswer:", [" A"])
    assert ctx == list(b"Q\nAnswer:") and conts == [[32, 65]]


def test_chat_context_is_lm_eval_multiturn_few_shot(tok):
    # lm-eval --apply_chat_template (fewshot_as_multiturn on by default): description -> system turn,
    # each shot -> user (its doc_to_text) + assistant (its answer), the question -> last user turn
    text = mc.chat_context(tok, q("Hi?", ["x", "y"], 0, subject="anatomy"), [q("Yo?", ["u", "v"], 1)], "letter")
    assert text == ("<|im_start|>system\nThe following are multiple choice questions (with answers) about anatomy.\n\n<|im_end|>\n"
                    "<|im_start|>user\nYo?\nA. u\nB. v\nAnswer:<|im_end|>\n<|im_start|>assistant\nB<|im_end|>\n"
                    "<|im_start|>user\nHi?\nA. x\nB. y\nAnswer:<|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------- log-likelihood: fast path == reference


def random_requests(n: int, seed: int, max_cont: int) -> list[Request]:
    """Contexts = a shared 30-token prefix + 1..12 own tokens (two groups), 2-4 continuations of 1..max_cont tokens."""
    rng = random.Random(seed)
    prefix = [rng.randrange(256) for _ in range(30)]
    out = []
    for i in range(n):
        ctx = prefix + [rng.randrange(256) for _ in range(rng.randint(1, 12))]
        conts = [[rng.randrange(256) for _ in range(rng.randint(1, max_cont))] for _ in range(rng.randint(2, 4))]
        out.append(Request(ctx, conts, "a" if i < n - 2 else "b"))
    return out


def flat(x: list[list[float]]) -> torch.Tensor:
    return torch.tensor(list(itertools.chain(*x)))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_shared_context_equals_naive_full_sequences(lively, batch_size):
    reqs = random_requests(7, 0, max_cont=5)
    naive = flat(loglik.loglik_naive(lively, reqs, 4, "cpu", 2048))
    shared = flat(loglik.loglik_shared(lively, reqs, batch_size, "cpu", 2048))
    assert naive.abs().min() > 1  # real, distinct numbers (sums of several log-probs of a peaked model)
    assert torch.allclose(shared, naive, rtol=1e-5, atol=1e-4)
    # nothing in common, one request per group, and the empty group: no prefix cache at all
    rng = random.Random(1)
    solo = [Request([rng.randrange(256) for _ in range(rng.randint(1, 9))], r.continuations, str(i % 3)) for i, r in enumerate(reqs)]
    assert torch.allclose(flat(loglik.loglik_shared(lively, solo, batch_size, "cpu", 2048)),
                          flat(loglik.loglik_naive(lively, solo, 4, "cpu", 2048)), rtol=1e-5, atol=1e-4)


def test_over_long_requests_are_truncated_from_the_left_like_lm_eval(lively):
    reqs = random_requests(4, 2, max_cont=3)
    # max_len 20 < 31+ tokens: (context + continuation)[-21:][:-1], exactly what loglik_naive feeds
    r = reqs[0]
    whole = (r.context + r.continuations[0])[-21:]
    logp = lively(input_ids=torch.tensor([whole[:-1]])).logits.float().log_softmax(-1)[0]
    n = len(r.continuations[0])
    by_hand = sum(logp[len(whole) - 1 - n + k, t].item() for k, t in enumerate(r.continuations[0]))
    assert loglik.loglik_shared(lively, reqs, 2, "cpu", 20)[0][0] == pytest.approx(by_hand, abs=1e-4)


def test_letter_fast_path_reads_all_choices_from_one_position(lively, monkeypatch):
    reqs = [Request(r.context, [[65], [66], [67], [68]], r.group) for r in random_requests(6, 3, max_cont=1)]
    calls = []
    real = loglik._forward

    def spy(*args: Any, **kw: Any) -> Any:
        calls.append(kw["last_only"])
        return real(*args, **kw)

    monkeypatch.setattr(loglik, "_forward", spy)
    fast = flat(loglik.loglik_shared(lively, reqs, 3, "cpu", 2048))
    # group "a": prefix + 2 batches, group "b": prefix + 1 batch; no continuation pass anywhere
    assert calls == [False, True, True, False, True]
    assert torch.allclose(fast, flat(loglik.loglik_naive(lively, reqs, 8, "cpu", 2048)), rtol=1e-5, atol=1e-4)


def test_common_prefix_leaves_every_context_a_token():
    assert loglik.common_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert loglik.common_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # identical contexts still keep their last token
    assert loglik.common_prefix([[7], [7, 8]]) == 0


# ---------------------------------------------------------------- metrics


def test_choose_acc_and_length_normalised_acc_norm():
    # lls [-3, -4, -9]; lengths [2, 8, 30] chars -> per char [-1.5, -0.5, -0.3]: acc picks 0, acc_norm picks 2
    assert choose([-3.0, -4.0, -9.0], [2, 8, 30]) == (0, 2)
    assert choose([-2.0, -2.0, -5.0], [1, 1, 1]) == (0, 0)  # ties: the first index, as np.argmax


def test_acc_and_acc_norm_with_a_fake_scorer(tmp_path, monkeypatch):
    rows = [{"question": f"q{i}", "choices": ["ab", "abcdefgh"], "answer": a, "subject": s}
            for i, (a, s) in enumerate([(0, "x"), (1, "x"), (1, "y"), (0, "y")])]
    data = write_jsonl(tmp_path, "q.jsonl", rows)
    # lls per question; len("ab") = 2, len("abcdefgh") = 8
    lls = [[-1.0, -2.0],   # acc: 0 (right)  norm: -0.5 vs -0.25 -> 1 (wrong)
           [-1.0, -2.0],   # acc: 0 (wrong)  norm -> 1 (right)
           [-3.0, -1.0],   # acc: 1 (right)  norm: -1.5 vs -0.125 -> 1 (right)
           [-1.0, -9.0]]   # acc: 0 (right)  norm: -0.5 vs -1.125 -> 0 (right)
    monkeypatch.setattr(mc, "loglik_shared", lambda model, reqs, *a, **k: lls)
    (res,) = mc.run(McConfig(data=str(data), models=("builtin:micro",), scoring="cloze", device="cpu"))
    # acc = 3/4, se = sqrt(var([1,0,1,1]) / 4) = sqrt(0.25 / 4) = 0.25; acc_norm = 3/4 likewise ([0,1,1,1])
    assert res.metrics == pytest.approx({"acc": 0.75, "acc_stderr": 0.25, "acc_norm": 0.75, "acc_norm_stderr": 0.25})
    assert res.primary == "acc_norm"
    assert res.extra["subjects"] == {"x": {"n": 2, "acc": 0.5, "acc_norm": 0.5}, "y": {"n": 2, "acc": 1.0, "acc_norm": 1.0}}
    assert res.extra["acc_macro"] == 0.75 and res.extra["acc_norm_macro"] == 0.75
    assert [s["extracted"] for s in res.samples] == [0, 0, 1, 0] and [s["pred_norm"] for s in res.samples] == [1, 1, 1, 0]
    assert res.samples[0]["input"] == "The following are questions (with answers) about x.\n\nQuestion: q0\nAnswer:"


# ---------------------------------------------------------------- input


def test_mmlu_csv_header_int_answer_subject_from_file_name(tmp_path):
    test, dev = mmlu_dir(tmp_path)
    qs = load_questions(str(test), {})
    assert [(x.subject, x.answer) for x in qs] == [("anatomy", 0), ("anatomy", 3), ("anatomy", 1), ("virology", 1)]
    assert qs[0].question == "Which bone, if any, is in the ear?" and qs[0].choices == ("stapes", "femur", "ulna", "tibia")
    assert qs[1].question == "Two\nlines?" and qs[2].where == f"{test / 'anatomy_test.csv'}:5"  # header, row, 2-line row
    assert [x.id for x in qs] == ["anatomy/0", "anatomy/1", "anatomy/2", "virology/0"]
    assert len(load_questions(str(dev), {}, split="dev")) == 6
    assert mc.select(qs, ("anatomy",), 2, "d") == qs[:2]
    assert mc.select(qs, (), 1, "d") == [qs[0], qs[3]]  # --limit is per subject
    with pytest.raises(RlhfError, match="no questions for subject"):
        mc.select(qs, ("astronomy",), None, "d")


def test_original_headerless_csv_with_letter_answers(tmp_path):
    path = tmp_path / "astronomy_test.csv"
    path.write_text("What orbits Earth?,Moon,Sun,Mars,Venus,A\nHot star colour?,red,blue,,green,B\n")
    with pytest.raises(RlhfError, match=rf"{path}:2: every choice must be a non-empty string"):
        load_questions(str(path), {})
    path.write_text("What orbits Earth?,Moon,Sun,Mars,Venus,A\nHot star colour?,red,blue,white,green,B\n")
    assert [(x.subject, x.answer) for x in load_questions(str(path), {})] == [("astronomy", 0), ("astronomy", 1)]


@pytest.mark.parametrize(("row", "message"), [
    ("Q?,a,b,c,d,4", "answer '4' is not a choice index 0..3"),
    ("Q?,a,b,c,d,E", "answer 'E' is not a choice index"),
    ("Q?,a,b,c,1", "5 columns, the header has 6"),
    (",a,b,c,d,1", "the question is missing or empty"),
])
def test_bad_csv_rows_exit_2_naming_file_and_line(tmp_path, capsys, row, message):
    path = tmp_path / "anatomy_test.csv"
    path.write_text(HEADER + "Fine?,a,b,c,d,0\n" + row + "\n")
    code, out, err = call(["eval", "mc", str(path), "-m", "builtin:micro"], capsys)
    assert code == 2 and out == ""
    assert f"{path}:3: {message}" in " ".join(err.split())


def test_jsonl_with_field_mapping(tmp_path):
    rows = [{"prompt": "Pick B", "options": ["a", "b", "c"], "label": "B", "topic": "letters", "id": "x1"},
            {"prompt": "Pick 0", "options": ["a", "b"], "label": 0}]
    path = write_jsonl(tmp_path, "q.jsonl", rows)
    fields = {"question": "prompt", "choices": "options", "answer": "label", "subject": "topic"}
    qs = load_questions(str(path), fields)
    assert [(x.id, x.subject, x.choices, x.answer) for x in qs] == [("x1", "letters", ("a", "b", "c"), 1), (1, "", ("a", "b"), 0)]
    with pytest.raises(RlhfError, match=r"q.jsonl:1: no 'question' field") as e:
        load_questions(str(path), {})
    assert "--field question=COLUMN" in e.value.hint


def test_shots_need_dev_rows_for_every_subject(tmp_path):
    test, dev = mmlu_dir(tmp_path)
    (dev / "virology_dev.csv").unlink()
    with pytest.raises(RlhfError, match=r"0 dev examples for subject 'virology', --shots wants 2"):
        mc.load_data(McConfig(data=str(test), dev=str(dev), shots=2))
    with pytest.raises(RlhfError, match="--shots 2 needs --dev"):
        mc.load_data(McConfig(data=str(test), shots=2))
    questions, shots = mc.load_data(McConfig(data=str(test), dev=str(dev), shots=2, subjects=("anatomy",)))
    assert len(questions) == 3 and [s.question for s in shots["anatomy"]] == ["anatomy one?", "anatomy two?"]


# ---------------------------------------------------------------- CLI end to end


def test_cli_two_models_one_json_line_table_and_sample_log(tmp_path, capsys, tok, lively):
    from rlhf_cli.models.checkpoint import save_checkpoint

    test, dev = mmlu_dir(tmp_path)
    other = save_checkpoint(lively, tok, tmp_path / "lively", {"step": "test"})
    log = tmp_path / "samples.jsonl"
    code, out, err = call(["eval", "mc", str(test), "--dev", str(dev), "--shots", "2", "-m", "builtin:micro",
                           "-m", str(other), "--log-samples", str(log), "--device", "cpu"], capsys)
    assert code == 0, err
    assert out.count("\n") == 1
    summary = orjson.loads(out)
    assert summary["kind"] == "mc" and [r["model"] for r in summary["results"]] == ["builtin:micro", str(other)]
    samples = [orjson.loads(x) for x in log.read_bytes().splitlines()]
    assert len(samples) == 8 and {s["model"] for s in samples} == {"builtin:micro", str(other)}
    for r in summary["results"]:
        mine = [s for s in samples if s["model"] == r["model"]]
        assert r["n"] == 4 and r["acc"] == pytest.approx(sum(s["score"] for s in mine) / 4)
        assert set(r["subjects"]) == {"anatomy", "virology"} and r["shots"] == 2 and r["scoring"] == "letter"
        assert all(s["extracted"] == max(range(4), key=lambda k: (s["loglikelihoods"][k], -k)) for s in mine)
    first = samples[0]
    assert first["input"].startswith("The following are multiple choice questions (with answers) about anatomy.\n\n"
                                      "anatomy one?\nA. w\nB. x\nC. y\nD. z\nAnswer: C\n\nanatomy two?")
    assert first["input"].endswith("Which bone, if any, is in the ear?\nA. stapes\nB. femur\nC. ulna\nD. tibia\nAnswer:")
    assert "rlhf eval mc" in err and "acc_norm" in err


def test_help_lists_the_examples(capsys):
    code, out, _ = call(["eval", "mc", "--help"], capsys)
    assert code == 0 and "rlhf eval mc mmlu/test/ --dev mmlu/dev/ -m sft/" in out and "--shared-context" in out
