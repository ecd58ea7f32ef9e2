"""The SQLAlchemy models of the ichnode index: the one schema of the node.

Received data (patients, studies, series, instances, association audit) and the
processing loop's state (series status, jobs, results, deliveries) live in the
same schema so there is a single owner of migrations (``storage/migrations``).
The models never create tables themselves: Alembic does, see
:func:`storage.index.Index.upgrade`.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Deterministic constraint names, so batch migrations on SQLite can find them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Foreign keys are ``<table>_id``, except where that would read as a DICOM
# keyword (PatientID, StudyID): there they are ``<table>_pk``.
UID_LEN = 64
AE_LEN = 16


def utcnow() -> dt.datetime:
    """Return the current time, timezone-aware, in UTC."""
    return dt.datetime.now(dt.UTC)


class SeriesStatus(enum.StrEnum):
    """Where a series stands in the processing loop."""

    RECEIVING = "receiving"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


class JobState(enum.StrEnum):
    """State of one analysis job."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class ResultKind(enum.StrEnum):
    """Kind of DICOM object a job produced."""

    SEG = "SEG"
    SR = "SR"
    SC = "SC"


class DeliveryState(enum.StrEnum):
    """State of one result object towards one destination."""

    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


class AssociationOutcome(enum.StrEnum):
    """How an association ended (``open`` while it lasts)."""

    OPEN = "open"
    RELEASED = "released"
    ABORTED = "aborted"
    REJECTED = "rejected"
    CLOSED = "closed"  # connection closed without release or abort
    INTERRUPTED = "interrupted"  # the node stopped (or crashed) while it was open


def _enum(cls: type[enum.StrEnum], name: str) -> Enum:
    # Store the values ("receiving"), not the member names; plain VARCHAR + CHECK.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp stored as naive UTC and always read back timezone-aware (UTC).

    SQLite has no timezone type; without this, aware values go in and naive
    values come out.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None)

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _ts() -> UTCDateTime:
    return UTCDateTime()


class Base(DeclarativeBase):
    """Declarative base of every ichnode table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Patient(Base):
    """A patient as identified by Patient ID (and its issuer) in received instances."""

    __tablename__ = "patients"
    __table_args__ = (UniqueConstraint("patient_id", "issuer_of_patient_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    patient_birth_date: Mapped[str] = mapped_column(String(8), default="")
    patient_sex: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[dt.datetime] = mapped_column(_ts(), default=utcnow)

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    """One study (Study Instance UID)."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    patient_pk: Mapped[int] = mapped_column(
        ForeignKey("patients.id", ondelete="CASCADE"), index=True
    )
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_time: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    study_id: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[dt.datetime] = mapped_column(_ts(), default=utcnow)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    """One series (Series Instance UID), with its processing status.

    ``status``/``reason`` are set by the processing loop; ``last_instance_at``
    by the SCP on every stored instance; ``ready_at`` when the scheduler decides
    the series is complete; ``content_hash`` fingerprints the set of instances
    analysed, so a re-sent identical series is not analysed twice.
    ``hemorrhage``/``hemorrhage_probability`` hold the series-level finding
    (NULL until a job fills them).
    """

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(64), default="")
    body_part_examined: Mapped[str] = mapped_column(String(16), default="")
    status: Mapped[SeriesStatus] = mapped_column(
        _enum(SeriesStatus, "series_status"), default=SeriesStatus.RECEIVING, index=True
    )
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_instance_at: Mapped[dt.datetime | None] = mapped_column(_ts(), nullable=True)
    ready_at: Mapped[dt.datetime | None] = mapped_column(_ts(), nullable=True)
    content_hash: Mapped[str | None] = mapped_column(String(128), nullable=True)
    hemorrhage: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    hemorrhage_probability: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(_ts(), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")
    jobs: Mapped[list[Job]] = relationship(back_populates="series")


class AssociationRecord(Base):
    """Audit row of one association (accepted or rejected) with a peer."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(AE_LEN))
    called_ae: Mapped[str] = mapped_column(String(AE_LEN))
    peer_address: Mapped[str] = mapped_column(String(64), default="")
    peer_port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    started_at: Mapped[dt.datetime] = mapped_column(_ts(), default=utcnow, index=True)
    ended_at: Mapped[dt.datetime | None] = mapped_column(_ts(), nullable=True)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    outcome: Mapped[AssociationOutcome] = mapped_column(
        _enum(AssociationOutcome, "association_outcome"), default=AssociationOutcome.OPEN
    )
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: ``host:pid`` of the receiver process that accepted it (migration 0004).
    receiver: Mapped[str | None] = mapped_column(String(128), nullable=True)


class Instance(Base):
    """One stored SOP instance: where its file is and how it arrived."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LEN))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LEN))
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[dt.datetime] = mapped_column(_ts(), default=utcnow)
    calling_ae: Mapped[str] = mapped_column(String(AE_LEN), default="")
    association_id: Mapped[int | None] = mapped_column(
        ForeignKey("associations.id", ondelete="SET NULL"), nullable=True, index=True
    )
    resend_count: Mapped[int] = mapped_column(Integer, default=0)
    last_resent_at: Mapped[dt.datetime | None] = mapped_column(_ts(), nullable=True)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One analysis of one series; claimed by a worker, retried with ``not_before``."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_not_before", "state", "not_before"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"), default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[dt.datetime | None] = mapped_column(_ts(), nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    claimed_at: Mapped[dt.datetime | None] = mapped_column(_ts(), nullable=True)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(_ts(), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    content_hash: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(_ts(), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(_ts(), nullable=True)
    # Stage timings for node.metrics (migration 0002): the series' last instance
    # time when queued, and the worker's measured inference and encoding time.
    received_at: Mapped[dt.datetime | None] = mapped_column(_ts(), nullable=True)
    inference_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    encoding_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)

    series: Mapped[Series] = relationship(back_populates="jobs")
    results: Mapped[list[Result]] = relationship(back_populates="job")


class Result(Base):
    """One DICOM object (SEG, SR or SC) a job produced and keeps on disk."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    kind: Mapped[ResultKind] = mapped_column(_enum(ResultKind, "result_kind"))
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LEN))
    path: Mapped[str] = mapped_column(Text)
    superseded: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(_ts(), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="results")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="result")


class Delivery(Base):
    """The outbox: one result object towards one destination, until acknowledged."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("result_id", "destination"),
        Index("ix_deliveries_state_next_attempt_at", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"))
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[DeliveryState] = mapped_column(
        _enum(DeliveryState, "delivery_state"), default=DeliveryState.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(_ts(), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(_ts(), default=utcnow)
    acked_at: Mapped[dt.datetime | None] = mapped_column(_ts(), nullable=True)
    # When ``ichnode outbox retry`` revived it; the age limit counts from then (0002).
    retried_at: Mapped[dt.datetime | None] = mapped_column(_ts(), nullable=True)

    result: Mapped[Result] = relationship(back_populates="deliveries")
