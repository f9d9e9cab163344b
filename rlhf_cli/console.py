"""The people channel: a rich console on stderr (stdout is reserved for JSONL data)."""

from __future__ import annotations

import os
import sys

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


def quiet_libraries() -> None:
    """Keep stderr ours: turn off transformers' and huggingface_hub's progress bars ("Loading
    weights", "Writing model shards") and their info logging, so only rlhf's progress and messages
    show. Called before dispatch and again from model loading (tests and scripts call `run(cfg)`).

    The environment variables reach libraries not imported yet and the calls those already imported;
    nothing is imported here, so `rlhf --help` stays instant. Exporting HF_HUB_DISABLE_PROGRESS_BARS=0
    or TRANSFORMERS_VERBOSITY=info yourself brings the libraries' own output back.
    """
    bars_off = os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1").upper() in ("1", "ON", "YES", "TRUE")
    logs_off = os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error") == "error"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars
        from huggingface_hub.utils import logging as hub_logging

        if bars_off:
            disable_progress_bars()
        if logs_off:
            hub_logging.set_verbosity_error()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        if bars_off:
            hf_logging.disable_progress_bar()
        if logs_off:
            hf_logging.set_verbosity_error()
