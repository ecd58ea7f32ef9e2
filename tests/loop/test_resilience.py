"""The loop survives a PACS outage and a SIGKILL of the node: everything arrives, once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hardening.loadutil import storescu
from tests.loop.conftest import (
    Study,
    make_study,
    register_node,
    result_series,
    send_to_node,
    upload,
)
from tests.loop.harness import Destination, NodeRunner, pid_alive, wait_for
from tests.orthanc import Orthanc

pytestmark = pytest.mark.interop


def _storescu(node: NodeRunner, files: list[Path]) -> None:
    run = storescu(node.port, files, called=node.ae_title)
    assert run.returncode == 0, run.stderr


def _exactly_one_set(orthanc: Orthanc, node: NodeRunner, study: Study) -> None:
    results = node.results(study.series_instance_uid)
    assert results, "no results indexed"
    found = result_series(orthanc, study.study_instance_uid)
    assert len(found["SR"]) == 1
    in_orthanc = sorted(
        str(orthanc.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"])
        for ids in found.values()
        for i in ids
    )
    assert in_orthanc == sorted(r.sop_instance_uid for r in results)
    deliveries = node.deliveries()
    assert len(deliveries) == len(results)  # one destination: one row per object
    assert {d.state.value for d in deliveries} == {"sent"}


def test_pacs_outage_then_everything_arrives_once(tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", 201, ("subdural",), n_slices=16)
    orthanc = Orthanc(tmp_path / "orthanc")
    node = NodeRunner(
        tmp_path / "node",
        [Destination("pacs", orthanc.aet, orthanc.dicom_port)],
        quiet_seconds=2.0,
        backoff_initial=0.5,
        backoff_max=2.0,
    )
    node.start()
    try:
        # the PACS is down while the study is analysed
        _storescu(node, study.files)

        def failed_twice() -> bool:
            rows = node.deliveries()
            return bool(rows) and all(d.attempts >= 2 and d.state.value == "pending" for d in rows)

        wait_for("deliveries failing while the PACS is down", failed_twice, 240)
        assert all(d.last_error for d in node.deliveries())
        orthanc.start()
        try:

            def all_sent() -> bool:
                return {d.state.value for d in node.deliveries()} == {"sent"}

            wait_for("the outbox to drain once the PACS is back", all_sent, 60)
            _exactly_one_set(orthanc, node, study)
            # nothing more goes out later
            count = orthanc.instance_count()
            workers = node.worker_pids()
            assert workers
            assert node.stop() == 0  # SIGTERM: a clean stop
            assert not any(pid_alive(pid) for pid in workers)
            assert orthanc.instance_count() == count
        finally:
            orthanc.stop()
    finally:
        node.stop()


def test_sigkill_during_a_job_then_exactly_one_set(tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", 301, ("epidural",), n_slices=40)
    with_orthanc = Orthanc(tmp_path / "orthanc")
    with_orthanc.start()
    node = NodeRunner(
        tmp_path / "node",
        [Destination("pacs", with_orthanc.aet, with_orthanc.dicom_port)],
        quiet_seconds=2.0,
        backoff_initial=0.5,
        backoff_max=2.0,
    )
    try:
        node.start()
        register_node(with_orthanc, node.ae_title, node.port)
        upload(with_orthanc, study.files)
        send_to_node(with_orthanc, [str(with_orthanc.find_study(study.study_instance_uid))])

        def running() -> bool:
            jobs = node.jobs(study.series_instance_uid)
            return bool(jobs) and jobs[0].state.value == "running"

        wait_for("the job to run", running, 120, interval=0.05)
        workers = node.worker_pids()
        node.kill()
        # the workers die with the node (no orphan finishing the job behind our back)
        wait_for("workers to die with the node", lambda: not any(map(pid_alive, workers)), 10)
        (job,) = node.jobs(study.series_instance_uid)
        assert job.state.value == "running", "the job finished before the kill; nothing proven"
        assert node.results(study.series_instance_uid) == []
        assert result_series(with_orthanc, study.study_instance_uid) == {}

        node.start()

        def done() -> bool:
            rows = node.deliveries()
            return bool(rows) and {d.state.value for d in rows} == {"sent"}

        wait_for("the job to be taken up and delivered after the restart", done, 240)
        (job,) = node.jobs(study.series_instance_uid)
        assert job.state.value == "done" and job.attempts == 2
        _exactly_one_set(with_orthanc, node, study)
        assert "queued again" in node.log_path.read_text()
    finally:
        node.stop()
        with_orthanc.stop()
