"""The wheel is a complete ctexp: every module of the checkout, and the Alembic migrations inside the package."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a build reads; copied so that building leaves no build/ or egg-info in the checkout.
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "ctexp", "migrations")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip wheel`` builds from a copy of the checkout (offline: no build isolation)."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    out = base / "out"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out),
         str(source)],
        capture_output=True, text=True, check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = out.glob("ctexp-*.whl")
    return wheel


def test_wheel_ships_the_migrations_inside_the_package(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"ctexp/migrations/env.py", "ctexp/migrations/script.py.mako"}
    expected |= {f"ctexp/migrations/versions/{path.name}" for path in (ROOT / "migrations" / "versions").glob("*.py")}
    assert len(expected) > 3  # at least one revision
    assert expected <= names, sorted(expected - names)
    assert not any(name.startswith("migrations/") for name in names), "migrations must not be a top-level package"


def test_wheel_holds_every_module_of_the_checkout(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "ctexp").rglob("*.py")}
    assert modules <= names, sorted(modules - names)


def test_installed_ctexp_finds_its_migrations(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install puts in site-packages
    found = subprocess.run(
        [sys.executable, "-c", "from ctexp.registry.engine import migrations_dir; print(migrations_dir())"],
        capture_output=True, text=True, check=False, cwd=tmp_path, env={"PYTHONPATH": str(site)},
    )
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == site / "ctexp" / "migrations"
