"""Series completion rules, content hash, routing and job recovery against a real SQLite index."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from config.settings import JobSettings, RoutingSettings
from node.scheduler import Scheduler, claim_job, requeue_orphans, series_ready
from storage.index import Index
from storage.models import AssociationOutcome, Job, JobState, Series, SeriesStatus
from tests.loop.helpers import ct_dataset, new_index, store

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_ready_rules() -> None:
    last = at(0)
    # released normally: 1 s of silence is enough
    assert not series_ready(at(0.9), last, released=True, quiet_seconds=5)
    assert series_ready(at(1.0), last, released=True, quiet_seconds=5)
    # not released (aborted, or still open): the full quiet time
    assert not series_ready(at(4.9), last, released=False, quiet_seconds=5)
    assert series_ready(at(5.0), last, released=False, quiet_seconds=5)
    # a quiet time shorter than the release grace wins ("whichever comes first")
    assert series_ready(at(0.5), last, released=True, quiet_seconds=0.5)


def _scheduler(index: Index, **routing: object) -> Scheduler:
    return Scheduler(index, 5.0, RoutingSettings(**routing), JobSettings())


def _series(index: Index, series_instance_uid: str) -> Series:
    with index.session(readonly=True) as session:
        row = session.execute(
            select(Series).where(Series.series_instance_uid == series_instance_uid)
        ).scalar_one()
        session.expunge(row)
        return row


def _jobs(index: Index) -> list[tuple[int, str]]:
    with index.session(readonly=True) as session:
        return [(j.id, j.state.value) for j in session.scalars(select(Job).order_by(Job.id))]


def _send(
    index: Index,
    tmp_path: Path,
    study: str,
    series: str,
    n: int,
    start: float,
    outcome: AssociationOutcome | None,
    first_number: int = 1,
    **kwargs: object,
) -> list[str]:
    assoc = index.open_association("SCANNER", "ICHNODE", started_at=at(start))
    uids = []
    for i in range(n):
        ds = ct_dataset(study, series, instance_number=first_number + i, **kwargs)  # type: ignore[arg-type]
        store(index, tmp_path / series, ds, association_id=assoc, received_at=at(start + 0.1 * i))
        uids.append(str(ds.SOPInstanceUID))
    if outcome is not None:
        index.close_association(assoc, outcome, instances=n, ended_at=at(start + 0.1 * n))
    return uids


def test_release_makes_ready_after_one_second(tmp_path: Path) -> None:
    index = new_index(tmp_path)
    study, series = generate_uid(), generate_uid()
    _send(index, tmp_path, study, series, 3, 0.0, AssociationOutcome.RELEASED)
    sched = _scheduler(index)
    last = 0.2
    assert sched.tick(at(last + 0.5)) == []
    assert _series(index, series).status == SeriesStatus.RECEIVING
    assert len(sched.tick(at(last + 1.01))) == 1
    row = _series(index, series)
    assert row.status == SeriesStatus.QUEUED
    assert row.ready_at == at(last + 1.01)
    assert row.content_hash
    assert _jobs(index) == [(1, "queued")]
    # nothing new: nothing more happens
    assert sched.tick(at(30)) == []
    assert len(_jobs(index)) == 1


@pytest.mark.parametrize("outcome", [AssociationOutcome.ABORTED, None])
def test_abort_or_open_waits_full_quiet_time(
    tmp_path: Path, outcome: AssociationOutcome | None
) -> None:
    index = new_index(tmp_path)
    study, series = generate_uid(), generate_uid()
    _send(index, tmp_path, study, series, 3, 0.0, outcome)
    sched = _scheduler(index)
    assert sched.tick(at(0.2 + 1.5)) == []
    assert sched.tick(at(0.2 + 4.9)) == []
    assert len(sched.tick(at(0.2 + 5.0))) == 1
    assert _jobs(index) == [(1, "queued")]


def test_identical_resend_no_job_new_slice_new_job(tmp_path: Path) -> None:
    index = new_index(tmp_path)
    study, series = generate_uid(), generate_uid()
    sched = _scheduler(index)
    uids = _send(index, tmp_path, study, series, 3, 0.0, AssociationOutcome.RELEASED)
    assert len(sched.tick(at(2))) == 1
    first_hash = _series(index, series).content_hash
    # the same series again, same files: made ready again but no second job
    assoc = index.open_association("SCANNER", "ICHNODE", started_at=at(10))
    for i, uid in enumerate(uids):
        ds = ct_dataset(study, series, uid, instance_number=i + 1)
        store(index, tmp_path / series, ds, association_id=assoc, received_at=at(10 + 0.1 * i))
    index.close_association(assoc, AssociationOutcome.RELEASED, instances=3, ended_at=at(10.3))
    assert len(sched.tick(at(12))) == 1
    assert _series(index, series).content_hash == first_hash
    assert _jobs(index) == [(1, "queued")]
    # one more slice: a new job supersedes the one still queued
    _send(index, tmp_path, study, series, 1, 20.0, AssociationOutcome.RELEASED, first_number=4)
    assert len(sched.tick(at(22))) == 1
    assert _series(index, series).content_hash != first_hash
    assert _jobs(index) == [(1, "superseded"), (2, "queued")]


def test_changed_file_is_new_content(tmp_path: Path) -> None:
    index = new_index(tmp_path)
    study, series = generate_uid(), generate_uid()
    sched = _scheduler(index)
    uids = _send(index, tmp_path, study, series, 2, 0.0, AssociationOutcome.RELEASED)
    sched.tick(at(2))
    # same SOP Instance UID, different pixels: that is new content
    ds = ct_dataset(study, series, uids[0], instance_number=99)
    assoc = index.open_association("SCANNER", "ICHNODE", started_at=at(5))
    store(index, tmp_path / series, ds, association_id=assoc, received_at=at(5))
    index.close_association(assoc, AssociationOutcome.RELEASED, instances=1, ended_at=at(5.1))
    sched.tick(at(7))
    assert [s for _, s in _jobs(index)] == ["superseded", "queued"]


@pytest.mark.parametrize(
    ("kwargs", "routing", "reason"),
    [
        ({"modality": "MR"}, {}, "modality MR"),
        ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, {}, "LOCALIZER"),
        ({"series_description": "BONE 1MM"}, {"series_description_exclude": ["bone"]}, "exclude"),
        ({}, {"min_slices": 10}, "min_slices"),
        ({}, {"study_description_include": ["^MR "]}, "no include pattern"),
        ({"manufacturer": "ichnode"}, {}, "ichnode result"),
    ],
)
def test_routing_skips_with_reason(
    tmp_path: Path, kwargs: dict[str, object], routing: dict[str, object], reason: str
) -> None:
    index = new_index(tmp_path)
    study, series = generate_uid(), generate_uid()
    _send(index, tmp_path, study, series, 2, 0.0, AssociationOutcome.RELEASED, **kwargs)
    _scheduler(index, **routing).tick(at(2))
    row = _series(index, series)
    assert row.status == SeriesStatus.SKIPPED
    assert row.reason is not None and reason in row.reason
    assert _jobs(index) == []
    listed = index.studies_document()["studies"][0]["series"][0]
    assert listed["status"] == "skipped" and reason in listed["reason"]


def _queue_jobs(index: Index, tmp_path: Path, count: int) -> None:
    study = generate_uid()
    assoc = index.open_association("SCANNER", "ICHNODE", started_at=at(0))
    for _ in range(count):
        ds = ct_dataset(study, generate_uid())
        store(index, tmp_path / "many", ds, association_id=assoc, received_at=at(0))
    with index.session() as session:
        for series_id in session.scalars(select(Series.id)):
            session.add(Job(series_id=series_id, state=JobState.QUEUED, attempts=0))


#: Jobs queued for the two claimers; each claims in as many rounds as there are
#: jobs for it.
CLAIM_JOBS = 60


def _claim_all(url: str, out: str, rounds: int, start: Any) -> None:
    index = Index(url)
    claimed = []
    # Round after round, both processes call claim_job at the same moment (the
    # barrier): every claim races one of the other process's, never a queue the
    # other has already drained.
    for _ in range(rounds):
        start.wait(60)
        with index.session() as session:
            job = claim_job(session, f"test:{os.getpid()}")
        if job is not None:
            claimed.append(job.id)
    while True:  # whatever a lost race left behind
        with index.session() as session:
            job = claim_job(session, f"test:{os.getpid()}")
        if job is None:
            break
        claimed.append(job.id)
    Path(out).write_text(" ".join(map(str, claimed)))


def test_two_workers_never_claim_the_same_job(tmp_path: Path) -> None:
    index = new_index(tmp_path)
    _queue_jobs(index, tmp_path, CLAIM_JOBS)
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"claimed-{i}.txt" for i in range(2)]
    start = ctx.Barrier(2)
    rounds = CLAIM_JOBS // 2
    procs = [ctx.Process(target=_claim_all, args=(index.url, str(o), rounds, start)) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    claimed = [[int(x) for x in o.read_text().split()] for o in outs]
    both = claimed[0] + claimed[1]
    assert sorted(both) == list(range(1, CLAIM_JOBS + 1))  # every job claimed exactly once
    assert len(set(both)) == len(both)
    with index.session(readonly=True) as session:
        states = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        owners = set(session.scalars(select(Job.claimed_by)))
    assert states == {JobState.RUNNING: CLAIM_JOBS}
    assert len(owners) == 2 and min(map(len, claimed)) > 0  # both took part in the race


def test_orphaned_jobs_are_taken_up_again(tmp_path: Path) -> None:
    index = new_index(tmp_path)
    _queue_jobs(index, tmp_path, 3)
    jobs = JobSettings(max_attempts=2, stale_after_seconds=30)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True
    )
    dead_pid = int(dead.stdout)
    host = socket.gethostname()
    with index.session() as session:
        a = claim_job(session, f"{host}:{dead_pid}", at(0))  # its process is gone
        b = claim_job(session, f"{host}:{os.getpid()}", at(0))  # alive, fresh heartbeat
        c = claim_job(session, f"{host}:{os.getpid()}", at(-100))  # alive, stale heartbeat
    assert a and b and c
    with index.session() as session:
        taken = requeue_orphans(session, jobs, at(1))
    assert sorted(taken) == sorted([a.id, c.id])
    states = dict(_jobs(index))
    assert states[a.id] == "queued" and states[c.id] == "queued" and states[b.id] == "running"
    # at start-up every running job is orphaned; a second loss exhausts max_attempts=2:
    # with report_not_analysed off the job fails here and then
    quiet = JobSettings(max_attempts=2, stale_after_seconds=30, report_not_analysed=False)
    with index.session() as session:
        again = claim_job(session, f"{host}:{dead_pid}", at(2))
    assert again is not None and again.attempts == 2
    with index.session() as session:
        requeue_orphans(session, quiet, at(3), all_running=True)
    states = dict(_jobs(index))
    assert states[again.id] == "failed"
    assert states[b.id] == "queued"
    failed_series = _series_by_job(index, again.id)
    assert failed_series.status == SeriesStatus.FAILED
    assert failed_series.reason and "stopped" in failed_series.reason
    # by default it is queued once more, for a worker to write its not-analysed SR
    # (tests/loop/test_worker.py), never to be analysed again
    with index.session() as session:
        last = claim_job(session, f"{host}:{dead_pid}", at(4))
        assert last is not None and last.id != again.id and last.attempts == 2
        taken = requeue_orphans(session, jobs, at(5), all_running=True)
    assert last.id in taken
    with index.session(readonly=True) as session:
        row = session.get(Job, last.id)
        assert row is not None and row.state == JobState.QUEUED and row.attempts == 2
        assert row.error and "stopped during attempt 2" in row.error


def _series_by_job(index: Index, job_id: int) -> Series:
    with index.session(readonly=True) as session:
        job = session.get(Job, job_id)
        assert job is not None
        row = session.get(Series, job.series_id)
        assert row is not None
        session.expunge(row)
        return row
