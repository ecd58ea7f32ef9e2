"""Run a command and measure its own peak resident memory.

``wait4``'s ``ru_maxrss`` is not the child's own peak on Linux: a child forked
(or vforked) from a large test process keeps the parent's high-water mark
through ``exec``, so in a long test session a small ``ichnode analyze`` reads as
big as pytest itself. The high-water mark of the process's own address space,
``VmHWM`` in ``/proc/<pid>/status``, starts afresh at ``exec``; it is polled
while the child runs (it only grows, so the last reading holds the peak up to
then).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Measured:
    returncode: int
    seconds: float
    peak_rss_mb: float


def vm_hwm_mb(pid: int) -> float | None:
    """The process's peak resident set (VmHWM) in MB; None once it has exited."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None  # a zombie has no memory lines


def run_measured(
    command: list[str], *, timeout: float, poll: float = 0.05, **popen: Any
) -> Measured:
    """Run ``command`` to its end; its exit code, wall time and own peak RSS (MB)."""
    start = time.monotonic()
    process = subprocess.Popen(command, **popen)
    peak = 0.0
    try:
        while process.poll() is None:
            if time.monotonic() > start + timeout:
                raise TimeoutError(f"{command[:4]} ran longer than {timeout} s")
            reading = vm_hwm_mb(process.pid)
            if reading is not None:
                peak = max(peak, reading)
            time.sleep(poll)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return Measured(process.returncode, time.monotonic() - start, peak)
