"""Triage notifications through the outbox, to a real HTTP server and a real MLLP listener.

The receivers are real sockets on loopback started by the tests: an HTTP
server (``http.server``) for the webhook and an MLLP listener that parses each
ORU^R01 with hl7apy and answers with an ACK the test chooses. The SRs are
real ichnode reports (``node.results``) of a synthetic CT series.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hl7apy.parser import parse_message
from pydicom import Dataset
from pydicom.uid import generate_uid

from config.settings import DeliverySettings, NotificationSettings
from node.notify import MLLP_END, MLLP_START, read_mllp
from node.results import ModelIdentity, build_not_analysed_report, build_results
from node.sender import Sender
from storage.index import Index
from storage.models import Delivery, DeliveryState, Job, JobState, Result, ResultKind, Series
from tests.interop import free_port
from tests.loop.helpers import new_index, store
from tests.loop.test_sender import _cli, _rows
from tests.node.conftest import make_ct_series, make_findings

# -- the receivers --------------------------------------------------------------


@dataclass
class WebhookReceiver:
    """A real HTTP server that records each POST and answers with ``status``."""

    port: int
    status: int = 200
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if receiver.status == 200:
                    receiver.received.append((dict(self.headers.items()), body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def documents(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.received]


@dataclass
class MllpListener:
    """A real MLLP listener: parses each message with hl7apy, answers MSA|<ack>."""

    port: int
    ack: str = "AA"  # AA, AE, AR, or "" for no answer at all
    messages: list[str] = field(default_factory=list)
    parse_errors: list[str] = field(default_factory=list)
    server: socketserver.ThreadingTCPServer | None = None

    def start(self) -> None:
        listener = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                sock.settimeout(5)
                try:
                    text = read_mllp(sock)
                except (OSError, ValueError):
                    return
                try:
                    msg = parse_message(text, find_groups=True)
                    control_id = msg.msh.msh_10.value
                except Exception as exc:  # noqa: BLE001 (record any parser complaint)
                    listener.parse_errors.append(repr(exc))
                    return
                if not listener.ack:
                    time.sleep(3)
                    return
                if listener.ack == "AA":
                    listener.messages.append(text)
                ack = (
                    f"MSH|^~\\&|RIS|HOSP|ICHNODE||20260101000000||ACK^R01^ACK|A{control_id}|P|2.5\r"
                    f"MSA|{listener.ack}|{control_id}|{'ok' if listener.ack == 'AA' else 'refused'}"
                )
                sock.sendall(MLLP_START + ack.encode() + MLLP_END)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver(free_port())
    yield receiver
    receiver.stop()


@pytest.fixture
def mllp() -> Iterator[MllpListener]:
    listener = MllpListener(free_port())
    yield listener
    listener.stop()


# -- real ichnode SRs in the index ------------------------------------------------

_SERIES = make_ct_series()


def _report(event: str) -> tuple[Dataset, Dataset]:
    """A real ichnode SR of a fresh copy of the synthetic series, and that series' first slice."""
    datasets = [copy.deepcopy(ds) for ds in _SERIES]
    study, series = generate_uid(), generate_uid()
    for ds in datasets:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if event == "not_analysed":
        report: Dataset = build_not_analysed_report(datasets, "series has 1 slice", ModelIdentity())
        return report, datasets[0]
    mask = np.zeros((len(datasets), 64, 64), dtype=bool)
    if event == "positive":
        mask[2:4, 20:30, 20:30] = True
    findings = make_findings(datasets, {"subdural": mask} if event == "positive" else {})
    built = build_results(findings, datasets)
    return next(o for o in built.objects if o.Modality == "SR"), datasets[0]


