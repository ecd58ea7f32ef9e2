"""Fixtures of the storage tests: an index database on SQLite or on a real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pg import postgres_server, postgres_url  # noqa: F401  (fixtures)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty index database: a SQLite file, or a new database on the test PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.sqlite'}"
    return str(request.getfixturevalue("postgres_url"))
