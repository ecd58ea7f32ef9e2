"""Every routed series gets an answer in the PACS: a real ``ichnode serve`` and a real Orthanc.

* a series whose slices carry a different Frame of Reference UID each (an
  anonymiser rewrote every UID) is analysed: SEG, SR and key images arrive;
* a series whose SEG cannot be built (no Frame of Reference UID at all, which
  highdicom refuses) still gets its SR, saying what is missing and why, and its
  key images; the series sent after it is unaffected;
* a routed series that cannot be analysed (here: no pixel spacing; and one
  longer than ``jobs.max_series_slices``) gets an SR saying "not analysed" and why.

Every object that reaches Orthanc passes ``dciodvfy``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from node.results import report_notes
from tests.hardening.loadutil import storescu
from tests.loop.conftest import dciodvfy_errors, download, result_series
from tests.loop.harness import Destination, NodeRunner, wait_for
from tests.loop.helpers import ct_dataset
from tests.orthanc import Orthanc, running_orthanc

pytestmark = pytest.mark.interop

MAX_SLICES = 30  # the node's jobs.max_series_slices in this module
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"


@dataclass(frozen=True)
class Sent:
    study_instance_uid: str
    series_instance_uid: str
    files: list[Path]


@dataclass
class Loop:
    orthanc: Orthanc
    node: NodeRunner
    case: object


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    from inference.phantom import generate_case

    root = tmp_path_factory.mktemp("answers")
    # The phantom of the e2e test whose bleed the bundled weights find (seed 103).
    case = generate_case(103, n_slices=24, matrix=256, subtypes=("intraparenchymal",))
    with running_orthanc(root / "orthanc") as orthanc:
        node = NodeRunner(
            root / "node",
            [Destination("pacs", orthanc.aet, orthanc.dicom_port)],
            quiet_seconds=2.0,
            extra_toml=f"[jobs]\nmax_series_slices = {MAX_SLICES}\nretry_backoff_seconds = 1.0\n",
        )
        node.start()
        try:
            yield Loop(orthanc, node, case)
        finally:
            node.stop()


def _phantom(loop: Loop, out: Path, name: str, frame_of_reference: str) -> Sent:
    """The seed-103 phantom as a new study; ``frame_of_reference``: same | per-slice | none."""
    from inference.phantom import write_series

    files = write_series(
        loop.case,  # type: ignore[arg-type]
        out,
        patient_id=f"ANSWERS-{name}",
        study_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        frame_of_reference_uid=generate_uid(),
    )
    for path in files:
        if frame_of_reference == "same":
            break
        ds = dcmread(path)
        if frame_of_reference == "per-slice":
            ds.FrameOfReferenceUID = generate_uid()
        else:
            del ds.FrameOfReferenceUID
        ds.save_as(path)
    header = dcmread(files[0], stop_before_pixels=True)
    return Sent(str(header.StudyInstanceUID), str(header.SeriesInstanceUID), list(files))


def _send(node: NodeRunner, sent: Sent) -> None:
    run = storescu(node.port, sent.files, called=node.ae_title)
    assert run.returncode == 0, run.stderr


def _delivered(loop: Loop, sent: Sent, kinds: set[str]) -> dict[str, list[str]] | None:
    """Orthanc's result instances of ``sent`` once ``kinds`` are there and all rows are sent."""
    found = result_series(loop.orthanc, sent.study_instance_uid)
    results = {r.id for r in loop.node.results(sent.series_instance_uid)}
    states = {d.state.value for d in loop.node.deliveries() if d.result_id in results}
    if not results or states != {"sent"} or not kinds <= set(found):
        return None
    return found


def _valid_objects(loop: Loop, found: dict[str, list[str]], out: Path) -> dict[str, list[object]]:
    """Download every result instance, check it with dciodvfy, return the datasets by kind."""
    out.mkdir(parents=True, exist_ok=True)
    objects: dict[str, list[object]] = {}
    for kind, ids in found.items():
        for n, instance_id in enumerate(ids):
            path = download(loop.orthanc, instance_id, out / f"{kind}-{n}.dcm")
            assert dciodvfy_errors(path) == [], f"{kind} object has dciodvfy errors"
            objects.setdefault(kind, []).append(dcmread(path))
    return objects


