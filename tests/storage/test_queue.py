"""Claims on the job queue and the outbox (storage.queue) on SQLite and a real PostgreSQL.

The race tests start several processes, each with its own engine as a worker
or sender on another machine would have, and make them claim at the same
moment round after round (a barrier before each claim): no job or delivery
may be claimed twice, and while work is waiting no claimer may come back
empty-handed (on PostgreSQL that is what ``FOR UPDATE SKIP LOCKED`` buys).
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from storage.index import Index, InstanceMeta
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
from storage.queue import claim_delivery, claim_job

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
CLAIMERS = 4
ROUNDS = 15  # each claimer claims once per round; the queue holds CLAIMERS * ROUNDS
LEASE = 600.0


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


@pytest.fixture
def index(db_url: str) -> Iterator[Index]:
    idx = Index(db_url)
    idx.upgrade()
    yield idx
    idx.dispose()


def _series(index: Index, n: int) -> list[int]:
    """``n`` indexed series (one instance each); their ids."""
    ids = []
    for i in range(n):
        recorded = index.record_instance(
            InstanceMeta(
                sop_instance_uid=f"1.2.9.{i}.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                study_instance_uid="1.2.9",
                series_instance_uid=f"1.2.9.{i}",
                patient_id="P1",
                modality="CT",
            ),
            path=f"/archive/{i}",
            size=1,
        )
        ids.append(recorded.series_id)
    return ids


def _queue_jobs(index: Index, n: int) -> list[int]:
    with index.session() as session:
        jobs = [Job(series_id=s, state=JobState.QUEUED, attempts=0) for s in _series(index, n)]
        session.add_all(jobs)
        session.flush()
        return [j.id for j in jobs]


def _queue_deliveries(index: Index, n: int) -> list[int]:
    """One job with ``n`` result objects, each pending towards ``pacs``."""
    (series_id,) = _series(index, 1)
    with index.session() as session:
        job = Job(series_id=series_id, state=JobState.DONE, attempts=1)
        session.add(job)
        session.flush()
        kinds = [ResultKind.SC, ResultKind.SEG, ResultKind.SR]
        results = [
            Result(
                job_id=job.id,
                series_id=series_id,
                kind=kinds[i % 3],
                sop_instance_uid=f"9.{i}",
                series_instance_uid="9.0",
                path=f"/results/{i}.dcm",
            )
            for i in range(n)
        ]
        session.add_all(results)
        session.flush()
        deliveries = [Delivery(result_id=r.id, destination="pacs") for r in results]
        session.add_all(deliveries)
        session.flush()
        return [d.id for d in deliveries]


def test_jobs_are_claimed_oldest_first_when_due(index: Index) -> None:
    first, second = _queue_jobs(index, 2)
    with index.session() as session:
        session.get_one(Job, first).not_before = at(10)
    with index.session() as session:
        job = claim_job(session, "host:1", at(0))
    assert job is not None and (job.id, job.attempts) == (second, 1)
    with index.session() as session:
        assert claim_job(session, "host:1", at(5)) is None  # the other is not due yet
    with index.session() as session:
        job = claim_job(session, "host:2", at(10))
    assert job is not None and job.id == first
    with index.session(readonly=True) as session:
        row = session.get_one(Job, first)
        assert (row.state, row.claimed_by, row.claimed_at) == (JobState.RUNNING, "host:2", at(10))
        assert session.get_one(Series, row.series_id).status == SeriesStatus.RUNNING


def test_delivery_lease_keeps_other_senders_off_until_it_runs_out(index: Index) -> None:
    sr, seg, sc = sorted(_queue_deliveries(index, 3), reverse=True)  # kinds SR, SEG, SC
    with index.session() as session:
        claims = [claim_delivery(session, 60, at(0)) for _ in range(4)]
    assert [c.id if c else None for c in claims] == [sr, seg, sc, None]  # SR first
    first = claims[0]
    assert first is not None
    assert first.path.endswith(".dcm") and not first.superseded and first.lease_until == at(60)
    with index.session() as session:
        assert claim_delivery(session, 60, at(59)) is None  # leased
        assert session.get_one(Delivery, sr).state == DeliveryState.PENDING
    with index.session() as session:  # the sender died: the lease runs out, another takes it
        again = claim_delivery(session, 60, at(60))
    assert again is not None and again.id == sr
    with index.session() as session:  # an outcome recorded by the claimant ends the claim
        session.get_one(Delivery, seg).state = DeliveryState.SENT
    with index.session() as session:
        later = claim_delivery(session, 60, at(100))  # SR leased again until 120
        assert later is not None and later.id == sc and later.result_id > 0
        # A sender's pass judges due-ness at its start: a row it retried during
        # the pass (due again at 170) is not taken twice in that pass.
        session.get_one(Delivery, sr).state = DeliveryState.SENT
        session.get_one(Delivery, sc).next_attempt_at = at(170)
        assert claim_delivery(session, 60, at(180), due_at=at(160)) is None
        again = claim_delivery(session, 60, at(180), due_at=at(180))
        assert again is not None and again.id == sc and again.lease_until == at(240)


def _claim_rounds(url: str, kind: str, out: str, start: Any) -> None:
    """One claimer process: claim once per round at the barrier, then drain the rest."""
    index = Index(url)
    me = f"test:{os.getpid()}"

    def claim() -> int | None:
        with index.session() as session:
            if kind == "job":
                job = claim_job(session, me)
                return None if job is None else job.id
            delivery = claim_delivery(session, LEASE)
            return None if delivery is None else delivery.id

    in_rounds: list[int | None] = []
    for _ in range(ROUNDS):
        start.wait(60)
        in_rounds.append(claim())
    start.wait(60)  # nobody drains while another still claims in the last round
    drained = []
    while (extra := claim()) is not None:
        drained.append(extra)
    index.dispose()
    Path(out).write_text(
        " ".join("-" if i is None else str(i) for i in in_rounds)
        + "\n"
        + " ".join(map(str, drained))
    )


def _race(url: str, kind: str, tmp_path: Path) -> tuple[list[list[int | None]], list[int]]:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(CLAIMERS)
    outs = [tmp_path / f"{kind}-{i}.txt" for i in range(CLAIMERS)]
    procs = [ctx.Process(target=_claim_rounds, args=(url, kind, str(o), start)) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * CLAIMERS
    rounds, drained = [], []
    for out in outs:
        first, second = out.read_text().split("\n")
        rounds.append([None if x == "-" else int(x) for x in first.split()])
        drained.extend(int(x) for x in second.split())
    return rounds, drained


def test_concurrent_workers_never_claim_a_job_twice(
    db_url: str, index: Index, tmp_path: Path
) -> None:
    queued = _queue_jobs(index, CLAIMERS * ROUNDS)
    rounds, drained = _race(db_url, "job", tmp_path)
    claimed = [i for r in rounds for i in r if i is not None] + drained
    assert len(claimed) == len(set(claimed)), "a job was claimed twice"
    assert sorted(claimed) == sorted(queued)
    # Work was waiting at every claim, so every claim got some.
    assert drained == [] and all(None not in r for r in rounds), str(rounds)
    with index.session(readonly=True) as session:
        states = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        owners = dict(
            session.execute(select(Job.claimed_by, func.count()).group_by(Job.claimed_by)).all()
        )
    assert states == {JobState.RUNNING: CLAIMERS * ROUNDS}
    assert sorted(owners.values()) == [ROUNDS] * CLAIMERS


def test_concurrent_senders_never_claim_a_delivery_twice(
    db_url: str, index: Index, tmp_path: Path
) -> None:
    pending = _queue_deliveries(index, CLAIMERS * ROUNDS)
    rounds, drained = _race(db_url, "delivery", tmp_path)
    claimed = [i for r in rounds for i in r if i is not None] + drained
    assert len(claimed) == len(set(claimed)), "a delivery was claimed twice"
    assert sorted(claimed) == sorted(pending)
    assert drained == [] and all(None not in r for r in rounds), str(rounds)
    with index.session(readonly=True) as session:
        leases = session.execute(
            select(Delivery.state, Delivery.next_attempt_at).where(Delivery.id.in_(pending))
        ).all()
    now = dt.datetime.now(dt.UTC)
    assert all(state == DeliveryState.PENDING for state, _ in leases)
    assert all(when is not None and when > now for _, when in leases)  # all still leased
