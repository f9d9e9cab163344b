"""`--engine vllm` through the commands: `rlhf sample` and `rlhf eval exact` against `--engine hf`.

Opt-in, as tests/test_vllm_engine.py (the engine itself): `make test-vllm` runs these in .vllm-venv.
The model is builtin:tiny with its matrices redrawn at std 0.15 (seeded), saved as an HF directory,
whose greedy tokens have top-1/top-2 logit margins far above GREEDY_MARGIN (checked, not assumed),
with a second EOS (a token its greedy text reaches) so greedy rows end both ways, "stop" and "length".
Greedy tokens, texts and finish reasons must then be equal across engines; log-probs differ by kernel
rounding (1.3e-5 measured, LOGP_TOL as in the engine tests).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import GREEDY_MARGIN, greedy_margin, vllm_missing, write_jsonl

pytestmark = pytest.mark.vllm


_why = vllm_missing()
if _why:
    pytest.skip(_why, allow_module_level=True)

LOGP_TOL = 2e-4
ROWS = [
    {"id": "a", "prompt": "Hello there", "meta": {"k": 1}},
    {"prompt": "2+2="},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The cat"}]},
    {"id": 7, "prompt": "Write a haiku about the sea."},
    {"prompt": "é✓"},
]


def cli(argv: list[str]) -> int:
    from rlhf_cli.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code or 0


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture(scope="module")
def sharp(tmp_path_factory: Any) -> tuple[Path, Any, Any]:
    """(HF directory, the model and tokenizer as loaded from it): builtin:tiny at std 0.15, plus a second EOS."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_cli.data.records import render_prompt
    from rlhf_cli.generation import SamplingParams, generate
    from rlhf_cli.models.builtin import build_model, build_tokenizer
    from rlhf_cli.models.loading import load_tokenizer, parse_model_spec

    tok = build_tokenizer()
    model = build_model("tiny", len(tok), tok).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    first = render_prompt(tok, ROWS[0]["prompt"], None, "chat")
    toks = generate(model, tok, [first], SamplingParams(temperature=0, max_new_tokens=8), "cpu", 0)[0][0].token_ids
    assert toks[4] not in toks[:4]
    model.generation_config.eos_token_id = [tok.eos_token_id, toks[4]]  # row "a" stops at its 5th token
    out = tmp_path_factory.mktemp("tiny-sharp")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, AutoModelForCausalLM.from_pretrained(out).eval(), load_tokenizer(parse_model_spec(str(out)))


def test_sample_greedy_rows_equal_the_hf_engines(tmp_path: Path, sharp: tuple[Path, Any, Any]) -> None:
    from rlhf_cli.data.records import render_prompt

    model_dir, hf, tok = sharp
    prompts = write_jsonl(tmp_path, "p.jsonl", ROWS)
    argv = ["sample", str(prompts), "-m", str(model_dir), "-t", "0", "--max-new-tokens", "12", "--logprobs", "-b", "2"]
    assert cli([*argv, "-o", str(tmp_path / "hf.jsonl")]) == 0
    assert cli([*argv, "--engine", "vllm", "-o", str(tmp_path / "vllm.jsonl")]) == 0
    ours, theirs = read_rows(tmp_path / "hf.jsonl"), read_rows(tmp_path / "vllm.jsonl")
    assert len(ours) == len(theirs) == len(ROWS)
    for src, h, v in zip(ROWS, ours, theirs, strict=True):
        ids = render_prompt(tok, src.get("prompt"), src.get("messages"), "chat")
        assert greedy_margin(hf, ids, h["completion_token_ids"][0]) > GREEDY_MARGIN  # no near-tie the kernels could flip
        assert set(h) == set(v) and v["sampling"] == {**h["sampling"], "engine": "vllm"}
        for key in ("id", "completions", "finish_reasons", "completion_tokens", "prompt_tokens", "completion_token_ids", "meta"):
            assert h.get(key) == v.get(key), key
        assert max(abs(a - b) for a, b in zip(h["logprobs"][0], v["logprobs"][0], strict=True)) < LOGP_TOL
    assert {r["finish_reasons"][0] for r in ours} == {"stop", "length"}


