"""`--judge human`: a person at the terminal answers each ask with one key.

The screen shows progress ("pair 7 of 40, prompt 3 of 10"), the prompt (and the row's reference
answer, dimmed, when it has one), the two answers side by side in columns A and B (stacked panels A
and B when the terminal is narrower than 90 columns; long text wraps), and the keys:

    a 1 ←  A is better    b 2 →  B is better    t =  tie    s  skip    u  undo    q  quit

Keys are read from the controlling terminal (/dev/tty) and the screen is drawn there too, never on
stdin or stdout, so the data can flow through files and pipes while the labeler talks to the
terminal:

    rlhf pairwise samples.jsonl --judge human --output prefs.jsonl
    rlhf pairwise samples.jsonl --judge human --output prefs.jsonl --resume     # carry on where you quit

The terminal is in cbreak mode (keys without Enter, no echo) only while a key is awaited, inside a
try/finally, so it is back in its own mode between keys, after the last one, on an exception and on
Ctrl-C, whatever `pairwise` does with the verdicts meanwhile. After Ctrl-Z and `fg` (the shell
puts its own mode back) the judge notices within a quarter second, re-enters cbreak and redraws.

Undo: the latest answer is held back from `pairwise` until the next one is given, so `u` can take
it back and show that pair again; answers already passed on are final (they may be written out).
`q` (or Ctrl-C) passes on the held answer, sets `stopped` and ends the iteration, so every decided
answer is kept and a rerun with `--resume` asks only what is left. `s` (skip) answers with no
winner, which never becomes a preference.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import termios
import threading
import tty
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

from rlhf_cli.data.records import Item
from rlhf_cli.errors import RlhfError
from rlhf_cli.judges.base import Ask, JudgeOptions, Verdict, Winner

# key name -> verdict winner (None = skip); the key name is the verdict's `raw`
ANSWERS: dict[str, Winner | None] = {"a": "A", "1": "A", "left": "A", "b": "B", "2": "B", "right": "B", "t": "tie", "=": "tie", "s": None}
UNDO, QUIT, INTERRUPT, HANGUP = "u", "q", "ctrl-c", "hangup"
ARROWS = {b"\x1b[D": "left", b"\x1bOD": "left", b"\x1b[C": "right", b"\x1bOC": "right"}
WIDE = 90  # columns from which A and B sit side by side
HELP = (("a 1 ←", "A is better"), ("b 2 →", "B is better"), ("t =", "tie"), ("s", "skip"), ("u", "undo"), ("q", "quit"))
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # everything but \t and \n: shown, never sent raw


def visible(text: str) -> str:
    """`text` safe to draw: a model's answer may hold escape sequences that would drive the terminal."""
    return CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text.replace("\r\n", "\n"))


@contextlib.contextmanager
def _sigint_as_flag() -> Iterator[Callable[[], bool]]:
    """While a key is awaited, Ctrl-C sets a flag that the key loop reads within a quarter second.

    A KeyboardInterrupt raised wherever the main thread happens to be (inside rich's rendering of
    the screen, between a lock's acquire and its try) can leave that state half-done, and a run was
    seen to hang there. select() is retried after the handler returns (PEP 475), so the loop polls
    the flag. Python installs signal handlers only on the main thread; elsewhere Ctrl-C stays a
    KeyboardInterrupt, which `_wait` also catches.
    """
    hit = [False]
    if threading.current_thread() is not threading.main_thread():
        yield lambda: hit[0]
        return

    def handler(signum: int, frame: Any) -> None:
        hit[0] = True

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: hit[0]
    finally:
        signal.signal(signal.SIGINT, old)


