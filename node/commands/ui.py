"""``ichnode ui``: start the Streamlit web interface as a child process.

The interface binds to 127.0.0.1 only (it shows patient data); put it behind a
reverse proxy with authentication to reach it from elsewhere (docs/UI.md). The
configuration path travels to the Streamlit process in ``ICHNODE_UI_CONFIG``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import FrameType

from config import load_settings

logger = logging.getLogger(__name__)

APP = Path(__file__).resolve().parents[2] / "ui" / "app.py"
CONFIG_ENV = "ICHNODE_UI_CONFIG"
HOST = "127.0.0.1"
MAX_UPLOAD_MB = 1024


def streamlit_command(port: int, app: Path = APP) -> list[str]:
    """The command line that serves ``app`` headless on ``HOST:port``."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app),
        "--server.address",
        HOST,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--server.fileWatcherType",
        "none",
        "--server.runOnSave",
        "false",
        "--server.maxUploadSize",
        str(MAX_UPLOAD_MB),
        "--browser.gatherUsageStats",
        "false",
        "--global.developmentMode",
        "false",
        "--client.toolbarMode",
        "minimal",
        "--theme.base",
        "dark",
    ]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def run(args: argparse.Namespace) -> int:
    """Validate the configuration, then run Streamlit until it exits or is signalled."""
    port = int(args.port)
    if not 1 <= port <= 65535:
        print(f"ichnode ui: --port {port} is not a TCP port (1-65535)", file=sys.stderr)
        return 2
    config_path = Path(args.config).resolve() if args.config else None
    settings = load_settings(config_path)  # a ConfigError becomes the CLI's one-line message
    if not APP.is_file():
        print(f"ichnode ui: the web interface is not installed ({APP} missing)", file=sys.stderr)
        return 2
    if not _port_free(port):
        print(f"ichnode ui: port {port} on {HOST} is already in use", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if config_path is not None:
        env[CONFIG_ENV] = str(config_path)
    else:
        env.pop(CONFIG_ENV, None)
    # The UI reads ichnode's packages from the checkout or the installed wheel alike.
    root = str(APP.parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    logger.info(
        "web interface on http://%s:%d/ (index %s)",
        HOST,
        port,
        settings.storage.effective_database_url,
    )
    child = subprocess.Popen(streamlit_command(port), env=env)

    forwarded: list[int] = []

    def _forward(signum: int, _frame: FrameType | None) -> None:
        forwarded.append(signum)
        child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, _forward)
    try:
        code = child.wait()
        # The server re-raises a SIGTERM it has handled once it has shut down: a stop
        # that was asked for is a clean exit, not a death by signal.
        if code == -signal.SIGTERM and signal.SIGTERM in forwarded:
            return 0
        return code
    except KeyboardInterrupt:
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
