"""The job queue (storage.jobs) and the outbox (storage.outbox), state by state.

Every transition on a real SQLite file and a real PostgreSQL (``db_url``),
with the clock passed in so backoffs and ages are exact.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from config.settings import DeliverySettings, JobSettings
from storage.index import Index, InstanceMeta
from storage.jobs import JobQueue, NewResult, SeriesFinding
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
from storage.outbox import Outbox
from storage.runtime import backoff_seconds, process_gone, process_id

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
ME = "worker-host:1"


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


@pytest.fixture
def index(db_url: str) -> Iterator[Index]:
    idx = Index(db_url)
    idx.upgrade()
    yield idx
    idx.dispose()


POLICY = JobSettings(
    max_attempts=3, retry_backoff_seconds=10, retry_backoff_max_seconds=15,
    stale_after_seconds=30,
)


def _series(index: Index, n: int = 0) -> Series:
    recorded = index.record_instance(
        InstanceMeta(
            sop_instance_uid=f"1.2.9.{n}.1",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            study_instance_uid="1.2.9",
            series_instance_uid=f"1.2.9.{n}",
            patient_id="P1",
            modality="CT",
        ),
        path=f"/archive/{n}",
        size=1,
        received_at=at(-5),
    )
    with index.session(readonly=True) as session:
        return session.get_one(Series, recorded.series_id)


def _enqueue(queue: JobQueue, series_id: int, now: dt.datetime, digest: str = "h1") -> int:
    with queue.index.session() as session:
        series = session.get_one(Series, series_id)
        return int(queue.enqueue(session, series, digest, now).id)


def _job(index: Index, job_id: int) -> Job:
    with index.session(readonly=True) as session:
        return session.get_one(Job, job_id)


def _series_row(index: Index, series_id: int) -> Series:
    with index.session(readonly=True) as session:
        return session.get_one(Series, series_id)


def _results(n: int, tag: str = "a") -> list[NewResult]:
    kinds = [ResultKind.SR, ResultKind.SEG]
    return [NewResult(kinds[i % 2], f"9.{tag}.{i}", f"9.{tag}", f"/r/{tag}{i}.dcm") for i in range(n)]


def test_one_clock_and_one_backoff_rule() -> None:
    assert [backoff_seconds(n, 10, 15) for n in (0, 1, 2, 3)] == [0.0, 10.0, 15.0, 15.0]
    assert [backoff_seconds(n, 5, 900) for n in (1, 2, 3, 9)] == [5.0, 10.0, 20.0, 900.0]
    assert backoff_seconds(10_000, 5, 900) == 900.0  # no overflow
    assert not process_gone(process_id())
    assert not process_gone("another-host.example:1")  # only its heartbeat can tell
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    assert process_gone(process_id().rsplit(":", 1)[0] + f":{ended.pid}")
    assert process_gone(None) and process_gone("")


def test_enqueue_supersedes_queued_and_claim_takes_the_due_one(index: Index) -> None:
    queue = JobQueue(index, POLICY)
    series = _series(index)
    first = _enqueue(queue, series.id, at(0), "h1")
    assert _job(index, first).state == JobState.QUEUED
    assert _series_row(index, series.id).status == SeriesStatus.QUEUED
    second = _enqueue(queue, series.id, at(1), "h2")  # new content: the first will not run
    assert _job(index, first).state == JobState.SUPERSEDED
    claimed = queue.claim(ME, at(2))
    assert claimed is not None and (claimed.id, claimed.attempts) == (second, 1)
    assert queue.claim("other:2", at(2)) is None
    row = _job(index, second)
    assert (row.state, row.claimed_by, row.heartbeat_at) == (JobState.RUNNING, ME, at(2))
    assert _series_row(index, series.id).status == SeriesStatus.RUNNING
    assert queue.heartbeat(second, ME, at(3)) and _job(index, second).heartbeat_at == at(3)
    assert not queue.heartbeat(second, "other:2", at(3))  # not its claim


def test_complete_records_results_deliveries_and_supersedes_earlier_sets(index: Index) -> None:
    queue = JobQueue(index, POLICY)
    series = _series(index)
    first = queue.claim(ME, at(1)) if _enqueue(queue, series.id, at(0)) else None
    assert first is not None
    ended = queue.complete(
        first, ME, results=_results(2, "a"), destinations=["pacs", "backup"],
        finding=SeriesFinding(True, 0.9), inference_seconds=1.5, now=at(2),
    )
    assert ended.state == "done"
    row, s = _job(index, first.id), _series_row(index, series.id)
    assert (row.state, row.finished_at, row.inference_seconds) == (JobState.DONE, at(2), 1.5)
    assert (s.status, s.hemorrhage, s.hemorrhage_probability) == (SeriesStatus.DONE, True, 0.9)
    with index.session(readonly=True) as session:
        deliveries = session.scalars(select(Delivery)).all()
    assert len(deliveries) == 4 and {d.state for d in deliveries} == {DeliveryState.PENDING}
    # The series is sent again with new content: the new job's set supersedes the old.
    _enqueue(queue, series.id, at(10), "h2")
    second = queue.claim(ME, at(11))
    assert second is not None
    assert queue.complete(second, ME, results=_results(2, "b"), destinations=["pacs"],
                          finding=SeriesFinding(False, 0.1), now=at(12)).state == "done"
    assert _job(index, first.id).state == JobState.SUPERSEDED
    with index.session(readonly=True) as session:
        superseded = dict(session.execute(select(Result.sop_instance_uid, Result.superseded)).all())
    assert superseded == {"9.a.0": True, "9.a.1": True, "9.b.0": False, "9.b.1": False}


def test_a_job_overtaken_by_a_newer_one_ends_superseded(index: Index) -> None:
    queue = JobQueue(index, POLICY)
    series = _series(index)
    _enqueue(queue, series.id, at(0))
    old = queue.claim(ME, at(1))
    assert old is not None
    newer = _enqueue(queue, series.id, at(2), "h2")  # instances arrived while it ran
    ended = queue.complete(old, ME, results=_results(1), destinations=["pacs"], now=at(3))
    assert ended.state == "superseded" and f"job {newer}" in (ended.detail or "")
    assert _job(index, old.id).state == JobState.SUPERSEDED
    with index.session(readonly=True) as session:
        assert session.scalars(select(Result)).all() == []  # nothing of it is sent


def test_skipped_job_is_done_with_its_not_analysed_report(index: Index) -> None:
    queue = JobQueue(index, POLICY)
    series = _series(index)
    _enqueue(queue, series.id, at(0))
    job = queue.claim(ME, at(1))
    assert job is not None
    ended = queue.complete(job, ME, results=_results(1), destinations=["pacs"],
                           series_status=SeriesStatus.SKIPPED, reason="no CT",
                           error="skipped: no CT", now=at(2))
    assert ended.state == "done"
    assert (_job(index, job.id).state, _job(index, job.id).error) == (JobState.DONE, "skipped: no CT")
    s = _series_row(index, series.id)
    assert (s.status, s.reason) == (SeriesStatus.SKIPPED, "no CT")


def test_failures_back_off_then_fail_with_the_report(index: Index) -> None:
    queue = JobQueue(index, POLICY)
    series = _series(index)
    job_id = _enqueue(queue, series.id, at(0))
    waits = []
    now = 1.0
    for attempt in (1, 2):
        job = queue.claim(ME, at(now))
        assert job is not None and job.attempts == attempt
        ended = queue.fail(job, ME, "model crashed", series_reason="x", now=at(now))
        assert ended.state == "retry"
        waits.append(ended.wait)
        row = _job(index, job_id)
        assert (row.state, row.claimed_by) == (JobState.QUEUED, None)
        assert row.not_before == at(now + ended.wait)
        assert queue.claim(ME, at(now + ended.wait - 0.5)) is None  # not due yet
        assert _series_row(index, series.id).status == SeriesStatus.QUEUED
        now += ended.wait
    assert waits == [10.0, 15.0]  # doubling, capped at retry_backoff_max_seconds
    job = queue.claim(ME, at(now))
    assert job is not None and job.attempts == 3
    ended = queue.fail(job, ME, "model crashed", series_reason="failed after 3 attempts",
                       results=_results(1), destinations=["pacs"], now=at(now))
    assert ended.state == "failed"
    row, s = _job(index, job_id), _series_row(index, series.id)
    assert (row.state, row.finished_at) == (JobState.FAILED, at(now))
    assert (s.status, s.reason) == (SeriesStatus.FAILED, "failed after 3 attempts")
    with index.session(readonly=True) as session:
        assert len(session.scalars(select(Delivery)).all()) == 1  # the not-analysed SR goes out


def test_a_worker_that_lost_its_claim_changes_nothing(index: Index) -> None:
    queue = JobQueue(index, POLICY)
    series = _series(index)
    _enqueue(queue, series.id, at(0))
    job = queue.claim(ME, at(1))
    assert job is not None
    # Its heartbeat went stale: taken up again and claimed by another worker.
    assert queue.requeue_orphans(at(100)) == [job.id]
    again = queue.claim("other-host:2", at(101))
    assert again is not None and again.id == job.id and again.attempts == 2
    assert queue.complete(job, ME, results=_results(1), destinations=["pacs"],
                          now=at(102)).state == "abandoned"
    assert queue.fail(job, ME, "late", series_reason="x", now=at(102)).state == "abandoned"
    row = _job(index, job.id)
    assert (row.state, row.claimed_by) == (JobState.RUNNING, "other-host:2")


def test_orphans_are_taken_up_by_heartbeat_or_dead_pid_and_fail_after_the_last(
    index: Index,
) -> None:
    queue = JobQueue(index, POLICY.model_copy(update={"report_not_analysed": False}))
    series = _series(index)
    job_id = _enqueue(queue, series.id, at(0))
    job = queue.claim("remote-host.example:7", at(1))
    assert job is not None
    assert queue.requeue_orphans(at(20)) == []  # heartbeat fresh, another host: alive
    assert queue.requeue_orphans(at(40)) == [job_id]  # stale heartbeat
    assert _job(index, job_id).state == JobState.QUEUED
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    gone = process_id().rsplit(":", 1)[0] + f":{ended.pid}"
    for attempt in (2, 3):
        job = queue.claim(gone, at(50 * attempt))
        assert job is not None and job.attempts == attempt
        assert queue.requeue_orphans(at(50 * attempt + 1)) == [job_id]  # its process ended
    row = _job(index, job_id)
    assert row.state == JobState.FAILED and "stopped during attempt 3" in (row.error or "")
    assert _series_row(index, series.id).status == SeriesStatus.FAILED


# -- the outbox -------------------------------------------------------------------------

DELIVERY = DeliverySettings(backoff_initial_seconds=5, backoff_max_seconds=20, max_age_hours=1)


def _one_delivery(index: Index, now: dt.datetime) -> int:
    queue = JobQueue(index, POLICY)
    series = _series(index)
    _enqueue(queue, series.id, now)
    job = queue.claim(ME, now)
    assert job is not None
    queue.complete(job, ME, results=_results(1), destinations=["pacs"], now=now)
    with index.session(readonly=True) as session:
        return int(session.execute(select(Delivery.id)).scalar_one())


def _delivery(index: Index, delivery_id: int) -> Delivery:
    with index.session(readonly=True) as session:
        return session.get_one(Delivery, delivery_id)


def test_delivery_is_sent_on_acknowledgement(index: Index) -> None:
    outbox = Outbox(index, DELIVERY)
    delivery_id = _one_delivery(index, at(0))
    claimed = outbox.claim(60, at(1))
    assert claimed is not None and claimed.id == delivery_id
    assert outbox.acknowledged(delivery_id, at(2)).state == "sent"
    row = _delivery(index, delivery_id)
    assert (row.state, row.attempts, row.acked_at, row.next_attempt_at) == (
        DeliveryState.SENT, 1, at(2), None)
    assert outbox.acknowledged(delivery_id, at(3)).state == "gone"  # recorded once
    assert outbox.failed(delivery_id, "late", at(3)).state == "gone"
    with pytest.raises(LookupError, match="already acknowledged"):
        outbox.retry(delivery_id, at(4))


def test_delivery_backs_off_then_dies_of_age_and_comes_back_by_hand(index: Index) -> None:
    outbox = Outbox(index, DELIVERY)
    delivery_id = _one_delivery(index, at(0))
    waits = [outbox.failed(delivery_id, "refused", at(t)).wait for t in (10, 20, 40, 80)]
    assert waits == [5.0, 10.0, 20.0, 20.0]
    row = _delivery(index, delivery_id)
    assert (row.state, row.attempts, row.next_attempt_at) == (DeliveryState.PENDING, 4, at(100))
    assert outbox.claim(60, at(99)) is None and outbox.claim(60, at(100)) is not None
    assert outbox.failed(delivery_id, "refused", at(3600)).state == "dead"  # an hour old
    row = _delivery(index, delivery_id)
    assert (row.state, row.last_error, row.next_attempt_at) == (DeliveryState.DEAD, "refused", None)
    assert outbox.claim(60, at(4000)) is None
    assert outbox.retry(None, at(5000)) == [delivery_id]  # ichnode outbox retry
    row = _delivery(index, delivery_id)
    assert (row.state, row.attempts, row.retried_at) == (DeliveryState.PENDING, 0, at(5000))
    # Its age counts from the retry: a failure soon after backs off again.
    assert outbox.failed(delivery_id, "refused", at(5010)).state == "retry"
    with pytest.raises(LookupError, match="no delivery"):
        outbox.retry(delivery_id + 100)


def test_superseded_delivery_is_dead_at_once_and_add_once_is_once(index: Index) -> None:
    outbox = Outbox(index, DELIVERY)
    delivery_id = _one_delivery(index, at(0))
    assert outbox.dead(delivery_id, "result superseded").state == "dead"
    assert outbox.dead(delivery_id, "again").state == "gone"
    result_id = _delivery(index, delivery_id).result_id
    added = outbox.add_once(result_id, "webhook", at(1))
    assert added is not None and outbox.add_once(result_id, "webhook", at(2)) is None
    assert _delivery(index, added).state == DeliveryState.PENDING
