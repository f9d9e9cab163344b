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
    for name, cmd in get_command(app).commands.items():
        assert f"### `rlhf {name}`" in block
        for p in cmd.params:
            if p.name != "help" and p.param_type_name == "option":
                assert f"`{p.opts[0]}`" in block, (name, p.opts)


def test_splice_replaces_only_the_marked_block():
    doc = f"intro\n{BEGIN}\nold\n{END}\noutro\n"
    assert splice(doc, "new\n") == f"intro\n{BEGIN}\nnew\n{END}\noutro\n"
