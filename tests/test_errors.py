"""Bad input a new user hit, and a quiet stderr.

Each bad input ends in one `error:` line naming the file (and line, where there is one) plus a
hint, exit code 2, no traceback and nothing written; a genuine bug still crashes (exit 1) and
`RLHF_DEBUG=1` shows the traceback. Only rlhf's own progress and messages reach stderr: none of
transformers' "Loading weights" / "Writing model shards" bars.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli, write_jsonl

from rlhf_cli.cli import main


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `rlhf argv` in-process -> (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return (0 if e.value.code is None else e.value.code), out, err


def one_line_error(code: int, out: str, err: str) -> str:
    """Assert the contract (exit 2, empty stdout, only `error:` + `hint:` lines) -> the error line."""
    assert code == 2, err
    assert out == ""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error: "), err
    assert len(lines) <= 2 and all(ln.startswith("hint: ") for ln in lines[1:]), err
    return lines[0]


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory) -> Path:
    """builtin:micro saved as a plain Hugging Face directory (config.json, model.safetensors, tokenizer)."""
    from rlhf_cli.models.builtin import build_model, build_tokenizer

    tok = build_tokenizer()
    out = tmp_path_factory.mktemp("models") / "micro"
    build_model("micro", len(tok), tok).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ---------------------------------------------------------------- corrupt or truncated model files


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# (name, what to damage -> the path the error must name (relative to tmp_path), words the error must have)
DAMAGE = {
    "gguf-garbage": (lambda d: (d.parent / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbagegarbagegarbage"), "broken.gguf", "GGUF"),
    "gguf-truncated": (lambda d: (d.parent / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00"), "broken.gguf", "GGUF"),
    "gguf-no-magic": (lambda d: (d.parent / "broken.gguf").write_text("not a model"), "broken.gguf", "GGUF"),
    "safetensors-truncated": (lambda d: _truncate(d / "model.safetensors", 3000), "m/model.safetensors", "truncated"),
    "safetensors-empty": (lambda d: _truncate(d / "model.safetensors", 0), "m/model.safetensors", "truncated"),
    "tokenizer-json-corrupt": (lambda d: _truncate(d / "tokenizer.json", 40), "m/tokenizer.json", "JSON"),
    "tokenizer-json-wrong-shape": (lambda d: (d / "tokenizer.json").write_text('{"foo": 1}'), "m/tokenizer.json", "tokenizer"),
    "tokenizer-config-corrupt": (lambda d: _truncate(d / "tokenizer_config.json", 10), "m/tokenizer_config.json", "JSON"),
    "config-json-corrupt": (lambda d: _truncate(d / "config.json", 20), "m/config.json", "JSON"),
    "config-unknown-model-type": (lambda d: _edit_json(d / "config.json", model_type="robot_arch"), "m/config.json", "robot_arch"),
    "config-bad-value": (lambda d: _edit_json(d / "config.json", hidden_size="big"), "m/config.json", "hidden_size"),
    "no-tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "m", "tokenizer"),
    "no-weights": (lambda d: (d / "model.safetensors").unlink(), "m", "model.safetensors"),
}


def damaged(micro_dir: Path, tmp_path: Path, case: str) -> tuple[str, str, str]:
    """A damaged copy of micro_dir at tmp_path/m (or tmp_path/broken.gguf) -> (--model, named path, words)."""
    d = tmp_path / "m"
    shutil.copytree(micro_dir, d)
    damage, named, words = DAMAGE[case]
    damage(d)
    model = str(tmp_path / "broken.gguf") if named.endswith(".gguf") else str(d)
    return model, str(tmp_path / named), words


def _named(line: str, path: str) -> bool:
    """The error line names `path` as a whole path (tmp/m, not only as the start of tmp/m/config.json)."""
    return line.endswith(path) or any(f"{path}{end}" in line for end in (": ", "'", " ", ")"))


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_model_is_one_line_naming_the_file(case, micro_dir, tmp_path, capsys) -> None:
    model, named, words = damaged(micro_dir, tmp_path, case)
    prompts = write_jsonl(tmp_path, "p.jsonl", [{"prompt": "hi"}])
    out = tmp_path / "out.jsonl"
    line = one_line_error(*call(["sample", str(prompts), "--model", model, "-n", "1", "--max-new-tokens", "2",
                                 "--output", str(out), "--device", "cpu"], capsys))
    assert _named(line, named), line
    assert words in line, line
    assert not out.exists()


@pytest.mark.parametrize("case", ["gguf-garbage", "safetensors-truncated", "tokenizer-json-corrupt", "config-json-corrupt"])
def test_training_on_a_damaged_model_writes_nothing(case, micro_dir, tmp_path, capsys) -> None:
    model, named, _ = damaged(micro_dir, tmp_path, case)
    data = write_jsonl(tmp_path, "d.jsonl", [{"prompt": "1+1=", "completion": "2"}])
    prefs = write_jsonl(tmp_path, "prefs.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}])
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv in (["sft", str(data), "--model", model, "--out", str(tmp_path / "sft"), "--max-steps", "1"],
                 ["train-rm", str(prefs), "--model", model, "--out", str(tmp_path / "rm"), "--max-steps", "1"]):
        line = one_line_error(*call([*argv, "--device", "cpu"], capsys))
        assert _named(line, named), line
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_missing_model_paths_are_one_line(tmp_path, capsys) -> None:
    prompts = write_jsonl(tmp_path, "p.jsonl", [{"prompt": "hi"}])
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"")
    for model, words in ((tmp_path / "nope.gguf", "no such GGUF file"), (tmp_path / "nope", "no such model directory"),
                         (tmp_path / "empty", "directory has no config.json"), (tmp_path / "model.safetensors", "a file, not a model")):
        line = one_line_error(*call(["sample", str(prompts), "--model", str(model), "--output", str(tmp_path / "o.jsonl")], capsys))
        assert f"{model}: {words}" in line, line
    assert not (tmp_path / "o.jsonl").exists()


def test_the_process_exits_2_and_rlhf_debug_shows_the_traceback(micro_dir, tmp_path) -> None:
    model, named, _ = damaged(micro_dir, tmp_path, "gguf-garbage")
    prompts = write_jsonl(tmp_path, "p.jsonl", [{"prompt": "hi"}])
    argv = ["sample", str(prompts), "--model", model, "--output", str(tmp_path / "o.jsonl")]
    proc = run_cli(argv)
    line = one_line_error(proc.returncode, proc.stdout, proc.stderr)
    assert line.startswith(f"error: {named}: "), line
    proc = run_cli(argv, env={"RLHF_DEBUG": "1"})
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert "RlhfError" in proc.stderr and "struct.error" in proc.stderr  # the library's own error, chained
    assert not (tmp_path / "o.jsonl").exists()


def test_a_bug_still_crashes_with_its_traceback(micro_dir, tmp_path, monkeypatch) -> None:
    """Only failures over the user's files become one-line errors: a TypeError from the loader while
    every file is sound (our bug, or the library's) keeps its traceback (exit 1 in the process)."""
    from transformers import AutoTokenizer

    def bug(*args, **kwargs):
        raise TypeError("from_pretrained() got an unexpected keyword argument 'oops'")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", bug)
    prompts = write_jsonl(tmp_path, "p.jsonl", [{"prompt": "hi"}])
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        main(["sample", str(prompts), "--model", str(micro_dir), "--output", str(tmp_path / "o.jsonl")])
    assert not (tmp_path / "o.jsonl").exists()


def test_a_reward_model_with_a_damaged_config_is_one_line(micro_dir, tmp_path) -> None:
    from rlhf_cli.errors import RlhfError
    from rlhf_cli.models.reward import load_for_scoring

    d = tmp_path / "rm"
    shutil.copytree(micro_dir, d)
    _truncate(d / "config.json", 20)
    with pytest.raises(RlhfError, match=f"^{d}/config.json: damaged file, not valid JSON"):
        load_for_scoring(str(d))


def test_a_damaged_parent_manifest_does_not_lose_a_finished_run(tmp_path, capsys) -> None:
    from rlhf_cli.models.checkpoint import MANIFEST, parent_info

    (tmp_path / MANIFEST).write_text('{"step": "sft", ')
    assert parent_info(str(tmp_path)) == {"model": str(tmp_path)}
    assert f"{tmp_path / MANIFEST}: damaged file" in capsys.readouterr().err


# ---------------------------------------------------------------- unknown chat roles


ROBOT = [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}, {"role": "assistant", "content": "ok"}]
GOOD = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]


