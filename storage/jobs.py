"""The job queue's state machine: every job transition, in one place.

A job is one analysis of one series::

    (series complete) --enqueue--> queued --claim--> running --complete--> done
                                                             --fail------> queued (backoff) | failed
                                                             --(newer job)--> superseded
    queued --(newer content)--> superseded
    running --(worker gone: requeue_orphans)--> queued | failed
    done --(a newer job of the series completes)--> superseded

Only this module writes ``jobs.state`` (and, with it, the series status and
the job's result rows, whose deliveries :mod:`storage.outbox` creates in the
same transaction). The scheduler enqueues and takes up orphans, the worker
claims, beats and finishes; each transition is one transaction, checked
against the claim (``running`` and ``claimed_by``) so a worker that lost its
job (it was taken up again after its heartbeat went stale) never overwrites
the new owner's work. Times come from :func:`storage.runtime.utcnow` unless
the caller passes one (tests); the wait after a failed attempt is
:func:`storage.runtime.backoff_seconds` with ``[jobs]``
``retry_backoff_seconds`` and ``retry_backoff_max_seconds``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.orm import Session

from config.settings import JobSettings
from storage.index import Index
from storage.models import Job, JobState, Result, ResultKind, Series, SeriesStatus
from storage.outbox import Outbox
from storage.queue import ClaimedJob, claim_job
from storage.runtime import as_utc, backoff_seconds, process_gone, utcnow

logger = logging.getLogger(__name__)

__all__ = ["ClaimedJob", "Finished", "JobLost", "JobQueue", "NewResult", "requeue_orphans"]


class JobLost(Exception):
    """The job is no longer ``running`` under this worker's claim."""


@dataclass(frozen=True)
class NewResult:
    """One result object a job wrote, to be recorded with the job's end."""

    kind: ResultKind
    sop_instance_uid: str
    series_instance_uid: str
    path: str


@dataclass(frozen=True)
class Finished:
    """How a job ended: ``done``, ``retry`` (in ``wait`` s), ``failed``, ``superseded``
    (a newer job of the series exists; ``detail`` names it) or ``abandoned`` (the claim
    was lost)."""

    state: str
    detail: str | None = None
    wait: float = 0.0


@dataclass(frozen=True)
class SeriesFinding:
    """What a done job says about its series."""

    hemorrhage: bool
    probability: float


