"""`--judge human` driven through a pseudo-terminal: keys in, verdicts and screens out.

Each test starts a small driver (or `rlhf pairwise`) in a new session whose controlling terminal is
a pty slave, so the judge opens the real /dev/tty; the test plays the labeler on the pty master:
it waits for a screen, checks it, and types the next key.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from rlhf_cli.errors import RlhfError
from rlhf_cli.judges.base import JudgeOptions
from rlhf_cli.judges.human import HumanJudge, KeyReader

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>78]")
RIGHT, LEFT, CTRL_C = "\x1b[C", "\x1b[D", "\x03"

# The driver: builds Items from rows, asks the judge, prints one JSON line per verdict as it is yielded.
DRIVER = r"""
import json, sys
from rlhf_cli.data.records import Item
from rlhf_cli.errors import RlhfError
from rlhf_cli.judges.base import Ask, JudgeOptions
from rlhf_cli.judges.human import HumanJudge

spec = json.loads(sys.argv[1])
items = [Item(r["id"], r["prompt"], tuple(r["completions"]), r, where=f"in.jsonl:{i + 1}") for i, r in enumerate(spec["rows"])]
asks = [Ask(items[i], f, s) for i, f, s in spec["asks"]]
try:
    judge = HumanJudge(JudgeOptions(), undo=spec.get("undo", 1))
except RlhfError as e:
    print(json.dumps({"error": e.message, "hint": e.hint}), flush=True)
    sys.exit(2)
try:
    for n, (ask, v) in enumerate(judge.judge(asks if spec.get("sized", True) else iter(asks)), 1):
        print(json.dumps({"id": ask.item.id, "pair": [ask.first, ask.second], "winner": v.winner, "raw": v.raw, "cost": v.cost}), flush=True)
        if n == spec.get("fail_after"):
            raise RuntimeError("the consumer failed")
finally:
    judge.close()
print(json.dumps({"stopped": judge.stopped}), flush=True)
"""

ROWS = [
    {"id": "p1", "prompt": "What is 2+2?", "answer": "4", "completions": ["alpha-four", "beta-five", "gamma-six"]},
    {"id": "p2", "prompt": "Name a colour.", "completions": ["alpha-red", "beta-blue", "gamma-green"]},
    {"id": "p3", "prompt": "Say hi.", "completions": ["alpha-hi", "beta-hello"]},
]


class Term:
    """A process whose controlling terminal is a fresh pty; we hold the master (keyboard and screen)."""

    def __init__(self, args: list[str], cols: int = 120, rows: int = 50, stdin: int | None = None,
                 stderr_to_tty: bool = False, cwd: Path = ROOT) -> None:
        self.master, self.slave = os.openpty()
        self.resize(cols, rows)
        self.saved = termios.tcgetattr(self.slave)  # the mode the judge must leave behind
        slave = self.slave
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "RLHF_DEBUG")}
        env.update(TERM="xterm-256color", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            args, cwd=cwd, env=env, stdin=self.slave if stdin is None else stdin, stdout=subprocess.PIPE,
            stderr=self.slave if stderr_to_tty else subprocess.PIPE, pass_fds=(slave,), start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(slave, termios.TIOCSCTTY, 0),  # after setsid: the pty becomes /dev/tty
        )
        self.raw = b""
        self.pos = 0
        self.lines: list[str] = []
        self._stop = False
        self._threads = [threading.Thread(target=self._read_screen, daemon=True),
                         threading.Thread(target=self._read_stdout, daemon=True)]
        for t in self._threads:
            t.start()

    def resize(self, cols: int, rows: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def _read_screen(self) -> None:
        while not self._stop:
            if select.select([self.master], [], [], 0.05)[0]:
                try:
                    self.raw += os.read(self.master, 65536)
                except OSError:
                    return

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.decode())

    @property
    def screen(self) -> str:
        return ANSI.sub("", self.raw.decode("utf-8", "replace")).replace("\r", "")

    def wait_for(self, text: str, timeout: float = 15) -> str:
        """Wait until `text` is drawn after the last thing waited for; return the screen from it on."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen
            i = screen.find(text, self.pos)
            if i >= 0:
                self.pos = i + len(text)
                return screen[i:]
            if self.proc.poll() is not None and self.screen.find(text, self.pos) < 0:
                break
            time.sleep(0.01)
        err = self.proc.stderr.read().decode() if self.proc.stderr and self.proc.poll() is not None else ""
        raise AssertionError(f"{text!r} never appeared; screen after it:\n{self.screen[self.pos:]}\n{err}")

    def wait_screen(self, head: str, tail: str = "q quit") -> str:
        """One whole screen: from `head` (drawn after the last thing waited for) to the next `tail`."""
        self.wait_for(head)
        start = self.screen.rfind(head, 0, self.pos)
        self.wait_for(tail)
        return self.screen[start : self.pos]

    def press(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def cbreak(self) -> bool:
        """Is the terminal in cbreak mode right now (no line editing, no echo)?"""
        lflag = termios.tcgetattr(self.slave)[3]
        return not lflag & (termios.ICANON | termios.ECHO)

    def finish(self, timeout: float = 30) -> list[dict]:
        """Wait for the exit; the JSON lines printed on stdout."""
        self.proc.wait(timeout)
        for t in self._threads[1:]:
            t.join(5)
        time.sleep(0.05)
        self._stop = True
        self._threads[0].join(5)
        self.restored = termios.tcgetattr(self.slave) == self.saved
        os.close(self.master)
        os.close(self.slave)
        return [json.loads(line) for line in self.lines if line.strip()]

    def wait_lines(self, n: int, timeout: float = 10) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.lines) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.lines)


