"""The README keeps every command documented, and its fresh-machine commands are what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from ctexp.cli import app
from ctexp.cli.app import COMMAND_MODULES, module_commands

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def commands(group) -> dict:
    """A group's commands by name, through click's listing (the app loads its command modules on demand)."""
    context = typer.Context(group)
    return {name: group.get_command(context, name) for name in group.list_commands(context)}


def command_names() -> list[str]:
    return sorted(commands(typer.main.get_command(app)))


def test_the_command_table_lists_what_the_modules_define():
    """Each command module defines exactly the commands ``COMMAND_MODULES`` names for it."""
    for module in set(COMMAND_MODULES.values()):
        listed = {name for name, owner in COMMAND_MODULES.items() if owner == module}
        assert set(module_commands(module)) == listed, module
    assert {"run", "runs", "db", "attention"} <= set(command_names())


def test_every_command_has_a_readme_section_with_an_example():
    for name in command_names():
        assert f"### `ctexp {name}`" in README, name
        assert re.search(rf"^ctexp {name}\b", README, re.MULTILINE), f"no example of ctexp {name}"


def leaf_commands(group, prefix: str = "ctexp"):
    """(full name, command) for every command, descending into groups such as ``ctexp db``."""
    for name, command in commands(group).items():
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
