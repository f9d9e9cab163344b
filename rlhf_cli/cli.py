"""The `rlhf` root command: registers the steps and turns errors into one-line messages.

Commands import torch/transformers inside `run()`, so `rlhf --help` answers instantly.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.markup import escape

from rlhf_cli import __version__
from rlhf_cli.commands import eval as eval_cmd
from rlhf_cli.commands import pairwise, plot, ppo, sample, sft, train_rm
from rlhf_cli.console import err, quiet_libraries
from rlhf_cli.errors import RlhfError
from rlhf_cli.options import STREAM

app = typer.Typer(
    name="rlhf",
    help="The InstructGPT recipe as small Unix steps: sft -> sample -> pairwise -> train-rm -> ppo -> eval.\n\n"
    "Every step reads JSONL (a file or '-') and writes JSONL to stdout or an HF checkpoint directory.\n\n"
    "Examples:\n\n"
    "  rlhf sft demos.jsonl --model builtin:tiny --out sft/\n\n"
    "  rlhf sample prompts.jsonl --model sft/ -n 4 > samples.jsonl\n\n"
    "  rlhf sft --help",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("sft", no_args_is_help=True)(sft.command)
app.command("sample", no_args_is_help=True, context_settings=STREAM)(sample.command)
app.command("pairwise", no_args_is_help=True, context_settings=STREAM)(pairwise.command)
app.command("train-rm", no_args_is_help=True)(train_rm.command)
app.command("ppo", no_args_is_help=True)(ppo.command)
app.command("plot", no_args_is_help=True)(plot.command)
app.add_typer(eval_cmd.app, name="eval")


def _version(value: bool) -> None:
    if value:
        print(f"rlhf {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
) -> None:
    """The InstructGPT recipe as small Unix steps."""


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: exit 0 on success, 2 on bad input / usage, 1 on a crash.

    Typer's standalone mode prints usage errors (exit 2) and handles --help, --version and Ctrl-C
    itself; we only add the one-line `RlhfError`. Catching Click's exception types here instead
    would break whenever Typer changes which Click it uses (0.29 vendors its own copy).
    """
    quiet_libraries()  # only our own progress and messages on stderr
    try:
        app(args=argv, prog_name="rlhf")  # standalone mode: always ends in SystemExit
    except RlhfError as e:
        if os.environ.get("RLHF_DEBUG"):
            raise
        # escape: messages quote user input (paths, JSON), which rich would read as [markup]
        err.print(f"[bold red]error:[/] {escape(e.message)}", soft_wrap=True)
        if e.hint:
            err.print(f"[dim]hint: {escape(e.hint)}[/]", soft_wrap=True)
        sys.exit(e.exit_code)
