"""`rlhf eval exact`, `rm` and `ppl`, and the shared output of every kind (evals/base.py)."""

from __future__ import annotations

import math

import orjson
import pytest
import torch
from conftest import accuracy_bounds, write_jsonl

from rlhf_cli.cli import main
from rlhf_cli.config import build
from rlhf_cli.evals import exact, ppl
from rlhf_cli.evals import rm as rm_eval
from rlhf_cli.evals.base import EvalResult, mean_stderr, parse_fields, report
from rlhf_cli.evals.exact import ExactConfig, Problem, build_prompt, extract_target, extractor, majority


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return (0 if e.value.code is None else e.value.code), out, err


# ---------------------------------------------------------------- shared output


def test_mean_stderr_by_hand():
    # [1, 0, 1, 1]: mean 0.75, sample var = (3 * 0.0625 + 0.5625) / 3 = 0.25, se = sqrt(0.25 / 4) = 0.25
    assert mean_stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx((0.75, 0.25))
    assert math.isnan(mean_stderr([1.0])[1]) and math.isnan(mean_stderr([])[0])


def test_report_prints_one_json_line_and_writes_samples_and_plot(tmp_path, capsys):
    results = [EvalResult("exact", m, {"exact_match": v, "exact_match_stderr": 0.1}, 2, "exact_match",
                          [{"id": 0, "score": v}]) for m, v in (("base", 0.25), ("sft", 0.75))]
    out = report(results, "data.jsonl", str(tmp_path / "s.jsonl"), str(tmp_path / "p.png"))
    stdout, stderr = capsys.readouterr()
    assert stdout.count("\n") == 1 and orjson.loads(stdout) == out
    assert [r["exact_match"] for r in out["results"]] == [0.25, 0.75]
    assert "0.7500 ± 0.1000" in stderr
    rows = [orjson.loads(x) for x in (tmp_path / "s.jsonl").read_bytes().splitlines()]
    assert rows == [{"model": "base", "id": 0, "score": 0.25}, {"model": "sft", "id": 0, "score": 0.75}]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parse_fields():
    assert parse_fields(["question=problem", "answer=solution"], ("question", "answer")) == {"question": "problem", "answer": "solution"}
    from rlhf_cli.errors import RlhfError

    with pytest.raises(RlhfError, match="expected NAME=COLUMN"):
        parse_fields(["question"], ("question",))
    with pytest.raises(RlhfError, match="unknown name 'q'"):
        parse_fields(["q=x"], ("question",))


# ---------------------------------------------------------------- exact: extraction


@pytest.mark.parametrize(("spec", "text", "want"), [
    ("gsm8k", "so 3 + 4 = 7 apples.\n#### 1,234", "1234"),
    ("gsm8k", "#### -3.50", "-3.5"),
    ("gsm8k", "no marker, the answer is 42 and then 7", "7"),  # lm-eval's flexible fallback: the last number
    ("gsm8k", "no number here", None),
    ("last-number", "It costs $1,000.00 in 2024", "2024"),
    ("last-number", "between 5 and 6.0", "6"),
    ("exact", "  Paris \n", "Paris"),
    ("regex:answer is (\\w+)", "I think the answer is B, or the answer is C.", "C"),
    ("regex:[A-D]", "B", "B"),
    ("regex:answer is (\\w+)", "no idea", None),
    # lm-eval gsm8k's strict-match: the FIRST "#### N" only; "$", "," and a final "." dropped as its metric does
    ("strict", "x #### 1,234.\n#### 9", "1234"),
    ("strict", "#### $5", None),  # lm-eval's regex allows no "$" after "#### "
    ("strict", "the answer is 42", None),
    # flexible-extract: the LAST run of [$0-9.,] of length >= 2, else the last lone digit
    ("flexible", "She pays $18. Then 3 more", "3"),
    ("flexible", "She pays $1,800.", "1800"),
    ("flexible", "so -7 apples", "-7"),
    ("flexible", "nothing", None),
])
def test_extraction_edge_cases(spec, text, want):
    assert extractor(spec)(text) == want


