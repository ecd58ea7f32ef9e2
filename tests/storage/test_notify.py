"""Wake-ups from the index (storage.notify): PostgreSQL NOTIFY from migration 0003's triggers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import update

from storage.index import Index, InstanceMeta
from storage.models import Delivery, DeliveryState, Job, JobState, Result, ResultKind
from storage.notify import DELIVERIES, JOBS, Wakeups
from storage.queue import claim_delivery, claim_job
from tests.pg import PostgresServer, wait_until_accepting


@pytest.fixture
def index(db_url: str) -> Iterator[Index]:
    idx = Index(db_url)
    idx.upgrade()
    yield idx
    idx.dispose()


def _series_id(index: Index) -> int:
    return index.record_instance(
        InstanceMeta(
            sop_instance_uid="1.2.3.1",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            study_instance_uid="1.2",
            series_instance_uid="1.2.3",
        ),
        path="/a/1",
        size=1,
    ).series_id


def _queue_job(index: Index, series_id: int) -> int:
    with index.session() as session:
        job = Job(series_id=series_id, state=JobState.QUEUED, attempts=0)
        session.add(job)
        session.flush()
        return job.id


def _later(seconds: float, action: object) -> threading.Thread:
    def run() -> None:
        time.sleep(seconds)
        action()  # type: ignore[operator]

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_queued_job_wakes_a_listening_worker_at_once(index: Index) -> None:
    series_id = _series_id(index)
    wakeups = Wakeups(index.url, [JOBS])
    try:
        assert wakeups.wait(0.2) is False  # nothing queued: the timeout
        started = time.monotonic()
        writer = _later(0.5, lambda: _queue_job(index, series_id))
        timeout = 2.0 if index.is_sqlite else 20.0
        woken = wakeups.wait(timeout)
        waited = time.monotonic() - started
        writer.join()
        if not index.is_sqlite:
            assert woken and 0.4 < waited < 5.0, waited  # not the 20 s timeout
            assert wakeups.wait(0.3) is False  # one notification per commit
            with index.session() as session:  # claiming (queued -> running) says nothing
                assert claim_job(session, "host:1") is not None
            assert wakeups.wait(0.3) is False
            with index.session() as session:  # queued again (a retry): a wake-up
                session.execute(update(Job).values(state=JobState.QUEUED))
            assert wakeups.wait(5.0) is True
        else:  # SQLite has no NOTIFY: the worker polls as before
            assert woken is False and waited >= timeout - 0.1
    finally:
        wakeups.close()


def test_pending_deliveries_wake_a_sender_and_leases_do_not(index: Index) -> None:
    if index.is_sqlite:
        pytest.skip("SQLite has no NOTIFY (covered by the job test's SQLite case)")
    series_id = _series_id(index)
    wakeups = Wakeups(index.url, [DELIVERIES])
    try:
        assert wakeups.wait(0.1) is False  # listening from here on
        with index.session() as session:
            job = Job(series_id=series_id, state=JobState.DONE, attempts=1)
            session.add(job)
            session.flush()
            result = Result(
                job_id=job.id,
                series_id=series_id,
                kind=ResultKind.SR,
                sop_instance_uid="9.1",
                series_instance_uid="9.1.1",
                path="/r/1.dcm",
            )
            session.add(result)
            session.flush()
            session.add(Delivery(result_id=result.id, destination="pacs"))
        # Committed before the wait: kept for it.
        assert wakeups.wait(5.0) is True
        with index.session() as session:  # a lease changes next_attempt_at only
            assert claim_delivery(session, 60) is not None
        assert wakeups.wait(0.3) is False
        with index.session() as session:  # dead, then retried by the operator
            session.execute(update(Delivery).values(state=DeliveryState.DEAD))
        assert wakeups.wait(0.3) is False
        with index.session() as session:
            session.execute(update(Delivery).values(state=DeliveryState.PENDING))
        assert wakeups.wait(5.0) is True
    finally:
        wakeups.close()


def test_wakeups_listen_again_after_a_server_restart(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    index = Index(postgres_url)
    index.upgrade()
    series_id = _series_id(index)
    wakeups = Wakeups(index.url, [JOBS])
    try:
        assert wakeups.wait(0.1) is False
        postgres_server.stop("fast")
        postgres_server.start()
        wait_until_accepting(postgres_server)
        assert wakeups.wait(0.2) is False  # the broken connection: a timed wait, no error
        assert wakeups.wait(0.1) is False  # listening again
        _queue_job(index, series_id)
        assert wakeups.wait(5.0) is True
    finally:
        wakeups.close()
        index.dispose()


def test_wake_ends_the_next_wait_and_unknown_channels_are_refused(db_url: str) -> None:
    wakeups = Wakeups(db_url, [JOBS, DELIVERIES])
    try:
        wakeups.wake()
        started = time.monotonic()
        assert wakeups.wait(10.0) is True and time.monotonic() - started < 1.0
    finally:
        wakeups.close()
    with pytest.raises(ValueError, match="unknown channel"):
        Wakeups(db_url, ["ichnode_everything"])
