"""Prometheus metrics of the node, served by ``prometheus_client.start_http_server``.

Everything is derived from the index, which is the one place the SCP, the
scheduler, the worker processes and the sender all write to:

* counters of received instances, bytes and associations (by outcome), read
  from the index at scrape time, so they survive restarts and need no hook in
  the receiving code;
* gauges of jobs and deliveries by state, also read at scrape time;
* histograms per stage (receive to ready, queue wait, inference, encoding,
  delivery, and the whole time from the last instance to the acknowledged
  result), observed by :meth:`NodeMetrics.poll` from the timings the workers
  and the sender record on the ``jobs`` and ``deliveries`` rows.

The registry is owned by a :class:`NodeMetrics` object (no module globals).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from storage.index import Index
from storage.models import (
    AssociationRecord,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Result,
    ResultKind,
)

if TYPE_CHECKING:
    from node.service import NodeService

logger = logging.getLogger(__name__)

STAGES = (
    "receive_to_ready",
    "queue_wait",
    "inference",
    "encoding",
    "delivery",
    "time_to_result",
)
BUCKETS = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    900.0,
)


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _seconds(later: dt.datetime | None, earlier: dt.datetime | None) -> float | None:
    a, b = _utc(later), _utc(earlier)
    if a is None or b is None:
        return None
    return max(0.0, (a - b).total_seconds())


class IndexCollector(Collector):
    """Counters and gauges computed from the index at each scrape."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        with self.index.session(readonly=True) as session:
            n_instances, n_bytes, resends = session.execute(
                select(
                    func.count(Instance.id),
                    func.coalesce(func.sum(Instance.size), 0),
                    func.coalesce(func.sum(Instance.resend_count), 0),
                )
            ).one()
            assoc_rows = session.execute(
                select(AssociationRecord.outcome, func.count()).group_by(AssociationRecord.outcome)
            ).all()
            job_rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
            delivery_rows = session.execute(
                select(Delivery.state, func.count()).group_by(Delivery.state)
            ).all()
        instances = CounterMetricFamily(
            "ichnode_instances_received", "Instances stored (re-sent copies included)"
        )
        instances.add_metric([], float(n_instances + resends))
        yield instances
        stored = CounterMetricFamily(
            "ichnode_bytes_stored", "Bytes of the instances the archive holds"
        )
        stored.add_metric([], float(n_bytes))
        yield stored
        assocs = CounterMetricFamily(
            "ichnode_associations", "Associations with peers, by outcome", labels=["outcome"]
        )
        for outcome, count in assoc_rows:
            assocs.add_metric([str(outcome)], float(count))
        yield assocs
        jobs = GaugeMetricFamily("ichnode_jobs", "Analysis jobs by state", labels=["state"])
        by_state = {str(s): c for s, c in job_rows}
        for state in JobState:
            jobs.add_metric([state.value], float(by_state.get(state.value, 0)))
        yield jobs
        deliveries = GaugeMetricFamily(
            "ichnode_deliveries", "Outbox deliveries by state", labels=["state"]
        )
        by_state = {str(s): c for s, c in delivery_rows}
        for dstate in DeliveryState:
            deliveries.add_metric([dstate.value], float(by_state.get(dstate.value, 0)))
        yield deliveries


class NodeMetrics:
    """The node's registry, its stage histograms and the HTTP endpoint."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.registry = CollectorRegistry()
        self.stage = Histogram(
            "ichnode_stage_seconds",
            "Duration of each stage of the processing loop",
            labelnames=["stage"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.registry.register(IndexCollector(index))
        now = dt.datetime.now(dt.UTC)
        self._jobs_since = now
        self._deliveries_since = now
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def observe(self, stage: str, seconds: float | None) -> None:
        """Record one duration of ``stage`` (ignored when None)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        if seconds is not None:
            self.stage.labels(stage=stage).observe(seconds)

    def poll(self) -> int:
        """Observe the jobs finished and deliveries acknowledged since the last poll.

        Returns how many rows were observed.
        """
        observed = 0
        with self.index.session(readonly=True) as session:
            jobs = session.execute(
                select(Job)
                .where(Job.state == JobState.DONE, Job.finished_at > self._jobs_since)
                .order_by(Job.finished_at)
            ).scalars()
            for job in jobs:
                self.observe("receive_to_ready", _seconds(job.created_at, job.received_at))
                self.observe("queue_wait", _seconds(job.claimed_at, job.created_at))
                self.observe("inference", job.inference_seconds)
                self.observe("encoding", job.encoding_seconds)
                self._jobs_since = max(self._jobs_since, _utc(job.finished_at) or self._jobs_since)
                observed += 1
            rows = session.execute(
                select(Delivery, Result.kind, Job.received_at)
                .join(Result, Result.id == Delivery.result_id)
                .join(Job, Job.id == Result.job_id)
                .where(
                    Delivery.state == DeliveryState.SENT, Delivery.acked_at > self._deliveries_since
                )
                .order_by(Delivery.acked_at)
            ).all()
            for delivery, kind, received_at in rows:
                self.observe("delivery", _seconds(delivery.acked_at, delivery.created_at))
                if kind == ResultKind.SR:
                    self.observe("time_to_result", _seconds(delivery.acked_at, received_at))
                acked = _utc(delivery.acked_at) or self._deliveries_since
                self._deliveries_since = max(self._deliveries_since, acked)
                observed += 1
        return observed

    def start(self, host: str, port: int) -> int | None:
        """Serve ``/metrics`` on ``host:port``; return the bound port (None when port is 0)."""
        if port == 0:
            return None
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._server.server_port)
        logger.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def stop(self) -> None:
        """Stop the HTTP endpoint."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


class MetricsComponent:
    """The endpoint plus a thread observing finished stages once a second."""

    name = "metrics"

    def __init__(self, metrics: NodeMetrics, host: str, port: int, enabled: bool) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self.enabled = enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.metrics.poll()
            except SQLAlchemyError as exc:
                logger.warning("metrics poll failed (%s); retrying", exc)

    def start(self) -> None:
        """Serve the endpoint (when enabled) and observe stage timings."""
        if self.enabled:
            try:
                self.metrics.start(self.host, self.port)
            except OSError as exc:
                # Metrics are for the operator; the node's work must not stop for them.
                logger.error(
                    "metrics endpoint not started on %s:%d (%s); the node runs without it",
                    self.host,
                    self.port,
                    exc,
                )
        self._thread = threading.Thread(target=self._loop, name="ichnode-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop observing and close the endpoint."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.metrics.stop()


def component(service: NodeService) -> MetricsComponent:
    """The metrics of ``ichnode serve`` (see :mod:`node.service`)."""
    cfg = service.settings.metrics
    return MetricsComponent(NodeMetrics(service.index), cfg.host, cfg.port, cfg.enabled)