def _add_sr(index: Index, tmp_path: Path, event: str) -> tuple[int, Dataset]:
    """Index a source series with a finished job and its SR; return (result id, SR)."""
    sr, source = _report(event)
    store(index, tmp_path / "src", source, association_id=None, received_at=dt.datetime.now(dt.UTC))
    path = tmp_path / "results" / f"{sr.SOPInstanceUID}.dcm"
    path.parent.mkdir(exist_ok=True)
    sr.save_as(path, enforce_file_format=True)
    with index.session() as session:
        series = (
            session.query(Series)
            .filter(Series.series_instance_uid == str(source.SeriesInstanceUID))
            .one()
        )
        job = Job(series_id=series.id, state=JobState.DONE, attempts=1)
        session.add(job)
        session.flush()
        result = Result(
            job_id=job.id,
            series_id=series.id,
            kind=ResultKind.SR,
            sop_instance_uid=str(sr.SOPInstanceUID),
            series_instance_uid=str(sr.SeriesInstanceUID),
            path=str(path),
        )
        session.add(result)
        session.flush()
        return int(result.id), sr


def _notification_rows(index: Index) -> list[Delivery]:
    return sorted(_rows(index).values(), key=lambda r: r.id)


def _sender(index: Index, notifications: list[NotificationSettings], **delivery: float) -> Sender:
    settings = DeliverySettings(**delivery)  # type: ignore[arg-type]
    return Sender(index, [], settings, "ICHNODE", notifications=notifications)


def _until_sent(sender: Sender, index: Index, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sender.send_once()
        rows = _notification_rows(index)
        if rows and all(r.state == DeliveryState.SENT for r in rows):
            return
        time.sleep(0.1)
    raise AssertionError(f"not all sent: {[(r.id, r.state, r.last_error) for r in rows]}")


# -- webhook ------------------------------------------------------------------------


def test_webhook_positive_only_receiver_down_at_first(
    tmp_path: Path, webhook: WebhookReceiver
) -> None:
    index = new_index(tmp_path)
    positive_id, positive = _add_sr(index, tmp_path, "positive")
    _add_sr(index, tmp_path, "negative")
    hook = NotificationSettings(
        name="triage",
        kind="webhook",
        url=f"http://127.0.0.1:{webhook.port}/ich",
        viewer_url="http://viewer.local/view?study={study_instance_uid}",
    )
    sender = _sender(index, [hook], backoff_initial_seconds=0.2, backoff_max_seconds=0.5)
    outcome = sender.send_once()  # the receiver is not listening yet
    (row,) = _notification_rows(index)  # the negative series is not notified
    assert row.result_id == positive_id and row.destination == "triage"
    assert outcome.retried == [row.id]
    assert "cannot connect" in (row.last_error or "")
    webhook.start()
    _until_sent(sender, index)
    assert sender.send_once().sent == []  # nothing twice
    time.sleep(0.6)
    assert sender.send_once().sent == []
    sender.stop()
    ((headers, body),) = webhook.received
    doc = json.loads(body)
    assert headers["Content-Type"] == "application/json"
    assert headers["Idempotency-Key"] == doc["id"] == f"ICH{row.id}"
    assert doc["schema"] == "ichnode.notification/1"
    assert doc["event"] == "positive" and doc["priority"] == "urgent"
    assert doc["study_instance_uid"] == str(positive.StudyInstanceUID)
    assert doc["accession_number"] == str(positive.AccessionNumber) != ""
    assert doc["finding"]["hemorrhage"] is True and 0.5 < doc["finding"]["probability"] <= 1
    assert doc["subtypes"]["subdural"]["present"] is True
    assert doc["subtypes"]["subdural"]["volume_ml"] > 0
    assert doc["subtypes"]["epidural"]["present"] is False
    assert doc["report"]["sop_instance_uid"] == str(positive.SOPInstanceUID)
    assert doc["links"]["viewer"] == f"http://viewer.local/view?study={positive.StudyInstanceUID}"
    # no PHI unless configured
    assert doc["patient"] is None
    assert str(positive.PatientName) not in body.decode()
    assert str(positive.PatientID) not in body.decode()


def test_webhook_error_dead_letter_then_outbox_retry(
    tmp_path: Path, webhook: WebhookReceiver
) -> None:
    index = new_index(tmp_path)
    _add_sr(index, tmp_path, "not_analysed")
    hook = NotificationSettings(
        name="triage",
        kind="webhook",
        url=f"http://127.0.0.1:{webhook.port}/ich",
        on=["not_analysed"],
        include_phi=True,
    )
    webhook.status = 503
    webhook.start()
    sender = _sender(index, [hook], backoff_initial_seconds=0.1, max_age_hours=0.0002)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        sender.send_once()
        rows = _notification_rows(index)
        if rows and rows[0].state == DeliveryState.DEAD:
            break
        time.sleep(0.1)
    (row,) = _notification_rows(index)
    assert row.state == DeliveryState.DEAD and row.attempts >= 2
    assert "HTTP 503" in (row.last_error or "")
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[storage]\nroot = "{tmp_path}"\ndatabase_url = "{index.url}"\n'
        f'[[notifications]]\nname = "triage"\nkind = "webhook"\nurl = "{hook.url}"\n'
    )
    listed = _cli("outbox", "--config", str(cfg), "list")
    assert listed.returncode == 0, listed.stderr
    assert " dead " in listed.stdout and "HTTP 503" in listed.stdout
    assert "triage           HOOK" in listed.stdout
    assert _cli("outbox", "--config", str(cfg), "retry", str(row.id)).returncode == 0
    webhook.status = 200
    assert sender.send_once().sent == [row.id]
    sender.stop()
    (doc,) = webhook.documents()
    assert doc["event"] == "not_analysed" and doc["priority"] == "routine"
    assert "series has 1 slice" in doc["finding"]["not_analysed_reason"]
    assert doc["finding"]["hemorrhage"] is None
    assert doc["patient"]["patient_id"]  # include_phi = true


