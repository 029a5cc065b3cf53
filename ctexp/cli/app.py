"""The Typer app, its one error handler at the edge, its command table, and the consoles every command prints with.

Errors raised by the library (``CtexpError``) and usage errors become one ``Error: ...`` line on
stderr and the error's exit code; ``--debug`` (or ``CTEXP_DEBUG=1``) shows the traceback instead.

Commands load lazily: ``COMMAND_MODULES`` names the module that defines each command, and ``ctexp
runs`` imports ``ctexp.cli.registry`` alone (``--help`` lists them all, so it imports every command
module, each of which keeps its heavy libraries inside its functions).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from difflib import get_close_matches
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from ctexp.errors import CtexpError

# Command name -> the module whose ``register(app)`` defines it, in the order ``--help`` lists them.
COMMAND_MODULES: dict[str, str] = {
    "run": "ctexp.cli.run",
    "world": "ctexp.cli.data",
    "align": "ctexp.cli.data",
    "extract": "ctexp.cli.data",
    "import": "ctexp.cli.data",
    "runs": "ctexp.cli.registry",
    "show": "ctexp.cli.registry",
    "best": "ctexp.cli.registry",
    "report": "ctexp.cli.registry",
    "ui": "ctexp.cli.registry",
    "delete": "ctexp.cli.registry",
    "db": "ctexp.cli.registry",
    "sweep": "ctexp.cli.sweep",
    "sweeps": "ctexp.cli.sweep",
    "compare": "ctexp.cli.compare",
    "intervene": "ctexp.cli.intervene",
    "attention": "ctexp.cli.attention",
    "codi": "ctexp.cli.codi",
}


# Libraries whose log lines (MLflow's "Creating initial MLflow database tables...", Alembic's migration
# steps, Optuna's "A new study created") would land between ctexp's progress bar and its tables.
THIRD_PARTY_LOGGERS = ("mlflow", "alembic", "optuna", "urllib3")


def route_third_party_logs(debug: bool) -> None:
    """Keep third-party log lines off the terminal unless ``--debug``; ctexp's own messages are unaffected.

    MLflow sets its loggers' level from ``MLFLOW_LOGGING_LEVEL`` when it is imported (lazily, inside a
    command), so the variable is set as well as the level of loggers that exist already.
    """
    if debug:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO")
        level = logging.INFO
    else:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
        level = logging.ERROR
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(level)


def module_commands(module_name: str) -> dict[str, Any]:
    """The click commands that ``module_name``'s ``register(app)`` defines, by name."""
    module = importlib.import_module(module_name)
    own = typer.Typer(rich_markup_mode=None, pretty_exceptions_enable=False, add_completion=False)
    module.register(own)
    return dict(typer.main.get_group(own).commands)


class CtexpGroup(TyperGroup):
    """One error handler at the edge, for every command (tests through CliRunner get it too), and commands
    loaded from ``COMMAND_MODULES`` when first asked for."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMAND_MODULES)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in self.commands and cmd_name in COMMAND_MODULES:
            loaded = module_commands(COMMAND_MODULES[cmd_name])
            if cmd_name not in loaded:
                raise RuntimeError(f"{COMMAND_MODULES[cmd_name]} defines no command {cmd_name!r}; fix COMMAND_MODULES")
            for name, command in loaded.items():
                self.commands.setdefault(name, command)
        return self.commands.get(cmd_name)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except typer.TyperException as error:  # a usage error: suggest among every command, loaded or not
            matches = get_close_matches(args[0], list(COMMAND_MODULES)) if args else []
            if matches and isinstance(getattr(error, "message", None), str) and "Did you mean" not in error.message:
                error.message = f"{error.message.rstrip('.')}. Did you mean {', '.join(map(repr, matches))}?"
            raise

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv or os.environ.get("CTEXP_DEBUG") == "1"
        route_third_party_logs(debug)
        try:
            outcome = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
            code = outcome if isinstance(outcome, int) else 0
        except typer.Exit as done:
            code = done.exit_code
        except typer.TyperException as error:  # usage errors: bad flag, bad choice
            if debug:
                raise
            typer.echo(f"Error: {error.format_message().replace('Value error, ', '')}", err=True)
            code = error.exit_code
        except CtexpError as error:
            if debug:
                raise
            typer.echo(f"Error: {error}", err=True)
            code = error.exit_code
        except (KeyboardInterrupt, typer.Abort):
            # Ctrl-C outside a run. Inside one, the recorder ends the run KILLED and raises Interrupted
            # (130, or 143 for SIGTERM), a CtexpError handled above.
            typer.echo("Error: interrupted", err=True)
            code = 130
        except Exception as error:  # a bug: still one line, unless --debug
            if debug:
                raise
            typer.echo(
                f"Error: internal error {type(error).__name__}: {error} (rerun with --debug for the traceback)",
                err=True,
            )
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=CtexpGroup,
    help="Decode CODI continuous thoughts into CoT tokens with tuned lenses, and keep every run.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
) -> None:
    """ctexp: an experiment registry for continuous-thought decoding."""


def stdout_console() -> Console:
    """Where tables go: wide, never wrapped."""
    return Console(soft_wrap=False, width=200)


def stderr_console() -> Console:
    """Where progress bars go, so that stdout stays clean for --json."""
    return Console(stderr=True, width=200)


@contextlib.contextmanager
def bar_cleared_on_error(progress: Any) -> Iterator[None]:
    """A failed command's answer is its one error line, not a half-full progress bar above it: on any
    exception the bar is cleared, and the display prints nothing more on exit."""
    try:
        yield
    except BaseException:
        progress.live.transient = True
        progress.live.stop()
        progress.disable = True
        raise


def print_json(data: Any) -> None:
    """One indented JSON object on stdout."""
    typer.echo(json.dumps(data, indent=2))
