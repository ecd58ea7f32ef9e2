"""``ichnode studies`` as a subprocess against a real index filled over DICOM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from storage.models import (
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Result,
    ResultKind,
    Series,
    SeriesStatus,
)
from tests.interop import REPO
from tests.storage.helpers import ct_series, running_scp


def _studies(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICHNODE_")}
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "studies", "--config", str(config), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_studies_json_and_table(tmp_path: Path) -> None:
    root = tmp_path / "data"
    config = tmp_path / "ichnode.toml"
    config.write_text(f'[storage]\nroot = "{root}"\n')
    first, second = ct_series(3), ct_series(2)
    with running_scp(root) as r:
        ae = AE("MODALITY")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", r.port, ae_title="ICHNODE")
        for ds in first + second:
            assert int(assoc.send_c_store(ds).Status) == 0
        assoc.release()
        # What the processing loop will have written for the first series.
        series_id = r.index.instance(first[0].SOPInstanceUID)["series_id"]  # type: ignore[index]
        with r.index.session() as session:
            series = session.get(Series, series_id)
            assert series is not None
            series.status = SeriesStatus.DONE
            series.hemorrhage = False
            job = Job(series_id=series_id, state=JobState.DONE)
            session.add(job)
            session.flush()
            sr = Result(
                job_id=job.id,
                series_id=series_id,
                kind=ResultKind.SR,
                sop_instance_uid="2.25.1",
                series_instance_uid="2.25.2",
                path="/r",
            )
            session.add(sr)
            session.flush()
            session.add(Delivery(result_id=sr.id, destination="pacs", state=DeliveryState.SENT))

    out = _studies(config, "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)  # exactly one JSON document on stdout
    assert list(doc) == ["studies"]
    by_study = {s["study_instance_uid"]: s for s in doc["studies"]}
    assert set(by_study) == {first[0].StudyInstanceUID, second[0].StudyInstanceUID}
    study = by_study[first[0].StudyInstanceUID]
    assert study["patient_id"] == "BENCH-001" and study["study_date"] == "20260101"
    assert study["study_description"] == "CT HEAD"
    (series_doc,) = study["series"]
    assert series_doc == {
        "series_instance_uid": first[0].SeriesInstanceUID,
        "modality": "CT",
        "series_description": "AXIAL 5MM",
        "instances": 3,
        "status": "done",
        "reason": None,
        "hemorrhage": False,
        "deliveries": {"pacs": "sent"},
    }
    other = by_study[second[0].StudyInstanceUID]["series"][0]
    assert other["instances"] == 2 and other["status"] == "receiving"
    assert other["hemorrhage"] is None and other["deliveries"] == {}
    assert "Bench^Phantom" not in out.stdout  # no patient names in the listing

    table = _studies(config)
    assert table.returncode == 0, table.stderr
    assert first[0].SeriesInstanceUID in table.stdout and "pacs:sent" in table.stdout
    assert "receiving" in table.stdout


def test_studies_without_an_index(tmp_path: Path) -> None:
    config = tmp_path / "ichnode.toml"
    config.write_text(f'[storage]\nroot = "{tmp_path / "nothing"}"\n')
    out = _studies(config, "--json")
    assert out.returncode == 0
    assert json.loads(out.stdout) == {"studies": []}
    assert "no index" in out.stderr
    assert not (tmp_path / "nothing").exists()  # listing creates nothing


def test_studies_with_a_bad_config_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "ichnode.toml"
    config.write_text("[storage]\nmin_free_disk_mb = -5\n")
    out = _studies(config, "--json")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "storage.min_free_disk_mb" in out.stderr
    assert out.stdout == ""
