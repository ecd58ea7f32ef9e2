"""Memory follows the voxels of a series, not its slice count.

One series of 10,000 CT slices of 8x8 pixels (about 10 MB on the wire) once
drove a worker to ~23 GB: the network input (windows x neighbours at the
model's 256x256) was made for the whole series at once, ~2.4 MB per slice
whatever the slice's own size. These tests stay small enough that they cannot
exhaust the machine themselves: a few hundred tiny slices, whose cost before
the fix (~4 MB each at the peak) shows as hundreds of MB, against a bound well
under that. The slice and voxel limits themselves are tested in
``tests/loop/test_answers.py`` (through ``ichnode serve``) and
``tests/node/test_degraded.py`` (``ichnode analyze``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from tests.hardening.loadutil import storescu
from tests.interop import REPO
from tests.loop.harness import NodeRunner, wait_for
from tests.loop.helpers import ct_dataset
from tests.procmem import run_measured

pytestmark = pytest.mark.interop

FEW, MANY = 20, 400
#: Peak RSS that MANY tiny slices may add over FEW. Measured before the fix:
#: +964 MB (analyze, 734 -> 1698 MB); after it: about +125 MB in a worker
#: (headers, references and allocator slack), which this leaves room for.
GROWTH_LIMIT_MB = 300


def _tiny(n: int, folder: Path) -> tuple[str, list[Path]]:
    """``n`` CT slices of 8x8 pixels with full geometry; returns the series UID and files."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    files = []
    for i in range(n):
        ds = ct_dataset(study, series, instance_number=i + 1)
        ds.FrameOfReferenceUID = frame
        ds.PixelSpacing = [0.5, 0.5]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        ds.PixelData = np.full((8, 8), 1064, dtype=np.int16).tobytes()
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return series, files


def _analyze_peak_mb(folder: Path, out: Path) -> float:
    """Peak resident size of one ``ichnode analyze`` process (its own VmHWM)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICHNODE_")}
    done = run_measured(
        [sys.executable, "-m", "node.cli", "analyze", "--json", "--device", "cpu"]
        + ["--out", str(out), str(folder)],
        timeout=600,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert done.returncode == 0
    return done.peak_rss_mb


def test_analyze_peak_memory_does_not_grow_with_tiny_slices(tmp_path: Path) -> None:
    _tiny(FEW, tmp_path / "few")
    _tiny(MANY, tmp_path / "many")
    few = _analyze_peak_mb(tmp_path / "few", tmp_path / "out-few")
    many = _analyze_peak_mb(tmp_path / "many", tmp_path / "out-many")
    assert many - few < GROWTH_LIMIT_MB, f"{FEW} slices: {few:.0f} MB, {MANY}: {many:.0f} MB"


def _peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_worker_peak_memory_does_not_grow_with_tiny_slices(tmp_path: Path) -> None:
    node = NodeRunner(tmp_path / "node", [], quiet_seconds=1.0)
    node.start()
    try:
        (worker,) = node.worker_pids()
        peaks = []
        for n in (FEW, MANY):
            series, files = _tiny(n, tmp_path / f"src-{n}")
            run = storescu(node.port, files, called=node.ae_title, timeout=300)
            assert run.returncode == 0, run.stderr

            def done(series: str = series) -> bool:
                row = node.series(series)
                return row is not None and row.status.value == "done"

            wait_for(f"the job of {n} slices", done, 600)
            peaks.append(_peak_mb(worker))
        assert node.worker_pids() == [worker]  # the same process did both jobs
        assert peaks[1] - peaks[0] < GROWTH_LIMIT_MB, (
            f"worker peak {peaks[0]:.0f} MB after {FEW} slices, {peaks[1]:.0f} MB after {MANY}"
        )
    finally:
        node.stop()
