"""The job runner of a worker process, on a real index, real phantom files and a real network.

The network has random weights made here (the test is about the loop, not the
model's accuracy), built through the same checkpoint format as the bundled one.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from config.settings import Settings
from inference.findings import CLASSES
from inference.predictor import Predictor, make_checkpoint
from node.results import write_result_files
from node.scheduler import claim_job, requeue_orphans
from node.worker import JobRunner, destinations_for, release_free_heap
from storage.index import Index
from storage.models import Delivery, Job, JobState, Result, Series, SeriesStatus
from tests.interop import REPO
from tests.loop.conftest import make_study
from tests.loop.helpers import ct_dataset, new_index, store


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    import torch

    from inference.model import HemorrhageNet, ModelConfig

    torch.manual_seed(0)
    model = HemorrhageNet(ModelConfig())
    ckpt = make_checkpoint(
        model, thresholds=dict.fromkeys(CLASSES, 0.0), version="loop-test", training={}
    )
    return Predictor.from_checkpoint(ckpt, "cpu")


def _settings(tmp_path: Path, **delivery: object) -> Settings:
    return Settings(
        storage={"root": tmp_path / "data"},  # type: ignore[arg-type]
        destinations=[  # type: ignore[list-item]
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
            {"name": "backup", "ae_title": "SCANNER", "host": "127.0.0.1", "port": 105},
        ],
        jobs={"max_attempts": 3, "retry_backoff_seconds": 10},  # type: ignore[arg-type]
        delivery=delivery,  # type: ignore[arg-type]
    )


def _queue(index: Index, files: list[Path]) -> int:
    from pydicom import dcmread

    now = dt.datetime.now(dt.UTC)
    for path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (OSError, ValueError):
            continue
        from storage.index import InstanceMeta

        meta = InstanceMeta.from_dataset(
            ds, transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID)
        )
        index.record_instance(
            meta, path=path, size=path.stat().st_size, calling_ae="SCANNER", received_at=now
        )
    with index.session() as session:
        series_id = session.execute(select(Series.id)).scalars().first()
        assert series_id is not None
        job = Job(series_id=series_id, state=JobState.QUEUED, attempts=0)
        session.add(job)
        session.flush()
        return int(job.id)


def test_destinations_and_return_to_sender(tmp_path: Path) -> None:
    assert destinations_for(_settings(tmp_path), {"SCANNER"}) == ["pacs", "backup"]
    back = _settings(tmp_path, return_to_sender=True)
    assert destinations_for(back, {"SCANNER"}) == ["backup"]
    assert destinations_for(back, {"UNKNOWN"}) == ["pacs", "backup"]


def test_job_results_deliveries_and_idempotent_rerun(tmp_path: Path, predictor: Predictor) -> None:
    study = make_study(tmp_path / "src", 11, ("subdural",), n_slices=8)
    index = new_index(tmp_path)
    settings = _settings(tmp_path)
    job_id = _queue(index, study.files)
    runner = JobRunner(settings, index, predictor)
    job = runner.claim()
    assert job is not None and job.id == job_id and job.attempts == 1
    # a crash of an earlier attempt left partial files under the job's folder
    stale = write_result_files(
        runner.results_root / str(job_id),
        [ct_dataset(generate_uid(), generate_uid())],
        replace=True,
    )
    outcome = runner.process(job)
    assert outcome.state == "done"
    assert not stale[0].exists()
    files = sorted((runner.results_root / str(job_id)).iterdir())
    assert [str(p) for p in files] == sorted(outcome.results)
    with index.session(readonly=True) as session:
        results = list(session.scalars(select(Result)))
        deliveries = list(session.scalars(select(Delivery)))
        series = session.execute(select(Series)).scalar_one()
        row = session.get(Job, job_id)
    assert {r.kind.value for r in results} >= {"SR"}
    assert sorted(r.path for r in results) == sorted(outcome.results)
    assert len(deliveries) == 2 * len(results)
    assert {d.destination for d in deliveries} == {"pacs", "backup"}
    assert series.status == SeriesStatus.DONE and series.hemorrhage is True
    assert series.hemorrhage_probability is not None
    assert row is not None and row.state == JobState.DONE
    assert row.inference_seconds and row.encoding_seconds and row.finished_at

    # the same job taken up again (its worker was declared dead after committing is
    # impossible, so only an uncommitted attempt can rerun): no second set of rows
    with index.session() as session:
        session.execute(update(Job).values(state=JobState.QUEUED))
    again = runner.run_one()
    assert again is not None and again.state == "done"
    with index.session(readonly=True) as session:
        current = list(session.scalars(select(Result).where(Result.superseded.is_(False))))
        assert len(current) == len(results)


def test_failures_retry_with_backoff_then_failed(tmp_path: Path, predictor: Predictor) -> None:
    index = new_index(tmp_path)
    study = make_study(tmp_path / "src", 12, (), n_slices=4)
    job_id = _queue(index, study.files)
    study.files[1].unlink()  # lost from the archive after indexing: an I/O error
    runner = JobRunner(_settings(tmp_path), index, predictor)
    waits = []
    for attempt in (1, 2, 3):
        before = dt.datetime.now(dt.UTC)
        job = runner.claim()
        assert job is not None and job.attempts == attempt
        outcome = runner.process(job)
        after = dt.datetime.now(dt.UTC)
        with index.session(readonly=True) as session:
            row = session.get(Job, job_id)
            series = session.execute(select(Series)).scalar_one()
        assert row is not None
        if attempt < 3:
            assert outcome.state == "retry"
            assert row.state == JobState.QUEUED and row.not_before is not None
            # the wait counts from the failure, somewhere between before and after
            waits.append(((row.not_before - after).total_seconds(),
                          (row.not_before - before).total_seconds()))
            assert series.status == SeriesStatus.QUEUED and "retry" in (series.reason or "")
            assert runner.claim() is None  # not due yet
            with index.session() as session:  # let time pass
                session.execute(update(Job).values(not_before=before))
    assert len(waits) == 2
    for (shortest, longest), expected in zip(waits, (10.0, 20.0), strict=True):
        assert shortest - 0.01 <= expected <= longest + 0.01, waits
    assert outcome.state == "failed"
    assert row.state == JobState.FAILED and row.error
    listed = index.studies_document()["studies"][0]["series"][0]
    assert listed["status"] == "failed"
    assert "after 3 attempts" in listed["reason"]
    # silence never means "no bleed": the PACS gets an SR saying "not analysed" and why
    _assert_not_analysed_report(index, outcome.results, "analysis failed after 3 attempts")


def _assert_not_analysed_report(index: Index, files: list[str], reason: str) -> None:
    from pydicom import dcmread

    from node.results import report_notes

    with index.session(readonly=True) as session:
        (result,) = list(session.scalars(select(Result)))
        deliveries = list(session.scalars(select(Delivery)))
    assert result.kind.value == "SR" and [result.path] == files
    assert sorted(d.destination for d in deliveries) == ["backup", "pacs"]
    (note,) = report_notes(dcmread(result.path))
    assert note.startswith("not analysed: ") and reason in note


def test_unanalysable_series_is_skipped_with_reason(tmp_path: Path, predictor: Predictor) -> None:
    index = new_index(tmp_path)
    study, series = generate_uid(), generate_uid()
    for i in range(3):  # 8x8 images without geometry: the loader refuses them
        store(
            index,
            tmp_path / "src",
            ct_dataset(study, series, instance_number=i + 1),
            association_id=None,
            received_at=dt.datetime.now(dt.UTC),
        )
    with index.session() as session:
        series_id = session.execute(select(Series.id)).scalar_one()
        session.add(Job(series_id=series_id, state=JobState.QUEUED, attempts=0))
    runner = JobRunner(_settings(tmp_path), index, predictor)
    job = runner.claim()
    assert job is not None
    outcome = runner.process(job)
    assert outcome.state == "skipped" and outcome.reason
    listed = index.studies_document()["studies"][0]["series"][0]
    assert listed["status"] == "skipped" and listed["reason"] == outcome.reason
    _assert_not_analysed_report(index, outcome.results, outcome.reason)


def test_job_whose_workers_all_died_gets_only_its_not_analysed_report(
    tmp_path: Path, predictor: Predictor
) -> None:
    """Killed during each of its attempts (e.g. for memory): never analysed again."""
    import socket
    import subprocess
    import sys

    index = new_index(tmp_path)
    study = make_study(tmp_path / "src", 15, (), n_slices=4)
    job_id = _queue(index, study.files)
    settings = _settings(tmp_path)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True
    )
    gone = f"{socket.gethostname()}:{int(dead.stdout)}"
    with index.session() as session:
        session.execute(update(Job).values(attempts=2))
        claimed = claim_job(session, gone)  # the third and last attempt, its worker dies
        assert claimed is not None and claimed.attempts == 3
    with index.session() as session:
        requeue_orphans(session, settings.jobs)
    runner = JobRunner(settings, index, predictor)
    job = runner.claim()
    assert job is not None and job.id == job_id and job.attempts == 4
    outcome = runner.process(job)
    assert outcome.state == "failed"
    with index.session(readonly=True) as session:
        row = session.get(Job, job_id)
        series = session.execute(select(Series)).scalar_one()
    assert row is not None and row.state == JobState.FAILED and row.inference_seconds is None
    assert series.status == SeriesStatus.FAILED and series.hemorrhage is None
    assert (
        series.reason == f"analysis failed after 3 attempts: worker {gone} stopped during attempt 3"
    )
    _assert_not_analysed_report(index, outcome.results, series.reason)


def test_not_analysed_report_can_be_turned_off(tmp_path: Path, predictor: Predictor) -> None:
    index = new_index(tmp_path)
    study, series = generate_uid(), generate_uid()
    store(
        index,
        tmp_path / "src",
        ct_dataset(study, series),
        association_id=None,
        received_at=dt.datetime.now(dt.UTC),
    )
    with index.session() as session:
        series_id = session.execute(select(Series.id)).scalar_one()
        session.add(Job(series_id=series_id, state=JobState.QUEUED, attempts=0))
    settings = _settings(tmp_path)
    settings.jobs.report_not_analysed = False
    runner = JobRunner(settings, index, predictor)
    job = runner.claim()
    assert job is not None
    outcome = runner.process(job)
    assert outcome.state == "skipped" and outcome.results == []
    with index.session(readonly=True) as session:
        assert list(session.scalars(select(Result))) == []


def test_series_over_the_slice_limit_is_skipped_before_its_pixels_are_read(
    tmp_path: Path, predictor: Predictor
) -> None:
    study = make_study(tmp_path / "src", 14, (), n_slices=6)
    index = new_index(tmp_path)
    _queue(index, study.files)
    settings = _settings(tmp_path)
    settings.jobs.max_series_slices = 5
    for path in study.files[1:]:  # only the first file's header is read before refusing
        path.write_bytes(b"not DICOM any more")
    runner = JobRunner(settings, index, predictor)
    job = runner.claim()
    assert job is not None
    outcome = runner.process(job)
    assert outcome.state == "skipped"
    assert outcome.reason == "6 slices, more than the 5 allowed per series"
    _assert_not_analysed_report(index, outcome.results, outcome.reason)


def test_job_taken_over_is_abandoned(tmp_path: Path, predictor: Predictor) -> None:
    index = new_index(tmp_path)
    study = make_study(tmp_path / "src", 13, (), n_slices=4)
    _queue(index, study.files)
    runner = JobRunner(_settings(tmp_path), index, predictor)
    job = runner.claim()
    assert job is not None
    # the scheduler declared the worker dead (stale heartbeat) and another took the job
    with index.session() as session:
        session.execute(update(Job).values(heartbeat_at=dt.datetime(2000, 1, 1, tzinfo=dt.UTC)))
        requeue_orphans(session, _settings(tmp_path).jobs)
        other = claim_job(session, "elsewhere:1")
    assert other is not None
    outcome = runner.process(job)
    assert outcome.state == "abandoned"
    with index.session(readonly=True) as session:
        assert list(session.scalars(select(Result))) == []
        row = session.get(Job, job.id)
        assert row is not None and row.claimed_by == "elsewhere:1"


def test_release_free_heap_returns_freed_memory_to_the_system() -> None:
    """What a job frees must leave the worker's resident size, not stay in malloc's
    arenas (the worker calls this after every job)."""

    def rss_mb() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20

    chunks = [bytes(2048) for _ in range(100_000)]  # 200 MB of malloc'd blocks
    last = chunks[-1]  # holds the top of the heap, so free() alone cannot shrink it
    del chunks
    before = rss_mb()
    assert release_free_heap()  # glibc: malloc_trim exists
    assert before - rss_mb() > 100, (before, rss_mb())
    assert len(last) == 2048


def test_worker_processes_share_the_cpus_between_their_threads() -> None:
    # Run in a fresh interpreter: set_num_threads is process-wide.
    code = (
        "import os, torch; from node.worker import _share_cpus; "
        "cpus = len(os.sched_getaffinity(0)); "
        "print(cpus, _share_cpus(2, 'cpu'), torch.get_num_threads(), "
        "_share_cpus(64, 'cpu'), torch.get_num_threads(), _share_cpus(1, 'cuda'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    cpus = int(out[0])
    assert out[1:3] == [str(max(1, cpus // 2))] * 2
    assert out[3:5] == ["1", "1"]  # never fewer than one thread
    assert out[5] == "None"  # a CUDA worker keeps PyTorch's default


def test_a_worker_stopped_on_purpose_is_not_started_again(tmp_path: Path) -> None:
    """SIGTERM to the whole group (systemd's stop) reaches a worker before the main
    process stops the pool: the worker's clean exit must not be taken for a death."""
    import os
    import signal

    from node.worker import WorkerPool

    settings = Settings(
        storage={"root": tmp_path / "data"},  # type: ignore[arg-type]
        inference={"device": "cpu", "workers": 1},  # type: ignore[arg-type]
    )
    index = Index(settings.storage.effective_database_url)
    index.upgrade()
    index.dispose()
    pool = WorkerPool(settings, 1)
    pool.start()
    try:
        assert pool.wait_ready(180)
        (pid,) = pool.pids
        os.kill(pid, signal.SIGTERM)
        pool._processes[0].join(60)
        assert pool._processes[0].exitcode == 0
        assert pool.check() == 0 and pool.pids == [pid]
    finally:
        pool.stop()
