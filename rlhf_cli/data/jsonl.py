"""JSONL in and out: `-` means stdin/stdout, errors name `file:line`, file outputs are atomic.

    rows = read_jsonl("prompts.jsonl")          # -> list[Line]; Line.where == "prompts.jsonl:3"
    rows = load_records("testset-v1.json")      # JSONL, or one JSON array (PandaLM, AlpacaEval files)
    with JsonlSink("-") as sink:                # stdout, flushed per row, quiet on SIGPIPE
        sink.write({"id": "a", "completions": [...]})
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from rlhf_cli.errors import RlhfError


@dataclass(frozen=True)
class Line:
    """One parsed JSONL object and where it came from (for error messages)."""

    data: dict[str, Any]
    path: str
    lineno: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.lineno}"


def _open_text(path: str) -> IO[bytes]:
    if path == "-":
        return sys.stdin.buffer
    p = Path(path)
    if p.is_dir():
        raise RlhfError(f"{path}: is a directory, expected a JSONL file", "pass a .jsonl file or '-' for stdin")
    try:
        if p.suffix == ".gz":  # HumanEval, HH-RLHF and friends ship as .jsonl.gz
            import gzip

            return gzip.open(p, "rb")  # type: ignore[return-value]
        return p.open("rb")
    except FileNotFoundError:
        raise RlhfError(f"{path}: no such file", "check the path, or pass '-' to read stdin") from None
    except OSError as e:
        raise RlhfError(f"{path}: cannot read ({e.strerror})", "check the file's permissions") from None


def iter_jsonl(path: str, *, nan_ok: bool = False, example: str = '{"prompt": ...}') -> Iterator[Line]:
    """Yield each non-blank line of `path` as a `Line`; malformed JSON raises at its line.

    nan_ok: also accept the NaN / Infinity tokens that Python's json module writes (orjson rejects
    them; our own writers emit null), for metrics files from other tools (`rlhf plot`).
    example: the object shape the hint shows when a line is not an object.
    """
    name = "<stdin>" if path == "-" else path
    f = _open_text(path)
    try:
        yield from _lines(f, name, nan_ok, example)
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz fails mid-read
        if not name.endswith(".gz"):
            raise
        raise RlhfError(f"{name}: not a readable gzip file ({e})", "pass .jsonl or a valid .jsonl.gz") from None
    finally:
        if f is not sys.stdin.buffer:
            f.close()


def _lines(f: IO[bytes], name: str, nan_ok: bool, example: str) -> Iterator[Line]:
    for lineno, raw in enumerate(f, start=1):
        if not raw.strip():
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            obj = _python_json(raw) if nan_ok else _MALFORMED
            if obj is _MALFORMED:
                raise RlhfError(
                    f"{name}:{lineno}: malformed JSON ({e.msg})", "each line must be one JSON object"
                ) from None
        if not isinstance(obj, dict):
            raise RlhfError(
                f"{name}:{lineno}: expected a JSON object, got {type(obj).__name__}",
                f"each line must be one JSON object like {example}",
            )
        yield Line(obj, name, lineno)


_MALFORMED = object()


def _python_json(raw: bytes) -> Any:
    """A line as Python's json module reads it (NaN, Infinity and -Infinity included), else _MALFORMED."""
    try:
        return json.loads(raw)
    except ValueError:
        return _MALFORMED


def read_jsonl(path: str) -> list[Line]:
    """Read a whole JSONL file; an empty file is an error (there is nothing to do)."""
    lines = list(iter_jsonl(path))
    if not lines:
        name = "<stdin>" if path == "-" else path
        raise RlhfError(f"{name}:1: file is empty, expected JSONL rows", "give at least one JSON object per line")
    return lines


def load_records(path: str) -> list[Line]:
    """JSONL, or one JSON array whose elements are reported at the line where they start."""
    name = "<stdin>" if path == "-" else path
    if path == "-":
        buf = sys.stdin.buffer
        head = buf.peek(256) if hasattr(buf, "peek") else b""
    else:
        try:
            with open(path, "rb") as f:
                head = f.read(256)
        except OSError:
            head = b""  # let read_jsonl word the error
    if head.lstrip()[:1] != b"[":
        return read_jsonl(path)
    text = (sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()).decode("utf-8", errors="replace")
    dec, pos, out = json.JSONDecoder(), text.index("[") + 1, []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        lineno = text.count("\n", 0, pos) + 1
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise RlhfError(f"{name}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise RlhfError(f"{name}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        out.append(Line(obj, name, lineno))
    if not out:
        raise RlhfError(f"{name}:1: the JSON array is empty")
    return out


def dumps(obj: Any) -> bytes:
    """One JSONL line (orjson: fast, UTF-8, no NaN surprises), newline included."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


class JsonlSink:
    """Writes rows to stdout (`-`) or appends to a file, flushing each row.

    Stdout consumers may go away early (`rlhf sample ... | head -1`); a broken pipe then ends the
    run quietly with exit code 0 instead of a traceback.
    """

    def __init__(self, path: str = "-", append: bool = False) -> None:
        self.path = path
        if path == "-":
            self._f: IO[bytes] = sys.stdout.buffer
        else:
            self._f = open(path, "ab" if append else "wb")  # noqa: SIM115 (closed in close())

    def write(self, row: dict[str, Any]) -> None:
        try:
            self._f.write(dumps(row))
            self._f.flush()
        except BrokenPipeError:
            _quiet_broken_pipe()

    def sync(self) -> None:
        """Make the rows so far durable (a file sink), so `--resume` after `kill -9` sees them."""
        if self.path != "-":
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if self.path != "-":
            self._f.close()

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _quiet_broken_pipe() -> None:
    # Point stdout at /dev/null so the interpreter's final flush does not raise again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    raise SystemExit(0)


def write_jsonl_atomic(path: str, rows: list[dict[str, Any]]) -> None:
    """Write all rows to `path` via a temp file in the same directory, then rename."""
    with atomic_file(path) as f:
        for row in rows:
            f.write(dumps(row))


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[IO[bytes]]:
    """Open a temp file beside `path`; on success fsync + rename over `path`, on error remove it.

    The file gets the mode a plain `open(path, "wb")` would give it (an existing file's own mode, else
    0666 less the umask), not mkstemp's private 0600, so `rlhf ... -o out.jsonl` reads like any output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask (reading it means setting it: put it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def truncate_partial_last_line(path: str | Path) -> int:
    """Cut a file after its last newline (a killed writer may leave half a row); returns bytes cut."""
    path = Path(path)
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with path.open("r+b") as f:
            f.truncate(keep)
    return len(data) - keep
