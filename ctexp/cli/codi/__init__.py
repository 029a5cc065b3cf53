"""The ``codi`` command group: ``ctexp codi train`` and ``ctexp codi eval`` (in ``commands``)."""

from __future__ import annotations

import typer

from ctexp.cli.codi.commands import codi_app


def register(app: typer.Typer) -> None:
    """Add the ``codi`` group (``train``, ``eval``) to ``app``."""
    app.add_typer(codi_app, name="codi")
