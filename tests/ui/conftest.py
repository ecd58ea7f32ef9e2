"""Fixtures of the UI tests: phantom series, a node index filled by the real processing path.

``node_data`` builds what a running node leaves behind: phantom CT series stored
through :class:`storage.archive.Archive` and :meth:`storage.index.Index.record_instance`
(as the SCP does), analysed by :class:`node.worker.JobRunner` (the worker's own
code: result files, ``results`` and ``deliveries`` rows, series status). The model
in that runner is :class:`GroundTruth`, which answers with the phantom's own labels,
so the stored findings are known exactly: the UI tests check what the UI shows
against them. A model run is tested separately with real (small, untrained) weights.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import update

from config import Settings, load_settings
from inference.findings import CLASSES, SUBTYPES, SeriesFindings, SliceResult, SubtypeFinding
from inference.phantom import PhantomCase, generate_case, write_series
from inference.volume import Volume
from node.worker import JobRunner
from storage.archive import Archive
from storage.index import Index, InstanceMeta
from storage.models import Delivery, DeliveryState, Job, JobState, Series, SeriesStatus
from tests.interop import REPO, free_port

N_SLICES = 10
MATRIX = 128


@dataclass
class PhantomSeries:
    """A phantom written as DICOM, with the map from SOP Instance UID to phantom slice."""

    case: PhantomCase
    paths: list[Path]
    series_instance_uid: str
    study_instance_uid: str
    slice_of: dict[str, int]


def make_series(
    folder: Path,
    seed: int,
    subtypes: tuple[str, ...],
    **options: object,
) -> PhantomSeries:
    """Generate and write one small phantom series."""
    case = generate_case(seed, n_slices=N_SLICES, matrix=MATRIX, subtypes=subtypes)
    paths = write_series(case, folder, **options)
    slice_of: dict[str, int] = {}
    series_uid = study_uid = ""
    for k, path in enumerate(paths):
        ds = dcmread(path, stop_before_pixels=True)
        slice_of[str(ds.SOPInstanceUID)] = k
        series_uid, study_uid = str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID)
    return PhantomSeries(case, paths, series_uid, study_uid, slice_of)


@dataclass
class GroundTruth:
    """An analyser that answers with the phantom labels (the node's model stand-in).

    ``fail`` names series for which it raises, to drive the worker's failure path.
    """

    series: dict[str, PhantomSeries] = field(default_factory=dict)
    fail: set[str] = field(default_factory=set)

    def predict(self, volume: Volume, *, explain: bool = True) -> SeriesFindings:
        """Findings from the labels of the phantom behind ``volume``."""
        if volume.series_instance_uid in self.fail:
            raise RuntimeError("model crashed on this series")
        phantom = self.series[volume.series_instance_uid]
        return truth_findings(phantom, volume)


def truth_findings(phantom: PhantomSeries, volume: Volume) -> SeriesFindings:
    """SeriesFindings that state exactly the phantom's labels, in the volume's slice order."""
    order = [phantom.slice_of[uid] for uid in volume.sop_instance_uids]
    labels = np.asarray(phantom.case.labels, dtype=bool)[:, order]
    voxel_ml = volume.voxel_volume_ml
    subtypes = {}
    for i, name in enumerate(SUBTYPES):
        present = bool(labels[i].any())
        subtypes[name] = SubtypeFinding(
            present=present,
            probability=0.97 if present else 0.03,
            volume_ml=float(labels[i].sum()) * voxel_ml,
        )
    slices = []
    for j, uid in enumerate(volume.sop_instance_uids):
        on_slice = labels[:, j].reshape(len(SUBTYPES), -1).any(axis=1)
        probabilities = {"any": 0.95 if on_slice.any() else 0.05}
        for i, name in enumerate(SUBTYPES):
            probabilities[name] = 0.9 if on_slice[i] else 0.02
        slices.append(SliceResult(uid, probabilities))
    gradcam = labels.any(axis=0).astype(np.float32)
    present_any = any(f.present for f in subtypes.values())
    return SeriesFindings(
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=volume.series_instance_uid,
        hemorrhage_present=present_any,
        hemorrhage_probability=0.97 if present_any else 0.03,
        subtypes=subtypes,
        slices=slices,
        sop_instance_uids=list(volume.sop_instance_uids),
        masks=labels,
        gradcam=gradcam,
        model_name="ichnode-ich",
        model_version="ground-truth",
        thresholds=dict.fromkeys(CLASSES, 0.5),
    )


def store(
    archive: Archive, index: Index, paths: list[Path], *, calling_ae: str = "SCANNER"
) -> None:
    """Store files as the SCP does: archive file first, then the index row."""
    for path in paths:
        ds = dcmread(path)
        raw = path.read_bytes()
        offset = 132 + len(_file_meta_bytes(raw))
        stored = archive.store(
            str(ds.StudyInstanceUID),
            str(ds.SeriesInstanceUID),
            str(ds.SOPInstanceUID),
            ds.file_meta,
            raw[offset:],
        )
        meta = InstanceMeta.from_dataset(
            ds, transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID)
        )
        index.record_instance(meta, path=stored.path, size=stored.size, calling_ae=calling_ae)


def _file_meta_bytes(raw: bytes) -> bytes:
    """The encoded File Meta group of a Part 10 file (after the 128-byte preamble and DICM)."""
    # (0002,0000) UL 4 bytes: group length, then that many bytes.
    group_length = int.from_bytes(raw[140:144], "little")
    return raw[132 : 144 + group_length]


def queue(index: Index, series_instance_uid: str) -> None:
    """Queue a job for a series, as the scheduler does when it is complete."""
    with index.session() as session:
        series = session.query(Series).filter_by(series_instance_uid=series_instance_uid).one()
        series.status = SeriesStatus.QUEUED
        session.add(Job(series_id=series.id, state=JobState.QUEUED, attempts=0))


@dataclass
class NodeData:
    """What a node left on disk: its settings, config file, and the phantoms it received."""

    settings: Settings
    config_path: Path
    positive: PhantomSeries
    negative: PhantomSeries
    failed: PhantomSeries
    skipped_uid: str
    receiving: PhantomSeries


def write_config(root: Path, weights: str = "", extra: str = "") -> Path:
    """A node configuration file with its storage under ``root`` and one destination.

    ``extra`` is TOML appended as it is (e.g. a ``[ui]`` section).
    """
    config = root / "node.toml"
    config.write_text(
        f'[storage]\nroot = "{root / "data"}"\nsqlite_synchronous = "NORMAL"\n'
        f'[inference]\ndevice = "cpu"\nweights = "{weights}"\n'
        "[jobs]\nmax_attempts = 1\n"
        '[[destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = 4242\n'
        '[[destinations]]\nname = "archive"\nae_title = "LTA"\nhost = "127.0.0.1"\nport = 4243\n'
        + extra
    )
    return config


def build_node_data(root: Path) -> NodeData:
    """Fill a storage root the way a running node would (see the module docstring)."""
    config = write_config(root)
    settings = load_settings(config)
    archive = Archive(settings.storage.root)
    index = Index(settings.storage.effective_database_url, sqlite_synchronous="NORMAL")
    index.upgrade()
    src = root / "src"
    positive = make_series(
        src / "pos",
        11,
        ("subdural", "intraparenchymal"),
        patient_id="ICH-POS",
        study_date="20260301",
        series_description="Head 5mm",
        overrides={"StudyDescription": "CT HEAD TRAUMA", "PatientSex": "F", "PatientAge": "071Y"},
    )
    negative = make_series(
        src / "neg",
        12,
        (),
        patient_id="ICH-NEG",
        study_date="20260215",
        series_description="Head 5mm",
        overrides={"StudyDescription": "CT HEAD"},
    )
    failed = make_series(
        src / "fail",
        13,
        ("epidural",),
        patient_id="ICH-FAIL",
        study_date="20260110",
        series_description="Head 5mm",
        overrides={"StudyDescription": "CT HEAD"},
    )
    skipped = make_series(
        src / "skip",
        14,
        (),
        patient_id="ICH-SKIP",
        study_date="20260105",
        series_description="Scout",
        overrides={
            "StudyDescription": "CT HEAD",
            "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"],
        },
    )
    receiving = make_series(
        src / "recv",
        15,
        (),
        patient_id="ICH-RECV",
        study_date="20251201",
        series_description="Head 2mm",
        overrides={"StudyDescription": "CT HEAD"},
    )
    truth = GroundTruth(
        {s.series_instance_uid: s for s in (positive, negative, failed)},
        fail={failed.series_instance_uid},
    )
    runner = JobRunner(settings, index, truth)  # type: ignore[arg-type]
    for phantom in (positive, negative, failed, skipped):
        store(archive, index, phantom.paths)
        queue(index, phantom.series_instance_uid)
        outcome = runner.run_one()
        assert outcome is not None, "the queued job was not claimed"
    store(archive, index, receiving.paths[:4])
    with index.session() as session:
        # the PACS acknowledged the positive's objects; the long-term archive has not yet
        session.execute(
            update(Delivery)
            .where(Delivery.destination == "pacs")
            .values(state=DeliveryState.SENT, acked_at=dt.datetime.now(dt.UTC))
        )
    index.dispose()
    return NodeData(
        settings, config, positive, negative, failed, skipped.series_instance_uid, receiving
    )


@pytest.fixture(scope="session")
def node_data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeData]:
    """One node storage root for the whole UI test session (built once: it runs the worker)."""
    yield build_node_data(tmp_path_factory.mktemp("node"))


@contextlib.contextmanager
def serve(config: Path) -> Iterator[str]:
    """``ichnode ui --config config`` on a free loopback port, stopped with SIGTERM afterwards."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "ICHNODE_UI_CONFIG"}
    child = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "ui", "--config", str(config), "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if child.poll() is not None:
                output = child.stdout.read() if child.stdout else ""
                pytest.fail(f"ichnode ui exited with {child.returncode}: {output[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.read() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("ichnode ui did not answer its health check within 60 s")
            time.sleep(0.5)
        yield url
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            pytest.fail("ichnode ui did not stop within 30 s of SIGTERM")
        # A stop that was asked for is a clean exit (what systemd and the tests expect).
        assert child.returncode == 0, f"ichnode ui ended with {child.returncode} after SIGTERM"
