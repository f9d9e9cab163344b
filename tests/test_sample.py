"""`rlhf sample`: batched KV-cached generation, the output row contract, streaming, --resume.

Models: `builtin:micro` where any model will do, and `lively`, a micro Llama re-initialised with
larger weights so greedy decoding depends on the prompt (builtin:micro at temperature 0 emits
"\\n" forever), whose EOS row copies token 202's (x1.05) so that EOS wins wherever 202 would:
greedy completions stop after a prompt-dependent number of tokens, or run to the length limit.
Most tests call `sample.run(cfg)` in-process; the pipe, kill and stdout tests use subprocesses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import torch
from conftest import GREEDY_MARGIN, greedy_margin, run_cli, write_jsonl

from rlhf_cli.commands.sample import SampleConfig, run
from rlhf_cli.data.records import render_prompt
from rlhf_cli.generation import SamplingParams, generate
from rlhf_cli.models.builtin import build_model, build_tokenizer

EOS = 258  # <|im_end|> in the builtin tokenizer
EOS_LIKE = 202  # the lively model emits EOS where it would emit this byte

# different lengths (so a batch is left-padded), a chat row, unicode
PROMPTS = [
    {"prompt": "hi"},
    {"prompt": "hello there friend"},
    {"prompt": "what is 2+2?"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ok"}]},
    {"prompt": "Write a haiku about the sea, please."},
    {"prompt": "é✓"},
]


def _lively(tok: Any) -> Any:
    model = build_model("micro", len(tok), tok).eval()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name else 2 / p.shape[1] ** 0.5)
        head = model.get_output_embeddings().weight  # tied to the input embeddings
        head[EOS] = head[EOS_LIKE] * 1.05
    return model


def _micro(tok: Any) -> Any:
    """builtin:micro as `sample` loads it."""
    from rlhf_cli.models.loading import load_model, parse_model_spec

    return load_model(parse_model_spec("builtin:micro"), tok).eval()


def _chat(tok: Any, row: dict[str, Any]) -> list[int]:
    return render_prompt(tok, row.get("prompt"), row.get("messages"), "chat")


@pytest.fixture(scope="module")
def lively_dir(tmp_path_factory: pytest.TempPathFactory, tok: Any) -> Path:
    from rlhf_cli.models.checkpoint import save_checkpoint

    return save_checkpoint(_lively(tok), tok, tmp_path_factory.mktemp("models") / "lively", {"step": "test"})


@pytest.fixture(scope="module")
def lively(lively_dir: Path) -> tuple[Any, Any]:
    """(model, tokenizer) loaded the way `sample` loads them."""
    from rlhf_cli.models.loading import load_model, load_tokenizer, parse_model_spec

    spec = parse_model_spec(str(lively_dir))
    tok = load_tokenizer(spec)
    return load_model(spec, tok).eval(), tok


def sample(tmp_path: Path, rows: list[Any] | Path, name: str = "out.jsonl", **kw: Any) -> list[dict[str, Any]]:
    """Run `sample` in-process on `rows` (or a prompt file) and return the output rows."""
    prompts = rows if isinstance(rows, Path) else write_jsonl(tmp_path, f"in-{name}", rows)
    out = tmp_path / name
    kw = {"model": "builtin:micro", "max_new_tokens": 4, **kw}
    run(SampleConfig(prompts=str(prompts), output=str(out), **kw))
    return [orjson.loads(line) for line in out.read_bytes().splitlines()]


def cli(argv: list[str]) -> int:
    """`rlhf *argv` in-process; returns the exit code."""
    from rlhf_cli.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def completions(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(r["completions"], r["finish_reasons"], r["completion_tokens"]) for r in rows]


# --- generation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["builtin:micro", "lively"])
def test_batched_greedy_equals_each_prompt_alone(tmp_path: Path, lively_dir: Path, lively: tuple[Any, Any], tok: Any,
                                                 model: str) -> None:
    lm = lively[0] if model == "lively" else _micro(tok)
    model = str(lively_dir) if model == "lively" else model
    batched = sample(tmp_path, PROMPTS, "b.jsonl", model=model, temperature=0, max_new_tokens=16, batch_size=6, logprobs=True)
    alone = sample(tmp_path, PROMPTS, "a.jsonl", model=model, temperature=0, max_new_tokens=16, batch_size=1, logprobs=True)
    assert len({r["prompt_tokens"] for r in batched}) >= 4  # the batch really was padded
    for src, r in zip(PROMPTS, alone, strict=True):  # no near-tie: padding's rounding cannot flip an argmax
        assert greedy_margin(lm, _chat(tok, src), r["completion_token_ids"][0]) > GREEDY_MARGIN
    assert completions(batched) == completions(alone)
    assert [r["completion_token_ids"] for r in batched] == [r["completion_token_ids"] for r in alone]
    if model != "builtin:micro":  # rows that finish early leave the batch without disturbing the rest
        assert {r["finish_reasons"][0] for r in batched} == {"stop", "length"}


def test_greedy_equals_hand_rolled_argmax_loop(lively: tuple[Any, Any]) -> None:
    model, tok = lively
    prompts = [render_prompt(tok, p["prompt"], None, "chat") for p in (PROMPTS[0], PROMPTS[4])]
    got = generate(model, tok, prompts, SamplingParams(temperature=0, max_new_tokens=6), "cpu", seed=0)
    for ids, (comp,) in zip(prompts, got, strict=True):
        want, seq = [], list(ids)
        with torch.no_grad():
            for _ in range(6):  # no cache, no padding: one full forward per token
                t = int(model(torch.tensor([seq])).logits[0, -1].argmax())
                want.append(t)
                seq.append(t)
                if t == EOS:
                    break
        assert greedy_margin(model, ids, want) > GREEDY_MARGIN  # batched + cached vs alone + uncached: no near-tie
        assert comp.token_ids == want


def test_top_k_1_and_tiny_top_p_equal_greedy(lively: tuple[Any, Any]) -> None:
    model, tok = lively
    prompts = [render_prompt(tok, p["prompt"], None, "chat") for p in PROMPTS[:3]]
    greedy = generate(model, tok, prompts, SamplingParams(temperature=0, max_new_tokens=8), "cpu", seed=0)
    ids = [[c.token_ids for c in cs] for cs in greedy]
    # n=2 doubles the batch, and dividing by the temperature rounds: the argmax must not be a near-tie
    assert all(greedy_margin(model, p, i) > GREEDY_MARGIN for p, (i,) in zip(prompts, ids, strict=True))
    for seed in (1, 2):
        top_k = generate(model, tok, prompts, SamplingParams(temperature=1.5, top_k=1, max_new_tokens=8, n=2), "cpu", seed)
        top_p = generate(model, tok, prompts, SamplingParams(temperature=1.5, top_p=1e-6, max_new_tokens=8), "cpu", seed)
        assert [[c.token_ids for c in cs] for cs in top_k] == [i * 2 for i in ids]
        assert [[c.token_ids for c in cs] for cs in top_p] == ids


def test_top_k_and_top_p_sample_only_from_the_allowed_tokens(lively: tuple[Any, Any]) -> None:
    model, tok = lively
    prompt = render_prompt(tok, "hi", None, "chat")
    with torch.no_grad():
        probs = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)  # (V,)
    order = probs.argsort(descending=True).tolist()
    nucleus = order[: int((probs[order].cumsum(0) < 0.6).sum()) + 1]  # smallest prefix with mass >= 0.6

    def first_tokens(**kw: Any) -> set[int]:
        (comps,) = generate(model, tok, [prompt], SamplingParams(max_new_tokens=1, n=200, **kw), "cpu", seed=0)
        return {c.token_ids[0] for c in comps}

    assert first_tokens(top_k=3) == set(order[:3])
    assert first_tokens(top_p=0.6) == set(nucleus)
    assert len(first_tokens()) > max(3, len(nucleus))  # without them, other tokens do turn up


def test_inverse_cdf_sampler_draws_the_softmax_distribution() -> None:
    """sample_categorical: frequencies of 40k draws per distribution within 5 standard errors of the
    probabilities (a tail of 4096 tokens at 7e-8 each, float32's resolution next to 1, which a float32
    cumulative sum would blur), zero-probability tokens never drawn, same seed same draws."""
    from rlhf_cli.generation import sample_categorical
    from rlhf_cli.runtime import keep_freed_memory

    keep_freed_memory()  # as every rlhf command does: no page faults for each batch's buffers
    v = 4100
    probs = torch.zeros(2, v, dtype=torch.float64)
    probs[0, :4] = torch.tensor([0.5, 0.3, 0.2 - 3e-4, 0.0])
    probs[0, 4:] = 3e-4 / (v - 4)
    probs[1, 1::2] = torch.linspace(1, 2, v // 2, dtype=torch.float64)  # every even token impossible
    probs[1] /= probs[1].sum()

    def draw(seed: int) -> torch.Tensor:  # (2, n) in batches of 400 rows per distribution (26 MB buffers, reused)
        rng = torch.Generator().manual_seed(seed)
        return torch.cat([sample_categorical(probs.float().repeat_interleave(400, 0), rng).view(2, -1) for _ in range(100)], 1)

    draws = draw(1)
    n = draws.shape[1]
    counts = torch.stack([torch.bincount(d, minlength=v) for d in draws]).double() / n
    halves, half_p = counts[1].view(2, -1).sum(1), probs[1].view(2, -1).sum(1)  # lower / upper half of the vocabulary
    for got, want in ((counts[0, :3], probs[0, :3]), (counts[0, 4:].sum(), probs[0, 4:].sum()), (halves, half_p)):
        assert torch.all((got - want).abs() <= 5 * (want * (1 - want) / n).sqrt())
    assert counts[0, 4:].sum() > 0  # the tail is drawn (expected 12 of 40k)
    assert counts[0, 3] == 0 and counts[1, 0::2].sum() == 0
    assert torch.equal(draws, draw(1)) and not torch.equal(draws, draw(2))


def test_n_gives_k_completions_per_row(tmp_path: Path) -> None:
    rows = sample(tmp_path, PROMPTS[:3], n=3, max_new_tokens=6, batch_size=2)
    assert len(rows) == 3
    for r in rows:
        assert len(r["completions"]) == len(r["finish_reasons"]) == len(r["completion_tokens"]) == 3
        assert len(set(r["completions"])) == 3  # three samples, not one copied


def test_same_seed_same_output_other_seed_differs(tmp_path: Path) -> None:
    a = sample(tmp_path, PROMPTS, "a.jsonl", n=2, seed=7, batch_size=4)
    b = sample(tmp_path, PROMPTS, "b.jsonl", n=2, seed=7, batch_size=4)
    c = sample(tmp_path, PROMPTS, "c.jsonl", n=2, seed=8, batch_size=4)
    assert a == b
    assert all(x["completions"] != y["completions"] for x, y in zip(a, c, strict=True))


def test_max_new_tokens_gives_length(tmp_path: Path) -> None:
    rows = sample(tmp_path, PROMPTS, n=2, max_new_tokens=5, logprobs=True)
    for r in rows:
        assert all(EOS not in ids for ids in r["completion_token_ids"])
        assert r["finish_reasons"] == ["length", "length"]
        assert r["completion_tokens"] == [5, 5]


def test_eos_gives_stop_and_is_not_in_the_text(tmp_path: Path, lively_dir: Path) -> None:
    rows = sample(tmp_path, PROMPTS, model=str(lively_dir), temperature=0, max_new_tokens=16, logprobs=True)
    reasons = [r["finish_reasons"][0] for r in rows]
    assert reasons.count("stop") >= 3 and "length" in reasons
    for r in rows:
        (ids,), (n,), (text,) = r["completion_token_ids"], r["completion_tokens"], r["completions"]
        assert n == len(ids)
        if r["finish_reasons"] == ["stop"]:
            assert ids[-1] == EOS and EOS not in ids[:-1]
            assert "<|im_end|>" not in text
        else:
            assert n == 16 and EOS not in ids
    # sampled completions too: "stop" exactly when the last token is EOS, else the length limit
    rows = sample(tmp_path, PROMPTS, "t1.jsonl", model=str(lively_dir), n=3, max_new_tokens=16, logprobs=True)
    seen = set()
    for r in rows:
        for reason, ids in zip(r["finish_reasons"], r["completion_token_ids"], strict=True):
            seen.add(reason)
            assert (reason == "stop") == (ids[-1] == EOS)
            assert EOS not in ids[:-1]
            assert reason == "stop" or len(ids) == 16
    assert seen == {"stop", "length"}


def test_stop_string_cuts_the_text_and_reports_stop(tmp_path: Path, lively_dir: Path) -> None:
    kw = {"model": str(lively_dir), "temperature": 0, "max_new_tokens": 16, "logprobs": True}
    [full] = sample(tmp_path, [PROMPTS[2]], "full.jsonl", **kw)
    [cut] = sample(tmp_path, [PROMPTS[2]], "cut.jsonl", stop=(".", "never"), **kw)
    (text,), (ids,) = full["completions"], full["completion_token_ids"]
    assert "." in text[1:] and full["finish_reasons"] == ["stop"]
    assert cut["completions"] == [text[: text.index(".")]]
    assert cut["finish_reasons"] == ["stop"]
    assert cut["completion_token_ids"] == [ids[: ids.index(ord(".")) + 1]]  # up to the token that made the '.'
    assert cut["completion_tokens"] == [ids.index(ord(".")) + 1]
    assert cut["sampling"]["stop"] == [".", "never"]
    [row] = sample(tmp_path, [PROMPTS[2]], "never.jsonl", stop=("never",), **kw)  # absent: no effect
    assert row["completion_token_ids"] == full["completion_token_ids"]


def test_stop_string_matches_the_text_not_special_token_names(tmp_path: Path, tok: Any) -> None:
    # The untrained micro model samples special tokens now and then; "<|pad|>" or "<|im_start|>"
    # contain "a", but they are not in the text, so they must not end a completion.
    rows = sample(tmp_path, PROMPTS, n=4, max_new_tokens=12, stop=("a",), logprobs=True, seed=3)
    for r in rows:
        for text, reason, ids in zip(r["completions"], r["finish_reasons"], r["completion_token_ids"], strict=True):
            assert "a" not in text
            if reason == "length":
                assert len(ids) == 12
            elif ids[-1] != EOS:  # stopped by the string: it is in the text of exactly these tokens
                assert "a" in tok.decode(ids, skip_special_tokens=True)
    assert any(t >= 256 for r in rows for ids in r["completion_token_ids"] for t in ids[:-1])


def _teacher_forced(model: Any, prompt: list[int], comp: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + comp])).logits[0].float()  # (T, V), no padding
    lp = logits.log_softmax(-1)
    return [lp[len(prompt) - 1 + j, t].item() for j, t in enumerate(comp)]


def test_logprobs_equal_teacher_forced_full_logits(tmp_path: Path, lively: tuple[Any, Any], lively_dir: Path) -> None:
    model, tok = lively
    rows = sample(tmp_path, PROMPTS, model=str(lively_dir), n=2, max_new_tokens=8, logprobs=True, batch_size=6)
    assert len({r["prompt_tokens"] for r in rows}) >= 4  # shorter prompts were left-padded
    for src, r in zip(PROMPTS, rows, strict=True):
        prompt = render_prompt(tok, src.get("prompt"), src.get("messages"), "chat")
        assert r["prompt_tokens"] == len(prompt)
        for ids, lps, n in zip(r["completion_token_ids"], r["logprobs"], r["completion_tokens"], strict=True):
            assert len(ids) == len(lps) == n
            assert lps == pytest.approx(_teacher_forced(model, prompt, ids), abs=1e-4)


def _tiny(kind: str, tok: Any) -> Any:
    """Micro models of other architectures: GPT-2 (learned absolute positions), Phi (lm_head has a
    bias) and three whose logits are not head(hidden): Granite divides by logits_scaling, Cohere
    multiplies by logit_scale, Gemma 2 soft-caps them."""
    import transformers as tf

    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, pad_token_id=tok.pad_token_id, eos_token_id=EOS, bos_token_id=tok.bos_token_id)
    config = {
        "gpt2": lambda: tf.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                      bos_token_id=tok.bos_token_id, eos_token_id=EOS),
        "phi": lambda: tf.PhiConfig(**common),
        "granite": lambda: tf.GraniteConfig(**common, num_key_value_heads=2, logits_scaling=4.0),
        "cohere": lambda: tf.CohereConfig(**common, num_key_value_heads=2, logit_scale=3.0),
        "gemma2": lambda: tf.Gemma2Config(**common, num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5),
    }[kind]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(20)  # sharper distributions, so a wrong head is far outside the tolerance
    return model


@pytest.mark.parametrize("kind", ["gpt2", "phi"])
def test_left_padding_for_other_architectures(kind: str, tok: Any) -> None:
    # RoPE models see only relative positions; GPT-2 needs position ids that start after the padding
    model = _tiny(kind, tok)
    prompts = [render_prompt(tok, p.get("prompt"), p.get("messages"), "chat") for p in PROMPTS]
    params = SamplingParams(temperature=0, max_new_tokens=8)
    batched = generate(model, tok, prompts, params, "cpu", seed=0)
    for prompt, (comp,) in zip(prompts, batched, strict=True):
        [(alone,)] = generate(model, tok, [prompt], params, "cpu", seed=0)
        assert greedy_margin(model, prompt, alone.token_ids) > GREEDY_MARGIN
        assert comp.token_ids == alone.token_ids
    assert len({tuple(c.token_ids) for (c,) in batched}) > 1  # not one output for every prompt


@pytest.mark.parametrize("kind", ["gpt2", "phi", "granite", "cohere", "gemma2"])
def test_logprobs_for_other_heads(kind: str, tok: Any) -> None:
    model = _tiny(kind, tok)
    prompts = [render_prompt(tok, p["prompt"], None, "chat") for p in (PROMPTS[0], PROMPTS[4])]
    out = generate(model, tok, prompts, SamplingParams(max_new_tokens=6, n=2), "cpu", seed=0, logprobs=True)
    for prompt, comps in zip(prompts, out, strict=True):
        for c in comps:
            assert c.logprobs == pytest.approx(_teacher_forced(model, prompt, c.token_ids), abs=1e-4)


def test_pad_token_equal_to_eos(lively: tuple[Any, Any]) -> None:
    # SmolLM2 style: pad == eos. Padding must stay padding, and rows ending in EOS still "stop".
    model, tok = lively
    tok_pe = build_tokenizer()
    tok_pe.pad_token = tok_pe.eos_token
    assert tok_pe.pad_token_id == EOS
    prompts = [render_prompt(tok, p.get("prompt"), p.get("messages"), "chat") for p in PROMPTS]
    params = SamplingParams(temperature=0, max_new_tokens=16)
    want = generate(model, tok, prompts, params, "cpu", seed=0, logprobs=True)
    got = generate(model, tok_pe, prompts, params, "cpu", seed=0, logprobs=True)
    alone = [generate(model, tok_pe, [p], params, "cpu", seed=0)[0] for p in prompts]
    assert {cs[0].finish_reason for cs in got} == {"stop", "length"}
    for p, w, g, a in zip(prompts, want, got, alone, strict=True):
        assert greedy_margin(model, p, a[0].token_ids) > GREEDY_MARGIN  # batched vs alone: no near-tie
        assert (g[0].token_ids, g[0].finish_reason, g[0].text) == (w[0].token_ids, w[0].finish_reason, w[0].text)
        assert g[0].token_ids == a[0].token_ids
        assert g[0].logprobs == pytest.approx(w[0].logprobs, abs=1e-5)


# --- output contract ----------------------------------------------------------------------------


CONTRACT_ROWS = [
    {"id": 7, "prompt": "2+2=", "answer": "4", "meta": {"source": "gsm", "tags": ["a", {"b": [1, 2.5, None]}]}},
    {"prompt": "Grüße, 世界 🌍", "answer": {"text": "hi", "alts": []}, "score": 0.1, "flag": False},
    {"id": "q-3", "messages": [{"role": "user", "content": "¿qué?"}], "nested": {"deep": {"er": [[]]}}},
    {"prompt": "2+2="},  # same prompt as row 1, no id: still a unique id
    {"prompt": "2+2=", "answer": "4"},
]
ADDED = {"id", "completions", "finish_reasons", "completion_tokens", "prompt_tokens", "sampling"}


def test_output_rows_keep_input_fields_and_add_the_contract(tmp_path: Path, tok: Any) -> None:
    rows = sample(tmp_path, CONTRACT_ROWS, n=2, max_new_tokens=3, seed=5, top_p=0.9, top_k=40, stop=("zz",))
    assert len(rows) == len(CONTRACT_ROWS)
    for src, out in zip(CONTRACT_ROWS, rows, strict=True):
        assert {k: out[k] for k in src} == src  # untouched, nested objects and unicode included
        assert set(out) == set(src) | ADDED
        assert len(out["completions"]) == len(out["finish_reasons"]) == len(out["completion_tokens"]) == 2
        assert all(isinstance(c, str) for c in out["completions"])
        assert set(out["finish_reasons"]) <= {"stop", "length"}
        assert out["prompt_tokens"] == len(render_prompt(tok, src.get("prompt"), src.get("messages"), "chat"))
        assert out["sampling"] == {"model": "builtin:micro", "temperature": 1.0, "top_p": 0.9, "top_k": 40,
                                   "max_new_tokens": 3, "seed": 5, "n": 2, "stop": ["zz"]}
    ids = [r["id"] for r in rows]
    assert ids[0] == 7 and ids[2] == "q-3"
    assert len(set(ids)) == len(ids)
    again = sample(tmp_path, CONTRACT_ROWS, "again.jsonl", n=2, max_new_tokens=3)
    assert [r["id"] for r in again] == ids  # assigned ids are stable across runs


def test_format_raw_skips_the_chat_template(tmp_path: Path) -> None:
    rows = sample(tmp_path, [{"prompt": "héllo"}, {"messages": [{"role": "user", "content": "héllo"}]}], format="raw")
    assert rows[0]["prompt_tokens"] == len("héllo".encode())  # byte-level tokenizer, nothing added
    assert rows[1]["prompt_tokens"] > 20  # messages always go through the template
    chat = sample(tmp_path, [{"prompt": "héllo"}], "chat.jsonl")
    assert chat[0]["prompt_tokens"] == rows[1]["prompt_tokens"]


# --- CLI: stdout, pipes, errors -----------------------------------------------------------------


def test_stdout_is_pure_jsonl(tmp_path: Path) -> None:
    stdin = b"".join(orjson.dumps(r) + b"\n" for r in CONTRACT_ROWS)
    proc = run_cli(["sample", "-", "-m", "builtin:micro", "-n", "2", "--max-new-tokens", "3", "--logprobs",
                    "--stop", "x", "--top-p", "0.9", "-b", "2"], input=stdin)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert proc.stdout.endswith("\n") and len(lines) == len(CONTRACT_ROWS)
    assert all(isinstance(orjson.loads(line), dict) for line in lines)
    assert "sample" in proc.stderr  # progress goes to stderr


def test_head_1_exits_quickly_and_quietly(tmp_path: Path) -> None:
    big = write_jsonl(tmp_path, "big.jsonl", [{"prompt": f"prompt number {i}"} for i in range(5000)])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RLHF_DEBUG", None)
    with (tmp_path / "err.txt").open("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "rlhf_cli", "sample", str(big), "-m", "builtin:micro",
                                 "--max-new-tokens", "16"], stdout=subprocess.PIPE, stderr=err, env=env)
        first = proc.stdout.readline()
        proc.stdout.close()  # what `head -1` does after one line
        t0 = time.monotonic()
        rc = proc.wait(timeout=120)
        gone_after = time.monotonic() - t0
        err.seek(0)
        stderr = err.read()
    assert orjson.loads(first)["prompt"] == "prompt number 0"
    assert rc == 0
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr
    assert gone_after < 15, f"took {gone_after:.1f}s after the reader left (all 5000 prompts take ~60s)"


@pytest.mark.parametrize(
    "args",
    [
        ["-n", "0"],
        ["--top-p", "0"],
        ["--top-p", "1.5"],
        ["--temperature", "0", "-n", "2"],
        ["--temperature", "-1"],
        ["--max-new-tokens", "0"],
        ["--resume"],  # resumes into --output FILE: stdout cannot be appended to
        ["--format", "plain"],
        ["--dtype", "fp8"],
    ],
)
def test_bad_options_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    def no_model(*a: Any, **k: Any) -> None:
        raise AssertionError("options must be checked before loading a model")

    monkeypatch.setattr("rlhf_cli.models.loading.load_model", no_model)
    monkeypatch.chdir(tmp_path)
    prompts = write_jsonl(tmp_path, "p.jsonl", [{"prompt": "hi"}])
    assert cli(["sample", str(prompts), "-m", "builtin:micro", *args]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == ""
    assert lines[0].startswith("error:") and "Traceback" not in err
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint:"))


def test_empty_raw_prompt_is_an_error_naming_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = write_jsonl(tmp_path, "p.jsonl", [{"prompt": "hi"}, {"prompt": ""}])
    assert cli(["sample", str(prompts), "-m", "builtin:micro", "--format", "raw"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {prompts}:2: the prompt is empty")


# --- resume -------------------------------------------------------------------------------------


def test_resume_after_a_half_written_row(tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path, "p.jsonl", [{"prompt": f"question {i}", "i": i} for i in range(10)])
    kw = {"temperature": 0.0, "max_new_tokens": 3, "batch_size": 3}
    full = tmp_path / "full.jsonl"
    sample(tmp_path, prompts, "full.jsonl", **kw)
    lines = full.read_bytes().splitlines(keepends=True)
    killed = tmp_path / "killed.jsonl"
    killed.write_bytes(b"".join(lines[:4]) + lines[4][:25])  # 4 rows and half of the 5th
    assert cli(["sample", str(prompts), "-m", "builtin:micro", "--temperature", "0", "--max-new-tokens", "3",
                "-b", "3", "--output", str(killed), "--resume"]) == 0
    got = killed.read_bytes()
    assert got.endswith(b"\n")
    rows = [orjson.loads(line) for line in got.splitlines()]
    assert [r["i"] for r in rows] == list(range(10))  # each prompt once, new ones in input order
    assert got.splitlines(keepends=True)[:4] == lines[:4]  # the finished rows are left alone
    # greedy: the resumed rows are the ones an unbroken run writes, though its batches of 3 start at other rows,
    # as no argmax is a near-tie
    tok = build_tokenizer()
    micro = _micro(tok)
    for i in range(10):
        prompt = render_prompt(tok, f"question {i}", None, "chat")
        [(c,)] = generate(micro, tok, [prompt], SamplingParams(temperature=0, max_new_tokens=3), "cpu", seed=0)
        assert greedy_margin(micro, prompt, c.token_ids) > GREEDY_MARGIN
    assert got == full.read_bytes()
    assert cli(["sample", str(prompts), "-m", "builtin:micro", "-o", str(killed), "--resume"]) == 0  # nothing left
    assert killed.read_bytes() == got


@pytest.mark.slow
def test_resume_after_kill_9(tmp_path: Path) -> None:
    prompts = write_jsonl(tmp_path, "p.jsonl", [{"prompt": f"prompt {i}", "i": i} for i in range(40)])
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_cli", "sample", str(prompts), "-m", "builtin:micro",
                             "--max-new-tokens", "16", "-b", "1", "-n", "2", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = out.read_bytes().count(b"\n")
    assert 3 <= before < 40, "the run should be killed part way"
    assert cli(["sample", str(prompts), "-m", "builtin:micro", "--max-new-tokens", "16", "-b", "1", "-n", "2",
                "--resume", "--output", str(out)]) == 0
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [r["i"] for r in rows] == list(range(40))
    assert all(len(r["completions"]) == 2 for r in rows)


@pytest.mark.parametrize("order", ["after", "before"])
def test_the_old_resume_file_spelling_still_works_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 order: str) -> None:
    """`--resume FILE` (before `--resume` became a switch) means `--output FILE --resume` for one more
    release, in either order, and never appends to the prompt file."""
    prompts = write_jsonl(tmp_path, "p.jsonl", [{"id": "a", "prompt": "hi"}, {"id": "b", "prompt": "ho"}])
    before = prompts.read_bytes()
    old = tmp_path / "old.jsonl"
    old.write_bytes(orjson.dumps({"id": "a", "prompt": "hi", "completions": ["x"]}) + b"\n")  # the first prompt is done
    argv = [str(prompts), "--resume", str(old)] if order == "after" else ["--resume", str(old), str(prompts)]
    assert cli(["sample", *argv, "-m", "builtin:micro", "--max-new-tokens", "2"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "--resume FILE is deprecated" in err and "--output FILE --resume" in err
    rows = [orjson.loads(line) for line in old.read_bytes().splitlines()]
    assert [r["prompt"] for r in rows] == ["hi", "ho"] and prompts.read_bytes() == before
    # a stray argument that is not the old spelling is still refused
    assert cli(["sample", str(prompts), "extra.jsonl", "-m", "builtin:micro"]) == 2


# --- --engine -----------------------------------------------------------------------------------


@pytest.fixture
def no_vllm(monkeypatch: pytest.MonkeyPatch) -> Any:
    """`import vllm` raises ImportError, installed or not; the VLLM_* defaults `import_vllm` sets are undone."""
    monkeypatch.setitem(sys.modules, "vllm", None)
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize(("args", "env", "message", "hint"), [
    (["--engine", "vllm"], {}, "--engine vllm needs vLLM", "pip install 'rlhf-cli[vllm]'"),
    (["--engine", "bogus"], {}, "--engine must be one of hf, vllm; got 'bogus'", "pick one of the listed values"),
    (["--engine", "vllm", "--engine-memory", "0"], {}, "--engine-memory must be in (0, 1]; got 0.0", "use a value in (0, 1]"),
    (["--engine", "vllm", "-m", "api:gpt-4o-mini"], {}, "--engine vllm with --model api:gpt-4o-mini: api: models are served already", "drop --engine vllm"),
    (["--engine", "vllm"], {"WORLD_SIZE": "2"}, "--engine vllm runs in a single process, not under torchrun", "launch without torchrun"),
], ids=["no-vllm", "bogus", "memory", "api", "torchrun"])
def test_engine_refusals_exit_2_before_a_model_loads_and_write_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, no_vllm: Any,
        args: list[str], env: dict[str, str], message: str, hint: str) -> None:
    def no_model(*a: Any, **k: Any) -> None:
        raise AssertionError("--engine must be checked before loading a model")

    monkeypatch.setattr("rlhf_cli.models.loading.load_model", no_model)
    monkeypatch.setattr("rlhf_cli.models.loading.load_tokenizer", no_model)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    prompts = write_jsonl(tmp_path, "p.jsonl", [{"prompt": "hi"}])
    out_file = tmp_path / "out.jsonl"
    assert cli(["sample", str(prompts), "-m", "builtin:micro", *args, "-o", str(out_file)]) == 2
    out, err = capsys.readouterr()
    err = " ".join(err.split())
    assert out == "" and not out_file.exists()
    assert f"error: {message}" in err and f"hint: {hint}" in err and "Traceback" not in err, err


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma2"])
def test_shared_prefill_equals_prefilling_each_sample(kind: str, lively: tuple[Any, Any], tok: Any) -> None:
    """With n > 1 the prompts are prefilled once and the KV cache repeated for the n samples
    (generation._prefill): the last logits and the next decode step's logits equal those of
    prefilling every repeated row, the reference path (a different batch shape: a tolerance)."""
    from rlhf_cli.generation import _prefill, forward_accepts, left_pad

    model = lively[0] if kind == "llama" else _tiny(kind, tok)
    prompts = [render_prompt(tok, p.get("prompt"), p.get("messages"), "chat") for p in PROMPTS[:3]]  # different lengths
    ids, mask = left_pad(prompts, 0, "cpu")
    cache_kw = "cache" if forward_accepts(model, "cache") else "past_key_values"
    keep = {"logits_to_keep": 1} if forward_accepts(model, "logits_to_keep") else {}
    n = 3
    with torch.no_grad():
        shared, c1 = _prefill(model, ids, mask, n, cache_kw, keep)
        alone, c2 = _prefill(model, ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), 1, cache_kw, keep)
        assert shared.shape == alone.shape == (len(prompts) * n, alone.shape[-1])
        torch.testing.assert_close(shared, alone, atol=1e-5, rtol=1e-5)
        nxt = alone.argmax(-1)[:, None]
        m = torch.cat([mask.repeat_interleave(n, 0), torch.ones(len(prompts) * n, 1, dtype=mask.dtype)], 1)
        pos = m.cumsum(1)[:, -1:] - 1
        steps = [model(input_ids=nxt, attention_mask=m, position_ids=pos, use_cache=True, **{cache_kw: c}, **keep).logits[:, -1]
                 for c in (c1, c2)]
    torch.testing.assert_close(steps[0], steps[1], atol=1e-5, rtol=1e-5)