class JobQueue:
    """Jobs of one index under one ``[jobs]`` policy.

    Parameters
    ----------
    index : Index
        The index (this process's engine).
    policy : JobSettings
        Attempts, backoff, staleness.
    """

    def __init__(self, index: Index, policy: JobSettings) -> None:
        self.index = index
        self.policy = policy

    # -- create --------------------------------------------------------------
    @staticmethod
    def supersede_queued(session: Session, series_id: int, now: dt.datetime) -> None:
        """Queued jobs of the series will not run: its content changed."""
        session.execute(
            update(Job)
            .where(and_(Job.series_id == series_id, Job.state == JobState.QUEUED))
            .values(
                state=JobState.SUPERSEDED, finished_at=now, error="superseded by newer instances"
            )
            .execution_options(synchronize_session=False)
        )

    def enqueue(
        self, session: Session, series: Series, content_hash: str, now: dt.datetime
    ) -> Job:
        """A new ``queued`` job for ``series`` (earlier queued ones superseded); caller commits."""
        self.supersede_queued(session, series.id, now)
        job = Job(
            series_id=series.id,
            state=JobState.QUEUED,
            attempts=0,
            content_hash=content_hash,
            created_at=now,
            received_at=series.last_instance_at,
        )
        session.add(job)
        series.status = SeriesStatus.QUEUED
        series.reason = None
        session.flush()
        return job

    # -- claim and heartbeat ---------------------------------------------------
    def claim(self, claimed_by: str, now: dt.datetime | None = None) -> ClaimedJob | None:
        """Take the oldest due queued job (:func:`storage.queue.claim_job`); ``None`` if none.

        A read-only look first, so idle workers polling an empty queue never
        take the write lock.
        """
        now = now or utcnow()
        with self.index.session(readonly=True) as session:
            waiting = session.execute(
                select(Job.id)
                .where(
                    Job.state == JobState.QUEUED,
                    or_(Job.not_before.is_(None), Job.not_before <= now),
                )
                .limit(1)
            ).first()
        if waiting is None:
            return None
        with self.index.session() as session:
            return claim_job(session, claimed_by, now)

    def heartbeat(self, job_id: int, claimed_by: str, now: dt.datetime | None = None) -> bool:
        """Refresh the claim's heartbeat; False when the job is no longer this worker's."""
        with self.index.session() as session:
            done = session.execute(
                update(Job)
                .where(
                    Job.id == job_id, Job.claimed_by == claimed_by, Job.state == JobState.RUNNING
                )
                .values(heartbeat_at=now or utcnow())
                .execution_options(synchronize_session=False)
            )
            return bool(done.rowcount)  # type: ignore[attr-defined]

    def last_error(self, job_id: int) -> str | None:
        """The error recorded on the job (e.g. why its worker stopped)."""
        with self.index.session(readonly=True) as session:
            row = session.get(Job, job_id)
            return None if row is None else row.error

    # -- ends ----------------------------------------------------------------
    @staticmethod
    def _own(session: Session, job: ClaimedJob, claimed_by: str) -> Job:
        row = session.get(Job, job.id)
        if row is None or row.state != JobState.RUNNING or row.claimed_by != claimed_by:
            raise JobLost(f"job {job.id} is no longer claimed by {claimed_by}")
        return row

    @staticmethod
    def _newer(session: Session, job: ClaimedJob) -> int | None:
        newer = session.execute(
            select(Job.id).where(
                Job.series_id == job.series_id,
                Job.id > job.id,
                Job.state.in_([JobState.QUEUED, JobState.RUNNING, JobState.DONE]),
            )
        ).first()
        return None if newer is None else int(newer[0])

    @staticmethod
    def _record_results(
        session: Session,
        job: ClaimedJob,
        results: Sequence[NewResult],
        destinations: Sequence[str],
        now: dt.datetime,
    ) -> None:
        """The job's result rows and their deliveries; earlier sets of the series superseded."""
        # Rows of an earlier run of this same job are replaced (their files were
        # replaced too), so one job has one set.
        session.execute(
            delete(Result).where(Result.job_id == job.id).execution_options(synchronize_session=False)
        )
        session.execute(
            update(Result)
            .where(Result.series_id == job.series_id, Result.job_id != job.id)
            .values(superseded=True)
            .execution_options(synchronize_session=False)
        )
        session.execute(
            update(Job)
            .where(Job.series_id == job.series_id, Job.id < job.id, Job.state == JobState.DONE)
            .values(state=JobState.SUPERSEDED)
            .execution_options(synchronize_session=False)
        )
        for new in results:
            row = Result(
                job_id=job.id,
                series_id=job.series_id,
                kind=new.kind,
                sop_instance_uid=new.sop_instance_uid,
                series_instance_uid=new.series_instance_uid,
                path=new.path,
                superseded=False,
                created_at=now,
            )
            session.add(row)
            session.flush()
            Outbox.add(session, row.id, destinations, now)

    def _supersede_if_newer(
        self, session: Session, job: ClaimedJob, row: Job, now: dt.datetime
    ) -> Finished | None:
        newer = self._newer(session, job)
        if newer is None:
            return None
        row.state = JobState.SUPERSEDED
        row.finished_at = now
        row.error = f"superseded by job {newer} before it finished"
        return Finished("superseded", row.error)

    def complete(
        self,
        job: ClaimedJob,
        claimed_by: str,
        *,
        results: Sequence[NewResult],
        destinations: Sequence[str],
        finding: SeriesFinding | None = None,
        series_status: SeriesStatus = SeriesStatus.DONE,
        reason: str | None = None,
        error: str | None = None,
        inference_seconds: float | None = None,
        encoding_seconds: float | None = None,
        now: dt.datetime | None = None,
    ) -> Finished:
        """``running`` -> ``done`` with its results and deliveries, in one transaction.

        ``series_status`` ``done`` (analysed; ``finding`` set) or ``skipped``
        (``reason`` says why; the results, if any, are the not-analysed SR).
        ``superseded`` instead when a newer job of the series exists; ``abandoned``
        when the claim was lost.
        """
        now = now or utcnow()
        try:
            with self.index.session() as session:
                row = self._own(session, job, claimed_by)
                series = session.get(Series, job.series_id)
                if series is None:
                    raise JobLost(f"series {job.series_id} of job {job.id} is gone")
                if results:
                    superseded = self._supersede_if_newer(session, job, row, now)
                    if superseded is not None:
                        return superseded
                    self._record_results(session, job, results, destinations, now)
                if finding is not None:
                    series.hemorrhage = finding.hemorrhage
                    series.hemorrhage_probability = finding.probability
                series.status = series_status
                series.reason = reason
                row.state = JobState.DONE
                row.finished_at = now
                row.error = error
                row.inference_seconds = inference_seconds
                row.encoding_seconds = encoding_seconds
        except JobLost as exc:
            return Finished("abandoned", str(exc))
        return Finished("done")

    def fail(
        self,
        job: ClaimedJob,
        claimed_by: str,
        error: str,
        *,
        series_reason: str,
        results: Sequence[NewResult] = (),
        destinations: Sequence[str] = (),
        now: dt.datetime | None = None,
    ) -> Finished:
        """An attempt failed: ``queued`` again after the backoff, or ``failed`` after the last.

        On the last attempt the series becomes ``failed`` with ``series_reason``
        and ``results`` (the not-analysed SR) are recorded with their deliveries.
        """
        now = now or utcnow()
        try:
            with self.index.session() as session:
                row = self._own(session, job, claimed_by)
                row.error = error
                series = session.get(Series, job.series_id)
                if row.attempts >= self.policy.max_attempts:
                    if results:
                        superseded = self._supersede_if_newer(session, job, row, now)
                        if superseded is not None:
                            return superseded
                        self._record_results(session, job, results, destinations, now)
                    row.state = JobState.FAILED
                    row.finished_at = now
                    if series is not None:
                        series.status = SeriesStatus.FAILED
                        series.reason = series_reason
                    return Finished("failed", error)
                wait = self.retry_wait(row.attempts)
                row.state = JobState.QUEUED
                row.claimed_by = None
                row.not_before = now + dt.timedelta(seconds=wait)
                if series is not None:
                    series.status = SeriesStatus.QUEUED
                    series.reason = (
                        f"attempt {row.attempts} failed, retry in {wait:.0f} s: {error}"
                    )
        except JobLost as exc:
            return Finished("abandoned", str(exc))
        return Finished("retry", error, wait)

    def retry_wait(self, attempts: int) -> float:
        """Seconds before the next attempt after ``attempts`` failed ones."""
        return backoff_seconds(
            attempts, self.policy.retry_backoff_seconds, self.policy.retry_backoff_max_seconds
        )

    def requeue_orphans(
        self, now: dt.datetime | None = None, *, all_running: bool = False
    ) -> list[int]:
        """:func:`requeue_orphans` in its own transaction."""
        with self.index.session() as session:
            return requeue_orphans(session, self.policy, now, all_running=all_running)