def drive(asks: list[tuple[int, int, int]], data: list[dict] = ROWS, **kw) -> Term:
    """Run the driver on sample rows `data`; asks are (row index, first, second); kw go to Term."""
    spec = {"rows": data, "asks": asks, **{k: kw.pop(k) for k in ("undo", "sized", "fail_after") if k in kw}}
    return Term([sys.executable, "-c", DRIVER, json.dumps(spec)], **kw)


def winners(out: list[dict]) -> list[tuple]:
    return [(o["id"], tuple(o["pair"]), o["winner"], o["raw"]) for o in out if "winner" in o]


def test_keys_give_verdicts_and_the_screen_shows_the_pair() -> None:
    t = drive([(0, 0, 1), (0, 2, 0), (1, 0, 1), (1, 1, 2), (2, 1, 0)])
    first = t.wait_screen("pair 1 of 5, prompt 1 of 3")
    assert t.cbreak()  # keys need no Enter while a pair is shown
    assert "What is 2+2?" in first and "answer: 4" in first  # the prompt, and its reference answer
    # side by side: one line of the screen crosses panel A and panel B
    assert any("alpha-four" in line and "beta-five" in line for line in first.splitlines()), first
    assert "gamma-six" not in first  # only the two completions asked about
    t.press("a")
    second = t.wait_screen("pair 2 of 5, prompt 1 of 3")
    assert "gamma-six" in second and "alpha-four" in second
    assert t.wait_lines(0) == []  # the first answer is held back (undoable) until the next is given
    t.press("x")  # not a key: said so, nothing answered
    t.wait_for("'x' is not a key here")
    t.press(RIGHT)
    t.wait_for("pair 3 of 5, prompt 2 of 3")
    assert len(t.wait_lines(1)) == 1  # now the first answer has been passed on
    t.press("t")
    third = t.wait_screen("pair 4 of 5, prompt 2 of 3")
    assert "answer:" not in third  # p2 has no reference answer
    t.press("s")
    t.wait_for("pair 5 of 5, prompt 3 of 3")
    t.press("1")
    out = t.finish()
    assert winners(out) == [
        ("p1", (0, 1), "A", "a"),
        ("p1", (2, 0), "B", "right"),
        ("p2", (0, 1), "tie", "t"),
        ("p2", (1, 2), None, "s"),  # skip: an answer with no winner
        ("p3", (1, 0), "A", "1"),
    ]
    assert all(o["cost"] == 0.0 for o in out if "winner" in o)
    assert out[-1] == {"stopped": None}
    assert t.proc.returncode == 0 and t.restored


def test_undo_shows_the_pair_again_and_keeps_the_new_answer() -> None:
    t = drive([(0, 0, 1), (0, 1, 2), (1, 0, 1)])
    t.wait_for("pair 1 of 3")
    t.press("a")
    t.wait_for("pair 2 of 3")
    t.press("u")  # take back pair 1's "a"
    assert "alpha-four" in t.wait_screen("pair 1 of 3")
    t.press("b")
    t.wait_for("pair 2 of 3")
    t.press("2")
    t.wait_for("pair 3 of 3")
    t.press("u")  # take back pair 2's "2"; pair 1 was passed on when pair 2 was answered
    t.wait_for("pair 2 of 3")
    t.press("u")
    t.wait_for("pair 2 of 3")
    t.wait_for("nothing to undo: earlier answers are already saved")
    t.press("=")
    t.wait_for("pair 3 of 3")
    t.press(LEFT)
    out = t.finish()
    assert winners(out) == [("p1", (0, 1), "B", "b"), ("p1", (1, 2), "tie", "="), ("p2", (0, 1), "A", "left")]
    assert t.restored


