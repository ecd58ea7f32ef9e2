"""Triage notifications: a webhook (JSON over HTTP POST) or an HL7 v2 ORU^R01 over MLLP.

A notification is durable like a delivery: it is a ``deliveries`` row whose
result is the series' SR and whose destination is the ``[[notifications]]``
entry's name, so it shares the outbox's backoff, dead letter and
``ichnode outbox list|retry``. :func:`enqueue_notifications` (called by the
sender, never by the worker) finds new SRs, reads their finding and adds a
row for every notification whose ``on`` list names it (``positive``,
``negative``, ``not_analysed``). The sender then calls :meth:`WebhookLink.send`
or :meth:`Hl7Link.send`, which read the SR again and build the message; the
formats are documented in ``docs/NOTIFICATIONS.md``.

Patient name, ID, birth date and sex go into a notification only with
``include_phi = true``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import and_, exists, or_, select

from config.settings import NotificationSettings
from node.dicomweb import PinnedVerifySession
from storage.index import Index
from storage.models import Delivery, Result, ResultKind, Series
from storage.outbox import Outbox

logger = logging.getLogger(__name__)

SCHEMA = "ichnode.notification/1"
SUBTYPE_NAMES = ("intraparenchymal", "intraventricular", "subarachnoid", "subdural", "epidural")
#: The statement prefix of a "not analysed" report (node.results.NOT_ANALYSED).
NOT_ANALYSED = "not analysed"

# MLLP framing (HL7 v2 Minimal Lower Layer Protocol): <VT> message <FS><CR>.
MLLP_START = b"\x0b"
MLLP_END = b"\x1c\x0d"
#: ACK codes that mean the RIS took the message (original and enhanced mode).
HL7_ACCEPTED = {"AA", "CA"}


# -- reading the SR -----------------------------------------------------------


@dataclass
class Notice:
    """What a notification says about one analysed (or not analysed) series."""

    event: str  # positive | negative | not_analysed
    study_instance_uid: str
    series_instance_uid: str  # the source CT series
    accession_number: str
    report_sop_instance_uid: str
    report_series_instance_uid: str
    hemorrhage: bool | None
    probability: float | None
    subtypes: dict[str, dict[str, Any]] = field(default_factory=dict)
    reason: str | None = None
    patient: dict[str, str] = field(default_factory=dict)
    study_description: str = ""
    algorithm: str = ""


def read_notice(sr_path: Path, series_instance_uid: str) -> Notice:
    """Read the finding of an ichnode TID 1500 SR (or its "not analysed" statement).

    Raises
    ------
    ValueError
        When the file is not a readable ichnode SR.
    """
    try:
        ds = dcmread(sr_path)
    except (OSError, InvalidDicomError) as exc:
        raise ValueError(f"cannot read the report {sr_path}: {exc}") from exc
    from node.results import read_report  # highdicom only where an SR is read

    try:
        reading = read_report(ds)
    except ValueError as exc:
        raise ValueError(f"{sr_path}: {exc}") from exc
    presence, probability, volume = reading.presence, reading.probability, reading.volume_ml
    reason = reading.not_analysed
    if "any" in presence:
        event = "positive" if presence["any"] else "negative"
        reason = None
    elif reason is not None:
        event = "not_analysed"
    else:
        raise ValueError(f"{sr_path} states no intracranial hemorrhage finding")
    subtypes = {
        name: {
            "present": presence[name],
            "probability": probability.get(name),
            "volume_ml": volume.get(name),
        }
        for name in SUBTYPE_NAMES
        if name in presence
    }
    patient = {
        "patient_id": str(ds.get("PatientID", "")),
        "patient_name": str(ds.get("PatientName", "")),
        "birth_date": str(ds.get("PatientBirthDate", "")),
        "sex": str(ds.get("PatientSex", "")),
    }
    return Notice(
        event=event,
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=series_instance_uid,
        accession_number=str(ds.get("AccessionNumber", "")),
        report_sop_instance_uid=str(ds.SOPInstanceUID),
        report_series_instance_uid=str(ds.SeriesInstanceUID),
        hemorrhage=presence.get("any"),
        probability=probability.get("any"),
        subtypes=subtypes,
        reason=reason,
        patient=patient,
        study_description=str(ds.get("StudyDescription", "")),
        algorithm=" ".join(str(v) for v in (ds.get("SoftwareVersions") or [])),
    )


def event_of(sr_path: Path) -> str | None:
    """``positive``, ``negative`` or ``not_analysed`` for an SR file; None when unreadable."""
    try:
        return read_notice(sr_path, "").event
    except ValueError as exc:
        logger.warning("no notification for %s: %s", sr_path, exc)
        return None


# -- the webhook document -------------------------------------------------------


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def priority_of(notice: Notice) -> str:
    """``urgent`` for a positive finding, ``routine`` otherwise."""
    return "urgent" if notice.event == "positive" else "routine"


def webhook_document(
    notice: Notice,
    settings: NotificationSettings,
    notification_id: str,
    dicomweb_urls: Sequence[str] = (),
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """The JSON document a webhook receives (see docs/NOTIFICATIONS.md)."""
    now = now or dt.datetime.now(dt.UTC)
    fill = {
        "study_instance_uid": notice.study_instance_uid,
        "series_instance_uid": notice.series_instance_uid,
        "accession_number": notice.accession_number,
    }
    links: dict[str, Any] = {
        "dicomweb_study": [
            f"{u.rstrip('/')}/studies/{notice.study_instance_uid}" for u in dicomweb_urls
        ]
    }
    if settings.viewer_url:
        links["viewer"] = settings.viewer_url.format(**fill)
    return {
        "schema": SCHEMA,
        "id": notification_id,
        "sent_at": now.isoformat(timespec="seconds"),
        "event": notice.event,
        "priority": priority_of(notice),
        "study_instance_uid": notice.study_instance_uid,
        "series_instance_uid": notice.series_instance_uid,
        "accession_number": notice.accession_number,
        "finding": {
            "hemorrhage": notice.hemorrhage,
            "probability": _round(notice.probability, 4),
            "not_analysed_reason": notice.reason,
        },
        "subtypes": {
            name: {
                "present": value["present"],
                "probability": _round(value["probability"], 4),
                "volume_ml": _round(value["volume_ml"], 2),
            }
            for name, value in notice.subtypes.items()
        },
        "report": {
            "sop_instance_uid": notice.report_sop_instance_uid,
            "series_instance_uid": notice.report_series_instance_uid,
        },
        "links": links,
        "algorithm": notice.algorithm,
        "patient": dict(notice.patient) if settings.include_phi else None,
    }


# -- the HL7 v2.5 ORU^R01 ---------------------------------------------------------


def hl7_escape(text: str) -> str:
    """Escape HL7 delimiters in a text value (HL7 v2 2.7: \\F\\ \\S\\ \\T\\ \\R\\ \\E\\)."""
    out = text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
    out = out.replace("~", "\\R\\").replace("&", "\\T\\")
    return " ".join(out.split())  # no CR/LF inside a field


def _ts(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S+0000")


_PRESENT = "52101004^Present^SCT"
_ABSENT = "272519000^Absent^SCT"
_ICH = "1386000^Intracranial hemorrhage^SCT"
_VOLUME = "118565006^Volume^SCT"
_PROBABILITY = "ICH-PROB^Probability of intracranial hemorrhage^99ICHNODE"
_SERVICE = "ICH-AI^Intracranial hemorrhage AI triage^99ICHNODE"
_SUMMARY = "ICH-SUMMARY^AI triage summary^99ICHNODE"


def _subtype_code(name: str) -> str:
    from node.results import SUBTYPE_CODES

    code = SUBTYPE_CODES[name]
    return f"{code.value}^{hl7_escape(code.meaning)}^SCT"


def summary_text(notice: Notice) -> str:
    """One line for a person: what was found, how sure, how much."""
    if notice.event == "not_analysed":
        return f"ICH AI: {notice.reason or NOT_ANALYSED}. Read the study as usual."
    if notice.event == "negative":
        prob = f" (p={notice.probability:.2f})" if notice.probability is not None else ""
        return f"ICH AI: no intracranial hemorrhage detected{prob}. Not a diagnosis."
    found = [
        f"{name} {v['volume_ml']:.1f} mL" if v.get("volume_ml") is not None else name
        for name, v in notice.subtypes.items()
        if v["present"]
    ]
    prob = f" (p={notice.probability:.2f})" if notice.probability is not None else ""
    what = ", ".join(found) if found else "subtype not determined"
    return f"ICH AI: intracranial hemorrhage suspected{prob}: {what}. Prioritise the read."


def oru_message(
    notice: Notice, settings: NotificationSettings, control_id: str, now: dt.datetime | None = None
) -> str:
    """The HL7 v2.5 ORU^R01 of a notice, ER7-encoded (segments separated by CR)."""
    from hl7apy.core import Message

    now = now or dt.datetime.now(dt.UTC)
    msg = Message("ORU_R01", version="2.5")
    msg.msh.msh_3 = hl7_escape(settings.sending_application)
    msg.msh.msh_4 = hl7_escape(settings.sending_facility)
    msg.msh.msh_5 = hl7_escape(settings.receiving_application)
    msg.msh.msh_6 = hl7_escape(settings.receiving_facility)
    msg.msh.msh_7 = _ts(now)
    msg.msh.msh_9 = "ORU^R01^ORU_R01"
    msg.msh.msh_10 = control_id
    msg.msh.msh_11 = "P"
    msg.msh.msh_12 = "2.5"
    result = msg.add_group("ORU_R01_PATIENT_RESULT")
    pid = result.add_group("ORU_R01_PATIENT").pid
    pid.pid_1 = "1"
    if settings.include_phi:
        patient = notice.patient
        if patient.get("patient_id"):
            pid.pid_3 = hl7_escape(patient["patient_id"])
        if patient.get("patient_name"):
            pid.pid_5 = "^".join(hl7_escape(p) for p in patient["patient_name"].split("^")[:5])
        if patient.get("birth_date"):
            pid.pid_7 = hl7_escape(patient["birth_date"])
        if patient.get("sex"):
            pid.pid_8 = hl7_escape(patient["sex"])
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    obr = order.obr
    accession = hl7_escape(notice.accession_number)
    obr.obr_1 = "1"
    if accession:
        obr.obr_3 = accession  # filler order number: the accession number
        obr.obr_18 = accession  # placer field 1: the accession number (IHE radiology)
    obr.obr_4 = _SERVICE
    obr.obr_7 = _ts(now)
    obr.obr_22 = _ts(now)
    obr.obr_25 = "P"  # preliminary: an AI triage result, not the radiologist's report
    obr.obr_27 = "^^^^^" + ("S" if notice.event == "positive" else "R")  # TQ priority
    observations: list[tuple[str, str, str, str, str, str, str]] = []
    # (value type, identifier, sub-id, value, units, abnormal flag, status)
    if notice.event == "not_analysed":
        observations.append(
            ("ST", _ICH, "", hl7_escape(notice.reason or NOT_ANALYSED), "", "", "X")
        )
    else:
        flag = "A" if notice.hemorrhage else "N"
        observations.append(
            ("CWE", _ICH, "", _PRESENT if notice.hemorrhage else _ABSENT, "", flag, "P")
        )
        if notice.probability is not None:
            observations.append(
                ("NM", _PROBABILITY, "", f"{notice.probability:.4f}", "1^no units^UCUM", "", "P")
            )
        for n, (name, value) in enumerate(notice.subtypes.items(), start=1):
            if not value["present"]:
                continue
            observations.append(("CWE", _subtype_code(name), str(n), _PRESENT, "", "A", "P"))
            if value.get("volume_ml") is not None:
                observations.append(
                    (
                        "NM",
                        _VOLUME,
                        str(n),
                        f"{value['volume_ml']:.2f}",
                        "mL^milliliter^UCUM",
                        "",
                        "P",
                    )
                )
    observations.append(("ST", _SUMMARY, "", hl7_escape(summary_text(notice)), "", "", "P"))
    for set_id, (kind, ident, sub_id, text, units, flag, status) in enumerate(observations, 1):
        obx = order.add_group("ORU_R01_OBSERVATION").obx
        obx.obx_1 = str(set_id)
        obx.obx_2 = kind
        obx.obx_3 = ident
        if sub_id:
            obx.obx_4 = sub_id
        obx.obx_5 = text
        if units:
            obx.obx_6 = units
        if flag:
            obx.obx_8 = flag
        obx.obx_11 = status
        obx.obx_14 = _ts(now)
    return str(msg.to_er7())


def mllp_frame(message: str) -> bytes:
    """Wrap an ER7 message in MLLP: 0x0B, the message, 0x1C 0x0D."""
    return MLLP_START + message.encode("utf-8") + MLLP_END


def read_mllp(sock: socket.socket, limit: int = 1 << 20) -> str:
    """Read one MLLP-framed message from ``sock`` (its own timeout applies)."""
    buffer = b""
    while MLLP_END not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the end of the MLLP frame")
        buffer += chunk
        if len(buffer) > limit:
            raise ValueError("MLLP frame too long")
    start = buffer.find(MLLP_START)
    end = buffer.find(MLLP_END)
    if start < 0 or start > end:
        raise ValueError("MLLP frame without its start byte 0x0B")
    return buffer[start + 1 : end].decode("utf-8", errors="replace")


def ack_status(ack: str, control_id: str) -> tuple[bool, str]:
    """Whether an HL7 ACK accepts the message ``control_id``: MSA-1 AA (or CA), MSA-2 ours."""
    segments = [s for s in ack.replace("\n", "\r").split("\r") if s]
    msa = next((s for s in segments if s.startswith("MSA")), None)
    if msa is None:
        return False, "HL7 answer without an MSA segment"
    fields = msa.split("|")
    code = fields[1] if len(fields) > 1 else ""
    acked = fields[2] if len(fields) > 2 else ""
    text = fields[3] if len(fields) > 3 else ""
    err = next((s for s in segments if s.startswith("ERR")), "")
    if code not in HL7_ACCEPTED:
        detail = "; ".join(x for x in (text, err) if x)
        return False, f"HL7 ACK MSA-1 {code or '(empty)'}" + (f": {detail}" if detail else "")
    if acked != control_id:
        return False, f"HL7 ACK for message {acked!r}, not {control_id!r}"
    return True, ""


# -- the links -------------------------------------------------------------------


class WebhookLink:
    """HTTP POST of the JSON document; a 2xx answer is the acknowledgement."""

    def __init__(
        self, settings: NotificationSettings, timeout: float, dicomweb_urls: Sequence[str] = ()
    ) -> None:
        self.settings = settings
        self.timeout = timeout
        self.dicomweb_urls = list(dicomweb_urls)
        self.reachable = True
        self._http: requests.Session | None = None

    def _session(self) -> requests.Session:
        if self._http is None:
            http = PinnedVerifySession()
            if not self.settings.tls_verify:
                http.verify = False
            elif self.settings.tls_ca_file is not None:
                http.verify = str(self.settings.tls_ca_file)
            if self.settings.token is not None:
                http.headers["Authorization"] = f"Bearer {self.settings.token.get_secret_value()}"
            self._http = http
        return self._http

    def send(self, notice: Notice, notification_id: str) -> tuple[bool, str]:
        """POST the document; return ``(acknowledged, error text)``."""
        document = webhook_document(notice, self.settings, notification_id, self.dicomweb_urls)
        where = f"webhook {self.settings.url}"
        try:
            response = self._session().post(
                self.settings.url,
                data=json.dumps(document).encode(),
                headers={
                    "Content-Type": "application/json",
                    "Idempotency-Key": notification_id,
                },
                timeout=self.timeout,
            )
        except requests.Timeout:
            self.release()
            self.reachable = False
            return False, f"{where}: no answer within {self.timeout:g} s"
        except requests.ConnectionError as exc:
            self.release()
            self.reachable = False
            return False, f"{where}: cannot connect ({type(exc).__name__})"
        except requests.RequestException as exc:
            self.release()
            self.reachable = False
            return False, f"{where}: {type(exc).__name__}: {exc}"
        if 200 <= response.status_code < 300:
            self.reachable = True
            return True, ""
        self.reachable = False
        return False, f"{where}: HTTP {response.status_code} {response.reason}".rstrip()

    def release(self) -> None:
        """Close the kept-alive connections."""
        if self._http is not None:
            self._http.close()
        self._http = None


class Hl7Link:
    """ORU^R01 over MLLP: one connection per message, acknowledged by MSA|AA."""

    def __init__(self, settings: NotificationSettings, timeout: float) -> None:
        self.settings = settings
        self.timeout = timeout
        self.reachable = True

    def send(self, notice: Notice, notification_id: str) -> tuple[bool, str]:
        """Send the message and wait for its ACK; return ``(accepted, error text)``."""
        control_id = notification_id[:20]  # MSH-10 is ST(20)
        message = oru_message(notice, self.settings, control_id)
        where = f"HL7 to {self.settings.host}:{self.settings.port}"
        assert self.settings.port is not None  # an hl7 notification has one (settings)
        try:
            with socket.create_connection(
                (self.settings.host, self.settings.port), timeout=self.timeout
            ) as sock:
                sock.settimeout(self.timeout)
                sock.sendall(mllp_frame(message))
                ack = read_mllp(sock)
        except TimeoutError:
            self.reachable = False
            return False, f"{where}: no ACK within {self.timeout:g} s"
        except (OSError, ValueError) as exc:
            self.reachable = False
            return False, f"{where}: {type(exc).__name__}: {exc}"
        self.reachable = True
        ok, reason = ack_status(ack, control_id)
        return ok, "" if ok else f"{where}: {reason}"

    def release(self) -> None:
        """Nothing is kept open between messages."""


NotifierLink = WebhookLink | Hl7Link


def notification_id(delivery_id: int) -> str:
    """The stable id of one notification (the same on every retry): ``ICH<delivery id>``."""
    return f"ICH{delivery_id}"


# -- enqueueing -------------------------------------------------------------------


class NotificationQueue:
    """Adds a notification row for every new SR whose finding a notification asks for.

    Looks at SRs created within ``max_age`` that are not superseded and lack
    a row for one of the notifications. Each SR file is read once per
    process (its event is remembered); the unique (result, destination)
    constraint keeps two processes from adding the same row twice.
    """

    def __init__(
        self,
        outbox: Outbox,
        notifications: Sequence[NotificationSettings],
        max_age: dt.timedelta,
    ) -> None:
        self.outbox = outbox
        self.index = outbox.index
        self.notifications = list(notifications)
        self.max_age = max_age
        self._events: dict[int, str | None] = {}

    def enqueue(self, now: dt.datetime) -> list[int]:
        """Add the rows due; return their delivery ids."""
        if not self.notifications:
            return []
        names = [n.name for n in self.notifications]
        cutoff = now - self.max_age
        with self.index.session(readonly=True) as session:
            missing = [
                ~exists().where(and_(Delivery.result_id == Result.id, Delivery.destination == n))
                for n in names
            ]
            rows = session.execute(
                select(Result.id, Result.path)
                .where(
                    Result.kind == ResultKind.SR,
                    Result.superseded.is_(False),
                    Result.created_at >= cutoff,
                    or_(*missing),
                )
                .order_by(Result.id)
            ).all()
            have = {
                (r[0], r[1])
                for r in session.execute(
                    select(Delivery.result_id, Delivery.destination).where(
                        Delivery.result_id.in_([r[0] for r in rows]),
                        Delivery.destination.in_(names),
                    )
                )
            }
        # Remember only what is still waiting (a result drops out once it has its rows).
        self._events = {r[0]: self._events[r[0]] for r in rows if r[0] in self._events}
        added: list[int] = []
        for result_id, path in rows:
            if result_id not in self._events:
                self._events[result_id] = event_of(Path(path))
            event = self._events[result_id]
            if event is None:
                continue
            for n in self.notifications:
                if event not in n.on or (result_id, n.name) in have:
                    continue
                delivery_id = self._add(result_id, n.name, now)
                if delivery_id is not None:
                    added.append(delivery_id)
                    logger.info(
                        "notification %s (%s) queued for result %s as delivery %s",
                        n.name,
                        event,
                        result_id,
                        delivery_id,
                    )
        return added

    def _add(self, result_id: int, name: str, now: dt.datetime) -> int | None:
        # None: another sender added it first (unique result and destination).
        return self.outbox.add_once(result_id, name, now)


def source_series_uid(index: Index, result_id: int) -> str:
    """The Series Instance UID of the CT series a result answers."""
    with index.session(readonly=True) as session:
        uid = session.execute(
            select(Series.series_instance_uid)
            .join(Result, Result.series_id == Series.id)
            .where(Result.id == result_id)
        ).scalar_one_or_none()
    return str(uid or "")
