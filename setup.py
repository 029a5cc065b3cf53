"""The one packaging fact pyproject.toml cannot state: ship the top-level ``migrations/`` as ``ctexp.migrations``.

The Alembic environment stays at the repository root (where alembic.ini and the alembic CLI expect it)
and lands inside the installed package, so that ``ctexp.registry.db.migrations_dir`` finds it both in a
checkout and in a wheel. Everything else about the project is in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["ctexp", "ctexp.*"]), "ctexp.migrations", "ctexp.migrations.versions"],
    package_dir={"ctexp.migrations": "migrations"},
)
