"""The README keeps every command documented, and its fresh-machine commands are what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from ctexp.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def command_names() -> list[str]:
    group = typer.main.get_command(app)
    return sorted(group.commands)  # type: ignore[attr-defined]


def test_every_command_has_a_readme_section_with_an_example():
    for name in command_names():
        assert f"### `ctexp {name}`" in README, name
        assert re.search(rf"^ctexp {name}\b", README, re.MULTILINE), f"no example of ctexp {name}"


def leaf_commands(group, prefix: str = "ctexp"):
    """(full name, command) for every command, descending into groups such as ``ctexp db``."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from leaf_commands(command, f"{prefix} {name}")
        else:
            yield f"{prefix} {name}", command


def test_every_command_help_has_an_example():
    for full_name, command in leaf_commands(typer.main.get_command(app)):
        assert "Example: " + full_name in (command.help or ""), full_name


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, re.DOTALL)
    setup_and_run, setup_and_test = blocks[0], blocks[1]
    assert setup_and_run.endswith("ctexp run")
    assert "pytest" in setup_and_test
    assert setup_and_test in (ROOT / ".ci" / "run").read_text()
