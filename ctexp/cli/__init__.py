"""The ``ctexp`` command line: parse, call the library, print. No experiment logic lives here.

One module per command group registers its commands onto the app (``app.py``), whose one handler
turns library errors (``CtexpError``) into an ``Error: ...`` line and the error's exit code.
"""

from __future__ import annotations

from ctexp.cli import attention, codi, compare, data, intervene, registry, run, sweep
from ctexp.cli.app import app

for _group in (run, data, registry, sweep, compare, intervene, attention, codi):
    _group.register(app)


def main() -> None:
    """Console-script entry point."""
    app()
