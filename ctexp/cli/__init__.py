"""The ``ctexp`` command line: parse, call the library, print. No experiment logic lives here.

One module per command group registers its commands onto the app (``app.py``), whose one handler
turns library errors (``CtexpError``) into an ``Error: ...`` line and the error's exit code. The app
imports a command's module only when the command is asked for (``app.COMMAND_MODULES``).
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading

from ctexp.cli.app import app

# A command's first moments are imports: hundreds of thousands of objects and no garbage, which the
# cyclic collector would scan again and again. It is off until then, and on again (with what was
# imported frozen out of its scans) for any command that runs longer.
GC_PAUSE_S = 2.0


def main() -> None:
    """Console-script entry point."""
    gc.disable()
    resume = threading.Timer(GC_PAUSE_S, _resume_gc)
    resume.daemon = True
    resume.start()
    try:
        app()
    except SystemExit as done:
        resume.cancel()
        _exit(done.code)


def _resume_gc() -> None:
    gc.freeze()
    gc.enable()


def _exit(code: int | str | None) -> None:
    """Exit as ``sys.exit`` would, less the interpreter's teardown of every module (a tenth of a short
    command): exit handlers run and the streams are flushed. Where another thread still runs, the
    normal exit waits for it."""
    if threading.active_count() > 1 and any(
        not thread.daemon for thread in threading.enumerate() if thread is not threading.main_thread()
    ):
        sys.exit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()  # the exit handlers a normal exit runs (logging, MLflow, ...)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 1
    os._exit(code or 0)
