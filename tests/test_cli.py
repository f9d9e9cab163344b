"""CLI tier: --help per command, --version, exit codes, one-line errors naming file:line, and no
output left behind when the input is bad.

Most cases call `rlhf_cli.cli.main(argv)` in-process (it ends in SystemExit); a few run the real
`python -m rlhf_cli` where the process boundary is the point (imports, tracebacks, exit codes).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import run_cli, write_jsonl

from rlhf_cli import __version__
from rlhf_cli.cli import main


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `rlhf argv` in-process -> (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    code = e.value.code
    return (0 if code is None else code), out, err


# ---------------------------------------------------------------- help, version, usage errors


@pytest.mark.parametrize(
    ("argv", "examples"),
    [
        (["--help"], ["Examples", "rlhf sft demos.jsonl", "rlhf sample prompts.jsonl"]),
        (["sft", "--help"], ["Examples", "rlhf sft demos.jsonl --model builtin:tiny --out sft/", "--resume"]),
        (["sample", "--help"], ["Examples", "rlhf sample prompts.jsonl --model sft/ -n 4", "--temperature 0"]),
        (["sft", "-h"], ["Examples"]),
    ],
)
def test_help_exits_0_and_shows_examples(argv, examples, capsys) -> None:
    code, out, _ = call(argv, capsys)
    assert code == 0
    for text in examples:
        assert text in out


def test_version(capsys) -> None:
    code, out, _ = call(["--version"], capsys)
    assert (code, out.strip()) == (0, f"rlhf {__version__}")


@pytest.mark.parametrize("argv", [["--bogus"], ["sft", "x.jsonl", "--bogus"], ["sample", "x.jsonl", "--bogus"], ["nope"]])
def test_usage_errors_exit_2_without_traceback(argv, capsys) -> None:
    code, out, err = call(argv, capsys)
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    assert ("No such option: --bogus" in err) or ("No such command" in err)


def test_bad_choice_is_a_one_line_error(tmp_path, capsys) -> None:
    data = write_jsonl(tmp_path, "d.jsonl", [{"text": "t"}])
    code, _, err = call(["sft", str(data), "--out", str(tmp_path / "o"), "--schedule", "step"], capsys)
    assert code == 2
    assert "error: --schedule must be one of constant, linear, cosine, wsd; got 'step'" in err


def test_help_does_not_import_torch_or_transformers() -> None:
    code = (
        "import sys\n"
        "from rlhf_cli.cli import main\n"
        "for argv in (['--help'], ['sft', '--help'], ['sample', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), e.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'tokenizers'))\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HEAVY []" in proc.stderr


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

BAD_SFT = [
    # (rows, where, expected text)
    ([{"prompt": "p", "completion": "c"}, '{"prompt": "p", '], ":2", "malformed JSON"),
    ([{"prompt": "p", "completion": "c"}, "[1, 2]"], ":2", "expected a JSON object, got list"),
    ([{"prompt": "p"}], ":1", "missing field 'completion', expected"),
    ([{"text": "ok"}, {"prompt": 3, "completion": "c"}], ":2", "field 'prompt' must be a string, got int"),
    ([{"messages": "hi"}], ":1", "'messages' must be a non-empty list"),
    ([{"messages": [{"content": "x"}]}], ":1", 'messages[0] must be {"role": str, "content": str}'),
    ([{"question": "q"}], ":1", "expected {\"prompt\": str, \"completion\": str}"),
    ([], ":1", "file is empty, expected JSONL rows"),
]

BAD_SAMPLE = [
    ([{"prompt": "p"}, '{"prompt": "p", '], ":2", "malformed JSON"),
    (['"p"'], ":1", "expected a JSON object, got str"),
    ([{"prompt": "p"}, {"question": "q"}], ":2", "no 'prompt' or 'messages' field, expected {\"prompt\": str}"),
    ([{"prompt": 3}], ":1", "field 'prompt' must be a string, got int"),
    ([{"messages": {"role": "user", "content": "x"}}], ":1", "'messages' must be a non-empty list"),
    ([{"messages": [{"content": "x"}]}], ":1", "messages[0] must be"),
    ([{"id": "a", "prompt": "p"}, {"id": "a", "prompt": "q"}], ":2", "duplicate id 'a'"),
    ([], ":1", "file is empty, expected JSONL rows"),
]


def _assert_one_line_error(code: int, out: str, err: str, location: str, expected: str) -> None:
    assert code == 2, err
    assert out == ""  # stdout is data: nothing on failure
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err
    assert location in errors[0] and expected in errors[0], err
    assert all(ln.startswith(("error:", "hint:")) for ln in err.splitlines() if ln.strip()), err


def _argv(cmd: str, src: str, out) -> list[str]:
    if cmd == "sft":
        return ["sft", src, "--out", str(out), "--model", "builtin:micro"]
    return ["sample", src, "--output", str(out), "--model", "builtin:micro"]


@pytest.mark.parametrize(("cmd", "rows", "line", "expected"), [("sft", *c) for c in BAD_SFT] + [("sample", *c) for c in BAD_SAMPLE])
def test_bad_rows_one_line_exit_2_no_output(cmd, rows, line, expected, tmp_path, capsys) -> None:
    src = write_jsonl(tmp_path, "in.jsonl", rows)
    out = tmp_path / ("ckpt" if cmd == "sft" else "out.jsonl")
    code, stdout, err = call(_argv(cmd, str(src), out), capsys)
    _assert_one_line_error(code, stdout, err, f"in.jsonl{line}:", expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no OUT, no OUT-state, no temp files


@pytest.mark.parametrize("cmd", ["sft", "sample"])
def test_missing_path_and_directory(cmd, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code, stdout, err = call(_argv(cmd, str(tmp_path / "missing.jsonl"), out), capsys)
    _assert_one_line_error(code, stdout, err, "missing.jsonl", "no such file")
    (tmp_path / "adir").mkdir()
    code, stdout, err = call(_argv(cmd, str(tmp_path / "adir"), out), capsys)
    _assert_one_line_error(code, stdout, err, "adir", "is a directory, expected a JSONL file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read anything")
@pytest.mark.parametrize("cmd", ["sft", "sample"])
def test_unreadable_path(cmd, tmp_path, capsys) -> None:
    src = write_jsonl(tmp_path, "secret.jsonl", [{"prompt": "p", "completion": "c"}])
    src.chmod(0)
    try:
        code, stdout, err = call(_argv(cmd, str(src), tmp_path / "out"), capsys)
    finally:
        src.chmod(0o644)
    _assert_one_line_error(code, stdout, err, "secret.jsonl", "cannot read")
    assert not (tmp_path / "out").exists()


def test_sft_bad_second_source_fails_before_anything_is_written(tmp_path, capsys) -> None:
    good = write_jsonl(tmp_path, "good.jsonl", [{"prompt": "p", "completion": "c"}])
    bad = write_jsonl(tmp_path, "bad.jsonl", [{"text": "t"}, {"text": 1}])
    argv = ["sft", f"{good}:2", "--data", f"{bad}:0.5", "--out", str(tmp_path / "ckpt"), "--model", "builtin:micro"]
    code, stdout, err = call(argv, capsys)
    _assert_one_line_error(code, stdout, err, "bad.jsonl:2:", "field 'text' must be a string, got int")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl"]


def test_error_text_is_not_read_as_markup(tmp_path, capsys) -> None:
    # rich would swallow '[red]' in a path if the message were printed as markup
    code, stdout, err = call(["sample", str(tmp_path / "[red]x.jsonl"), "--output", str(tmp_path / "o")], capsys)
    _assert_one_line_error(code, stdout, err, "[red]x.jsonl", "no such file")


# ---------------------------------------------------------------- the real process


def test_process_exit_code_and_one_line_error(tmp_path) -> None:
    src = write_jsonl(tmp_path, "in.jsonl", [{"prompt": "p", "completion": "c"}, "{oops"])
    out = tmp_path / "ckpt"
    proc = run_cli(["sft", str(src), "--out", str(out)])
    assert proc.returncode == 2
    assert proc.stdout == ""
    first = proc.stderr.splitlines()[0]
    assert first.startswith(f"error: {src}:2: malformed JSON"), proc.stderr
    assert not out.exists() and not (tmp_path / "ckpt-state").exists()


def test_rlhf_debug_shows_the_traceback(tmp_path) -> None:
    src = write_jsonl(tmp_path, "in.jsonl", [{"prompt": 1}])
    proc = run_cli(["sample", str(src), "--output", str(tmp_path / "o.jsonl")], env={"RLHF_DEBUG": "1"})
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "RlhfError" in proc.stderr and "in.jsonl:1: field 'prompt' must be a string" in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_keep_freed_memory_sets_glibc_malloc_and_respects_the_users_tunables() -> None:
    """mallopt is applied in a fresh process (True on glibc Linux), and skipped when GLIBC_TUNABLES
    already holds malloc settings: the user's own choice wins."""
    import subprocess
    import sys

    code = "from rlhf_cli.runtime import keep_freed_memory; print(keep_freed_memory())"
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    if sys.platform.startswith("linux") and Path("/lib/x86_64-linux-gnu/libc.so.6").exists():
        assert plain == "True"
    env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.strip() == "False"
