"""``ichnode ui``: configuration errors in one line, loopback only, a real Streamlit child."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from node.commands.ui import HOST, streamlit_command
from tests.interop import REPO, free_port

ICHNODE = [sys.executable, "-m", "node.cli"]


def _ichnode(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ICHNODE, *args], check=False, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_command_line_is_headless_loopback_without_telemetry() -> None:
    cmd = streamlit_command(8765)
    joined = " ".join(cmd)
    assert cmd[1:4] == ["-m", "streamlit", "run"]
    assert cmd[4].endswith("ui/app.py") and Path(cmd[4]).is_file()
    assert "--server.address 127.0.0.1" in joined
    assert "--server.port 8765" in joined
    assert "--server.headless true" in joined
    assert "--browser.gatherUsageStats false" in joined


def test_bad_config_is_one_line_without_traceback(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[storage]\nno_such_key = 1\n")
    result = _ichnode("ui", "--config", str(config), "--port", str(free_port()))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "storage.no_such_key" in lines[0] and "Traceback" not in result.stderr


def test_missing_config_and_bad_port(tmp_path: Path) -> None:
    result = _ichnode("ui", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = _ichnode("ui", "--port", "70000")
    assert result.returncode == 2 and "not a TCP port" in result.stderr


def test_port_in_use_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = _ichnode("ui", "--port", str(port))
    assert result.returncode == 2
    assert f"port {port}" in result.stderr and "in use" in result.stderr


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # TCP_LISTEN
                found.add(address)
    return found


def test_serves_on_loopback_only_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\nroot = "{tmp_path / "data"}"\n')
    child = subprocess.Popen(
        [*ICHNODE, "ui", "--config", str(config), "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        body = ""
        while time.monotonic() < deadline:
            if child.poll() is not None:
                pytest.fail(
                    f"ichnode ui exited early: {child.stdout.read() if child.stdout else ''}"
                )
            try:
                with urllib.request.urlopen(f"http://{HOST}:{port}/_stcore/health", timeout=2) as r:
                    body = r.read().decode()
                    break
            except OSError:
                time.sleep(0.5)
        assert body == "ok"
        addresses = _listening_addresses(port)
        # 0100007F is 127.0.0.1 in /proc's little-endian hex; nothing on 0.0.0.0 or ::
        assert addresses == {"0100007F"}, addresses
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            rc = child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise
    assert rc in (0, -signal.SIGTERM)
