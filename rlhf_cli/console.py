"""The people channel: a rich console on stderr (stdout is reserved for JSONL data)."""

from __future__ import annotations

import os

from rich.console import Console
from rich.markup import escape

err = Console(stderr=True, highlight=False)


def is_main_process() -> bool:
    """True unless we are a non-zero rank under torchrun (so only rank 0 talks)."""
    return os.environ.get("RANK", "0") == "0"


def info(msg: str) -> None:
    if is_main_process():
        err.print(escape(msg), soft_wrap=True)


def warn(msg: str) -> None:
    if is_main_process():
        err.print(f"[yellow]warning:[/] {escape(msg)}", soft_wrap=True)
