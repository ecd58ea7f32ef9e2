"""Shared fixtures for the ichnode test suite."""

from __future__ import annotations

import pytest

from tests.interop import free_port


@pytest.fixture
def port() -> int:
    return free_port()