def _is_latest_job(session: Session, job: Job) -> bool:
    newest = session.execute(
        select(Job.id).where(Job.series_id == job.series_id).order_by(Job.id.desc()).limit(1)
    ).scalar_one()
    return int(newest) == job.id


def requeue_orphans(
    session: Session,
    jobs: JobSettings,
    now: dt.datetime | None = None,
    *,
    all_running: bool = False,
) -> list[int]:
    """Put running jobs whose worker is gone back in the queue (or fail them).

    A job is orphaned when ``all_running`` (the node starts and no worker of
    it runs yet), its heartbeat is older than ``jobs.stale_after_seconds``, or
    its ``claimed_by`` process is a process of this host that has ended. A job
    that already used ``jobs.max_attempts`` (its worker died each time, e.g.
    killed for memory) is not analysed again: with ``jobs.report_not_analysed``
    it is queued once more so that a worker, seeing attempts beyond the
    maximum, only writes its "not analysed" SR and marks it ``failed``;
    otherwise it becomes ``failed`` here. The caller commits; returns the job ids.
    """
    now = now or utcnow()
    stale_before = now - dt.timedelta(seconds=jobs.stale_after_seconds)
    running = session.execute(select(Job).where(Job.state == JobState.RUNNING)).scalars().all()
    taken: list[int] = []
    for job in running:
        heartbeat = as_utc(job.heartbeat_at) if job.heartbeat_at else None
        orphan = (
            all_running
            or heartbeat is None
            or heartbeat < stale_before
            or process_gone(job.claimed_by)
        )
        if not orphan:
            continue
        taken.append(job.id)
        series = session.get(Series, job.series_id)
        if job.attempts >= jobs.max_attempts and jobs.report_not_analysed:
            job.state = JobState.QUEUED
            job.error = f"worker {job.claimed_by} stopped during attempt {job.attempts}"
            job.claimed_by = None
            job.not_before = now
            logger.error("job %s: %s; giving up (not-analysed report next)", job.id, job.error)
            continue
        if job.attempts >= jobs.max_attempts:
            job.state = JobState.FAILED
            job.error = f"worker {job.claimed_by} stopped during attempt {job.attempts}"
            job.finished_at = now
            if series is not None and _is_latest_job(session, job):
                series.status = SeriesStatus.FAILED
                series.reason = job.error
            logger.error("job %s failed: %s", job.id, job.error)
            continue
        logger.warning("job %s: worker %s is gone, queued again", job.id, job.claimed_by)
        job.state = JobState.QUEUED
        job.error = f"worker {job.claimed_by} stopped; taken up again"
        job.claimed_by = None
        job.not_before = now
        if series is not None and _is_latest_job(session, job):
            series.status = SeriesStatus.QUEUED
    return taken