def test_mixed_frame_of_reference_series_gets_all_its_objects(loop: Loop, tmp_path: Path) -> None:
    sent = _phantom(loop, tmp_path / "src", "mixed-for", "per-slice")
    _send(loop.node, sent)
    found = wait_for(
        "SEG, SR and key images of the mixed-FoR series",
        lambda: _delivered(loop, sent, {"SEG", "SR", "SC"}),
        300,
    )
    objects = _valid_objects(loop, found, tmp_path / "got")
    row = loop.node.series(sent.series_instance_uid)
    assert row is not None and row.status.value == "done" and row.hemorrhage is True
    (seg,) = objects["SEG"]
    source_frames = {
        str(dcmread(p, stop_before_pixels=True).FrameOfReferenceUID) for p in sent.files
    }
    assert len(source_frames) == len(sent.files)
    assert str(seg.FrameOfReferenceUID) in source_frames  # type: ignore[attr-defined]
    (sr,) = objects["SR"]
    assert report_notes(sr) == []  # type: ignore[arg-type]
    assert "distinct Frame of Reference UIDs" in loop.node.log_path.read_text()


def test_seg_that_cannot_be_built_leaves_sr_with_reason_and_key_images(
    loop: Loop, tmp_path: Path
) -> None:
    broken = _phantom(loop, tmp_path / "broken", "no-for", "none")
    after = _phantom(loop, tmp_path / "after", "after", "same")
    _send(loop.node, broken)
    _send(loop.node, after)
    found = wait_for(
        "SR and key images of the series without a Frame of Reference",
        lambda: _delivered(loop, broken, {"SR", "SC"}),
        300,
    )
    objects = _valid_objects(loop, found, tmp_path / "got-broken")
    assert "SEG" not in objects
    (sr,) = objects["SR"]
    notes = report_notes(sr)  # type: ignore[arg-type]
    assert len(notes) == 1 and notes[0].startswith("SEG not produced:")
    assert "Frame Of Reference" in notes[0]
    row = loop.node.series(broken.series_instance_uid)
    assert row is not None and row.status.value == "done" and row.hemorrhage is True
    assert row.reason is not None and "SEG not produced" in row.reason
    (job,) = loop.node.jobs(broken.series_instance_uid)
    assert job.state.value == "done" and job.attempts == 1  # degraded, not retried

    # the next series is unaffected: its whole set, an SR without notes
    found = wait_for(
        "SEG, SR and key images of the series sent after it",
        lambda: _delivered(loop, after, {"SEG", "SR", "SC"}),
        300,
    )
    objects = _valid_objects(loop, found, tmp_path / "got-after")
    (sr,) = objects["SR"]
    assert report_notes(sr) == []  # type: ignore[arg-type]
    row = loop.node.series(after.series_instance_uid)
    assert row is not None and row.status.value == "done" and row.reason is None


def _tiny_series(out: Path, n: int, *, geometry: bool) -> Sent:
    """``n`` CT slices of 8x8 pixels; without ``geometry`` they have no spacing or position."""
    study, series = generate_uid(), generate_uid()
    frame = generate_uid()
    out.mkdir(parents=True)
    files = []
    for i in range(n):
        ds = ct_dataset(study, series, instance_number=i + 1)
        if geometry:
            ds.FrameOfReferenceUID = frame
            ds.PixelSpacing = [0.5, 0.5]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [0.0, 0.0, float(i)]
            ds.PixelData = np.full((8, 8), 40, dtype=np.int16).tobytes()
        path = out / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return Sent(study, series, files)


@pytest.mark.parametrize(
    ("n", "geometry", "reason"),
    [
        (4, False, "no PixelSpacing"),
        (MAX_SLICES + 10, True, f"{MAX_SLICES + 10} slices, more than the {MAX_SLICES} allowed"),
    ],
    ids=["no-spacing", "over-slice-limit"],
)
def test_routed_series_that_cannot_be_analysed_gets_a_not_analysed_sr(
    loop: Loop, tmp_path: Path, n: int, geometry: bool, reason: str
) -> None:
    sent = _tiny_series(tmp_path / "src", n, geometry=geometry)
    _send(loop.node, sent)
    found = wait_for("the not-analysed SR in Orthanc", lambda: _delivered(loop, sent, {"SR"}), 120)
    assert set(found) == {"SR"}
    (sr,) = _valid_objects(loop, found, tmp_path / "got")["SR"]
    notes = report_notes(sr)  # type: ignore[arg-type]
    assert len(notes) == 1 and notes[0].startswith("not analysed:") and reason in notes[0]
    assert sr.CompletionFlag == "PARTIAL"  # type: ignore[attr-defined]
    assert sr.StudyInstanceUID == sent.study_instance_uid  # type: ignore[attr-defined]
    row = loop.node.series(sent.series_instance_uid)
    assert row is not None and row.status.value == "skipped" and reason in (row.reason or "")
    assert row.hemorrhage is None  # no finding stated either way


