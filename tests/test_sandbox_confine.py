"""The sandbox's file-system confinement: hostile candidates read and write nothing outside their own
working directory, under each layer the kernel offers (Landlock; the mount namespace view), alone.

The reads, the write to /tmp and the other candidate's directory also run with confine="none" where
that shows the attack succeeding (as root while the dropped uid keeps CAP_DAC_READ_SEARCH to reach a
pyenv under /root; as an ordinary user, in its own home), so the tests are known to bite.
"""

from __future__ import annotations

import functools
import os
import secrets
import subprocess
import tempfile
from pathlib import Path

import orjson
import pytest
from conftest import write_jsonl

from rlhf_cli.cli import main
from rlhf_cli.evals import code
from rlhf_cli.evals.confine import allowlist, landlock_abi
from rlhf_cli.evals.sandbox import PRELOAD, Outcome, Sandbox, confinement, run_program

ROOT = os.geteuid() == 0
NOBODY = 65534
LAYERS = ("landlock", "mountns")
WHY = {"landlock": "no Landlock on this kernel (Linux >= 5.13 with landlock among the LSMs)",
       "mountns": "no mount namespace here (needs root or unprivileged user namespaces)"}


def box(layer: str, **kw) -> Sandbox:
    # the guard off: it leaves open() alone anyway, and the OS layer is what is measured
    return Sandbox(timeout=2.0, memory_mb=512, guard=False, confine=layer, **kw)


@functools.cache
def available(layer: str) -> bool:
    return layer in confinement(box(layer))


@pytest.fixture(params=LAYERS)
def layer(request) -> str:
    if not available(request.param):
        pytest.skip(WHY[request.param])
    return request.param


@pytest.fixture
def secret() -> str:
    return f"SECRET-{secrets.token_hex(8)}"


@pytest.fixture
def home_secret(secret):
    """A 0600 file in the invoking user's home (/root when root: the root-only file of the report)."""
    path = Path.home() / f".rlhf-confine-test-{secrets.token_hex(4)}"
    path.write_text(secret)
    path.chmod(0o600)
    try:
        yield path
    finally:
        path.unlink()


def leaked(o: Outcome, *needles: str) -> bool:
    return any(n in o.output or n in o.error for n in needles)


def unconfined_reads(path: Path) -> bool:
    """Would the read succeed without confinement? As root only while the uid drop keeps
    CAP_DAC_READ_SEARCH (an interpreter under /root); as an ordinary user, its own files always."""
    o = run_program("pass", box("none"))
    return o.layers.get("read_cap", False) or not ROOT and os.access(path, os.R_OK)


# ---------------------------------------------------------------- reads


def test_reading_a_file_in_the_home_directory_fails(layer, home_secret, secret):
    program = f"print(open({str(home_secret)!r}).read())"
    o = run_program(program, box(layer))
    assert o.status == "failed" and o.layers["confine"] == [layer]
    assert o.error.startswith("PermissionError" if layer == "landlock" else "FileNotFoundError")
    assert not leaked(o, secret)
    if unconfined_reads(home_secret):  # the attack is real: without the layer the secret comes out
        assert secret in run_program(program, box("none")).output


def test_reading_a_root_only_file_outside_home_fails(layer, tmp_path, secret):
    hidden = tmp_path / "root-only"
    hidden.mkdir(mode=0o700)
    target = hidden / "key"
    target.write_text(secret)
    target.chmod(0o600)
    program = f"print(open({str(target)!r}).read())"
    o = run_program(program, box(layer))
    assert o.status == "failed" and not leaked(o, secret)
    if unconfined_reads(target):
        assert secret in run_program(program, box("none")).output


def never_shown(path: str) -> set[str]:
    """The entries of directory `path` that no allowed path (nor the working directories) goes through."""
    through = {*(p for p, _ in allowlist(PRELOAD)), tempfile.gettempdir()}
    ways = {Path(p).relative_to(path).parts[0] for p in through if Path(p) != Path(path) and Path(p).is_relative_to(path)}
    return set(os.listdir(path)) - ways


@pytest.mark.parametrize("where", ["home", "/root", "/"])
def test_listing_home_root_or_the_root_directory_shows_nothing_else(layer, home_secret, where):
    path = str(Path.home()) if where == "home" else where
    if not os.access(path, os.R_OK):
        pytest.skip(f"{path} is closed to us as well")
    hidden = never_shown(path)
    assert home_secret.name in hidden or path != str(Path.home())
    o = run_program(f"import os\nprint(sorted(os.listdir({path!r})))", box(layer))
    assert not leaked(o, *(repr(name) for name in hidden))
    if layer == "landlock":
        assert o.status == "failed" and "PermissionError" in o.error
    else:  # the view: the directory holds at most the way to the interpreter and the working directory
        assert o.status == "failed" or o.status == "passed" and o.output.startswith("[")


