"""Options shared by several commands, declared once (the `hf` CLI's TokenOpt pattern)."""

from __future__ import annotations

from typing import Annotated

import typer

ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="Hub id, local HF directory, .gguf file, or builtin:tiny / builtin:small."),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed: same seed, same result.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="fp32 | bf16 (bf16 autocast over fp32 weights when training).")]
FormatOpt = Annotated[
    str,
    typer.Option("--format", help="chat: prompts go through the chat template (ChatML if none). raw: plain text."),
]
TrustOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow model repos to run their own Python code (off by default).")
]


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    from rlhf_cli.errors import RlhfError

    if value not in choices:
        raise RlhfError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value
