"""The index of ichnode: a typed repository API over the SQLAlchemy models.

``Index(url)`` owns one engine and one sessionmaker for the life of the
process (never one per C-STORE). Other packages import it:

>>> index = Index("sqlite:///ichnode-data/index.sqlite")
>>> index.upgrade()                      # Alembic, to the newest revision
>>> with index.session() as session:     # commits on success, rolls back on error
...     ...

SQLite settings and why
-----------------------
Every connection gets ``journal_mode=WAL`` (readers never block the writer),
``busy_timeout`` (other processes such as the UI wait instead of failing),
``foreign_keys=ON`` and ``synchronous`` from ``storage.sqlite_synchronous``.
ichnode chooses ``NORMAL`` by default: in WAL mode a commit is written to the
WAL before COMMIT returns, so a row whose C-STORE got success survives a crash
or SIGKILL of the process (``tests/node/test_serve.py`` kills the
node right after a success and checks); only a power loss can drop the last
commits (the WAL is fsynced at checkpoints, not at every commit). The archive
file itself is always fsynced before the success, and the next start indexes
files whose rows were lost that way (``storage/recovery.py``). ``FULL`` fsyncs the WAL at
every commit as well (power-loss safe index); it costs one more fsync per
instance, which serialises all associations behind the index lock (measured in
``bench/ingest.py``). The C-STORE path on SQLite uses plain DB-API statements
(two statements and a commit per instance) rather than the ORM, which cost
several milliseconds of CPU per instance. Write sessions start with
``BEGIN IMMEDIATE`` so two writers never deadlock on a lock upgrade; in-process
writers are also serialised by a lock, so threads queue in Python rather than
spin on ``SQLITE_BUSY``.

PostgreSQL
----------
``postgresql+psycopg://user@host/db`` works with the same code: the same
Alembic migrations (under an advisory lock, so processes starting together
migrate once), the SQLAlchemy path for instances, and the claims of
:mod:`storage.queue` with ``FOR UPDATE SKIP LOCKED``, so several processes and
machines share one index. Connections are checked before use
(``pool_pre_ping``): after a server restart the next session gets a new
connection instead of an error; while the server is down a session raises
``OperationalError`` (the receiver answers a failure status, nothing is
acknowledged). ``busy_timeout_ms`` is the connect timeout there.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import DateTime, Engine, create_engine, event, func, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

from storage.models import (
    AssociationOutcome,
    AssociationRecord,
    Delivery,
    DeliveryState,
    Instance,
    Patient,
    Result,
    Series,
    SeriesStatus,
    Study,
    utcnow,
)
from storage.runtime import process_gone, process_id

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

logger = logging.getLogger(__name__)
# Alembic (imported only when migrations run) logs a line per plugin and per context at INFO on every start; the
# index logs the revision it reached itself.
logging.getLogger("alembic").setLevel(logging.WARNING)

MIGRATIONS = Path(__file__).with_name("migrations")
# Tries of one instance on PostgreSQL when another process inserted the same
# patient, study or series concurrently (a unique violation).
_RECORD_ATTEMPTS = 3
# The PostgreSQL advisory lock key that serialises migrations ("ichn" in ASCII).
_MIGRATION_LOCK = 0x6963686E


def _owner_key(meta: InstanceMeta) -> tuple[str, str, str]:
    return (meta.study_instance_uid, meta.patient_id, meta.issuer_of_patient_id)

# The row of a known SOP Instance UID with the study, series and patient it
# belongs to (the re-send path of the SQLite C-STORE hot path).
_OWNER_SQL = (
    "SELECT i.id, i.path, st.study_instance_uid, se.series_instance_uid,"
    " p.patient_id, p.issuer_of_patient_id"
    " FROM instances i JOIN series se ON se.id = i.series_id"
    " JOIN studies st ON st.id = se.study_pk JOIN patients p ON p.id = st.patient_pk"
    " WHERE i.sop_instance_uid = ?"
)
Synchronous = Literal["FULL", "NORMAL", "EXTRA"]


class MissingAttributeError(ValueError):
    """An instance lacks an attribute the index needs (a UID)."""


class InvalidAttributeError(ValueError):
    """An attribute the index keys on is longer than its VR allows.

    Such a value is refused, never shortened: two values that differ only
    after the limit would otherwise name one row.
    """


#: Attributes the index keys on: field, DICOM keyword, and the longest value
#: their VR allows (PS3.5 6.2: UI 64 characters, LO 64 characters).
KEYED_ATTRIBUTES: tuple[tuple[str, str, int], ...] = (
    ("sop_instance_uid", "SOPInstanceUID", 64),
    ("sop_class_uid", "SOPClassUID", 64),
    ("study_instance_uid", "StudyInstanceUID", 64),
    ("series_instance_uid", "SeriesInstanceUID", 64),
    ("patient_id", "PatientID", 64),
    ("issuer_of_patient_id", "IssuerOfPatientID", 64),
)


@dataclass(frozen=True)
class InstanceMeta:
    """What the index keeps of one instance, taken from its header.

    Only the three UIDs, the SOP Class UID and the transfer syntax are required;
    every other attribute may be empty.
    """

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""
    accession_number: str = ""
    study_id: str = ""
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    body_part_examined: str = ""
    instance_number: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "sop_instance_uid",
            "sop_class_uid",
            "transfer_syntax_uid",
            "study_instance_uid",
            "series_instance_uid",
        ):
            if not getattr(self, name):
                raise MissingAttributeError(f"{name} is missing or empty")
        for name, keyword, limit in KEYED_ATTRIBUTES:
            length = len(getattr(self, name))
            if length > limit:
                raise InvalidAttributeError(
                    f"{keyword} has {length} characters (at most {limit}); refused, never shortened"
                )

    @classmethod
    def from_dataset(
        cls, ds: Any, *, sop_class_uid: str = "", transfer_syntax_uid: str
    ) -> InstanceMeta:
        """Build from a pydicom dataset (only the header is read).

        Parameters
        ----------
        ds : pydicom.dataset.Dataset
            The received dataset.
        sop_class_uid : str
            Fallback when the dataset has no SOP Class UID.
        transfer_syntax_uid : str
            The transfer syntax the dataset arrived in.

        Raises
        ------
        MissingAttributeError
            When a required UID is missing or empty.
        InvalidAttributeError
            When a UID, the Patient ID or its issuer is longer than its VR allows.
        """

        def text(keyword: str, limit: int | None = 64) -> str:
            """The value, stripped; display-only values are cut to ``limit``.

            Values the index keys on pass ``limit=None``: they are kept whole
            (and refused in ``__post_init__`` when too long).
            """
            value = ds.get(keyword, "")
            stripped = "" if value is None else str(value).strip()
            return stripped if limit is None else stripped[:limit]

        def integer(keyword: str) -> int | None:
            value = ds.get(keyword)
            try:
                return int(value) if value not in (None, "") else None
            except (TypeError, ValueError):
                return None

        return cls(
            sop_instance_uid=text("SOPInstanceUID", None),
            sop_class_uid=text("SOPClassUID", None) or sop_class_uid,
            transfer_syntax_uid=transfer_syntax_uid,
            study_instance_uid=text("StudyInstanceUID", None),
            series_instance_uid=text("SeriesInstanceUID", None),
            patient_id=text("PatientID", None),
            issuer_of_patient_id=text("IssuerOfPatientID", None),
            patient_name=text("PatientName", 324),
            patient_birth_date=text("PatientBirthDate", 8),
            patient_sex=text("PatientSex", 16),
            study_date=text("StudyDate", 8),
            study_time=text("StudyTime", 16),
            study_description=text("StudyDescription"),
            accession_number=text("AccessionNumber", 16),
            study_id=text("StudyID", 16),
            modality=text("Modality", 16),
            series_number=integer("SeriesNumber"),
            series_description=text("SeriesDescription"),
            body_part_examined=text("BodyPartExamined", 16),
            instance_number=integer("InstanceNumber"),
        )


@dataclass(frozen=True)
class InstanceOwner:
    """The patient, study and series an indexed instance belongs to."""

    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str

    def conflict_with(self, meta: InstanceMeta) -> str | None:
        """Why ``meta`` (a re-send of the same SOP Instance UID) cannot replace it, or ``None``.

        A re-send that names another study, or another patient (Patient ID and
        its issuer), is a different object under a reused UID. A re-send into
        another series of the same study and patient is allowed (it moves).
        """
        if meta.study_instance_uid != self.study_instance_uid:
            return "another study"
        if (meta.patient_id, meta.issuer_of_patient_id) != (
            self.patient_id,
            self.issuer_of_patient_id,
        ):
            return "another patient"
        return None


class UIDConflictError(Exception):
    """A UID the index keys on already names rows of another patient or study.

    ``keyword`` is the UID's DICOM keyword; ``stored`` where the index has it.
    Nothing was written to the index.
    """

    def __init__(self, keyword: str, uid: str, stored: InstanceOwner, reason: str) -> None:
        super().__init__(f"{keyword} {uid} is already stored under {reason}")
        self.keyword = keyword
        self.uid = uid
        self.stored = stored
        self.reason = reason


class InstanceConflictError(UIDConflictError):
    """A re-sent SOP Instance UID names another patient or study than the stored instance."""

    def __init__(self, sop_instance_uid: str, stored: InstanceOwner, reason: str) -> None:
        super().__init__("SOPInstanceUID", sop_instance_uid, stored, reason)
        self.sop_instance_uid = sop_instance_uid


@dataclass(frozen=True)
class RecordedInstance:
    """The outcome of :meth:`Index.record_instance`.

    ``previous_path`` is the file of an earlier copy when a re-send moved the
    instance to a different path (the caller may delete it), else ``None``.
    """

    instance_id: int
    series_id: int
    study_id: int
    resent: bool
    previous_path: str | None = None


@dataclass(frozen=True)
class SeriesSummary:
    """One series as ``ichnode studies`` shows it."""

    series_instance_uid: str
    modality: str
    series_description: str
    instances: int
    status: str
    reason: str | None
    hemorrhage: bool | None
    deliveries: dict[str, str] = field(default_factory=dict)
    series_id: int = 0
    series_number: int | None = None
    last_instance_at: dt.datetime | None = None


@dataclass(frozen=True)
class StudySummary:
    """One study with its series, as ``ichnode studies`` shows it."""

    study_instance_uid: str
    patient_id: str
    study_date: str
    study_description: str
    series: list[SeriesSummary]
    patient_name: str = ""
    accession_number: str = ""

    def to_json(self) -> dict[str, Any]:
        """Return the document of DESIGN.md (``ichnode studies --json``), one study."""
        return {
            "study_instance_uid": self.study_instance_uid,
            "patient_id": self.patient_id,
            "study_date": self.study_date,
            "study_description": self.study_description,
            "series": [
                {
                    "series_instance_uid": s.series_instance_uid,
                    "modality": s.modality,
                    "series_description": s.series_description,
                    "instances": s.instances,
                    "status": s.status,
                    "reason": s.reason,
                    "hemorrhage": s.hemorrhage,
                    "deliveries": dict(s.deliveries),
                }
                for s in self.series
            ],
        }


@dataclass(frozen=True)
class InstanceFile:
    """One stored instance of a series: where its file is."""

    sop_instance_uid: str
    instance_number: int | None
    path: str
    transfer_syntax_uid: str
    size: int


def _sqlite_pragmas(synchronous: Synchronous, busy_timeout_ms: int) -> Any:
    def on_connect(dbapi_connection: Any, connection_record: ConnectionPoolEntry) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN, so we choose its kind.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute(f"PRAGMA synchronous = {synchronous}")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    return on_connect


def _sqlite_begin(conn: Any) -> None:
    mode = conn.get_execution_options().get("ichnode_begin", "IMMEDIATE")
    conn.exec_driver_sql("BEGIN IMMEDIATE" if mode == "IMMEDIATE" else "BEGIN")


def _aggregate_delivery(states: list[str]) -> str:
    for state in (DeliveryState.DEAD, DeliveryState.PENDING):
        if state.value in states:
            return state.value
    return DeliveryState.SENT.value


class Index:
    """The index database: engine, sessions, migrations and the repository API.

    Parameters
    ----------
    url : str
        SQLAlchemy URL, e.g. ``sqlite:///ichnode-data/index.sqlite`` or
        ``postgresql+psycopg://ichnode@db.example.org/ichnode`` (``postgresql://``
        means the same). Other databases are refused with ``ValueError``.
    sqlite_synchronous : {"FULL", "NORMAL", "EXTRA"}
        ``PRAGMA synchronous`` for SQLite (see the module docstring).
    busy_timeout_ms : int
        How long a SQLite connection waits for a lock held by another process;
        on PostgreSQL, the connect timeout (rounded to seconds).
    """

    def __init__(
        self,
        url: str,
        *,
        sqlite_synchronous: Synchronous = "NORMAL",
        busy_timeout_ms: int = 30_000,
    ) -> None:
        parsed = make_url(url)
        backend = parsed.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(
                f"storage.database_url: the index runs on SQLite or PostgreSQL, not {backend!r}"
            )
        if parsed.drivername == "postgresql":
            # Plain postgresql:// would mean psycopg2; ichnode ships psycopg (3).
            parsed = parsed.set(drivername="postgresql+psycopg")
            url = parsed.render_as_string(hide_password=False)
        self.url = url
        self.is_sqlite = backend == "sqlite"
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            database = parsed.database
            if database and database != ":memory:" and not database.startswith("file:"):
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy_timeout_ms / 1000}
        else:
            # A pooled connection the server dropped (restart, fail-over, idle
            # timeout) is noticed and replaced before a session uses it.
            kwargs["pool_pre_ping"] = True
            kwargs["connect_args"] = {
                "application_name": "ichnode",
                "connect_timeout": max(1, round(busy_timeout_ms / 1000)),
            }
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(
                self.engine, "connect", _sqlite_pragmas(sqlite_synchronous, busy_timeout_ms)
            )
            event.listen(self.engine, "begin", _sqlite_begin)
        self._read_engine = self.engine.execution_options(ichnode_begin="DEFERRED")
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(self._read_engine, expire_on_commit=False)
        # Re-entrant, so a nested write session fails with SQLite's busy timeout
        # (a clear error) instead of hanging on this lock.
        self._write_lock = threading.RLock()
        # series_instance_uid -> (series id, study id) of committed rows, with
        # the (study UID, patient ID, issuer) they belong to; saves a SELECT per
        # instance on the C-STORE path.
        self._series_cache: dict[str, tuple[int, int, tuple[str, str, str]]] = {}
        processor = DateTime().dialect_impl(self.engine.dialect).bind_processor(self.engine.dialect)
        self._sqlite_datetime: Callable[[Any], Any] = processor or (lambda value: value)

    # -- lifecycle -----------------------------------------------------------

    def _alembic_config(self) -> AlembicConfig:
        from alembic.config import Config as AlembicConfig

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        return cfg

    def upgrade(self, revision: str = "head") -> None:
        """Create or upgrade the schema with the Alembic migrations."""
        from alembic import command

        cfg = self._alembic_config()
        with self._write_lock, self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Processes starting together on one database migrate one after
                # the other; the later ones find the schema at head.
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
        logger.info("index schema at revision %s (%s)", self.current_revision(), self._safe_url())

    def downgrade(self, revision: str = "base") -> None:
        """Step the schema back to ``revision`` (``"base"``: no tables); for tests and repairs."""
        from alembic import command

        cfg = self._alembic_config()
        with self._write_lock, self.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, revision)
        self._series_cache.clear()

    def current_revision(self) -> str | None:
        """Return the Alembic revision the database is at (``None`` when empty)."""
        from alembic.runtime.migration import MigrationContext

        with self._read_engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def head_revision(self) -> str | None:
        """Return the newest revision the shipped migrations know."""
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(self._alembic_config()).get_current_head()

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def _safe_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    @contextmanager
    def session(self, *, readonly: bool = False) -> Iterator[Session]:
        """Yield a session in a transaction: committed on success, rolled back on error.

        Parameters
        ----------
        readonly : bool
            Start with a plain (deferred) BEGIN and skip the in-process write
            lock; use it for queries that write nothing (UI, CLI listings).
        """
        if readonly:
            with self._read_sessions() as session, session.begin():
                yield session
            return
        with self._write_lock, self._sessions() as session, session.begin():
            yield session

    # -- associations --------------------------------------------------------

    def open_association(
        self,
        calling_ae: str,
        called_ae: str,
        peer_address: str = "",
        peer_port: int | None = None,
        *,
        started_at: dt.datetime | None = None,
    ) -> int:
        """Record an accepted association; return its audit id."""
        with self.session() as session:
            return int(
                session.execute(
                    insert(AssociationRecord)
                    .values(
                        calling_ae=calling_ae,
                        called_ae=called_ae,
                        peer_address=peer_address,
                        peer_port=peer_port,
                        started_at=started_at or utcnow(),
                        instances=0,
                        failures=0,
                        outcome=AssociationOutcome.OPEN,
                        receiver=process_id(),
                    )
                    .returning(AssociationRecord.id)
                ).scalar_one()
            )

    def close_association(
        self,
        association_id: int,
        outcome: AssociationOutcome | str,
        *,
        instances: int,
        failures: int = 0,
        detail: str | None = None,
        ended_at: dt.datetime | None = None,
    ) -> None:
        """Record how and when an association ended and what it carried."""
        with self.session() as session:
            session.execute(
                update(AssociationRecord)
                .where(AssociationRecord.id == association_id)
                .values(
                    outcome=AssociationOutcome(outcome),
                    instances=instances,
                    failures=failures,
                    detail=detail,
                    ended_at=ended_at or utcnow(),
                )
            )

    def record_rejected_association(
        self,
        calling_ae: str,
        called_ae: str,
        peer_address: str,
        peer_port: int | None,
        detail: str,
    ) -> int:
        """Record an association the node rejected; return its audit id."""
        now = utcnow()
        with self.session() as session:
            return int(
                session.execute(
                    insert(AssociationRecord)
                    .values(
                        calling_ae=calling_ae,
                        called_ae=called_ae,
                        peer_address=peer_address,
                        peer_port=peer_port,
                        started_at=now,
                        ended_at=now,
                        instances=0,
                        failures=0,
                        outcome=AssociationOutcome.REJECTED,
                        detail=detail,
                    )
                    .returning(AssociationRecord.id)
                ).scalar_one()
            )

    def mark_interrupted_associations(self) -> int:
        """Close the audit rows left ``open`` by receivers that are gone; return how many.

        Several receivers may share the index: only rows of a receiver process
        of this host that no longer runs (or rows that name no receiver) are
        marked ``interrupted``; a live receiver's associations stay open.
        """
        with self.session() as session:
            rows = session.execute(
                select(AssociationRecord.id, AssociationRecord.receiver).where(
                    AssociationRecord.outcome == AssociationOutcome.OPEN
                )
            ).all()
            gone = [int(r.id) for r in rows if process_gone(r.receiver)]
            if gone:
                session.execute(
                    update(AssociationRecord)
                    .where(AssociationRecord.id.in_(gone))
                    .values(outcome=AssociationOutcome.INTERRUPTED, ended_at=utcnow())
                )
            return len(gone)

    def associations(self, limit: int = 100) -> list[dict[str, Any]]:
        """Return the newest association audit rows as plain dicts."""
        with self.session(readonly=True) as session:
            rows = session.scalars(
                select(AssociationRecord).order_by(AssociationRecord.id.desc()).limit(limit)
            ).all()
            return [
                {
                    "id": r.id,
                    "calling_ae": r.calling_ae,
                    "called_ae": r.called_ae,
                    "peer_address": r.peer_address,
                    "peer_port": r.peer_port,
                    "started_at": r.started_at,
                    "ended_at": r.ended_at,
                    "instances": r.instances,
                    "failures": r.failures,
                    "outcome": r.outcome.value,
                    "detail": r.detail,
                }
                for r in rows
            ]

    # -- instances -----------------------------------------------------------

    def record_instance(
        self,
        meta: InstanceMeta,
        *,
        path: str | Path,
        size: int,
        calling_ae: str = "",
        association_id: int | None = None,
        received_at: dt.datetime | None = None,
    ) -> RecordedInstance:
        """Index one stored instance (insert, or record a re-send) and commit.

        The patient, study and series rows are created on first sight. A SOP
        Instance UID seen before keeps its row: its path, size, transfer
        syntax and sender are updated and ``resend_count``/``last_resent_at``
        record the re-send. ``series.last_instance_at`` is set either way.

        Raises
        ------
        InstanceConflictError
            When the SOP Instance UID is indexed under another study or
            patient (see :meth:`InstanceOwner.conflict_with`); nothing is
            written then.
        UIDConflictError
            When the Series Instance UID belongs to another study or patient,
            or the Study Instance UID to another patient (nothing is written).
        """
        now = received_at or utcnow()
        values: dict[str, Any] = {
            "sop_class_uid": meta.sop_class_uid,
            "transfer_syntax_uid": meta.transfer_syntax_uid,
            "instance_number": meta.instance_number,
            "path": str(path),
            "size": int(size),
            "calling_ae": calling_ae,
            "association_id": association_id,
        }
        if self.is_sqlite:
            fast = self._record_instance_sqlite(meta, now, values)
            if fast is not None:
                return fast
        attempt = 1
        while True:
            try:
                return self._record_instance(meta, now, values, path)
            except IntegrityError:
                # Another process (a second receiver on the same PostgreSQL)
                # created the same patient, study or series in the meantime;
                # the next try finds its committed rows. SQLite writers are
                # serialised (BEGIN IMMEDIATE) and never get here.
                if self.is_sqlite or attempt >= _RECORD_ATTEMPTS:
                    raise
                attempt += 1
                logger.debug("concurrent insert of series %s; again", meta.series_instance_uid)

    def _record_instance(
        self, meta: InstanceMeta, now: dt.datetime, values: dict[str, Any], path: str | Path
    ) -> RecordedInstance:
        """The general path of :meth:`record_instance` (the ORM, any dialect), one transaction."""
        with self.session() as session:
            series_id, study_id = self._series_for(session, meta, now)
            values["series_id"] = series_id
            # Hot path: one INSERT that does nothing when the UID is known.
            new_id = session.execute(
                self._insert_instance(
                    sop_instance_uid=meta.sop_instance_uid,
                    received_at=now,
                    resend_count=0,
                    **values,
                )
            ).scalar_one_or_none()
            if new_id is not None:
                result = RecordedInstance(int(new_id), series_id, study_id, resent=False)
            else:
                existing = session.execute(
                    select(Instance.id, Instance.path).where(
                        Instance.sop_instance_uid == meta.sop_instance_uid
                    )
                ).one()
                owner = self._owner(session, meta.sop_instance_uid)
                reason = owner.conflict_with(meta) if owner is not None else None
                if owner is not None and reason is not None:
                    # Leaving the session by an exception rolls back the new
                    # patient/study/series rows _series_for may have added.
                    raise InstanceConflictError(meta.sop_instance_uid, owner, reason)
                session.execute(
                    update(Instance)
                    .where(Instance.id == existing.id)
                    .values(resend_count=Instance.resend_count + 1, last_resent_at=now, **values)
                )
                previous = existing.path if existing.path != str(path) else None
                result = RecordedInstance(int(existing.id), series_id, study_id, True, previous)
        # Cache only what was committed (_series_for checked that the series
        # belongs to this study and patient, or made it for them).
        self._series_cache[meta.series_instance_uid] = (series_id, study_id, _owner_key(meta))
        return result

    def _cached_series(self, meta: InstanceMeta) -> tuple[int, int] | None:
        """(series id, study id) from the cache when it belongs to ``meta``'s study and patient."""
        cached = self._series_cache.get(meta.series_instance_uid)
        if cached is None or cached[2] != _owner_key(meta):
            return None  # unknown, or a conflict the general path reports
        return cached[0], cached[1]

    def _record_instance_sqlite(
        self, meta: InstanceMeta, now: dt.datetime, values: dict[str, Any]
    ) -> RecordedInstance | None:
        """The C-STORE hot path on SQLite: plain DB-API statements, one transaction.

        Only for a series already indexed (and cached); returns ``None`` to send
        the caller down the general path otherwise. Same rows, same timestamp
        format as the SQLAlchemy path (the dialect's DATETIME processor).
        """
        cached = self._cached_series(meta)
        if cached is None:
            return None
        series_id, study_id = cached
        stamp = self._sqlite_datetime(now.astimezone(dt.UTC).replace(tzinfo=None))
        with self._write_lock:
            raw = self.engine.raw_connection()
            try:
                cur = raw.cursor()
                cur.execute("BEGIN IMMEDIATE")
                try:
                    cur.execute(
                        "UPDATE series SET last_instance_at = ? WHERE id = ?", (stamp, series_id)
                    )
                    if cur.rowcount != 1:  # the series was deleted meanwhile
                        cur.execute("ROLLBACK")
                        self._series_cache.pop(meta.series_instance_uid, None)
                        return None
                    row = cur.execute(
                        "INSERT INTO instances (sop_instance_uid, series_id, sop_class_uid,"
                        " transfer_syntax_uid, instance_number, path, size, received_at,"
                        " calling_ae, association_id, resend_count)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)"
                        " ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING id",
                        (
                            meta.sop_instance_uid,
                            series_id,
                            values["sop_class_uid"],
                            values["transfer_syntax_uid"],
                            values["instance_number"],
                            values["path"],
                            values["size"],
                            stamp,
                            values["calling_ae"],
                            values["association_id"],
                        ),
                    ).fetchone()
                    if row is not None:
                        result = RecordedInstance(int(row[0]), series_id, study_id, resent=False)
                    else:
                        (
                            instance_id,
                            old_path,
                            study_uid,
                            series_uid,
                            patient_id,
                            issuer,
                        ) = cur.execute(_OWNER_SQL, (meta.sop_instance_uid,)).fetchone()
                        owner = InstanceOwner(study_uid, series_uid, patient_id, issuer)
                        reason = owner.conflict_with(meta)
                        if reason is not None:
                            cur.execute("ROLLBACK")
                            raise InstanceConflictError(meta.sop_instance_uid, owner, reason)
                        cur.execute(
                            "UPDATE instances SET series_id = ?, sop_class_uid = ?,"
                            " transfer_syntax_uid = ?, instance_number = ?, path = ?, size = ?,"
                            " calling_ae = ?, association_id = ?,"
                            " resend_count = resend_count + 1, last_resent_at = ? WHERE id = ?",
                            (
                                series_id,
                                values["sop_class_uid"],
                                values["transfer_syntax_uid"],
                                values["instance_number"],
                                values["path"],
                                values["size"],
                                values["calling_ae"],
                                values["association_id"],
                                stamp,
                                instance_id,
                            ),
                        )
                        previous = old_path if old_path != values["path"] else None
                        result = RecordedInstance(
                            int(instance_id), series_id, study_id, True, previous
                        )
                    cur.execute("COMMIT")
                except InstanceConflictError:
                    raise  # already rolled back
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
                finally:
                    cur.close()
            finally:
                raw.close()  # back to the pool
        return result

    def instance_owner(self, sop_instance_uid: str) -> InstanceOwner | None:
        """The patient, study and series of an indexed instance, or ``None`` when unknown."""
        with self.session(readonly=True) as session:
            return self._owner(session, sop_instance_uid)

    def find_conflict(self, meta: InstanceMeta) -> UIDConflictError | None:
        """The conflict :meth:`record_instance` would raise for ``meta``, or ``None``.

        For the receiver, before it writes the file: a re-send under another
        patient into the same study and series folder would otherwise replace
        the stored file. :meth:`record_instance` checks again in its transaction.
        """
        with self.session(readonly=True) as session:
            owner = self._owner(session, meta.sop_instance_uid)
            if owner is not None:
                reason = owner.conflict_with(meta)
                return (
                    None
                    if reason is None
                    else InstanceConflictError(meta.sop_instance_uid, owner, reason)
                )
            if self._cached_series(meta) is not None:
                return None
            series = self._series_row(session, meta.series_instance_uid)
            if series is not None:
                return self._series_conflict(series, meta)
            study = self._study_row(session, meta.study_instance_uid)
            if study is not None:
                return self._study_conflict(study, meta)
        return None

    @staticmethod
    def _series_row(session: Session, series_instance_uid: str) -> Any:
        """The series' id, study and patient (``id``, ``study_pk``, ``study_instance_uid``,
        ``patient_id``, ``issuer_of_patient_id``), or ``None``."""
        return session.execute(
            select(
                Series.id,
                Series.study_pk,
                Study.study_instance_uid,
                Patient.patient_id,
                Patient.issuer_of_patient_id,
            )
            .select_from(Series)
            .join(Study, Study.id == Series.study_pk)
            .join(Patient, Patient.id == Study.patient_pk)
            .where(Series.series_instance_uid == series_instance_uid)
        ).first()

    @staticmethod
    def _study_row(session: Session, study_instance_uid: str) -> Any:
        """The study's id and patient (``id``, ``patient_id``, ``issuer_of_patient_id``),
        or ``None``."""
        return session.execute(
            select(Study.id, Patient.patient_id, Patient.issuer_of_patient_id)
            .select_from(Study)
            .join(Patient, Patient.id == Study.patient_pk)
            .where(Study.study_instance_uid == study_instance_uid)
        ).first()

    @staticmethod
    def _series_conflict(series: Any, meta: InstanceMeta) -> UIDConflictError | None:
        """A stored series (:meth:`_series_row`) of another study or patient than ``meta``."""
        owner = InstanceOwner(
            series.study_instance_uid,
            meta.series_instance_uid,
            series.patient_id,
            series.issuer_of_patient_id,
        )
        reason = owner.conflict_with(meta)
        if reason is None:
            return None
        return UIDConflictError("SeriesInstanceUID", meta.series_instance_uid, owner, reason)

    @staticmethod
    def _study_conflict(study: Any, meta: InstanceMeta) -> UIDConflictError | None:
        """A stored study (:meth:`_study_row`) of another patient than ``meta``."""
        owner = InstanceOwner(
            meta.study_instance_uid, "", study.patient_id, study.issuer_of_patient_id
        )
        reason = owner.conflict_with(meta)
        if reason is None:
            return None
        return UIDConflictError("StudyInstanceUID", meta.study_instance_uid, owner, reason)

    @staticmethod
    def _owner(session: Session, sop_instance_uid: str) -> InstanceOwner | None:
        row = session.execute(
            select(
                Study.study_instance_uid,
                Series.series_instance_uid,
                Patient.patient_id,
                Patient.issuer_of_patient_id,
            )
            .select_from(Instance)
            .join(Series, Series.id == Instance.series_id)
            .join(Study, Study.id == Series.study_pk)
            .join(Patient, Patient.id == Study.patient_pk)
            .where(Instance.sop_instance_uid == sop_instance_uid)
        ).first()
        return None if row is None else InstanceOwner(*row)

    def _insert_instance(self, **values: Any) -> Any:
        """``INSERT ... ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING id``."""
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            from sqlalchemy.dialects import sqlite

            return (
                sqlite.insert(Instance)
                .values(**values)
                .on_conflict_do_nothing(index_elements=[Instance.sop_instance_uid])
                .returning(Instance.id)
            )
        if dialect == "postgresql":
            from sqlalchemy.dialects import postgresql

            return (
                postgresql.insert(Instance)
                .values(**values)
                .on_conflict_do_nothing(index_elements=[Instance.sop_instance_uid])
                .returning(Instance.id)
            )
        raise NotImplementedError(f"the index supports SQLite and PostgreSQL, not {dialect}")

    def _series_for(
        self, session: Session, meta: InstanceMeta, now: dt.datetime
    ) -> tuple[int, int]:
        cached = self._cached_series(meta)
        if cached is not None:
            touched = session.execute(
                update(Series).where(Series.id == cached[0]).values(last_instance_at=now)
            )
            if touched.rowcount == 1:  # type: ignore[attr-defined]
                return cached
            self._series_cache.pop(meta.series_instance_uid, None)  # deleted meanwhile
        row = self._series_row(session, meta.series_instance_uid)
        if row is not None:
            conflict = self._series_conflict(row, meta)
            if conflict is not None:
                # One series of two studies or patients would mix their images.
                raise conflict
            session.execute(update(Series).where(Series.id == row.id).values(last_instance_at=now))
            return int(row.id), int(row.study_pk)
        study = self._study_row(session, meta.study_instance_uid)
        if study is not None:
            conflict = self._study_conflict(study, meta)
            if conflict is not None:
                raise conflict
        study_pk = None if study is None else int(study.id)
        if study_pk is None:
            patient_pk = session.execute(
                select(Patient.id).where(
                    Patient.patient_id == meta.patient_id,
                    Patient.issuer_of_patient_id == meta.issuer_of_patient_id,
                )
            ).scalar_one_or_none()
            if patient_pk is None:
                patient_pk = session.execute(
                    insert(Patient)
                    .values(
                        patient_id=meta.patient_id,
                        issuer_of_patient_id=meta.issuer_of_patient_id,
                        patient_name=meta.patient_name,
                        patient_birth_date=meta.patient_birth_date,
                        patient_sex=meta.patient_sex,
                        created_at=now,
                    )
                    .returning(Patient.id)
                ).scalar_one()
            study_pk = session.execute(
                insert(Study)
                .values(
                    study_instance_uid=meta.study_instance_uid,
                    patient_pk=patient_pk,
                    study_date=meta.study_date,
                    study_time=meta.study_time,
                    study_description=meta.study_description,
                    accession_number=meta.accession_number,
                    study_id=meta.study_id,
                    created_at=now,
                )
                .returning(Study.id)
            ).scalar_one()
        series_id = session.execute(
            insert(Series)
            .values(
                series_instance_uid=meta.series_instance_uid,
                study_pk=study_pk,
                modality=meta.modality,
                series_number=meta.series_number,
                series_description=meta.series_description,
                body_part_examined=meta.body_part_examined,
                status=SeriesStatus.RECEIVING,
                last_instance_at=now,
                created_at=now,
            )
            .returning(Series.id)
        ).scalar_one()
        return int(series_id), int(study_pk)

    def instance(self, sop_instance_uid: str) -> dict[str, Any] | None:
        """Return one instance row as a plain dict, or ``None``."""
        with self.session(readonly=True) as session:
            row = session.scalars(
                select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
            ).first()
            if row is None:
                return None
            return {
                "id": row.id,
                "sop_instance_uid": row.sop_instance_uid,
                "series_id": row.series_id,
                "sop_class_uid": row.sop_class_uid,
                "transfer_syntax_uid": row.transfer_syntax_uid,
                "instance_number": row.instance_number,
                "path": row.path,
                "size": row.size,
                "received_at": row.received_at,
                "calling_ae": row.calling_ae,
                "association_id": row.association_id,
                "resend_count": row.resend_count,
                "last_resent_at": row.last_resent_at,
            }

    def count_instances(self) -> int:
        """Return how many instances the index holds."""
        with self.session(readonly=True) as session:
            return int(session.execute(select(func.count(Instance.id))).scalar_one())

    def newest_received_at(self) -> dt.datetime | None:
        """The latest receive or re-send time of any instance (UTC), or None when empty."""
        with self.session(readonly=True) as session:
            received, resent = session.execute(
                select(func.max(Instance.received_at), func.max(Instance.last_resent_at))
            ).one()
        times = [t for t in (received, resent) if t is not None]
        return max(times) if times else None

    def known_sop_instance_uids(self, uids: list[str]) -> set[str]:
        """Those of ``uids`` that have an instance row."""
        known: set[str] = set()
        with self.session(readonly=True) as session:
            for start in range(0, len(uids), 500):
                chunk = uids[start : start + 500]
                known.update(
                    session.execute(
                        select(Instance.sop_instance_uid).where(
                            Instance.sop_instance_uid.in_(chunk)
                        )
                    ).scalars()
                )
        return known

    def series_files(self, series_instance_uid: str) -> list[InstanceFile]:
        """Return the stored files of a series, by Instance Number then SOP Instance UID."""
        with self.session(readonly=True) as session:
            rows = session.execute(
                select(
                    Instance.sop_instance_uid,
                    Instance.instance_number,
                    Instance.path,
                    Instance.transfer_syntax_uid,
                    Instance.size,
                )
                .join(Series, Series.id == Instance.series_id)
                .where(Series.series_instance_uid == series_instance_uid)
                .order_by(Instance.instance_number, Instance.sop_instance_uid)
            ).all()
            return [InstanceFile(*row) for row in rows]

    # -- listings ------------------------------------------------------------

    def list_studies(self) -> list[StudySummary]:
        """Return every study with its series, instance counts, status and deliveries."""
        with self.session(readonly=True) as session:
            counts = dict(
                session.execute(
                    select(Instance.series_id, func.count(Instance.id)).group_by(Instance.series_id)
                ).all()
            )
            delivery_states: dict[int, dict[str, list[str]]] = {}
            for series_id, destination, state in session.execute(
                select(Result.series_id, Delivery.destination, Delivery.state)
                .join(Delivery, Delivery.result_id == Result.id)
                .where(Result.superseded.is_(False))
            ):
                per = delivery_states.setdefault(series_id, {})
                per.setdefault(destination, []).append(DeliveryState(state).value)
            series_by_study: dict[int, list[SeriesSummary]] = {}
            for s in session.scalars(select(Series).order_by(Series.series_number, Series.id)):
                series_by_study.setdefault(s.study_pk, []).append(
                    SeriesSummary(
                        series_instance_uid=s.series_instance_uid,
                        modality=s.modality,
                        series_description=s.series_description,
                        instances=int(counts.get(s.id, 0)),
                        status=SeriesStatus(s.status).value,
                        reason=s.reason,
                        hemorrhage=s.hemorrhage,
                        deliveries={
                            dest: _aggregate_delivery(states)
                            for dest, states in sorted(delivery_states.get(s.id, {}).items())
                        },
                        series_id=s.id,
                        series_number=s.series_number,
                        last_instance_at=s.last_instance_at,
                    )
                )
            studies = session.execute(
                select(Study, Patient)
                .join(Patient, Patient.id == Study.patient_pk)
                .order_by(Study.study_date.desc(), Study.id)
            ).all()
            return [
                StudySummary(
                    study_instance_uid=study.study_instance_uid,
                    patient_id=patient.patient_id,
                    study_date=study.study_date,
                    study_description=study.study_description,
                    series=series_by_study.get(study.id, []),
                    patient_name=patient.patient_name,
                    accession_number=study.accession_number,
                )
                for study, patient in studies
            ]

    def studies_document(self) -> dict[str, Any]:
        """Return ``{"studies": [...]}`` exactly as ``ichnode studies --json`` prints it."""
        return {"studies": [study.to_json() for study in self.list_studies()]}


def summary_as_dict(summary: StudySummary) -> dict[str, Any]:
    """Return every field of a study summary as plain data (datetimes left as objects)."""
    return asdict(summary)