def test_undo_depth_two_takes_back_two_answers() -> None:
    t = drive([(0, 0, 1), (0, 1, 2), (1, 0, 1)], undo=2)
    t.wait_for("pair 1 of 3")
    t.press("a")
    t.wait_for("pair 2 of 3")
    t.press("a")
    t.wait_for("pair 3 of 3")
    assert t.wait_lines(0) == []  # both held
    t.press("u")
    t.wait_for("pair 2 of 3")
    t.press("u")
    t.wait_for("pair 1 of 3")
    t.press("b")
    t.wait_for("pair 2 of 3")
    t.press("b")
    t.wait_for("pair 3 of 3")
    t.press("t")
    out = t.finish()
    assert winners(out) == [("p1", (0, 1), "B", "b"), ("p1", (1, 2), "B", "b"), ("p2", (0, 1), "tie", "t")]


@pytest.mark.parametrize("stop_key, reason", [("q", "quit by the labeler"), (CTRL_C, "interrupted by the labeler (Ctrl-C)")])
def test_quit_half_way_keeps_every_decided_answer(stop_key: str, reason: str) -> None:
    t = drive([(0, 0, 1), (0, 1, 2), (1, 0, 1), (2, 0, 1)])
    t.wait_for("pair 1 of 4")
    t.press("b")
    t.wait_for("pair 2 of 4")
    t.press("a")
    t.wait_for("pair 3 of 4")
    t.press(stop_key)
    out = t.finish()
    # the held answer (pair 2) is passed on at the stop; pairs 3 and 4 never are
    assert winners(out) == [("p1", (0, 1), "B", "b"), ("p1", (1, 2), "A", "a")]
    assert out[-1] == {"stopped": reason}
    assert t.proc.returncode == 0 and t.restored


def test_narrow_terminal_stacks_a_generator_of_asks_and_redraws_on_resize() -> None:
    rows = [{"id": 7, "prompt": "Pick one.", "completions": ["alpha-one \x1b[31mred", "beta-two"]}]
    t = drive([(0, 0, 1)], data=rows, sized=False, cols=120)
    wide = t.wait_screen("pair 1 of 1")
    assert "pair 1 of 1, prompt 1 of 1" in wide  # totals even when the asks come from a generator
    assert "alpha-one \\x1bred" in wide.replace("[31m", "")  # an escape in an answer is shown, not obeyed
    assert any("alpha-one" in line and "beta-two" in line for line in wide.splitlines())
    t.resize(60, 50)
    narrow = t.wait_screen("pair 1 of 1")
    lines = narrow.splitlines()
    assert not any("alpha-one" in line and "beta-two" in line for line in lines)  # stacked
    a = next(i for i, line in enumerate(lines) if "alpha-one" in line)
    b = next(i for i, line in enumerate(lines) if "beta-two" in line)
    assert a < b and max(len(line) for line in lines) <= 60
    t.press("a")
    assert winners(t.finish()) == [(7, (0, 1), "A", "a")]


def test_cbreak_comes_back_after_the_shell_resets_the_terminal() -> None:
    """What Ctrl-Z then `fg` does: the shell puts canonical mode back while the judge is stopped."""
    t = drive([(0, 0, 1)])
    t.wait_for("q quit")
    termios.tcsetattr(t.slave, termios.TCSANOW, t.saved)
    t.wait_for("pair 1 of 1")  # noticed within a poll: cbreak again, screen redrawn
    assert t.cbreak()
    t.press("b")  # one key, no Enter
    assert winners(t.finish()) == [("p1", (0, 1), "B", "b")]
    assert t.restored


def test_the_terminal_is_restored_when_the_consumer_fails() -> None:
    t = drive([(0, 0, 1), (0, 1, 2), (1, 0, 1)], fail_after=1)
    t.wait_for("pair 1 of 3")
    t.press("a")
    t.wait_for("pair 2 of 3")
    t.press("a")
    out = t.finish()
    assert t.proc.returncode == 1 and winners(out) == [("p1", (0, 1), "A", "a")]
    assert t.restored


def test_no_terminal_is_a_clear_error() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    spec = json.dumps({"rows": ROWS, "asks": [[0, 0, 1]]})
    proc = subprocess.run([sys.executable, "-c", DRIVER, spec], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, start_new_session=True, timeout=60)  # a new session has no /dev/tty
    assert proc.returncode == 2, proc.stderr.decode()
    out = json.loads(proc.stdout)
    assert out["error"].startswith("--judge human needs a terminal") and "/dev/tty" in out["error"]
    assert "interactive terminal" in out["hint"]


