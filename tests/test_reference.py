"""The README's CLI reference must match the commands' own --help metadata."""

from __future__ import annotations

from pathlib import Path

from rlhf_cli.reference import BEGIN, END, markdown, splice

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_cli_reference_is_current():
    current = README.read_text()
    assert splice(current, markdown()) == current, "run: python -m rlhf_cli.reference --write README.md"


def test_reference_lists_every_option_of_every_command():
    from typer.main import get_command

    from rlhf_cli.cli import app

    block = markdown()

    def check(group, prefix):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):  # a group (`rlhf eval`): one section per subcommand
                check(cmd, f"{prefix} {name}")
                continue
            assert f"### `{prefix} {name}`" in block
            for p in cmd.params:
                if p.name != "help" and p.param_type_name == "option":
                    assert f"`{p.opts[0]}`" in block, (name, p.opts)

    check(get_command(app), "rlhf")
    assert "### `rlhf eval exact`" in block and "### `rlhf eval code`" in block


def test_splice_replaces_only_the_marked_block():
    doc = f"intro\n{BEGIN}\nold\n{END}\noutro\n"
    assert splice(doc, "new\n") == f"intro\n{BEGIN}\nnew\n{END}\noutro\n"
