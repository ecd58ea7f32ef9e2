"""A real Orthanc accepts every result object over C-STORE and files it under the
source study."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    Comprehensive3DSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from pynetdicom import AE

from node import results
from tests.node.conftest import FIXED_NOW, hu_volume, make_ct_series, make_findings
from tests.orthanc import Orthanc, orthanc  # noqa: F401 (pytest fixture)

pytestmark = pytest.mark.interop


def _c_store(server: Orthanc, paths: list[Path]) -> list[int]:
    ae = AE(ae_title="ICHNODE")
    for sop_class_uid in (
        CTImageStorage,
        SegmentationStorage,
        Comprehensive3DSRStorage,
        SecondaryCaptureImageStorage,
    ):
        ae.add_requested_context(sop_class_uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(server.host, server.dicom_port, ae_title=server.aet)
    assert assoc.is_established, server.log_tail()
    statuses = []
    try:
        for path in paths:
            status = assoc.send_c_store(pydicom.dcmread(path))
            # an empty status means timeout or abort, never success
            assert "Status" in status, f"no response for {path.name}"
            statuses.append(int(status.Status))
    finally:
        assoc.release()
    return statuses


def test_orthanc_accepts_results_under_the_source_study(
    tmp_path: Path,
    orthanc: Orthanc,  # noqa: F811
) -> None:
    datasets = make_ct_series(5, 64)
    mask = np.zeros((5, 64, 64), dtype=bool)
    mask[1:4, 20:30, 20:34] = True
    ventricle = np.zeros((5, 64, 64), dtype=bool)
    ventricle[2, 30:36, 30:36] = True
    findings = make_findings(datasets, {"intraparenchymal": mask, "intraventricular": ventricle})
    source_dir = tmp_path / "source"
    source_dir.mkdir()
    source_paths = []
    for ds in datasets:
        path = source_dir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        source_paths.append(path)
    result_paths = results.write_results(
        findings, datasets, tmp_path / "out", hu=hu_volume(datasets), now=FIXED_NOW
    )
    assert len(result_paths) == 4  # SEG, SR, two key images

    statuses = _c_store(orthanc, source_paths + result_paths)
    assert statuses == [0x0000] * (len(source_paths) + len(result_paths)), orthanc.log_tail()

    series = orthanc.study_series(str(datasets[0].StudyInstanceUID))
    by_description = {s["MainDicomTags"].get("SeriesDescription", ""): s for s in series}
    assert set(by_description) >= {"ICH AI SEG", "ICH AI REPORT", "ICH AI KEY IMAGES"}
    assert len(series) == 4  # the CT and our three
    assert len(by_description["ICH AI KEY IMAGES"]["Instances"]) == 2
    assert by_description["ICH AI SEG"]["MainDicomTags"]["Modality"] == "SEG"
    assert by_description["ICH AI REPORT"]["MainDicomTags"]["Modality"] == "SR"

    # storage and index outlive a restart of the server
    orthanc.restart()
    assert orthanc.instance_count() == len(source_paths) + len(result_paths)


def test_negative_report_is_accepted(
    tmp_path: Path,
    orthanc: Orthanc,  # noqa: F811
) -> None:
    datasets = make_ct_series(3, 32)
    paths = results.write_results(make_findings(datasets, {}), datasets, tmp_path)
    assert _c_store(orthanc, paths) == [0x0000]
    (series,) = orthanc.study_series(str(datasets[0].StudyInstanceUID))
    assert series["MainDicomTags"]["SeriesDescription"] == "ICH AI REPORT"