@pytest.mark.parametrize(
    ("cmd", "rows"),
    [
        ("sft", [{"messages": GOOD}, {"messages": ROBOT}]),
        ("sft-ptx", [{"prompt": "1+1=", "completion": "2"}, {"messages": ROBOT}]),
        ("sample", [{"messages": GOOD[:2]}, {"messages": ROBOT[:2]}]),
        ("pairwise", [{"messages": GOOD[:2], "completions": ["a", "b"], "answer": "a"},
                      {"messages": ROBOT[:2], "completions": ["a", "b"], "answer": "a"}]),
        ("ppo", [{"messages": GOOD[:2], "answer": "2"}, {"messages": ROBOT[:2], "answer": "2"}]),
        ("train-rm", [{"messages": GOOD[:2], "chosen": "a", "rejected": "b"}, {"messages": ROBOT[:2], "chosen": "a", "rejected": "b"}]),
        ("train-rm", [{"prompt": GOOD[:2], "chosen": "a", "rejected": "b"}, {"prompt": ROBOT[:2], "chosen": "a", "rejected": "b"}]),
        ("train-rm", [{"chosen": GOOD, "rejected": GOOD[:2] + [{"role": "assistant", "content": "no"}]},
                      {"chosen": ROBOT, "rejected": ROBOT[:2] + [{"role": "assistant", "content": "no"}]}]),
    ],
)
def test_an_unknown_role_is_one_line_naming_file_and_line(cmd, rows, tmp_path, capsys) -> None:
    path = write_jsonl(tmp_path, "in.jsonl", rows)
    good = write_jsonl(tmp_path, "good.jsonl", [{"prompt": "1+1=", "answer": "2"}] * 4)
    argv = {
        "sft": ["sft", str(path), "--out", str(tmp_path / "out")],
        "sft-ptx": ["ppo", str(good), "--judge", "rule:exact", "--ptx", str(path), "-b", "4", "--minibatch-size", "4",
                    "--out", str(tmp_path / "out")],
        "sample": ["sample", str(path), "--output", str(tmp_path / "out")],
        "pairwise": ["pairwise", str(path), "--judge", "rule:exact", "--output", str(tmp_path / "out")],
        "ppo": ["ppo", str(path), "--judge", "rule:exact", "-b", "2", "--minibatch-size", "2", "--out", str(tmp_path / "out")],
        "train-rm": ["train-rm", str(path), "--out", str(tmp_path / "out")],
    }[cmd]
    if cmd != "pairwise":
        argv += ["--policy" if argv[0] == "ppo" else "--model", "builtin:micro"]
    line = one_line_error(*call(argv, capsys))
    field = "chosen" if isinstance(rows[1].get("chosen"), list) else "messages"  # TRL's implicit-prompt pairs
    assert f"{path}:2: {field}[1] has role 'robot'" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.jsonl", "in.jsonl"]