# -- HL7 over MLLP -----------------------------------------------------------------


def _fields(text: str, segment: str) -> list[list[str]]:
    return [s.split("|") for s in text.split("\r") if s.startswith(segment + "|")]


def test_hl7_oru_acknowledged(tmp_path: Path, mllp: MllpListener) -> None:
    index = new_index(tmp_path)
    positive_id, positive = _add_sr(index, tmp_path, "positive")
    _add_sr(index, tmp_path, "negative")
    skipped_id, _ = _add_sr(index, tmp_path, "not_analysed")
    ris = NotificationSettings(
        name="ris",
        kind="hl7",
        host="127.0.0.1",
        port=mllp.port,
        on=["positive", "not_analysed"],
        include_phi=True,
        receiving_application="RIS",
    )
    mllp.start()
    sender = _sender(index, [ris])
    _until_sent(sender, index)
    sender.stop()
    rows = _notification_rows(index)
    assert [r.result_id for r in rows] == [positive_id, skipped_id]
    assert mllp.parse_errors == []
    assert len(mllp.messages) == 2
    by_id = {_fields(m, "MSH")[0][9]: m for m in mllp.messages}
    first = by_id[f"ICH{rows[0].id}"]
    msh = _fields(first, "MSH")[0]
    assert msh[8] == "ORU^R01^ORU_R01" and msh[11] == "2.5" and msh[4] == "RIS"
    obr = _fields(first, "OBR")[0]
    assert obr[3] == str(positive.AccessionNumber)  # filler order number: the accession
    assert obr[25] == "P"  # preliminary
    assert obr[27].split("^")[5] == "S"  # stat: the RIS moves the study up the worklist
    obx = _fields(first, "OBX")
    assert obx[0][3].startswith("1386000^") and obx[0][5] == "52101004^Present^SCT"
    assert obx[0][8] == "A"
    assert any(o[3].startswith("35486000^") for o in obx)  # subdural
    volumes = [o for o in obx if o[3].startswith("118565006^")]
    assert volumes and float(volumes[0][5]) > 0 and volumes[0][6].startswith("mL^")
    pid = _fields(first, "PID")[0]
    assert pid[5] == str(positive.PatientName)  # include_phi = true
    second = by_id[f"ICH{rows[1].id}"]
    assert _fields(second, "OBR")[0][27].split("^")[5] == "R"
    assert _fields(second, "OBX")[0][11] == "X"  # result cannot be obtained


