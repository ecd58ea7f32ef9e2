"""Metrics derived from a real index, scraped over HTTP from the real endpoint."""

from __future__ import annotations

import datetime as dt
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from node.metrics import NodeMetrics
from storage.models import (
    AssociationOutcome,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Result,
    ResultKind,
    Series,
)
from tests.interop import free_port
from tests.loop.helpers import ct_dataset, new_index, store


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_counters_gauges_and_stage_histograms(tmp_path: Path) -> None:
    index = new_index(tmp_path)
    now = dt.datetime.now(dt.UTC)
    study, series_uid = generate_uid(), generate_uid()
    assoc = index.open_association("SCANNER", "ICHNODE", started_at=now)
    sizes = 0
    for i in range(3):
        path = store(
            index,
            tmp_path / "src",
            ct_dataset(study, series_uid, instance_number=i + 1),
            association_id=assoc,
            received_at=now,
        )
        sizes += path.stat().st_size
    index.close_association(assoc, AssociationOutcome.RELEASED, instances=3)
    metrics = NodeMetrics(index)
    port = metrics.start("127.0.0.1", free_port())
    assert port is not None
    try:
        samples = _scrape(port)
        assert samples[("ichnode_instances_received_total", ())] == 3
        assert samples[("ichnode_bytes_stored_total", ())] == sizes
        assert samples[("ichnode_associations_total", (("outcome", "released"),))] == 1
        assert samples[("ichnode_jobs", (("state", "queued"),))] == 0
        # a job that finished after the metrics started, and its SR delivered
        last = now + dt.timedelta(seconds=1)
        with index.session() as session:
            series = session.query(Series).one()
            job = Job(
                series_id=series.id,
                state=JobState.DONE,
                attempts=1,
                received_at=last,
                created_at=last + dt.timedelta(seconds=1.0),
                claimed_at=last + dt.timedelta(seconds=1.5),
                finished_at=last + dt.timedelta(seconds=4.0),
                inference_seconds=2.0,
                encoding_seconds=0.25,
            )
            session.add(job)
            session.flush()
            result = Result(
                job_id=job.id,
                series_id=series.id,
                kind=ResultKind.SR,
                sop_instance_uid=generate_uid(),
                series_instance_uid=generate_uid(),
                path=str(tmp_path / "sr.dcm"),
            )
            session.add(result)
            session.flush()
            session.add(
                Delivery(
                    result_id=result.id,
                    destination="pacs",
                    state=DeliveryState.SENT,
                    created_at=last + dt.timedelta(seconds=4.0),
                    acked_at=last + dt.timedelta(seconds=4.5),
                )
            )
        assert metrics.poll() == 2
        assert metrics.poll() == 0  # observed once only
        samples = _scrape(port)
        assert samples[("ichnode_jobs", (("state", "done"),))] == 1
        assert samples[("ichnode_deliveries", (("state", "sent"),))] == 1

        def stage(name: str, suffix: str = "sum") -> float:
            return samples[(f"ichnode_stage_seconds_{suffix}", (("stage", name),))]

        assert stage("receive_to_ready") == 1.0
        assert stage("queue_wait") == 0.5
        assert stage("inference") == 2.0
        assert stage("encoding") == 0.25
        assert stage("delivery") == 0.5
        assert stage("time_to_result") == 4.5
        assert all(stage(n, "count") == 1 for n in ("inference", "delivery", "time_to_result"))
    finally:
        metrics.stop()


def test_metrics_port_in_use_does_not_stop_the_node(tmp_path: Path) -> None:
    import socket

    from node.metrics import MetricsComponent

    index = new_index(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        component = MetricsComponent(NodeMetrics(index), "127.0.0.1", port, enabled=True)
        component.start()  # logs an error, does not raise
        assert component.metrics.port is None
        component.stop()
    disabled = MetricsComponent(NodeMetrics(index), "127.0.0.1", 0, enabled=True)
    disabled.start()
    assert disabled.metrics.port is None
    disabled.stop()
