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
from rlhf_cli.commands import dpo, grpo, known, pairwise, plot, ppo, sample, sft, train_rm
from rlhf_cli.commands import eval as eval_cmd
from rlhf_cli.commands import select as select_cmd
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
app.command("dpo", no_args_is_help=True)(dpo.command)
app.command("grpo", no_args_is_help=True)(grpo.command)
app.command("select", no_args_is_help=True, context_settings=STREAM)(select_cmd.command)
app.command("plot", no_args_is_help=True)(plot.command)
app.command("known", no_args_is_help=True)(known.command)
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
    from rlhf_cli.runtime import keep_freed_memory

    keep_freed_memory()  # glibc: no page faults re-zeroing every step's activations (runtime.py)
    try:
        argv = legacy_resume(list(sys.argv[1:] if argv is None else argv))
        app(args=argv, prog_name="rlhf")  # standalone mode: always ends in SystemExit
    except RlhfError as e:
        if os.environ.get("RLHF_DEBUG"):
            raise
        # escape: messages quote user input (paths, JSON), which rich would read as [markup]
        err.print(f"[bold red]error:[/] {escape(e.message)}", soft_wrap=True)
        if e.hint:
            err.print(f"[dim]hint: {escape(e.hint)}[/]", soft_wrap=True)
        _exit(e.exit_code)
    except SystemExit as e:
        _exit(e.code if isinstance(e.code, int) else (0 if e.code is None else 1), e)


def _exit(code: int, exc: SystemExit | None = None) -> None:
    """sys.exit, except in a torchrun worker, which leaves without interpreter finalization (runtime.hard_exit)."""
    from rlhf_cli import runtime

    if runtime.joined_group():
        runtime.hard_exit(code)
    if exc is not None:
        raise exc
    sys.exit(code)


def legacy_resume(argv: list[str]) -> list[str]:
    """`sample` / `pairwise --resume FILE` (the spelling before `--resume` became a switch) ->
    `--output FILE --resume`, with a deprecation warning; kept for one release.

    Typer has no option that is a switch and also takes a value, so the old spelling is read here,
    before parsing: it is the old one exactly when the token after `--resume` is a bare word and,
    counting it, the command line holds one positional more than the command takes (the old
    `--resume` always took a value; the new one never does).
    """
    if not argv or argv[0] not in ("sample", "pairwise"):
        return argv
    if any(a.startswith("--resume=") for a in argv):
        i = next(i for i, a in enumerate(argv) if a.startswith("--resume="))
        return _rewrite(argv, i, argv[i].split("=", 1)[1], 1)
    if "--resume" not in argv[1:] or "--" in argv:
        return argv
    i = argv.index("--resume")
    if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
        return argv
    command = typer.main.get_command(app).commands[argv[0]]  # type: ignore[attr-defined]
    takes_value = {o for p in command.params if p.param_type_name == "option" and not p.is_flag for o in p.opts}
    n_args = sum(1 for p in command.params if p.param_type_name == "argument")
    positionals, j = 0, 1
    while j < len(argv):
        a = argv[j]
        if a in takes_value:
            j += 2
            continue
        positionals += not a.startswith("-") or a == "-"
        j += 1
    return _rewrite(argv, i, argv[i + 1], 2) if positionals > n_args else argv


def _rewrite(argv: list[str], i: int, path: str, width: int) -> list[str]:
    from rlhf_cli.options import deprecated

    deprecated("--resume FILE", "--output FILE --resume", None)
    return [*argv[:i], "--output", path, "--resume", *argv[i + width :]]