def test_hl7_down_then_refused_then_accepted(tmp_path: Path, mllp: MllpListener) -> None:
    index = new_index(tmp_path)
    _add_sr(index, tmp_path, "positive")
    ris = NotificationSettings(name="ris", kind="hl7", host="127.0.0.1", port=mllp.port)
    sender = _sender(index, [ris], backoff_initial_seconds=0.1, backoff_max_seconds=0.2)
    outcome = sender.send_once()  # nobody listens
    (row,) = _notification_rows(index)
    assert outcome.retried == [row.id] and "ConnectionRefusedError" in (row.last_error or "")
    mllp.ack = "AE"
    mllp.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "MSA-1 AE" not in (
        _notification_rows(index)[0].last_error or ""
    ):
        sender.send_once()
        time.sleep(0.05)
    (row,) = _notification_rows(index)
    assert row.state == DeliveryState.PENDING and "MSA-1 AE: refused" in (row.last_error or "")
    mllp.ack = "AA"
    _until_sent(sender, index)
    sender.stop()
    (message,) = mllp.messages
    assert _fields(message, "MSH")[0][9] == f"ICH{row.id}"  # the same id on every try
    pid = _fields(message, "PID")[0]
    assert len(pid) <= 2 or all(not f for f in pid[2:])  # no PHI by default


def test_hl7_without_ack_is_not_delivered(tmp_path: Path, mllp: MllpListener) -> None:
    index = new_index(tmp_path)
    _add_sr(index, tmp_path, "positive")
    mllp.ack = ""
    mllp.start()
    ris = NotificationSettings(name="ris", kind="hl7", host="127.0.0.1", port=mllp.port)
    sender = _sender(index, [ris], timeout_seconds=1.0)
    (retried,) = sender.send_once().retried
    sender.stop()
    row = _rows(index)[retried]
    assert row.state == DeliveryState.PENDING and "no ACK within 1 s" in (row.last_error or "")


def test_result_to_acknowledged_latency(
    tmp_path: Path, webhook: WebhookReceiver, mllp: MllpListener
) -> None:
    """From the SR row committed to webhook 2xx and HL7 AA, with the sender thread running."""
    index = new_index(tmp_path)
    webhook.start()
    mllp.start()
    notifications = [
        NotificationSettings(name="hook", kind="webhook", url=f"http://127.0.0.1:{webhook.port}/"),
        NotificationSettings(name="ris", kind="hl7", host="127.0.0.1", port=mllp.port),
    ]
    sender = _sender(index, notifications)
    sender.start()
    waits = []
    try:
        for _ in range(5):
            before = {r.id for r in _notification_rows(index)}
            start = time.monotonic()
            _add_sr(index, tmp_path, "positive")
            while time.monotonic() - start < 10:
                new = [r for r in _notification_rows(index) if r.id not in before]
                if len(new) == 2 and all(r.state == DeliveryState.SENT for r in new):
                    break
                time.sleep(0.02)
            waits.append(time.monotonic() - start)
    finally:
        sender.stop()
    print(f"SR committed -> webhook 2xx and HL7 AA: {[round(w, 2) for w in waits]} s")
    assert max(waits) < 10
    assert len(webhook.received) == 5 and len(mllp.messages) == 5