def test_reference_targets_and_comparison():
    ex = extractor("gsm8k")
    assert extract_target("Janet sells 9 eggs <<16-3-4=9>>.\n#### 18", ex) == "18"
    assert extract_target("68", extractor("exact")) == "68"
    assert exact.is_correct("18.0", "18") and exact.is_correct("1,000", "1000") and not exact.is_correct(None, "18")
    assert exact.is_correct("paris.", "Paris") and not exact.is_correct("3.5", "35")


def test_majority_vote_ignores_failures_and_breaks_ties_by_first_seen():
    assert majority(["7", None, "8", "7.0", None]) == "7"  # "7" and "7.0" are one answer
    assert majority(["8", "7", "7", "8"]) == "8"  # 2-2: the first seen wins
    assert majority([None, None]) is None


def test_prompt_follows_lm_eval_gsm8k_layout():
    shots = [Problem(0, "What is 1+1?", "1+1=2\n#### 2", "2"), Problem(1, "What is 2+3?", "#### 5", "5")]
    # lm-eval gsm8k: doc_to_text "Question: {{question}}\nAnswer:", target " {{answer}}", fewshot_delimiter "\n\n"
    assert build_prompt("What is 4+4?", shots, "raw") == (
        "Question: What is 1+1?\nAnswer: 1+1=2\n#### 2\n\nQuestion: What is 2+3?\nAnswer: #### 5\n\nQuestion: What is 4+4?\nAnswer:"
    )
    chat = build_prompt("What is 4+4?", shots[:1], "chat")
    assert chat == [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "1+1=2\n#### 2"},
                    {"role": "user", "content": "What is 4+4?"}]
    # lm-eval --apply_chat_template --fewshot_as_multiturn: user = doc_to_text, assistant = the answer
    chat = build_prompt("What is 4+4?", shots[:1], "chat", "Question: {question}\nAnswer:")
    assert chat == [{"role": "user", "content": "Question: What is 1+1?\nAnswer:"}, {"role": "assistant", "content": "1+1=2\n#### 2"},
                    {"role": "user", "content": "Question: What is 4+4?\nAnswer:"}]
    assert build_prompt("4+4", shots[:1], "raw", "Q: {question} =") == "Q: What is 1+1? = 1+1=2\n#### 2\n\nQ: 4+4 ="


def test_gsm8k_rows_and_field_mapping_and_bad_rows(tmp_path):
    from rlhf_cli.errors import RlhfError

    gsm = write_jsonl(tmp_path, "gsm.jsonl", [{"question": "q1", "answer": "work\n#### 72"}])
    assert exact.load_problems(str(gsm), {}, extractor("gsm8k")) == [Problem(0, "q1", "work\n#### 72", "72")]
    other = write_jsonl(tmp_path, "o.jsonl", [{"problem": "q", "solution": 5, "uid": "a"}])
    got = exact.load_problems(str(other), {"question": "problem", "answer": "solution", "id": "uid"}, extractor("gsm8k"))
    assert got == [Problem("a", "q", "5", "5")]
    bad = write_jsonl(tmp_path, "bad.jsonl", [{"question": "q1", "answer": "#### 1"}, {"question": "q2"}])
    with pytest.raises(RlhfError, match=r"bad.jsonl:2: no reference answer in field 'answer'"):
        exact.load_problems(str(bad), {}, extractor("gsm8k"))


def test_exact_cli_errors_exit_2(tmp_path, capsys):
    data = write_jsonl(tmp_path, "d.jsonl", [{"prompt": "1+1", "answer": "2"}])
    code, out, err = call(["eval", "exact", str(data), "-m", "builtin:micro", "--shots", "2"], capsys)
    assert code == 2 and out == "" and "--shots 2 needs --fewshot FILE" in err
    code, _, err = call(["eval", "exact", str(data), "-m", "builtin:micro", "--extract", "regex:("], capsys)
    assert code == 2 and "bad regular expression" in err
    code, _, err = call(["eval", "exact", str(data), "-m", "builtin:micro", "-n", "3"], capsys)
    assert code == 2 and "use a temperature > 0" in err
    code, _, err = call(["eval", "exact", str(data), "-m", "builtin:micro", "--question-template", "Q:"], capsys)
    assert code == 2 and "--question-template 'Q:' has no {question}" in err
    code, _, err = call(["eval", "exact", str(data), "-m", "builtin:micro", "-t", "-0.5"], capsys)
    assert code == 2 and "--temperature must be >= 0; got -0.5" in err
    code, _, err = call(["eval", "exact", str(data), "--format", "plain"], capsys)
    assert code == 2 and "--format must be one of chat, raw" in err


