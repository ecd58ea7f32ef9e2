"""Helpers for tests that need real peers: external tools, free ports, the real data."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "real"
REAL_5MM = REAL_DATA / "philips-head-phantom-5mm"
REAL_TILT = REAL_DATA / "philips-head-phantom-tilt"


def interop_required() -> bool:
    """True when CI asked that missing interop tools fail the run instead of skipping."""
    return os.environ.get("ICHNODE_REQUIRE_INTEROP", "") == "1"


def missing(reason: str) -> None:
    """Skip with ``reason``, or fail when ICHNODE_REQUIRE_INTEROP=1."""
    if interop_required():
        pytest.fail(f"{reason} (ICHNODE_REQUIRE_INTEROP=1 makes this a failure)")
    pytest.skip(reason)


def require_tool(name: str, package: str = "") -> str:
    """Return the path of executable ``name``, or skip/fail with a clear reason."""
    path = shutil.which(name)
    if path is None:
        for extra in ("/usr/sbin", "/usr/local/sbin"):
            candidate = Path(extra) / name
            if candidate.exists():
                return str(candidate)
        missing(f"{name} not found on PATH (apt-get install {package or name})")
    assert path is not None
    return path


def require_real_data() -> Path:
    if not REAL_TILT.is_dir() or not REAL_5MM.is_dir():
        missing(f"real test series not found under {REAL_DATA}")
    return REAL_DATA


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