def test_notification_names_do_not_clash_with_destinations(tmp_path: Path) -> None:
    from config.settings import ConfigError, load_settings

    cfg = tmp_path / "node.toml"
    cfg.write_text(
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
        '[[notifications]]\nname = "pacs"\nkind = "hl7"\nhost = "127.0.0.1"\nport = 2575\n'
    )
    with pytest.raises(ConfigError, match="used twice or by a destination"):
        load_settings(cfg)
    cfg.write_text('[[notifications]]\nname = "ris"\nkind = "hl7"\nurl = "http://x"\n')
    with pytest.raises(ConfigError, match="host and port"):
        load_settings(cfg)
    cfg.write_text('[[notifications]]\nname = "hook"\nkind = "webhook"\nurl = "http://x/"\n')
    (hook,) = load_settings(cfg).notifications
    assert hook.on == ["positive"] and hook.include_phi is False


# -- end to end: ichnode serve, Orthanc over DICOMweb, webhook and RIS ---------------


@pytest.mark.interop
@pytest.mark.slow
def test_serve_stow_rs_and_notifications_end_to_end(
    tmp_path: Path, webhook: WebhookReceiver, mllp: MllpListener
) -> None:
    """A phantom bleed sent by Orthanc to ``ichnode serve``: results come back by STOW-RS,
    the webhook and the RIS are told, and the time from the last instance is measured."""
    from tests.loop.conftest import make_study, register_node, result_series, send_to_node, upload
    from tests.loop.harness import NodeRunner, wait_for
    from tests.orthanc import running_orthanc

    bleed = make_study(tmp_path / "phantom", 103, ("intraparenchymal",), n_slices=24)
    webhook.start()
    mllp.start()
    with running_orthanc(tmp_path / "orthanc", dicomweb=True) as orthanc:
        extra = (
            f'\n[[destinations]]\nname = "archive"\nkind = "dicomweb"\n'
            f'url = "{orthanc.dicomweb_url}"\n'
            f'\n[[notifications]]\nname = "triage"\nkind = "webhook"\n'
            f'url = "http://127.0.0.1:{webhook.port}/ich"\n'
            f'\n[[notifications]]\nname = "ris"\nkind = "hl7"\nhost = "127.0.0.1"\n'
            f"port = {mllp.port}\n"
        )
        node = NodeRunner(tmp_path / "node", [], quiet_seconds=3.0, extra_toml=extra)
        node.start()
        try:
            register_node(orthanc, node.ae_title, node.port)
            ids = upload(orthanc, bleed.files)
            study = orthanc.find_study(bleed.study_instance_uid)
            assert study is not None and len(ids) == 24
            send_to_node(orthanc, [study])
            last_instance = time.monotonic()  # Orthanc's C-STORE is synchronous
            wait_for("webhook and HL7 ACK", lambda: webhook.received and mllp.messages, 240)
            latency = time.monotonic() - last_instance
            wait_for(
                "every delivery acknowledged",
                lambda: (
                    (rows := node.deliveries()) and all(r.state == DeliveryState.SENT for r in rows)
                ),
                120,
            )
            deliveries = node.deliveries()
        finally:
            node.stop()
        found = result_series(orthanc, bleed.study_instance_uid)
    print(f"last instance -> webhook 2xx and HL7 AA: {latency:.1f} s")
    assert "SR" in found  # STOW-RS put the results into the source study
    by_destination: dict[str, int] = {}
    for row in deliveries:
        by_destination[row.destination] = by_destination.get(row.destination, 0) + 1
    assert by_destination["triage"] == 1 and by_destination["ris"] == 1
    assert by_destination["archive"] == sum(len(v) for v in found.values())
    (doc,) = webhook.documents()
    assert doc["series_instance_uid"] == bleed.series_instance_uid
    assert doc["event"] == "positive" and doc["finding"]["hemorrhage"] is True
    assert doc["links"]["dicomweb_study"] == [
        f"{orthanc.dicomweb_url}/studies/{bleed.study_instance_uid}"
    ]
    (message,) = mllp.messages
    assert _fields(message, "OBR")[0][27].split("^")[5] == "S"