def test_the_role_hint_lists_the_roles(tmp_path, capsys) -> None:
    path = write_jsonl(tmp_path, "in.jsonl", [{"messages": ROBOT}])
    code, out, err = call(["sft", str(path), "--model", "builtin:micro", "--out", str(tmp_path / "o")], capsys)
    one_line_error(code, out, err)
    assert "hint: roles are system, user and assistant" in err, err


# ---------------------------------------------------------------- rule judges without the reference


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        # no row has the reference: the first row is named, and the hint lists the fields there are
        ([{"prompt": "a", "completions": ["x", "y"], "gold": "x"}, {"prompt": "b", "completions": ["x", "y"], "gold": "y"}],
         "in.jsonl:1: no reference field 'answer'"),
        # some rows lack it: the first of those is named, even when it is far past the first chunk
        ([{"prompt": f"q{i}", "completions": ["x", "y"], "answer": "x"} for i in range(300)]
         + [{"prompt": "late", "completions": ["x", "y"]}], "in.jsonl:301: no reference field 'answer'"),
        ([{"prompt": "a", "completions": ["x", "y"], "answer": "x"}, {"prompt": "b", "completions": ["x", "y"], "answer": None}],
         "in.jsonl:2: no reference field 'answer'"),
    ],
)
def test_a_rule_judge_names_the_first_row_without_its_reference(rows, expected, tmp_path, capsys) -> None:
    path = write_jsonl(tmp_path, "in.jsonl", rows)
    out = tmp_path / "pairs.jsonl"
    code, stdout, err = call(["pairwise", str(path), "--judge", "rule:exact", "--output", str(out)], capsys)
    line = one_line_error(code, stdout, err)
    assert f"error: {tmp_path}/{expected}" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_no_reference_anywhere_hints_at_the_fields_there_are(tmp_path, capsys) -> None:
    path = write_jsonl(tmp_path, "in.jsonl", [{"prompt": "a", "completions": ["x", "y"], "gold": "x"}])
    code, out, err = call(["pairwise", str(path), "--judge", "rule:exact"], capsys)
    one_line_error(code, out, err)
    assert "the rows have: gold, prompt" in err and "--reference FIELD" in err, err