def test_pairwise_human_without_a_terminal_fails_before_any_output(tmp_path: Path) -> None:
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in SAMPLES))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("RLHF_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "rlhf_cli", "pairwise", str(samples), "--judge", "human", "--output", "prefs.jsonl"],
                          cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          start_new_session=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: --judge human needs a terminal"), proc.stderr
    assert not (tmp_path / "prefs.jsonl").exists()


def test_a_terminal_that_is_not_one_is_a_clear_error() -> None:
    with pytest.raises(RlhfError, match="/dev/null is not one"):
        HumanJudge(JudgeOptions(), terminal="/dev/null")


def test_key_reader_splits_typed_ahead_bytes_into_keys() -> None:
    r, w = os.pipe()
    try:
        os.write(w, "ab\x1b[D\x1b[C\x1bOCé=\x1bx".encode())
        keys = KeyReader(r)
        got = [keys.key(timeout=0.5) for _ in range(9)]
        assert got == ["a", "b", "left", "right", "right", "é", "=", "escape", "x"]
        assert keys.key(timeout=0.01) is None
        os.write(w, b"A")
        assert keys.key(timeout=0.5) == "a"  # keys are case-blind
    finally:
        os.close(r)
        os.close(w)


# -- end to end: `rlhf pairwise --judge human`, quit half way, --resume, finish ---------------------

SAMPLES = [  # completions named by rank (r2 best), shuffled so that chosen is not always the first index
    {"id": "q1", "prompt": "First question?", "answer": "x", "completions": ["q1-r1-text", "q1-r0-text", "q1-r2-text"]},
    {"id": "q2", "prompt": "Second question?", "answer": "y", "completions": ["q2-r2-text", "q2-r0-text", "q2-r1-text"]},
    {"id": "q3", "prompt": "Third question?", "answer": "z", "completions": ["q3-r0-text", "q3-r2-text", "q3-r1-text"]},
]
RANK = re.compile(r"(q\d)-r(\d)-text")


def label(t: Term, n: int, total: int, arrows: bool = False) -> tuple[str, str]:
    """Play a labeler who prefers the higher rank: read which text is on the left (A), press a key.
    Returns (chosen, rejected) as pressed."""
    screen = t.wait_screen(f"pair {n} of {total}")
    line = next(line for line in screen.splitlines() if len(RANK.findall(line)) == 2)
    left, right = (m.group() for m in RANK.finditer(line))  # A is drawn left of B
    a_wins = int(RANK.match(left).group(2)) > int(RANK.match(right).group(2))
    t.press((LEFT if arrows else "a") if a_wins else (RIGHT if arrows else "b"))
    return (left, right) if a_wins else (right, left)


def test_pairwise_human_quit_resume_finish(tmp_path: Path) -> None:
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in SAMPLES))
    prefs = tmp_path / "prefs.jsonl"
    cli = [sys.executable, "-m", "rlhf_cli", "pairwise"]

    # run 1: samples on stdin, keys from the terminal; answer q1's 3 pairs and one of q2's, then quit
    with samples.open("rb") as stdin:
        t = Term([*cli, "-", "--judge", "human", "--output", str(prefs)], stdin=stdin.fileno(), stderr_to_tty=True, cwd=tmp_path)
    pressed = [label(t, n, 9, arrows=n % 2 == 0) for n in range(1, 5)]
    t.wait_for("pair 5 of 9")
    t.press("q")
    assert t.finish() == [] and t.proc.returncode == 3, t.screen[-2000:]  # stdout stays empty; 3 = stopped, resumable
    assert "--resume" in t.screen[t.pos:] and t.restored
    first = [json.loads(line) for line in prefs.read_text().splitlines()]
    # q1 is finished and written; q2's one answered pair is not (a prompt is written whole)
    assert sorted(r["id"].split(":")[0] for r in first) == ["q1", "q1", "q1"]

    # run 2: --resume asks only q2 and q3; an undo on the way
    t = Term([*cli, str(samples), "--judge", "human", "--output", str(prefs), "--resume"], stderr_to_tty=True, cwd=tmp_path)
    again = [label(t, 1, 6), label(t, 2, 6)]
    t.wait_for("pair 3 of 6")
    t.press("u")  # take back pair 2 and answer it again
    again[-1] = label(t, 2, 6)
    again += [label(t, n, 6) for n in range(3, 7)]
    assert t.finish() == [] and t.proc.returncode == 0, t.screen[-2000:]
    assert t.restored

    rows = [json.loads(line) for line in prefs.read_text().splitlines()]
    got = sorted((r["chosen"], r["rejected"]) for r in rows)
    assert got == sorted(pressed[:3] + again) and len(rows) == 9  # every pair once, as pressed
    for r in rows:  # and each pair is its higher rank over its lower, row fields intact
        qid, i, j = re.fullmatch(r"(q\d):(\d)-(\d)", r["id"]).groups()
        completions = SAMPLES[int(qid[1]) - 1]["completions"]
        assert (completions[int(i)], completions[int(j)]) == (r["chosen"], r["rejected"])
        assert r["chosen"] > r["rejected"] and r["chosen"].startswith(qid)  # "q1-r2-text" > "q1-r1-text"
        assert r["answer"] == "xyz"[int(qid[1]) - 1] and r["judge"]["kind"] == "human"
    assert len({r["id"] for r in rows}) == 9
