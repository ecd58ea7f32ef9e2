"""Shared helpers of the benchmarks (and tests): synthetic CT series, peers, timings."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]


def make_ct_dataset(
    study_instance_uid: str,
    series_instance_uid: str,
    index: int,
    *,
    rows: int = 512,
    columns: int = 512,
    sop_instance_uid: str | None = None,
    patient_id: str = "BENCH-001",
    pixel_seed: int = 0,
) -> Dataset:
    """Return one axial CT slice (int16, HU-like content) with file meta, ready to save."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    sop_uid = UID(sop_instance_uid or generate_uid())
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.FrameOfReferenceUID = (
        series_instance_uid + ".1" if len(series_instance_uid) < 62 else series_instance_uid
    )
    ds.PatientName = "Bench^Phantom"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.StudyDescription = "CT HEAD"
    ds.AccessionNumber = "A1"
    ds.StudyID = "1"
    ds.Modality = "CT"
    ds.SeriesNumber = 2
    ds.SeriesDescription = "AXIAL 5MM"
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [-125.0, -125.0, 5.0 * index]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [250 / columns, 250 / rows]
    ds.SliceThickness = 5.0
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.WindowCenter = 40
    ds.WindowWidth = 80
    yy, xx = np.mgrid[0:rows, 0:columns]
    r = np.hypot((yy - rows / 2) / (rows * 0.4), (xx - columns / 2) / (columns * 0.33))
    img = np.where(r < 1.0, 1024 + 35, 0).astype(np.int16)  # brain ~35 HU, air outside
    img[(r >= 0.93) & (r < 1.0)] = 1024 + 1000  # skull
    rng = np.random.default_rng(pixel_seed + index)
    img = img + rng.normal(0, 6, size=img.shape).astype(np.int16)
    ds.PixelData = img.astype(np.int16).tobytes()
    return ds


def write_ct_series(folder: Path, count: int, *, rows: int = 512, columns: int = 512) -> list[Path]:
    """Write a synthetic CT series of ``count`` slices into ``folder``; return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    series = generate_uid()
    paths = []
    for i in range(count):
        ds = make_ct_dataset(study, series, i, rows=rows, columns=columns)
        path = folder / f"CT{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def free_port() -> int:
    """Return a TCP port free on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    """Wait until something accepts TCP connections on ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK tools (TCP_NODELAY on, as the benchmarks and tests require)."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


def machine() -> dict[str, str | int]:
    """Describe the machine for a benchmark report."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count() or 0,
        "cpu": cpu,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
    }


def tool_version(tool: str) -> str:
    """Return the first line of ``tool --version`` (or ``""``)."""
    path = shutil.which(tool)
    if path is None:
        return ""
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


def write_benchmark_section(name: str, body: str, path: Path | None = None) -> None:
    """Replace the ``<!-- name:start -->``..``<!-- name:end -->`` section of docs/BENCHMARKS.md."""
    target = path or REPO / "docs" / "BENCHMARKS.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = target.read_text() if target.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        before = text[: text.index(start)]
        after = text[text.index(end) + len(end) :]
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    target.write_text(text)


def time_end_to_end(
    predictor: Any, runs: int, n_slices: int, matrix: int, sync: Callable[[], None] = lambda: None
) -> tuple[list[float], dict[str, float], Any]:
    """Time a phantom series from DICOM files to findings with Grad-CAM.

    Writes an ``n_slices`` x ``matrix`` phantom series (one intraparenchymal bleed,
    5 mm) to a temporary folder, then ``runs`` + 1 times: ``read_series``,
    ``load_volume``, ``predictor.predict``; the first run warms caches and is not
    counted. ``sync`` waits for the device before each clock reading (CUDA).
    Returns the counted totals, the median of each stage over the counted runs
    (one slow run does not stand for the others) and the last run's findings.
    """
    from inference.phantom import generate_case, write_series
    from inference.volume import load_volume, read_series

    case = generate_case(7, n_slices=n_slices, matrix=matrix, subtypes=("intraparenchymal",),
                         slice_thickness=5.0)
    totals: list[float] = []
    stages: dict[str, list[float]] = {"read_series_s": [], "load_volume_s": [],
                                      "predict_with_gradcam_s": []}
    findings = None
    with tempfile.TemporaryDirectory() as tmp:
        write_series(case, Path(tmp))
        for run in range(runs + 1):
            sync()
            t0 = time.perf_counter()
            groups, _ = read_series([Path(tmp)])
            t1 = time.perf_counter()
            volume = load_volume(next(iter(groups.values())))
            t2 = time.perf_counter()
            findings = predictor.predict(volume, explain=True)
            sync()
            t3 = time.perf_counter()
            if run:
                totals.append(t3 - t0)
                for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                    stages[name].append(seconds)
    if not totals:
        raise ValueError("runs must be at least 1")
    return totals, {name: statistics.median(v) for name, v in stages.items()}, findings