# ---------------------------------------------------------------- a quiet stderr

HF_NOISE = ("Loading weights", "Writing model shards", "it/s]", "%|")


def _quiet(stderr: str) -> None:
    for text in HF_NOISE:
        assert text not in stderr, stderr


def test_sft_sample_and_ppo_in_process_show_only_our_own_progress(micro_dir, tmp_path, capfd) -> None:
    """The quick-tier twin of the subprocess test below: cli.main over sft, sample and ppo, with the
    libraries' bars and info logging switched back on before each (as a fresh process has them)."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    from rlhf_cli.cli import main

    data = write_jsonl(tmp_path, "d.jsonl", [{"prompt": f"{i}+1=", "completion": str(i + 1), "answer": str(i + 1)} for i in range(4)])
    runs = [
        (["sft", str(data), "--model", str(micro_dir), "--out", str(tmp_path / "sft"), "--max-steps", "1", "-b", "2", "--device", "cpu"], "saved"),
        (["sample", str(data), "--model", str(micro_dir), "-n", "1", "--max-new-tokens", "2", "--device", "cpu"], "sample"),
        (["ppo", str(data), "-m", str(micro_dir), "--judge", "rule:exact", "-b", "4", "--minibatch-size", "4", "--max-new-tokens", "2",
          "--max-steps", "1", "--save-every", "0", "--out", str(tmp_path / "ppo"), "--device", "cpu"], "saved"),
    ]
    for argv, ours in runs:
        enable_progress_bars()
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity_info()
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capfd.readouterr().err
        assert e.value.code in (0, None), err
        _quiet(err)
        assert ours in err, err


@pytest.mark.slow
def test_sft_sample_and_ppo_show_only_our_own_progress(micro_dir, tmp_path) -> None:
    data = write_jsonl(tmp_path, "d.jsonl", [{"prompt": f"{i}+1=", "completion": str(i + 1), "answer": str(i + 1)} for i in range(4)])
    sft = run_cli(["sft", str(data), "--model", str(micro_dir), "--out", str(tmp_path / "sft"), "--max-steps", "1",
                   "-b", "2", "--device", "cpu"])
    assert sft.returncode == 0, sft.stderr
    _quiet(sft.stderr)
    assert "saved" in sft.stderr and "sft" in sft.stderr
    sample = run_cli(["sample", str(data), "--model", str(tmp_path / "sft"), "-n", "1", "--max-new-tokens", "2",
                      "--device", "cpu"])
    assert sample.returncode == 0, sample.stderr
    _quiet(sample.stderr)
    assert "sample" in sample.stderr and sample.stdout.count("\n") == 4
    ppo = run_cli(["ppo", str(data), "--policy", str(tmp_path / "sft"), "--judge", "rule:exact", "-b", "4",
                   "--minibatch-size", "4", "--max-new-tokens", "2", "--max-steps", "1", "--save-every", "0",
                   "--out", str(tmp_path / "ppo"), "--device", "cpu"])
    assert ppo.returncode == 0, ppo.stderr
    _quiet(ppo.stderr)
    assert "ppo" in ppo.stderr and (tmp_path / "ppo" / "model.safetensors").is_file()


def test_run_called_directly_is_quiet_too(micro_dir, tmp_path, capfd) -> None:
    """Tests and scripts call run(cfg) without cli.main: model loading itself turns the bars off."""
    from transformers.utils import logging as hf_logging

    from rlhf_cli.commands.sample import SampleConfig, run

    hf_logging.enable_progress_bar()  # as a fresh process would have it, whatever ran before
    prompts = write_jsonl(tmp_path, "p.jsonl", [{"prompt": "hi"}])
    run(SampleConfig(prompts=str(prompts), model=str(micro_dir), n=1, max_new_tokens=2, output=str(tmp_path / "o.jsonl"),
                     device="cpu"))
    _quiet(capfd.readouterr().err)