def test_another_candidates_directory_cannot_be_read(layer, secret):
    # what a candidate running beside this one (same uid) leaves in its working directory, world-readable
    other = Path(tempfile.mkdtemp(prefix="rlhf-code-"))
    try:
        (other / "answer.txt").write_text(secret)
        (other / "answer.txt").chmod(0o644)
        if ROOT:
            os.chown(other, NOBODY, NOBODY)
        program = f"import glob\nprint(glob.glob({str(other.parent)!r} + '/rlhf-code-*'))\nprint(open({str(other / 'answer.txt')!r}).read())"
        o = run_program(program, box(layer))
        assert o.status == "failed" and not leaked(o, secret) and other.name not in o.output  # nor listed by the glob
        assert secret in run_program(program, box("none")).output  # same uid, no layer: it reads it
    finally:
        (other / "answer.txt").unlink()
        other.rmdir()


# ---------------------------------------------------------------- writes


def test_writing_to_tmp_fails_and_creates_nothing(layer):
    target = Path(tempfile.gettempdir()) / f"rlhf-escape-{secrets.token_hex(4)}"
    program = f"open({str(target)!r}, 'w').write('x')"
    o = run_program(program, box(layer))
    assert o.status == "failed" and not target.exists()
    assert o.error.startswith("PermissionError" if layer == "landlock" else "OSError: [Errno 30] Read-only file system")
    try:
        assert run_program(program, box("none")).status == "passed" and target.exists()  # /tmp is anyone's, unconfined
    finally:
        target.unlink(missing_ok=True)


def test_writing_next_to_the_problem_file_fails(layer):
    shared = Path(tempfile.mkdtemp(prefix="rlhf-problems-"))  # a data directory anyone may write to
    shared.chmod(0o777)
    problems = write_jsonl(shared, "problems.jsonl", [{"task_id": "t"}])
    target = problems.parent / "planted.py"
    program = f"open({str(target)!r}, 'w').write('import os')"
    try:
        o = run_program(program, box(layer))
        assert o.status == "failed" and not target.exists()
        assert sorted(p.name for p in shared.iterdir()) == ["problems.jsonl"]
        assert run_program(program, box("none")).status == "passed" and target.exists()  # unconfined, it plants it
    finally:
        for p in shared.iterdir():
            p.unlink()
        shared.rmdir()


def test_the_working_directory_stays_writable_and_python_works(layer):
    program = ("import hashlib, json, math, os, re, tempfile, datetime\n"
               "open('out.txt', 'w').write('kept')\nd = tempfile.mkdtemp()\nopen(os.path.join(d, 'x'), 'w').write('y')\n"
               "open(os.devnull, 'w').write('gone')\nassert len(os.urandom(8)) == 8 and len(open('/dev/urandom', 'rb').read(8)) == 8\n"
               "print(open('out.txt').read(), hashlib.md5(b'').hexdigest()[:6], datetime.datetime.now().year > 2000)")
    o = run_program(program, box(layer))
    assert (o.status, o.output) == ("passed", "kept d41d8c True\n")
    numpy = run_program("import numpy as np\nassert int(np.arange(5).sum()) == 10", box(layer))  # the preloaded site-packages
    assert numpy.status == "passed", numpy.error


def test_a_subprocess_inherits_the_confinement(layer, home_secret, secret):
    o = run_program(f"import subprocess\nprint(subprocess.run(['cat', {str(home_secret)!r}], capture_output=True, text=True))",
                    box(layer))
    assert o.status == "passed" and "returncode=1" in o.output and not leaked(o, secret)  # cat ran, and could not read it


# ---------------------------------------------------------------- the layers together, and without any


@pytest.mark.skipif(not ROOT, reason="the uid drop (and its capabilities) happens only when started as root")
def test_the_uid_drop_keeps_no_capability_when_the_view_shows_the_interpreter():
    if not available("mountns"):
        pytest.skip(WHY["mountns"])
    effective = ("import ctypes, struct\nhdr = ctypes.create_string_buffer(struct.pack('Ii', 0x20080522, 0))\n"
                 "data = ctypes.create_string_buffer(24)\nassert ctypes.CDLL(None).capget(hdr, data) == 0\n"
                 "print(struct.unpack('6I', data.raw)[0])")
    o = run_program(effective, box("auto"))
    assert o.status == "passed" and int(o.output) == 0 and o.layers["read_cap"] is False
    assert o.layers["confine"] == [c for c in ("mountns", "landlock") if available(c)]


