"""The outbox sender against real associations on loopback: statuses, backoff, dead letters."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import SecondaryCaptureImageStorage
from pynetdicom.transport import ThreadedAssociationServer

from config.settings import DeliverySettings, DestinationSettings
from node.sender import Sender, backoff_seconds
from storage.index import Index
from storage.models import Delivery, DeliveryState, Job, JobState, Result, ResultKind, Series
from tests.interop import REPO, free_port
from tests.loop.helpers import ct_dataset, new_index, sc_dataset, store


def test_backoff_schedule() -> None:
    waits = [backoff_seconds(n, 5, 900) for n in range(1, 11)]
    assert waits == [5, 10, 20, 40, 80, 160, 320, 640, 900, 900]
    assert backoff_seconds(0, 5, 900) == 0
    assert backoff_seconds(10_000, 5, 900) == 900


@dataclass
class Peer:
    """A real C-STORE SCP whose answer the test chooses."""

    port: int
    status: int = 0x0000
    delay: float = 0.0
    received: list[str] = field(default_factory=list)
    server: ThreadedAssociationServer | None = None

    def handle(self, event: Event) -> int:
        if self.delay:
            time.sleep(self.delay)
        if self.status == 0x0000:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return self.status

    def start(self) -> None:
        ae = AE(ae_title="PACS")
        ae.add_supported_context(SecondaryCaptureImageStorage)
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self.handle)],
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer(free_port())
    yield p
    p.stop()


def _outbox(index: Index, tmp_path: Path, destinations: list[str], count: int = 1) -> list[int]:
    """Index a source series, a finished job and ``count`` result files with deliveries."""
    study = generate_uid()
    src = ct_dataset(study, generate_uid())
    store(index, tmp_path / "src", src, association_id=None, received_at=dt.datetime.now(dt.UTC))
    ids = []
    with index.session() as session:
        series = (
            session.query(Series)
            .filter(Series.series_instance_uid == str(src.SeriesInstanceUID))
            .one()
        )
        job = Job(series_id=series.id, state=JobState.DONE, attempts=1)
        session.add(job)
        session.flush()
        for _ in range(count):
            ds: Dataset = sc_dataset(study)
            path = tmp_path / "results" / f"{ds.SOPInstanceUID}.dcm"
            path.parent.mkdir(exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            result = Result(
                job_id=job.id,
                series_id=series.id,
                kind=ResultKind.SC,
                sop_instance_uid=ds.SOPInstanceUID,
                series_instance_uid=ds.SeriesInstanceUID,
                path=str(path),
            )
            session.add(result)
            session.flush()
            for name in destinations:
                delivery = Delivery(result_id=result.id, destination=name)
                session.add(delivery)
                session.flush()
                ids.append(delivery.id)
    return ids


def _rows(index: Index) -> dict[int, Delivery]:
    with index.session(readonly=True) as session:
        rows = session.query(Delivery).all()
        for r in rows:
            session.expunge(r)
        return {r.id: r for r in rows}


def _sender(index: Index, port: int, **delivery: float) -> Sender:
    dest = DestinationSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
    return Sender(index, [dest], DeliverySettings(**delivery), "ICHNODE")  # type: ignore[arg-type]


def test_acknowledged_once_on_one_association(tmp_path: Path, peer: Peer) -> None:
    index = new_index(tmp_path)
    ids = _outbox(index, tmp_path, ["pacs"], count=3)
    peer.start()
    sender = _sender(index, peer.port)
    outcome = sender.send_once()
    assert sorted(outcome.sent) == sorted(ids)
    rows = _rows(index)
    assert all(
        r.state == DeliveryState.SENT and r.acked_at and r.attempts == 1 for r in rows.values()
    )
    assert len(peer.received) == 3
    assert sender.links["pacs"].assoc is not None  # kept open for the next results
    # nothing is sent twice
    assert sender.send_once().sent == []
    sender.stop()
    assert len(peer.received) == 3


def test_failure_status_is_retried_with_backoff(tmp_path: Path, peer: Peer) -> None:
    index = new_index(tmp_path)
    (delivery_id,) = _outbox(index, tmp_path, ["pacs"])
    peer.status = 0xA700  # out of resources
    peer.start()
    sender = _sender(index, peer.port, backoff_initial_seconds=0.5, backoff_max_seconds=1)
    before = dt.datetime.now(dt.UTC)
    assert sender.send_once().retried == [delivery_id]
    row = _rows(index)[delivery_id]
    assert row.state == DeliveryState.PENDING and row.attempts == 1
    assert row.last_error and "0xA700" in row.last_error
    assert row.next_attempt_at is not None
    assert 0.4 <= (row.next_attempt_at - before).total_seconds() <= 1.5
    # not due yet: nothing happens
    assert sender.send_once().retried == []
    peer.status = 0x0000
    time.sleep(0.6)
    assert sender.send_once().sent == [delivery_id]
    sender.stop()
    assert peer.received == [_sop_of(index, delivery_id)]


def _sop_of(index: Index, delivery_id: int) -> str:
    with index.session(readonly=True) as session:
        delivery = session.get(Delivery, delivery_id)
        assert delivery is not None
        return str(session.get(Result, delivery.result_id).sop_instance_uid)  # type: ignore[union-attr]


def test_no_response_is_not_success(tmp_path: Path, peer: Peer) -> None:
    index = new_index(tmp_path)
    (delivery_id,) = _outbox(index, tmp_path, ["pacs"])
    peer.delay = 2.5  # longer than the DIMSE timeout: the response never comes in time
    peer.start()
    sender = _sender(index, peer.port, timeout_seconds=1.0, backoff_initial_seconds=0.2)
    assert sender.send_once().retried == [delivery_id]
    row = _rows(index)[delivery_id]
    assert row.state == DeliveryState.PENDING
    assert row.last_error and "no C-STORE response" in row.last_error
    sender.stop()


def _config(tmp_path: Path, index: Index, port: int) -> Path:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[storage]\nroot = "{tmp_path}"\ndatabase_url = "{index.url}"\n'
        f'[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {port}\n'
    )
    return cfg


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_dead_letter_and_outbox_retry(tmp_path: Path, peer: Peer) -> None:
    index = new_index(tmp_path)
    first, second = _outbox(index, tmp_path, ["pacs"], count=2)
    # the destination is down, and deliveries may live 0.72 s
    sender = _sender(index, peer.port, backoff_initial_seconds=0.1, max_age_hours=0.0002)
    assert sorted(sender.send_once().retried) == [first, second]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(
        r.state == DeliveryState.DEAD for r in _rows(index).values()
    ):
        sender.send_once()
        time.sleep(0.1)
    rows = _rows(index)
    assert {r.state for r in rows.values()} == {DeliveryState.DEAD}
    assert all(r.attempts >= 2 and r.last_error for r in rows.values())
    # a dead delivery is left alone
    assert sender.send_once().retried == []
    cfg = _config(tmp_path, index, peer.port)
    listed = _cli("outbox", "--config", str(cfg), "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count(" dead ") == 2
    # retry one by ID; the PACS is back
    peer.start()
    retried = _cli("outbox", "--config", str(cfg), "retry", str(first))
    assert retried.returncode == 0, retried.stderr
    rows = _rows(index)
    assert rows[first].state == DeliveryState.PENDING and rows[first].retried_at is not None
    assert rows[second].state == DeliveryState.DEAD
    assert sender.send_once().sent == [first]
    # then every dead one
    assert _cli("outbox", "--config", str(cfg), "retry").returncode == 0
    assert sender.send_once().sent == [second]
    sender.stop()
    assert len(peer.received) == 2
    # an unknown or acknowledged ID is a one-line error
    bad = _cli("outbox", "--config", str(cfg), "retry", "999")
    assert bad.returncode == 1 and "no delivery with id 999" in bad.stderr
    assert "Traceback" not in bad.stderr
    done = _cli("outbox", "--config", str(cfg), "retry", str(first))
    assert done.returncode == 1 and "already acknowledged" in done.stderr
    listed = _cli("outbox", "--config", str(cfg), "list")
    assert listed.stdout.count(" sent ") == 2


def test_superseded_result_is_not_sent(tmp_path: Path, peer: Peer) -> None:
    index = new_index(tmp_path)
    (delivery_id,) = _outbox(index, tmp_path, ["pacs"])
    with index.session() as session:
        session.query(Result).update({Result.superseded: True})
    peer.start()
    sender = _sender(index, peer.port)
    assert sender.send_once().dead == [delivery_id]
    assert peer.received == []
    sender.stop()


def test_association_closed_by_peer_is_reopened(tmp_path: Path, peer: Peer) -> None:
    index = new_index(tmp_path)
    first, second = _outbox(index, tmp_path, ["pacs"], count=2)
    with index.session() as session:  # only the first is due now
        session.query(Delivery).filter(Delivery.id == second).update(
            {Delivery.next_attempt_at: dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)}
        )
    peer.start()
    sender = _sender(index, peer.port)
    assert sender.send_once().sent == [first]
    assert sender.links["pacs"].assoc is not None
    peer.stop()  # the PACS restarts: the kept-open association is gone
    peer.start()
    time.sleep(1.0)
    assert sender.send_once().sent == [second]
    assert _rows(index)[second].attempts == 1
    sender.stop()
    assert len(peer.received) == 2
