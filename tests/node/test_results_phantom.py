"""Result objects over phantom series, with the phantom's true labels as masks: the
objects validate and the SEG gives back exactly the labels of each source slice."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from inference.findings import SUBTYPES, SeriesFindings, SliceResult, SubtypeFinding
from inference.phantom import generate_case, write_series
from node import results
from tests.node.conftest import FIXED_NOW

pytestmark = pytest.mark.interop


def _findings_from_labels(
    datasets: Sequence[pydicom.Dataset], labels: np.ndarray, voxel_ml: float
) -> SeriesFindings:
    present = [bool(labels[i].any()) for i in range(len(SUBTYPES))]
    return SeriesFindings(
        study_instance_uid=str(datasets[0].StudyInstanceUID),
        series_instance_uid=str(datasets[0].SeriesInstanceUID),
        hemorrhage_present=any(present),
        hemorrhage_probability=0.99 if any(present) else 0.01,
        subtypes={
            name: SubtypeFinding(
                present=present[i],
                probability=0.99 if present[i] else 0.01,
                volume_ml=float(labels[i].sum()) * voxel_ml,
            )
            for i, name in enumerate(SUBTYPES)
        },
        slices=[SliceResult(str(ds.SOPInstanceUID), {"any": 0.5}) for ds in datasets],
        sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets],
        masks=labels,
        gradcam=None,
        model_name="ground-truth",
        model_version="phantom",
    )


@pytest.mark.parametrize(
    ("seed", "subtypes", "transfer_syntax"),
    [
        (910001, ("subdural", "intraventricular"), "explicit"),
        (910002, ("epidural", "subarachnoid", "intraparenchymal"), "jpegls"),
    ],
)
def test_phantom_labels_round_trip_through_seg_and_sr(
    tmp_path: Path,
    dciodvfy: Callable[[Path], list[str]],
    seed: int,
    subtypes: tuple[str, ...],
    transfer_syntax: str,
) -> None:
    case = generate_case(seed, n_slices=10, matrix=128, subtypes=subtypes)
    files = write_series(case, tmp_path / "ct", transfer_syntax=transfer_syntax)
    datasets = [pydicom.dcmread(path) for path in files]  # paths[k] holds slice k
    dz, dy, dx = case.spacing
    findings = _findings_from_labels(datasets, case.labels, dz * dy * dx / 1000.0)
    # no hu=: the key images decode the (possibly compressed) source pixels themselves
    paths = results.write_results(findings, datasets, tmp_path / "out", now=FIXED_NOW)
    found = [name for i, name in enumerate(SUBTYPES) if case.labels[i].any()]
    assert sorted(p.name.split("-")[1] for p in paths) == sorted(
        ["SEG", "SR"] + ["SC"] * len(found)
    )
    for path in paths:
        assert dciodvfy(path) == [], path.name

    seg = hd.seg.segread(next(p for p in paths if "-SEG-" in p.name))
    numbers = {
        s.SegmentLabel.removesuffix(" hemorrhage"): int(s.SegmentNumber)
        for s in seg.SegmentSequence
    }
    assert list(numbers) == found
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=findings.sop_instance_uids,
        segment_numbers=[numbers[name] for name in found],
        assert_missing_frames_are_empty=True,
    )
    for k, name in enumerate(found):
        np.testing.assert_array_equal(
            pixels[..., k].astype(bool), case.labels[SUBTYPES.index(name)]
        )
    report = hd.sr.srread(next(p for p in paths if "-SR-" in p.name)).content
    groups = report.get_volumetric_roi_measurement_groups()  # type: ignore[attr-defined]
    assert len(groups) == len(found)