def test_sample_from_a_builtin_model_same_rows_shape_and_pure_stdout(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """builtin:tiny has no directory: it is written to a temporary one for the engine, removed at the end.
    Sampled rows (-n 3, temperature 1) have the hf engine's keys, ids and n; stdout holds only JSONL."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    prompts = write_jsonl(tmp_path, "p.jsonl", ROWS)
    argv = ["sample", str(prompts), "-m", "builtin:tiny", "-n", "3", "--max-new-tokens", "6", "--logprobs", "--seed", "3"]
    assert cli(argv) == 0
    hf_out = capfd.readouterr().out
    assert cli([*argv, "--engine", "vllm", "--engine-memory", "0.05"]) == 0
    out = capfd.readouterr().out
    ours = [orjson.loads(line) for line in hf_out.splitlines()]
    theirs = [orjson.loads(line) for line in out.splitlines()]  # any stray print would fail to parse
    assert [set(r) for r in theirs] == [set(r) for r in ours] and [r["id"] for r in theirs] == [r["id"] for r in ours]
    for r in theirs:
        assert len(r["completions"]) == len(r["finish_reasons"]) == len(r["completion_token_ids"]) == 3
        assert r["completion_tokens"] == [len(t) for t in r["completion_token_ids"]] and max(r["completion_tokens"]) <= 6
        assert [len(lp) for lp in r["logprobs"]] == r["completion_tokens"] and all(x <= 0 for lp in r["logprobs"] for x in lp)
        assert r["sampling"]["engine"] == "vllm"
    assert not list(scratch.glob("rlhf-vllm-*"))  # the written model is gone


def test_eval_exact_scores_the_same_as_hf_at_temperature_0(tmp_path: Path, sharp: tuple[Path, Any, Any],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Greedy answers are the hf engine's, so the score and every logged sample are too. The references
    are the hf engine's own answers for half the questions (exact_match 0.5), computed in a first run."""
    from rlhf_cli.evals import exact
    from rlhf_cli.generation import SamplingParams, generate

    model_dir, hf, tok = sharp
    questions = ["1+1", "Hello there", "The cat", "2+2=", "Why?", "é✓"]
    # no near-tie in the greedy answers (prompts as `eval exact` renders them, tokens from our sampler)
    ids = [tok(exact.build_prompt(q, [], "raw"))["input_ids"] for q in questions]
    greedy = generate(hf, tok, ids, SamplingParams(temperature=0, max_new_tokens=8, stop=exact.STOP), "cpu", 0)
    assert all(greedy_margin(hf, p, g[0].token_ids) > GREEDY_MARGIN for p, g in zip(ids, greedy, strict=True))
    data = write_jsonl(tmp_path, "d.jsonl", [{"id": i, "question": q, "answer": "unused"} for i, q in enumerate(questions)])
    argv = ["eval", "exact", "-m", str(model_dir), "--extract", "exact", "--max-new-tokens", "8", "-b", "4"]
    assert cli([*argv[:2], str(data), *argv[2:], "--log-samples", str(tmp_path / "first.jsonl")]) == 0
    first = read_rows(tmp_path / "first.jsonl")
    assert all(r["output"] for r in first[::2])
    data = write_jsonl(tmp_path, "d2.jsonl", [{"id": i, "question": q, "answer": first[i]["output"] if i % 2 == 0 else "nope"}
                                              for i, q in enumerate(questions)])
    capsys.readouterr()
    scores = {}
    for engine in ("hf", "vllm"):
        assert cli([*argv[:2], str(data), *argv[2:], "--engine", engine, "--log-samples", str(tmp_path / f"{engine}.jsonl")]) == 0
        scores[engine] = orjson.loads(capsys.readouterr().out)["results"][0]["exact_match"]
    ours, theirs = read_rows(tmp_path / "hf.jsonl"), read_rows(tmp_path / "vllm.jsonl")
    assert scores == {"hf": 0.5, "vllm": 0.5}
    assert [(r["id"], r["output"], r["extracted"], r["score"]) for r in theirs] == [(r["id"], r["output"], r["extracted"], r["score"]) for r in ours]


def test_known_greedy_answers_and_categories_equal_the_hf_engines(tmp_path: Path, sharp: tuple[Path, Any, Any]) -> None:
    """`rlhf known --engine vllm` loads one engine for both passes (greedy, then sampled): zero-shot raw
    prompts are `eval exact`'s (whose greedy margins the test above checks), so every greedy answer,
    p_greedy and the greedy categories equal the hf engine's. The references are hf's own greedy
    answers for half the rows: those are highly_known on both engines."""
    model_dir, _, _ = sharp
    questions = ["1+1", "Hello there", "The cat", "2+2=", "Why?", "é✓"]
    argv = ["known", "-m", str(model_dir), "--shots", "0", "-n", "2", "--temperature", "1", "--format", "raw", "--max-new-tokens", "8",
            "-b", "4", "--judge", "rule:exact"]
    data = write_jsonl(tmp_path, "q.jsonl", [{"id": i, "prompt": q, "answer": "unused"} for i, q in enumerate(questions)])
    assert cli([argv[0], str(data), *argv[1:], "-o", str(tmp_path / "first.jsonl")]) == 0
    first = read_rows(tmp_path / "first.jsonl")
    data = write_jsonl(tmp_path, "q2.jsonl", [{"id": i, "prompt": q, "answer": first[i]["known"]["greedy_answer"] if i % 2 == 0 else "nope"}
                                              for i, q in enumerate(questions)])
    got = {}
    for engine in ("hf", "vllm"):
        assert cli([argv[0], str(data), *argv[1:], "--engine", engine, "--engine-memory", "0.05", "-o", str(tmp_path / f"{engine}.jsonl")]) == 0
        got[engine] = [(r["id"], r["known"]["greedy_answer"], r["known"]["p_greedy"]) for r in read_rows(tmp_path / f"{engine}.jsonl")]
    assert got["vllm"] == got["hf"]
    assert [p for _, _, p in got["hf"]][::2] == [1.0, 1.0, 1.0] and all(r["known"]["category"] == "highly_known"
                                                                       for r in read_rows(tmp_path / "vllm.jsonl")[::2])