@pytest.mark.skipif(not ROOT, reason="the capability question arises only for the uid drop as root")
def test_landlock_holds_even_against_cap_dac_read_search(home_secret, secret):
    if not available("landlock"):
        pytest.skip(WHY["landlock"])
    o = run_program(f"print(open({str(home_secret)!r}).read())", box("landlock"))
    if not o.layers["read_cap"]:
        pytest.skip("this interpreter is world-readable: the uid drop keeps no capability to test against")
    assert o.status == "failed" and "PermissionError" in o.error and not leaked(o, secret)


@pytest.mark.skipif(not ROOT, reason="needs a process of the same uid as the candidate outside its sandbox")
def test_landlock_scopes_signals_to_the_candidates_own_processes():
    if not available("landlock") or landlock_abi() < 6:
        pytest.skip("signal scoping needs Landlock ABI >= 6 (Linux >= 6.12)")
    neighbour = subprocess.Popen(["sleep", "30"], user=NOBODY)  # another candidate, as far as uids go
    try:
        program = f"import os\nos.kill({neighbour.pid}, 0)\nprint('reached')"
        assert run_program(program, box("none")).output == "reached\n"
        o = run_program(program, box("landlock"))
        assert o.status == "failed" and "PermissionError" in o.error
        assert neighbour.poll() is None
    finally:
        neighbour.kill()
        neighbour.wait()


# ---------------------------------------------------------------- end to end: rlhf eval code


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return (0 if e.value.code is None else e.value.code), out, err


def hostile_problem_set(tmp_path: Path, home_secret: Path, marker: str) -> tuple[Path, Path, list[Path]]:
    """A problem file whose canonical solution holds `marker`, and completions that go after the home
    secret, the problem file, and places to plant files: (problems, completions, would-be files)."""
    problems = write_jsonl(tmp_path, "p.jsonl", [{
        "task_id": "t/0", "prompt": "def add(a, b):\n", "entry_point": "add",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "canonical_solution": f"    return a + b  # {marker}\n"}])
    planted = [tmp_path / "planted.py", Path(tempfile.gettempdir()) / f"rlhf-escape-{secrets.token_hex(4)}"]
    attacks = [f"    print(open({str(home_secret)!r}).read())\n    return a + b\n",
               f"    print(open({str(problems)!r}).read())\n    return a + b\n",
               *(f"    open({str(p)!r}, 'w').write('x')\n    return a + b\n" for p in planted)]
    completions = write_jsonl(tmp_path, "samples.jsonl", [{"task_id": "t/0", "completion": c} for c in attacks])
    return problems, completions, planted


def test_eval_code_end_to_end_leaks_nothing(layer, tmp_path, capsys, monkeypatch, home_secret, secret):
    marker = f"MARKER-{secrets.token_hex(6)}"
    problems, completions, planted = hostile_problem_set(tmp_path, home_secret, marker)
    monkeypatch.setattr(code, "Sandbox", functools.partial(Sandbox, confine=layer))
    log = tmp_path / "log.jsonl"
    rc, out, err = call(["eval", "code", str(problems), "--completions", str(completions), "--allow-code-exec",
                         "--require-confinement", "--log-samples", str(log)], capsys)
    assert rc == 0
    result = orjson.loads(out)["results"][0]
    assert result["outcomes"] == {"failed": 4} and result["sandbox"]["confinement"] == [layer]
    for channel in (out, err, log.read_text()):
        assert secret not in channel and marker not in channel
    assert not any(p.exists() for p in planted)


def test_without_confinement_eval_code_warns_or_refuses(tmp_path, capsys, monkeypatch, home_secret):
    problems, completions, planted = hostile_problem_set(tmp_path, home_secret, "m")
    monkeypatch.setattr(code, "Sandbox", functools.partial(Sandbox, confine="none"))
    log = tmp_path / "log.jsonl"
    argv = ["eval", "code", str(problems), "--completions", str(completions), "--allow-code-exec", "--log-samples", str(log)]
    rc, out, err = call([*argv, "--require-confinement"], capsys)
    assert rc == 2 and out == "" and not log.exists()  # refused before any candidate ran
    error, hint = err.strip().splitlines()
    assert error.startswith("error: --require-confinement") and "no file-system confinement" in error and hint.startswith("hint:")
    rc, out, err = call(argv, capsys)
    assert rc == 0 and "NO FILE-SYSTEM CONFINEMENT" in " ".join(err.split())
    assert orjson.loads(out)["results"][0]["sandbox"]["confinement"] == []
    for p in planted:
        p.unlink(missing_ok=True)  # unconfined, the candidates may have planted these
