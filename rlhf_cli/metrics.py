"""metrics.jsonl writer and the rich progress bar on stderr (rank 0 only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rlhf_cli.console import err


class MetricsLog:
    """Appends one JSON object per line; on resume, rows past the resumed step are dropped."""

    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_bytes(b"")
        elif self.path.exists():
            keep = [ln for ln in self.path.read_bytes().splitlines() if ln.strip() and _step(ln) <= resume_step]
            self.path.write_bytes(b"".join(ln + b"\n" for ln in keep))

    def log(self, row: dict[str, Any]) -> None:
        with self.path.open("ab") as f:
            f.write(orjson.dumps(row) + b"\n")


def _step(line: bytes) -> int:
    try:
        return int(orjson.loads(line).get("step", 0))
    except (orjson.JSONDecodeError, ValueError):
        return 1 << 62  # a half-written last line: drop it


def progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not enabled,
        transient=False,
    )
