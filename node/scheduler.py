"""Series completion and the job queue.

The scheduler decides when a received series is complete and turns it into a
``jobs`` row; everything it decides on is kept in the index:

* a series is *ready* when the association that sent its latest instances was
  released normally and no instance arrived for :data:`RELEASE_QUIET_SECONDS`,
  or when ``scheduler.series_quiet_seconds`` passed since its last instance
  (an aborted association waits the full quiet time);
* instances that arrive after a series was handled make it ready again
  (``last_instance_at > ready_at``); a new job supersedes the queued ones;
* an identical resend (same content hash over the sorted SOP Instance UIDs,
  file sizes and SHA-256 of the files) creates no job;
* a series the routing rules reject is marked ``skipped`` with the reason.

It also takes up jobs whose worker died (stale heartbeat, or claimed by a
process of this host that no longer exists). Every job transition (enqueue,
claim, heartbeat, finish, retry, orphans) belongs to :mod:`storage.jobs`; the
scheduler decides *when*, the job queue writes the states.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from config.settings import JobSettings, RoutingSettings
from node.routing import skip_reason
from storage.index import Index
from storage.jobs import JobQueue, requeue_orphans
from storage.leader import Leadership
from storage.models import (
    AssociationOutcome,
    AssociationRecord,
    Instance,
    Series,
    SeriesStatus,
)
from storage.queue import ClaimedJob, claim_job
from storage.runtime import as_utc, utcnow

if TYPE_CHECKING:
    from node.scp import AssociationClosed, InstanceStored
    from node.service import NodeService

logger = logging.getLogger(__name__)

# After a normal release, the series is ready once no instance came for this long.
RELEASE_QUIET_SECONDS = 1.0
# A standby scheduler asks for the role this often (seconds).
STANDBY_POLL_SECONDS = 1.0
_HASH_CHUNK = 1 << 20


def series_ready(
    now: dt.datetime,
    last_instance_at: dt.datetime,
    released: bool,
    quiet_seconds: float,
    release_quiet_seconds: float = RELEASE_QUIET_SECONDS,
) -> bool:
    """Return True when a series whose last instance came at ``last_instance_at`` is complete.

    Parameters
    ----------
    now, last_instance_at : datetime
        Aware or naive-UTC times.
    released : bool
        Every association that sent the series' new instances was released normally.
    quiet_seconds : float
        ``scheduler.series_quiet_seconds``.
    """
    idle = (as_utc(now) - as_utc(last_instance_at)).total_seconds()
    if idle >= quiet_seconds:
        return True
    return released and idle >= min(release_quiet_seconds, quiet_seconds)


def content_hash(instances: Iterable[tuple[str, str, int]]) -> str:
    """SHA-256 over the sorted (SOP Instance UID, file size, file SHA-256) of a series.

    Parameters
    ----------
    instances : iterable of (sop_instance_uid, path, size)
        A file that cannot be read counts with an empty digest.
    """
    outer = hashlib.sha256()
    for sop_instance_uid, path, size in sorted(instances):
        inner = hashlib.sha256()
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(_HASH_CHUNK):
                    inner.update(chunk)
            digest = inner.hexdigest()
        except OSError:
            digest = ""
        outer.update(f"{sop_instance_uid}\0{size}\0{digest}\n".encode())
    return outer.hexdigest()


__all__ = ["ClaimedJob", "Scheduler", "claim_job", "requeue_orphans"]


class Scheduler:
    """Watches the index for complete series and queues their jobs.

    It is also an ``IngestListener`` of the SCP: a closed association wakes it
    so a released series is seen without waiting for the next poll.

    Parameters
    ----------
    index : storage.index.Index
        The index (one engine for the process).
    quiet_seconds : float
        ``scheduler.series_quiet_seconds``.
    routing : RoutingSettings
        The ``[routing]`` rules.
    jobs : JobSettings
        Retry and staleness settings.
    """

    def __init__(
        self,
        index: Index,
        quiet_seconds: float,
        routing: RoutingSettings,
        jobs: JobSettings,
        poll_seconds: float = 0.1,
        leadership: Leadership | None = None,
    ) -> None:
        self.index = index
        self.queue = JobQueue(index, jobs)
        self.leadership = leadership
        self.quiet_seconds = quiet_seconds
        self.routing = routing
        self.jobs = jobs
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    name = "scheduler"

    # -- SCP listener -------------------------------------------------------
    def instance_stored(self, stored: InstanceStored) -> None:
        """Nothing to do: the SCP already set ``series.last_instance_at``."""

    def association_closed(self, closed: AssociationClosed) -> None:
        """Look at the series of a closed association soon."""
        self.wake()

    # -- decisions ---------------------------------------------------------
    def _released(self, session: Session, series: Series) -> bool:
        """Every association that sent instances since the last decision ended in a release."""
        conditions = [Instance.series_id == series.id]
        if series.ready_at is not None:
            since = series.ready_at
            conditions.append(or_(Instance.received_at > since, Instance.last_resent_at > since))
        outcomes = session.execute(
            select(Instance.association_id, AssociationRecord.outcome)
            .outerjoin(AssociationRecord, AssociationRecord.id == Instance.association_id)
            .where(*conditions)
            .distinct()
        ).all()
        if not outcomes:
            return False
        return all(
            pk is not None and outcome == AssociationOutcome.RELEASED for pk, outcome in outcomes
        )

    def candidates(self, session: Session) -> list[Series]:
        """Series with instances the scheduler has not decided on yet."""
        return list(
            session.execute(
                select(Series)
                .where(
                    Series.last_instance_at.is_not(None),
                    or_(Series.ready_at.is_(None), Series.last_instance_at > Series.ready_at),
                )
                .order_by(Series.last_instance_at)
            ).scalars()
        )

    def tick(self, now: dt.datetime | None = None) -> list[int]:
        """Decide on every waiting series; return the ids of the series made ready."""
        now = now or utcnow()
        made_ready: list[int] = []
        with self.index.session(readonly=True) as session:
            waiting = [
                (s.id, s.last_instance_at)
                for s in self.candidates(session)
                if s.last_instance_at is not None
                and series_ready(
                    now, s.last_instance_at, self._released(session, s), self.quiet_seconds
                )
            ]
        for series_id, seen_last in waiting:
            if self.make_ready(series_id, seen_last, now):
                made_ready.append(series_id)
        return made_ready

    def make_ready(self, series_id: int, seen_last: dt.datetime, now: dt.datetime) -> bool:
        """Hash, route and queue one complete series. False when it changed meanwhile."""
        with self.index.session(readonly=True) as session:
            rows = [
                (str(r[0]), str(r[1]), int(r[2]))
                for r in session.execute(
                    select(Instance.sop_instance_uid, Instance.path, Instance.size)
                    .where(Instance.series_id == series_id)
                    .order_by(Instance.instance_number, Instance.sop_instance_uid)
                ).all()
            ]
        digest = content_hash(rows)
        # Read a header outside the write transaction (it may touch the disk).
        reason = self._route(rows, series_id)
        with self.index.session() as session:
            # Locked (PostgreSQL): a scheduler that lost its role a moment ago
            # and is finishing its pass cannot queue the same content twice.
            series = session.get(Series, series_id, with_for_update=True)
            if series is None:
                return False
            if series.last_instance_at is None or as_utc(series.last_instance_at) != as_utc(
                seen_last
            ):
                return False  # an instance arrived meanwhile; decide at the next tick
            series.ready_at = now
            if digest == series.content_hash:
                logger.info(
                    "series %s: same content as analysed before, no new job",
                    series.series_instance_uid,
                )
                return True
            series.content_hash = digest
            if reason is not None:
                self.queue.supersede_queued(session, series_id, now)
                series.status = SeriesStatus.SKIPPED
                series.reason = reason
                logger.info("series %s skipped: %s", series.series_instance_uid, reason)
                return True
            job = self.queue.enqueue(session, series, digest, now)
            logger.info(
                "series %s complete (%d instances): job %s queued",
                series.series_instance_uid,
                len(rows),
                job.id,
            )
        return True

    def _route(self, rows: Sequence[tuple[str, str, int]], series_id: int) -> str | None:
        if not rows:
            return "no instances"
        ds = None
        for row in rows:
            try:
                ds = dcmread(Path(row[1]), stop_before_pixels=True)
                break
            except (OSError, InvalidDicomError, ValueError) as exc:
                logger.warning("series %s: cannot read %s: %s", series_id, row[1], exc)
        if ds is None:
            return "no readable instance in the archive"
        return skip_reason(ds, len(rows), self.routing)

    # -- thread ------------------------------------------------------------
    def recover(self) -> list[int]:
        """At start-up: queue again the jobs whose worker died with an earlier node process.

        A worker of this host is gone when its pid is (workers die with the node,
        see :mod:`node.worker`); a job of another host waits for its heartbeat to
        go stale, so a second node on the same index never loses its jobs.
        """
        return self.queue.requeue_orphans()

    def wake(self) -> None:
        """Look at the index now (e.g. after an association was released)."""
        self._wake.set()

    def _lead(self) -> bool:
        """True when this scheduler holds the role (taking it, and the orphans, when free)."""
        if self.leadership is None:
            return True
        was = self.leadership.held
        if not self.leadership.hold():
            return False
        if not was:
            taken = self.recover()
            if taken:
                logger.warning("%d job(s) whose worker is gone were queued again", len(taken))
        return True

    def _loop(self) -> None:
        stale_check = 0.0
        while not self._stop.is_set():
            try:
                if self._lead():
                    self.tick()
                    stale_check += self.poll_seconds
                    if stale_check >= self.jobs.heartbeat_seconds:
                        stale_check = 0.0
                        self.queue.requeue_orphans()
            except (SQLAlchemyError, OSError) as exc:
                logger.warning("scheduler pass failed (%s); retrying", exc)
            self._wake.wait(self.poll_seconds if self._leading() else STANDBY_POLL_SECONDS)
            self._wake.clear()

    def _leading(self) -> bool:
        return self.leadership is None or self.leadership.held

    def start(self) -> None:
        """Take up the jobs of a previous run, then run the scheduler in a background thread.

        With a :class:`storage.leader.Leadership`, only the holder of the
        ``scheduler`` role works; another scheduler waits on standby and takes
        the role (and the orphaned jobs) when the holder is gone.
        """
        if self.leadership is None:
            taken = self.recover()
            if taken:
                logger.warning(
                    "%d job(s) were running when the node stopped; queued again", len(taken)
                )
        elif not self._lead():
            logger.info("another scheduler holds the role; standing by")
        self._thread = threading.Thread(target=self._loop, name="ichnode-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and give the role up."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.leadership is not None:
            self.leadership.release()


def component(service: NodeService) -> Scheduler:
    """The scheduler of ``ichnode serve``: one active across every process on the index."""
    settings = service.settings
    scheduler = Scheduler(
        service.index,
        settings.scheduler.series_quiet_seconds,
        settings.routing,
        settings.jobs,
        leadership=Leadership(settings.storage.effective_database_url, "scheduler"),
    )
    if service.scp is not None:
        service.scp.add_listener(scheduler)
    return scheduler