def test_exact_end_to_end_two_models_majority_vote(tmp_path, capsys, monkeypatch):
    """Plumbing on builtin:micro; correctness of the scoring with a generate() that answers from a table."""
    from rlhf_cli import generation
    from rlhf_cli.generation import Completion

    data = write_jsonl(tmp_path, "d.jsonl", [{"id": i, "prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(4)])
    # sample k of question i answers i+1 when k < i (so question 0 never, question 3 in 3 of 4 samples)
    def fake_generate(model, tok, prompts, params, device, seed, logprobs=False):
        out = []
        for p in prompts:
            i = int(tok.decode(p).split("What is ")[1].split("+")[0])
            out.append([Completion(str(i + 1) if k < i else "0", "stop", [1]) for k in range(params.n)])
        return out

    monkeypatch.setattr(generation, "generate", fake_generate)
    cfg = ExactConfig(data=str(data), models=("builtin:micro", "builtin:micro"), extract="exact", format="chat", n=4,
                      temperature=1.0, max_new_tokens=4, device="cpu", log_samples=str(tmp_path / "s.jsonl"))
    results = exact.run(cfg)
    # majority: q0 "0"; q1 1-3 -> "0"; q2 2-2 -> first seen "3" correct; q3 3-1 correct -> 2/4
    # single samples: (0 + 1 + 2 + 3) / 16 = 0.375
    assert results[0].metrics["exact_match"] == 0.5 and results[0].metrics["sample_accuracy"] == 0.375
    assert len((tmp_path / "s.jsonl").read_bytes().splitlines()) == 8
    out = orjson.loads(capsys.readouterr().out)
    assert [r["exact_match"] for r in out["results"]] == [0.5, 0.5]


def test_exact_stop_strings_default_to_lm_eval_and_stop_replaces_them(tmp_path, monkeypatch, capsys):
    from rlhf_cli import generation
    from rlhf_cli.generation import Completion

    seen = []
    prompts_seen = []

    def fake_generate(model, tok, prompts, params, device, seed, logprobs=False):
        seen.append(params.stop)
        prompts_seen.append(tok.decode(prompts[0]))
        return [[Completion("#### 2", "stop", [1])] for _ in prompts]

    monkeypatch.setattr(generation, "generate", fake_generate)
    data = write_jsonl(tmp_path, "d.jsonl", [{"question": "1+1", "answer": "#### 2"}])
    for fmt, stop, want in (("raw", None, ("Question:", "</s>", "<|im_end|>")), ("chat", None, ()), ("raw", ("\n\n",), ("\n\n",))):
        res = exact.run(ExactConfig(data=str(data), models=("builtin:micro",), format=fmt, stop=stop, device="cpu"))
        assert seen[-1] == want and res[0].metrics["exact_match"] == 1.0
    # a typed "\\n" in --question-template is a newline
    code, _, err = call(["eval", "exact", str(data), "-m", "builtin:micro", "--question-template", "Q: {question}\\nA:"], capsys)
    assert code == 0 and "Q: 1+1\nA:" in prompts_seen[-1], err
    # the old spelling --template still works for one release, with a warning
    code, _, err = call(["eval", "exact", str(data), "-m", "builtin:micro", "--template", "Task {question}\\nA:"], capsys)
    assert code == 0 and "Task 1+1\nA:" in prompts_seen[-1]
    assert "--template is deprecated" in " ".join(err.split()) and "--question-template" in err


def test_exact_real_generation_runs(tmp_path, capsys):
    data = write_jsonl(tmp_path, "d.jsonl", [{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(3)])
    code, out, err = call(["eval", "exact", str(data), "-m", "builtin:micro", "--max-new-tokens", "3", "--device", "cpu"], capsys)
    assert code == 0, err
    row = orjson.loads(out)["results"][0]
    assert row["n"] == 3 and row["exact_match"] == 0.0  # a random model


# ---------------------------------------------------------------- rm


def test_rm_pair_metrics_by_hand():
    pairs = [rm_eval.Pair("p", c, r, False, "") for c, r in (("long answer", "x"), ("y", "longer one"), ("a", "b"), ("cc", "c"))]
    # rewards: pair 0 right, pair 1 wrong, pair 2 tie (1/2), pair 3 right -> accuracy (1 + 0 + 0.5 + 1) / 4 = 0.625
    r_c, r_r = [2.0, 0.0, 1.0, 3.0], [1.0, 1.0, 1.0, 0.0]
    m = rm_eval.pair_metrics(r_c, r_r, pairs)
    assert m["accuracy"] == 0.625
    assert m["margin"] == pytest.approx((1 - 1 + 0 + 3) / 4)
    # unequal lengths: pairs 0 (chosen longer), 1 (rejected longer), 3 (chosen longer); the labels pick the longer 2/3;
    # the RM (ties excluded): pair 0 prefers longer, pair 1 prefers the rejected = longer, pair 3 longer -> 3/3
    assert m["labels_prefer_longer"] == pytest.approx(2 / 3) and m["prefers_longer"] == 1.0
    assert rm_eval.pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert math.isnan(rm_eval.pearson([1.0, 1.0], [1.0, 2.0]))


def test_rm_eval_ranking_rows_expand_to_ordered_pairs(tmp_path):
    data = write_jsonl(tmp_path, "r.jsonl", [{"prompt": "q", "ranking": [["a"], ["b", "c"], ["d"]]},
                                             {"prompt": "q", "chosen": "x", "rejected": "y", "tie": True}])
    pairs = rm_eval.load_pairs(str(data), None)
    assert [(p.chosen, p.rejected) for p in pairs] == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"), ("c", "d")]


def test_rm_eval_field_mapping(tmp_path, capsys):
    # "chosen" exists in the file but is not the answer column: the mapping wins over the column name
    data = write_jsonl(tmp_path, "m.jsonl", [{"question": "q1", "good": "a", "bad": "b", "chosen": "ignore me"}])
    pairs = rm_eval.load_pairs(str(data), None, {"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert [(p.prompt, p.chosen, p.rejected, p.raw) for p in pairs] == [("q1", "a", "b", False)]
    code, out, err = call(["eval", "rm", str(data), "-m", "x/", "--field", "answer=good"], capsys)
    assert code == 2 and out == "" and "unknown name 'answer'" in err


def test_rm_eval_matches_direct_scoring(tmp_path, capsys):
    from rlhf_cli.commands.train_rm import RmConfig
    from rlhf_cli.commands.train_rm import run as train_rm
    from rlhf_cli.models.reward import load_for_scoring, score

    prefs = write_jsonl(tmp_path, "p.jsonl", [{"prompt": f"What is {i}+1?", "chosen": str(i + 1), "rejected": str(i + 7) * (1 + i % 3)}
                                             for i in range(12)])
    train_rm(build(RmConfig, data=str(prefs), out=str(tmp_path / "rm"), model="builtin:micro", max_steps=3, batch_size=4, lr=1e-2,
                      save_every=0, device="cpu", max_len=64))
    (res,) = rm_eval.run(rm_eval.RmEvalConfig(str(prefs), (str(tmp_path / "rm"),), device="cpu"))
    model, tok, _ = load_for_scoring(str(tmp_path / "rm"))
    rows = [orjson.loads(x) for x in prefs.read_bytes().splitlines()]
    rc = score(model, tok, [r["prompt"] for r in rows], [r["chosen"] for r in rows], device="cpu", max_len=64)
    rr = score(model, tok, [r["prompt"] for r in rows], [r["rejected"] for r in rows], device="cpu", max_len=64)
    # eval rm batches differently from score(): a pair within TIE_TOL of a tie may fall either way (or count 1/2)
    lo, hi = accuracy_bounds([c - r for c, r in zip(rc, rr, strict=True)])
    assert res.n == 12 and lo <= res.metrics["accuracy"] <= hi
    assert res.samples[0]["extracted"]["chosen"] == pytest.approx(rc[0], abs=1e-5)


# ---------------------------------------------------------------- ppl


def test_windows():
    assert ppl.windows([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4]]  # the lone 5 has nothing to predict
    assert ppl.windows([1, 2, 3], 8) == [[1, 2, 3]]


def test_perplexity_equals_a_naive_full_logits_computation(tmp_path):
    from rlhf_cli.models.loading import load_model, load_tokenizer, parse_model_spec

    texts = ["hello world, this is a longer text", "short one", "x y"]
    data = write_jsonl(tmp_path, "t.jsonl", [{"body": t} for t in texts])
    (res,) = ppl.run(ppl.PplConfig(str(data), ("builtin:micro",), max_len=8, batch_size=2, fields=("text=body",), device="cpu"))
    spec = parse_model_spec("builtin:micro")
    tok = load_tokenizer(spec)
    model = load_model(spec, tok).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            for w in ppl.windows(tok(t)["input_ids"], 8):
                ids = torch.tensor([w])
                logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
                nll -= logp.gather(-1, ids[0, 1:, None]).sum().item()
                count += len(w) - 1
    assert res.extra["tokens"] == count
    assert res.metrics["token_perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert res.metrics["bits_per_byte"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-4)
    assert res.metrics["byte_perplexity"] == pytest.approx(2 ** res.metrics["bits_per_byte"])


def test_ppl_bad_row_names_the_line(tmp_path, capsys):
    data = write_jsonl(tmp_path, "t.jsonl", [{"text": "ok"}, {"txt": "no"}])
    code, out, err = call(["eval", "ppl", str(data), "-m", "builtin:micro"], capsys)
    assert code == 2 and out == "" and f"{data}:2: no text in field 'text'" in err


def test_eval_help_lists_the_kinds(capsys):
    code, out, _ = call(["eval", "--help"], capsys)
    assert code == 0 and all(k in out for k in ("exact", "rm", "ppl"))
    for kind in ("exact", "rm", "ppl"):
        code, out, _ = call(["eval", kind, "--help"], capsys)
        assert code == 0 and "Examples" in out


# ---------------------------------------------------------------- --engine (exact, code, winrate -m)


@pytest.fixture
def no_vllm(monkeypatch):
    """`import vllm` raises ImportError, installed or not; the VLLM_* defaults `import_vllm` sets are undone."""
    import os
    import sys

    monkeypatch.setitem(sys.modules, "vllm", None)
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _engine_argv(kind, tmp_path, model):
    if kind == "exact":
        return ["eval", "exact", str(write_jsonl(tmp_path, "d.jsonl", [{"prompt": "1+1", "answer": "2"}])), "-m", model]
    if kind == "code":
        probs = write_jsonl(tmp_path, "p.jsonl", [{"task_id": "t/0", "prompt": "def f():\n", "entry_point": "f", "test": "def check(f): pass"}])
        return ["eval", "code", str(probs), "-m", model, "--allow-code-exec"]
    ref = tmp_path / "ref.json"
    ref.write_bytes(orjson.dumps([{"instruction": "Say hi", "output": "hi", "generator": "ref"}]))
    return ["eval", "winrate", "--reference", str(ref), "-m", model, "--judge", "rule:exact"]


@pytest.mark.parametrize("kind", ["exact", "code", "winrate"])
@pytest.mark.parametrize(("model", "engine", "message", "hint"), [
    ("builtin:micro", "vllm", "--engine vllm needs vLLM", "pip install 'rlhf-cli[vllm]'"),
    ("builtin:micro", "bogus", "--engine must be one of hf, vllm; got 'bogus'", "pick one of the listed values"),
    ("api:gpt-4o-mini", "vllm", "--engine vllm with --model api:gpt-4o-mini: api: models are served already", "drop --engine vllm"),
], ids=["no-vllm", "bogus", "api"])
def test_eval_engine_refusals_exit_2_before_a_model_loads(tmp_path, capsys, monkeypatch, no_vllm, kind, model, engine, message, hint):
    def no_model(*a, **k):
        raise AssertionError("--engine must be checked before loading a model")

    monkeypatch.setattr("rlhf_cli.models.loading.load_model", no_model)
    monkeypatch.setattr("rlhf_cli.models.loading.load_tokenizer", no_model)
    log = tmp_path / "log.jsonl"
    code, out, err = call([*_engine_argv(kind, tmp_path, model), "--engine", engine, "--log-samples", str(log)], capsys)
    err = " ".join(err.split())
    assert code == 2 and out == "" and not log.exists(), err
    assert f"error: {message}" in err and f"hint: {hint}" in err and "Traceback" not in err, err