class KeyReader:
    """Named keys from a terminal fd in cbreak mode: "a", "=", "left", "right", "escape", ...

    Bytes that arrive together (typed ahead, or a pasted "ab") are buffered and returned one key
    at a time; an escape sequence is collected whole (an arrow key is three bytes).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def _fill(self, timeout: float | None) -> bool:
        """Read what is available within `timeout` seconds; False on a timeout. EOFError on hangup."""
        if not select.select([self.fd], [], [], timeout)[0]:
            return False
        try:
            data = os.read(self.fd, 64)
        except OSError as e:  # EIO: the terminal is gone
            raise EOFError from e
        if not data:
            raise EOFError
        self.buf += data
        return True

    def key(self, timeout: float | None) -> str | None:
        """The next key, or None if none came within `timeout` seconds."""
        if not self.buf and not self._fill(timeout):
            return None
        if self.buf[:1] == b"\x1b":
            while len(self.buf) < 3 and self._fill(0.05):  # the rest of a sequence follows at once
                pass
            if self.buf[1:2] in (b"[", b"O"):
                end = next((i for i in range(2, len(self.buf)) if 0x40 <= self.buf[i] <= 0x7E), len(self.buf) - 1)
                seq, self.buf = self.buf[: end + 1], self.buf[end + 1 :]
                return ARROWS.get(seq, "escape")
            self.buf = self.buf[1:]
            return "escape"
        lead = self.buf[0]
        n = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4  # UTF-8 sequence length
        while len(self.buf) < n and self._fill(0.05):
            pass
        ch, self.buf = self.buf[:n].decode("utf-8", "replace"), self.buf[n:]
        return ch.lower()


class HumanJudge:
    """A pair judge that shows each ask on the terminal and waits for a key; see the module docstring.

    `terminal` is the one to use: the controlling terminal, unless a caller names another (a pty).
    `undo` is how many answers are held back, so how many `u` can take back in a row.
    """

    kind = "human"

    def __init__(self, opts: JudgeOptions, terminal: str = "/dev/tty", undo: int = 1) -> None:
        if undo < 1:
            raise ValueError("undo must be >= 1: the latest answer is always held back")
        self.reference = opts.reference_field
        self.undo = undo
        self.stopped: str | None = None
        self.fd: int | None = None
        try:
            fd = os.open(terminal, os.O_RDWR | os.O_NOCTTY)
        except OSError as e:
            raise RlhfError(f"--judge human needs a terminal to show pairs and read keys, and {terminal} cannot be opened ({e.strerror})",
                            "run it from an interactive terminal (stdin and stdout may still be files or pipes)") from None
        if not os.isatty(fd):
            os.close(fd)
            raise RlhfError(f"--judge human needs a terminal, and {terminal} is not one", "run it from an interactive terminal")
        self.fd = fd
        self.keys = KeyReader(fd)
        self.out = open(fd, "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115 (closed in close())

        from rich.console import Console

        self.console = Console(file=self.out, highlight=False, emoji=False)

    def describe(self) -> dict[str, Any]:
        return {"kind": "human", "name": "terminal"}

    def judge(self, asks: Iterable[Ask]) -> Iterator[tuple[Ask, Verdict]]:
        # a person answers in order and slowly: reading every ask first costs nothing and gives totals
        asks = asks if isinstance(asks, Collection) else list(asks)
        total, prompts = len(asks), len({_key(a.item) for a in asks})
        source = iter(asks)
        prompt_no: dict[tuple[str, str], int] = {}
        held: list[tuple[Ask, Verdict]] = []  # answered, not yet passed on: what `u` can take back
        again: list[Ask] = []  # asks taken back by `u` (and the one it interrupted), next to show last
        answered = 0
        note = ""
        while True:
            ask = again.pop() if again else next(source, None)
            if ask is None:
                break
            n = prompt_no.setdefault(_key(ask.item), len(prompt_no) + 1)
            progress = f"pair {answered + 1} of {total}, prompt {n} of {prompts}"
            key = self._wait(ask, progress, note)
            note = ""
            if key == UNDO:
                again.append(ask)
                if held:
                    again.append(held.pop()[0])
                    answered -= 1
                else:
                    note = "nothing to undo: earlier answers are already saved"
                continue
            if key in (QUIT, INTERRUPT, HANGUP):
                self.stopped = {QUIT: "quit by the labeler", INTERRUPT: "interrupted by the labeler (Ctrl-C)",
                                HANGUP: "the terminal closed"}[key]
                break
            held.append((ask, Verdict(ANSWERS[key], raw=key, cost=0.0)))
            answered += 1
            if len(held) > self.undo:
                yield held.pop(0)
        self._clear()
        yield from held

    def close(self) -> None:
        if self.fd is not None:
            self.out.close()
            os.close(self.fd)
            self.fd = None

    # -- internals ------------------------------------------------------------------------------

    def _wait(self, ask: Ask, progress: str, note: str) -> str:
        """Draw the ask and return the first key that means something (an answer, u or q)."""
        assert self.fd is not None, "judge() after close()"
        try:
            with self._cbreak(), _sigint_as_flag() as interrupted:
                size = self._draw(ask, progress, note)
                while not interrupted():
                    key = self.keys.key(timeout=0.25)
                    if interrupted():
                        break
                    if key is None:  # no key yet: redraw if the window was resized or the mode lost
                        if termios.tcgetattr(self.fd)[3] & termios.ICANON:
                            # after Ctrl-Z and `fg` the shell has put its own mode back, and drawn over us
                            tty.setcbreak(self.fd, termios.TCSANOW)
                            size = self._draw(ask, progress, note)
                        elif _size(self.fd) != size:
                            size = self._draw(ask, progress, note)
                        continue
                    if key in ANSWERS or key in (UNDO, QUIT):
                        return key
                    size = self._draw(ask, progress, f"{key!r} is not a key here")
                return INTERRUPT  # cbreak keeps ISIG: Ctrl-C is SIGINT; it ends the session like q
        except KeyboardInterrupt:  # off the main thread, Ctrl-C still arrives as an exception
            return INTERRUPT
        except EOFError:
            return HANGUP

    @contextlib.contextmanager
    def _cbreak(self) -> Iterator[None]:
        assert self.fd is not None
        saved = termios.tcgetattr(self.fd)
        try:
            tty.setcbreak(self.fd, termios.TCSANOW)  # TCSANOW: keys typed ahead are kept, not flushed
            yield
        finally:
            termios.tcsetattr(self.fd, termios.TCSANOW, saved)

    def _draw(self, ask: Ask, progress: str, note: str) -> tuple[int, int]:
        from rich import box
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        assert self.fd is not None
        size = _size(self.fd)
        self.console.size = size
        parts: list[Any] = [Text.assemble((progress, "bold"), (f"   id {ask.item.id}", "dim"))]
        parts.append(Panel(Text(visible(ask.item.prompt)), title="prompt", title_align="left", border_style="cyan"))
        ref = ask.item.row.get(self.reference)
        if ref is not None and ref != "":
            ref_text = ref if isinstance(ref, str) else _json(ref)
            parts.append(Text(f"{self.reference}: {visible(ref_text)}", style="dim"))
        a, b = Text(visible(ask.a)), Text(visible(ask.b))
        if size[0] >= WIDE:  # one table, so both boxes are as tall as the longer answer
            table = Table(box=box.ROUNDED, expand=True, border_style="dim")
            table.add_column("A", ratio=1, header_style="bold green")
            table.add_column("B", ratio=1, header_style="bold magenta")
            table.add_row(a, b)
            parts.append(table)
        else:
            parts += [Panel(a, title="A", border_style="green"), Panel(b, title="B", border_style="magenta")]
        keys = Text("  ").join(Text.assemble((k, "bold"), f" {what}") for k, what in HELP)
        parts.append(keys)
        if note:
            parts.append(Text(note, style="yellow"))
        self.console.clear()
        self.console.print(Group(*parts))
        self.out.flush()
        return size

    def _clear(self) -> None:
        if self.fd is not None:
            self.console.clear()
            self.out.flush()


def _key(item: Item) -> tuple[str, str]:
    """One prompt: its id and where it was read (two rows may share an id)."""
    return (str(item.id), item.where)


def _size(fd: int) -> tuple[int, int]:
    try:
        cols, rows = os.get_terminal_size(fd)
    except OSError:
        return (80, 24)
    return (cols or 80, rows or 24)


def _json(value: Any) -> str:
    import orjson

    return orjson.dumps(value).decode()
