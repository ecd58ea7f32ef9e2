"""Helpers of the load, soak and PHI-log tests: memory of a node process, senders.

Memory is read from ``/proc/<pid>/status`` (``VmRSS`` now, ``VmHWM`` the peak
the kernel kept); :class:`RssSampler` samples a process in a thread while a test
loads it. :func:`storescu` sends files with DCMTK; :func:`start_scu` starts the
receiver tests' pynetdicom C-STORE SCU (``tests/storage/scu.py``) in its own
process, which prints one JSON line with every status.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Self

from tests.interop import REPO, require_tool

logger = logging.getLogger(__name__)


def proc_status_kb(pid: int, field: str) -> int:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of ``/proc/<pid>/status``; 0 when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return 0


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` now, in MB (MiB)."""
    return proc_status_kb(pid, "VmRSS") / 1024


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of ``pid`` so far, in MB (MiB)."""
    return proc_status_kb(pid, "VmHWM") / 1024


class RssSampler:
    """Sample the VmRSS of one process every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            value = rss_mb(self.pid)
            if value:
                self.samples.append(value)
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def max_mb(self) -> float:
        """The largest sample (0 when none)."""
        return max(self.samples, default=0.0)


def storescu(port: int, files: list[Path], *, calling: str = "SCANNER", called: str = "ICHNODE",
             timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Send ``files`` in one association with DCMTK ``storescu`` (TCP_NODELAY on)."""
    tool = require_tool("storescu", "dcmtk")
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return subprocess.run(
        [tool, "-aet", calling, "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )


def start_scu(port: int, calling: str, count: int, *, size: int, go: Path) -> subprocess.Popen[str]:
    """Start this module as a C-STORE SCU process; it sends once ``go`` exists."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.storage.scu", str(port), calling, str(count),
         "--size", str(size), "--go", str(go)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


