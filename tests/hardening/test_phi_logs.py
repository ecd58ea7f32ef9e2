"""PHI-safe logs: the loop at INFO never logs a patient's identity; DEBUG never logs pixels.

Phantom series carry distinctive PatientName, PatientBirthDate, AccessionNumber,
OtherPatientIDs, ReferringPhysicianName and InstitutionName. They go through
the whole loop (``ichnode serve`` at INFO, storescu in, SR/SEG/SC out to a real
Orthanc), then ``ichnode studies``, ``ichnode outbox list`` and ``ichnode
analyze`` run on them; none of these strings may appear in the node's log or
in the stderr of any command. A second run at DEBUG (``serve`` and
``analyze``) may print the patient name but never pixel data.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from storage.models import DeliveryState
from tests.hardening.loadutil import storescu
from tests.interop import REPO
from tests.loop.harness import TEST_WEIGHTS, Destination, NodeRunner, wait_for
from tests.orthanc import Orthanc, running_orthanc

logger = logging.getLogger(__name__)

PHI: dict[str, str] = {
    "PatientName": "Quaxlethorpe^Zebedina^Marguerite",
    "PatientBirthDate": "19230417",
    "AccessionNumber": "ACQZ47115",
    "OtherPatientIDs": "OPIDXK99317",
    "ReferringPhysicianName": "Vexworthy^Hortensio",
    "InstitutionName": "Brontoxyl Memorial Infirmary",
}


def forbidden_strings() -> list[str]:
    """Each PHI value, and the forms a log line could print it in."""
    found = set()
    for keyword, value in PHI.items():
        found.add(value)
        if "^" in value:
            found.update(part for part in value.split("^") if len(part) > 4)
            found.add(value.replace("^", " "))
        if keyword == "PatientBirthDate":
            found.add(f"{value[:4]}-{value[4:6]}-{value[6:]}")
    return sorted(found)


def leaks(text: str) -> list[str]:
    """Lines of ``text`` that contain one of the PHI strings (case-insensitive)."""
    lowered = [(line, line.lower()) for line in text.splitlines()]
    return [
        line for line, low in lowered if any(s.lower() in low for s in forbidden_strings())
    ]


_NUMBER_RUN = re.compile(r"(?:-?\d+[ ,]+){16,}-?\d+")
_BYTES_RUN = re.compile(r"(?:\\x[0-9a-f]{2}|[0-9a-f]{2} ){32,}", re.IGNORECASE)


def pixel_dumps(text: str, pixel_fragments: list[str]) -> list[str]:
    """Lines that look like pixel data: long runs of numbers or bytes, or known pixel bytes."""
    bad = []
    for line in text.splitlines():
        if (
            len(line) > 20000
            or _NUMBER_RUN.search(line)
            or _BYTES_RUN.search(line)
            or any(f in line for f in pixel_fragments)
        ):
            bad.append(line[:300])
    return bad


def write_phi_series(out: Path) -> list[Path]:
    """A positive 8-slice 128x128 phantom series and a localizer, both with the PHI above."""
    from inference.phantom import generate_case, write_series

    case = generate_case(4711, n_slices=8, matrix=128, subtypes=("intraparenchymal",))
    files = write_series(
        case, out / "axial", patient_name=PHI["PatientName"], patient_id="PHI-TEST-1",
        overrides={k: v for k, v in PHI.items() if k != "PatientName"},
    )
    scout = generate_case(4712, n_slices=1, matrix=64, subtypes=())
    files += write_series(
        scout, out / "scout", patient_name=PHI["PatientName"], patient_id="PHI-TEST-1",
        series_description="SCOUT",
        study_instance_uid=str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID),
        overrides={**{k: v for k, v in PHI.items() if k != "PatientName"},
                   "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]},
    )
    return files


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``python -m node.cli ARGS`` and return it (stdout and stderr captured)."""
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args], cwd=REPO, capture_output=True, text=True,
        timeout=timeout, check=False,
    )


@pytest.fixture(scope="module")
def series_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The PHI-laden phantom files, written once for both tests."""
    files = write_phi_series(tmp_path_factory.mktemp("phi"))
    ds = dcmread(files[0])
    assert str(ds.PatientName) == PHI["PatientName"] and ds.AccessionNumber == PHI["AccessionNumber"]
    return files


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A real Orthanc as the node's destination."""
    with running_orthanc(tmp_path / "orthanc") as server:
        yield server


