"""The ``ctexp`` command line: parse, call the library, print. No experiment logic lives here.

One module per command group registers its commands onto the app (``app.py``), whose one handler
turns library errors (``CtexpError``) into an ``Error: ...`` line and the error's exit code. The app
imports a command's module only when the command is asked for (``app.COMMAND_MODULES``).
"""

from __future__ import annotations

from ctexp.cli.app import app


def main() -> None:
    """Console-script entry point."""
    app()
