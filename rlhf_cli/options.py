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

# The lm / api judge's knobs, shared by `rlhf pairwise` and `rlhf eval winrate` (both fill a JudgeOptions).
JUDGE_PANEL = "Judge options"
TemplateOpt = Annotated[
    str | None, typer.Option("--template", help="lm / api: pairwise prompt template file.", rich_help_panel=JUDGE_PANEL)
]
BaseUrlOpt = Annotated[
    str | None,
    typer.Option("--base-url", help="api: OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1.", rich_help_panel=JUDGE_PANEL),
]
ApiKeyEnvOpt = Annotated[
    str, typer.Option("--api-key-env", help="api: name of the environment variable holding the key.", rich_help_panel=JUDGE_PANEL)
]
ConcurrencyOpt = Annotated[int, typer.Option("--concurrency", help="api: requests in flight.", rich_help_panel=JUDGE_PANEL)]
PricesOpt = Annotated[
    str | None,
    typer.Option("--prices", help="api: 'IN,OUT' dollars per million tokens, or a JSON price table.", rich_help_panel=JUDGE_PANEL),
]
MaxCostOpt = Annotated[
    float | None,
    typer.Option("--max-cost", help="api: stop cleanly after this many dollars (exit 3); a rerun reuses the cached verdicts.",
                 rich_help_panel=JUDGE_PANEL),
]
CacheDirOpt = Annotated[str | None, typer.Option("--cache-dir", help="api: verdict cache directory.", rich_help_panel=JUDGE_PANEL)]


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    from rlhf_cli.errors import RlhfError

    if value not in choices:
        raise RlhfError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value
