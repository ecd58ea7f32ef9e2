"""The worklist: what the node's index holds, read-only, as rows for the UI.

The UI opens the index with a read-only SQLite connection (``mode=ro``), so it
can never change what the node wrote, and reads it through
:class:`storage.index.Index`. Finding details (subtypes, volumes) come from the
stored SR of each series (:mod:`ui.stored`); this module only gathers rows,
filters them and lists the result files of a series.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.engine import make_url

from config import Settings
from storage.index import Index, SeriesSummary, StudySummary
from storage.models import Result, Series

logger = logging.getLogger(__name__)

STATUSES: tuple[str, ...] = ("receiving", "queued", "running", "done", "failed", "skipped")
FINDING_FILTERS: tuple[str, ...] = ("all", "hemorrhage", "no hemorrhage", "not analysed")


class IndexUnavailable(RuntimeError):
    """The index cannot be opened (missing file, unreadable); the message says what to do."""


def read_only_url(settings: Settings) -> str:
    """The index URL for a reader that must never write.

    For a SQLite file this is ``sqlite:///file:<abs path>?mode=ro&uri=true``; the
    file must exist (the node creates it). Other back-ends are used as configured.
    """
    url = settings.storage.effective_database_url
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return url
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return url
    path = Path(database).expanduser().resolve()
    if not path.is_file():
        raise IndexUnavailable(
            f"no index at {path}: start the node (ichnode serve) with the same configuration first"
        )
    return f"sqlite:///file:{path}?mode=ro&uri=true"


def open_index(settings: Settings) -> Index:
    """Open the node's index read-only; raise :class:`IndexUnavailable` with a clear message."""
    index = Index(read_only_url(settings), busy_timeout_ms=5_000)
    revision = index.current_revision()
    if revision is None:
        index.dispose()
        raise IndexUnavailable("the index holds no schema yet: start the node once to create it")
    return index


@dataclass(frozen=True)
class StoredFinding:
    """The finding of one analysed series as read back from its stored SR.

    ``subtypes`` maps each subtype named in the SR to (present, probability,
    volume in mL); probability or volume are None when the SR does not state them.
    """

    hemorrhage: bool | None
    probability: float | None
    subtypes: dict[str, tuple[bool, float | None, float | None]] = field(default_factory=dict)

    def present_subtypes(self) -> list[str]:
        """Names of the subtypes stated present."""
        return [name for name, (present, _, _) in self.subtypes.items() if present]


@dataclass(frozen=True)
class ResultFile:
    """One stored result object of a series (current, not superseded)."""

    kind: str
    sop_instance_uid: str
    series_instance_uid: str
    path: str
    created_at: dt.datetime | None


@dataclass(frozen=True)
class WorklistRow:
    """One series of the worklist with its study and patient."""

    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    study_description: str
    accession_number: str
    series_number: int | None
    series_description: str
    modality: str
    instances: int
    status: str
    reason: str | None
    hemorrhage: bool | None
    deliveries: dict[str, str]
    last_instance_at: dt.datetime | None
    finding: StoredFinding | None = None

    @property
    def status_label(self) -> str:
        """Status with its reason when it has one (failed, skipped)."""
        return f"{self.status}: {self.reason}" if self.reason else self.status

    @property
    def finding_label(self) -> str:
        """One-line finding: subtypes with volumes, ``no hemorrhage``, or empty when unknown."""
        if self.hemorrhage is None:
            return ""
        if not self.hemorrhage:
            return "no hemorrhage"
        if self.finding is None or not self.finding.present_subtypes():
            return "hemorrhage"
        parts = []
        for name in self.finding.present_subtypes():
            volume = self.finding.subtypes[name][2]
            parts.append(f"{name} {volume:.1f} mL" if volume is not None else name)
        return "hemorrhage: " + ", ".join(parts)

    @property
    def label(self) -> str:
        """A short name for pickers: patient, date, series."""
        date = _format_date(self.study_date) or "no date"
        series = self.series_description or self.modality or "series"
        return (
            f"{self.patient_id or '(no ID)'} · {date} · {series} · {self.series_instance_uid[-12:]}"
        )


def _format_date(value: str) -> str:
    value = (value or "").strip()
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


def _row(study: StudySummary, series: SeriesSummary, finding: StoredFinding | None) -> WorklistRow:
    return WorklistRow(
        study_instance_uid=study.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        patient_id=study.patient_id,
        patient_name=study.patient_name,
        study_date=study.study_date,
        study_description=study.study_description,
        accession_number=study.accession_number,
        series_number=series.series_number,
        series_description=series.series_description,
        modality=series.modality,
        instances=series.instances,
        status=series.status,
        reason=series.reason,
        hemorrhage=series.hemorrhage,
        deliveries=dict(series.deliveries),
        last_instance_at=series.last_instance_at,
        finding=finding,
    )