def weights_args() -> list[str]:
    return ["--weights", TEST_WEIGHTS] if TEST_WEIGHTS else []


def test_loop_at_info_logs_no_phi(
    tmp_path: Path, orthanc: Orthanc, series_files: list[Path]
) -> None:
    node = NodeRunner(
        tmp_path / "node", [Destination("pacs", orthanc.aet, orthanc.dicom_port)],
        quiet_seconds=1.0,
    )
    node.start()
    try:
        sent = storescu(node.port, series_files)
        assert sent.returncode == 0, sent.stderr
        uid = str(dcmread(series_files[0], stop_before_pixels=True).SeriesInstanceUID)

        def delivered() -> bool:
            done = node.series(uid)
            rows = node.deliveries()
            return (
                done is not None and done.status == "done" and bool(rows)
                and all(d.state == DeliveryState.SENT for d in rows)
            )

        wait_for("results delivered to Orthanc", delivered, timeout=180)
        commands = [
            cli("studies", "--config", str(node.config_path)),
            cli("studies", "--json", "--config", str(node.config_path)),
            cli("outbox", "--config", str(node.config_path), "list"),
            cli("analyze", *map(str, series_files), "--out", str(tmp_path / "out"),
                "--device", "cpu", *weights_args()),
        ]
    finally:
        code = node.stop()
    assert code == 0, f"ichnode serve exited with {code}: {node.log_tail()}"
    for proc in commands[:3]:
        assert proc.returncode == 0, proc.stderr[-2000:]
    # analyze exits 1 because the localizer is skipped; both series were logged at INFO.
    analyze_log = commands[-1].stderr
    assert commands[-1].returncode in (0, 1), analyze_log[-2000:]
    assert "hemorrhage present" in analyze_log and "skipped" in analyze_log, analyze_log[-2000:]
    logs = {"node.log": node.log_path.read_text(errors="replace")}
    logs.update({f"stderr of {' '.join(p.args[3:5])}": p.stderr for p in commands})
    logs.update({str(p): p.read_text(errors="replace") for p in node.root.rglob("*.log")})
    assert "ichnode serving as" in logs["node.log"] and "acknowledged" in logs["node.log"]
    for name, text in logs.items():
        assert not leaks(text), f"PHI in {name}: {leaks(text)[:5]}"
    # The study list shows the patient ID by contract, never the name.
    for proc in commands[:3]:
        assert not leaks(proc.stdout), f"PHI on stdout of {proc.args}: {leaks(proc.stdout)[:3]}"


def test_debug_logs_no_pixel_data(tmp_path: Path, series_files: list[Path]) -> None:
    fragments = []
    for path in series_files[:3]:
        pixels = dcmread(path).PixelData
        middle = len(pixels) // 2
        fragments.append(repr(pixels[middle : middle + 12])[2:-1])
        fragments.append(pixels[middle : middle + 12].hex())
    node = NodeRunner(tmp_path / "node", [], quiet_seconds=1.0)  # writes the config
    log_path = tmp_path / "debug-serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "--log-level", "DEBUG", "serve", "--config",
             str(node.config_path)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            wait_for("the node at DEBUG listening",
                     lambda: proc.poll() is not None or re.search(
                         r"worker \S+ ready", log_path.read_text(errors="replace")),
                     timeout=180)
            assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
            sent = storescu(node.port, series_files)
            assert sent.returncode == 0, sent.stderr
            uid = str(dcmread(series_files[0], stop_before_pixels=True).SeriesInstanceUID)
            wait_for("the series analysed", lambda: (s := node.series(uid)) is not None
                     and s.status == "done", timeout=180)
        finally:
            proc.terminate()
            proc.wait(60)
            node.stop()
    analyze = cli("--log-level", "DEBUG", "analyze", *map(str, series_files), "--out",
                  str(tmp_path / "out"), "--device", "cpu", *weights_args())
    assert analyze.returncode in (0, 1), analyze.stderr[-2000:]
    assert "hemorrhage present" in analyze.stderr, analyze.stderr[-2000:]
    serve_log = log_path.read_text(errors="replace")
    assert " DEBUG " in serve_log and " DEBUG " in analyze.stderr
    for name, text in (("serve", serve_log), ("analyze", analyze.stderr)):
        dumps = pixel_dumps(text, fragments)
        assert not dumps, f"pixel data in the DEBUG log of {name}: {dumps[:3]}"