def test_enhanced_ct_series_gets_seg_sr_and_key_images(loop: Loop, tmp_path: Path) -> None:
    """The seed-103 phantom as one Enhanced CT instance (frames stored out of order,
    geometry and rescale in functional groups): through ``ichnode serve`` it is
    analysed like its single-frame twin, and SEG, SR and key images reach the PACS,
    valid, referencing the instance's frames."""
    from tests.node.test_variants import enhanced_ct_from

    single = _phantom(loop, tmp_path / "single", "enhanced", "same")
    singles: list[Dataset] = [dcmread(p) for p in single.files]
    singles.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    hu = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in singles]
    ).astype(np.float32)
    n = len(singles)
    order = [*range(1, n, 2), *range(0, n, 2)]  # odd slices first: frame order is not z order
    enhanced = enhanced_ct_from(singles, hu, order=order)
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    sent = Sent(single.study_instance_uid, single.series_instance_uid, [path])
    _send(loop.node, sent)
    found = wait_for(
        "SEG, SR and key images of the Enhanced CT series",
        lambda: _delivered(loop, sent, {"SEG", "SR", "SC"}),
        300,
    )
    objects = _valid_objects(loop, found, tmp_path / "got")
    row = loop.node.series(sent.series_instance_uid)
    assert row is not None and row.status.value == "done" and row.hemorrhage is True
    (seg,) = objects["SEG"]
    for item in seg.PerFrameFunctionalGroupsSequence:  # type: ignore[attr-defined]
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
        frame = int(source.ReferencedFrameNumber)
        z = order[frame - 1]
        assert [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient] == (
            pytest.approx([float(v) for v in singles[z].ImagePositionPatient], abs=1e-3)
        )
    (sr,) = objects["SR"]
    assert report_notes(sr) == []  # type: ignore[arg-type]


def test_jpeg_lossless_series_gets_its_objects(loop: Loop, tmp_path: Path) -> None:
    """The bleed phantom compressed as scanners send it (JPEG lossless, process 14
    SV1, by DCMTK's dcmcjpeg) and sent in that transfer syntax: stored as sent,
    analysed with the finding of its uncompressed twin; SEG, SR and key images
    reach the PACS."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from tests.node.test_variants import jpeg_lossless

    sent = _phantom(loop, tmp_path / "src", "jpeg", "same")
    jpeg_lossless(sent.files)
    assert dcmread(sent.files[0]).file_meta.TransferSyntaxUID == JPEG_LOSSLESS_SV1
    # As a scanner holding compressed images sends: one presentation context, CT
    # Image Storage in JPEG lossless SV1 only (DCMTK's storescu also proposes
    # uncompressed, then cannot decompress for it).
    scu = AE(ae_title="SCANNER")
    scu.add_requested_context(CTImageStorage, [JPEG_LOSSLESS_SV1])
    assoc = scu.associate("127.0.0.1", loop.node.port, ae_title=loop.node.ae_title)
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(dcmread(path)).Status) for path in sent.files]
    finally:
        assoc.release()
    assert statuses == [0] * len(sent.files), statuses
    found = wait_for(
        "SEG, SR and key images of the JPEG-lossless series",
        lambda: _delivered(loop, sent, {"SEG", "SR", "SC"}),
        300,
    )
    objects = _valid_objects(loop, found, tmp_path / "got")
    row = loop.node.series(sent.series_instance_uid)
    assert row is not None and row.status.value == "done" and row.hemorrhage is True
    stored = loop.node.index.series_files(sent.series_instance_uid)
    assert len(stored) == len(sent.files)
    for item in stored:
        header = dcmread(item.path, stop_before_pixels=True)
        assert header.file_meta.TransferSyntaxUID == JPEG_LOSSLESS_SV1
    (sr,) = objects["SR"]
    assert report_notes(sr) == []  # type: ignore[arg-type]
