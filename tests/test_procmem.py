"""tests.procmem measures a child's own peak memory, not its parent's."""

from __future__ import annotations

import subprocess
import sys

from tests.procmem import run_measured


def test_a_small_child_of_a_big_parent_reads_small() -> None:
    ballast = bytearray(400 * 1024 * 1024)  # the parent holds 400 MB, touched
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    small = run_measured(
        [sys.executable, "-c", "pass"], timeout=60, stdout=subprocess.DEVNULL
    )
    big = run_measured(
        [sys.executable, "-c", "import time; b = bytearray(300 * 2**20); time.sleep(0.5)"],
        timeout=60,
    )
    del ballast
    assert small.returncode == 0 and big.returncode == 0
    assert small.peak_rss_mb < 100, small.peak_rss_mb
    assert 300 < big.peak_rss_mb < 400, big.peak_rss_mb
