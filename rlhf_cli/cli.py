"""The `rlhf` root command: registers the steps and turns errors into one-line messages.

Commands import torch/transformers inside `run()`, so `rlhf --help` answers instantly.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import click
import typer

from rlhf_cli import __version__
from rlhf_cli.commands import sample, sft
from rlhf_cli.console import err
from rlhf_cli.errors import RlhfError

app = typer.Typer(
    name="rlhf",
    help="The InstructGPT recipe as small Unix steps: sft -> sample -> pairwise -> train-rm -> ppo -> eval.\n\n"
    "Every step reads JSONL (a file or '-') and writes JSONL to stdout or an HF checkpoint directory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("sft", no_args_is_help=True)(sft.command)
app.command("sample", no_args_is_help=True)(sample.command)


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
    """Console-script entry point: exit 0 on success, 2 on bad input / usage, 1 on a crash."""
    try:
        rc = app(args=argv, prog_name="rlhf", standalone_mode=False)
    except RlhfError as e:
        if os.environ.get("RLHF_DEBUG"):
            raise
        err.print(f"[bold red]error:[/] {e.message}", soft_wrap=True)
        if e.hint:
            err.print(f"[dim]hint: {e.hint}[/]", soft_wrap=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)