def _newest_first(row: WorklistRow) -> tuple[str, float]:
    stamp = row.last_instance_at.timestamp() if row.last_instance_at else 0.0
    return (row.study_date or "", stamp)


def load_worklist(
    index: Index,
    finding_for: Callable[[str], StoredFinding | None] | None = None,
) -> list[WorklistRow]:
    """Every series of the index, newest study first (then newest arrival first).

    Parameters
    ----------
    index : storage.index.Index
        The node's index (read-only is enough).
    finding_for : callable, optional
        Called with the SR path of each analysed series to read its finding;
        the rows of series without an SR get ``finding=None``.
    """
    sr_paths = sr_paths_by_series(index) if finding_for is not None else {}
    rows = []
    for study in index.list_studies():
        for series in study.series:
            finding = None
            path = sr_paths.get(series.series_instance_uid)
            if finding_for is not None and path is not None:
                finding = finding_for(path)
            rows.append(_row(study, series, finding))
    rows.sort(key=_newest_first, reverse=True)
    return rows


def filter_rows(
    rows: Iterable[WorklistRow],
    statuses: Iterable[str] | None = None,
    finding: str = "all",
    text: str = "",
) -> list[WorklistRow]:
    """Keep the rows whose status is in ``statuses`` (None: any), matching ``finding`` and ``text``.

    ``finding`` is one of :data:`FINDING_FILTERS`; ``text`` is matched
    case-insensitively against patient ID and name, descriptions and accession.
    """
    if finding not in FINDING_FILTERS:
        raise ValueError(f"finding filter must be one of {FINDING_FILTERS}, not {finding!r}")
    wanted = set(statuses) if statuses is not None else None
    if wanted is not None:
        unknown = wanted - set(STATUSES)
        if unknown:
            raise ValueError(f"unknown status {min(unknown)!r}; expected one of {STATUSES}")
    needle = text.strip().lower()
    kept = []
    for row in rows:
        if wanted is not None and row.status not in wanted:
            continue
        if finding == "hemorrhage" and row.hemorrhage is not True:
            continue
        if finding == "no hemorrhage" and row.hemorrhage is not False:
            continue
        if finding == "not analysed" and row.hemorrhage is not None:
            continue
        if needle:
            haystack = (
                f"{row.patient_id} {row.patient_name} {row.study_description} "
                f"{row.series_description} {row.accession_number}"
            ).lower()
            if needle not in haystack:
                continue
        kept.append(row)
    return kept


def table(rows: Iterable[WorklistRow]) -> list[dict[str, object]]:
    """Rows as plain dicts for ``st.dataframe``, one column per worklist field."""
    out: list[dict[str, object]] = []
    for row in rows:
        out.append(
            {
                "patient ID": row.patient_id,
                "study date": _format_date(row.study_date),
                "study": row.study_description,
                "series": row.series_description,
                "slices": row.instances,
                "status": row.status_label,
                "finding": row.finding_label,
                "delivery": ", ".join(f"{d}: {s}" for d, s in sorted(row.deliveries.items())),
                "received": row.last_instance_at.strftime("%Y-%m-%d %H:%M:%S")
                if row.last_instance_at
                else "",
                "modality": row.modality,
                "series UID": row.series_instance_uid,
            }
        )
    return out


def result_files(index: Index, series_instance_uid: str) -> list[ResultFile]:
    """The current (not superseded) SEG/SR/SC objects of a source series, newest first."""
    with index.session(readonly=True) as session:
        rows = session.execute(
            select(
                Result.kind,
                Result.sop_instance_uid,
                Result.series_instance_uid,
                Result.path,
                Result.created_at,
            )
            .join(Series, Series.id == Result.series_id)
            .where(
                Series.series_instance_uid == series_instance_uid,
                Result.superseded.is_(False),
            )
            .order_by(Result.created_at.desc(), Result.id.desc())
        ).all()
    return [
        ResultFile(str(getattr(kind, "value", kind)), sop, series_uid, path, created)
        for kind, sop, series_uid, path, created in rows
    ]


def sr_paths_by_series(index: Index) -> dict[str, str]:
    """Series Instance UID -> path of its newest current SR, for every analysed series."""
    with index.session(readonly=True) as session:
        rows = session.execute(
            select(Series.series_instance_uid, Result.path, Result.kind)
            .join(Series, Series.id == Result.series_id)
            .where(Result.superseded.is_(False))
            .order_by(Result.created_at, Result.id)
        ).all()
    paths: dict[str, str] = {}
    for uid, path, kind in rows:
        if str(getattr(kind, "value", kind)) == "SR":
            paths[uid] = path  # later rows win: the newest SR
    return paths
