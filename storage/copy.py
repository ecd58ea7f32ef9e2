"""Copy a whole index into an empty database: how a site moves from SQLite to PostgreSQL.

A site starts with the embedded SQLite index; when it grows to several
machines the index must move to PostgreSQL without losing anything.
:func:`copy_index` copies every row of every table, keeping every primary
key, so the archive paths, jobs, results, deliveries and association audit
rows stay consistent with one another and with the files on disk:

1. the source must be at the Alembic head (``ichnode serve`` upgrades it), and
   the node must be stopped: no association ``open``, no job ``running``
   (``force`` skips only this check, for rows a crash left behind);
2. the target must hold no row in any table; its schema is then created with
   :meth:`storage.index.Index.upgrade` (which also writes ``alembic_version``);
3. the tables are copied in foreign-key order (``Base.metadata.sorted_tables``),
   the source streamed ``batch_size`` rows at a time from one read snapshot,
   inside ONE transaction on the target: a failure leaves the target's tables
   empty, and the copy can simply be run again;
4. on PostgreSQL every sequence of an integer primary key is set to the
   largest copied id, so rows written after the copy get new ids;
5. the row count of every table is compared with the source's, after commit.

Values go through the models' column types in both directions, so timestamps
(naive UTC in the database, aware UTC in Python, :class:`storage.models.UTCDateTime`),
enums, booleans, text and NULLs mean the same on the target. Nothing here
prints: the result is a :class:`CopyReport`, refusals raise :class:`CopyRefused`
(nothing written) and failures :class:`IndexCopyError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Integer, Table, func, inspect, literal, select, table, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

from storage.index import Index
from storage.models import AssociationOutcome, AssociationRecord, Base, Job, JobState

logger = logging.getLogger(__name__)

__all__ = ["CopyRefused", "CopyReport", "IndexCopyError", "TableCopy", "copy_index"]

#: Rows per INSERT (one executemany) and per fetch from the source.
BATCH_SIZE = 1000
#: Alembic's own table: written by ``Index.upgrade``, never copied.
_ALEMBIC_TABLE = "alembic_version"
#: At most this many ids are named in a refusal message.
_NAMED_IDS = 5


class IndexCopyError(Exception):
    """The copy failed; the message is one line for the user. The target's tables are left empty."""


class CopyRefused(IndexCopyError):
    """The copy was refused before anything was copied (the message says why and what to do)."""


@dataclass(frozen=True)
class TableCopy:
    """One table copied: its name and how many rows it holds on both sides."""

    table: str
    rows: int


@dataclass(frozen=True)
class CopyReport:
    """What :func:`copy_index` did.

    ``source`` and ``target`` are the URLs with any password hidden;
    ``sequences`` names the PostgreSQL sequences that were set (empty for a
    SQLite target, which takes the next id from the table itself);
    ``open_associations`` and ``running_jobs`` are the ids copied as they were
    because ``force`` skipped the check that the node is stopped.
    """

    source: str
    target: str
    revision: str
    tables: tuple[TableCopy, ...]
    sequences: tuple[str, ...] = ()
    open_associations: tuple[int, ...] = ()
    running_jobs: tuple[int, ...] = ()

    @property
    def rows(self) -> int:
        """Rows copied, all tables together."""
        return sum(t.rows for t in self.tables)


def _safe(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(not a URL)"


def _first_line(exc: BaseException) -> str:
    """The driver's message of a database error, first line only, without SQLAlchemy's suffix."""
    inner = getattr(exc, "orig", None) or exc
    lines = str(inner).strip().splitlines()
    return lines[0].strip() if lines else inner.__class__.__name__


def _ids(ids: list[int]) -> str:
    named = ", ".join(str(i) for i in ids[:_NAMED_IDS])
    return named + (f" and {len(ids) - _NAMED_IDS} more" if len(ids) > _NAMED_IDS else "")


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (``None``: not SQLite, or in memory)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def _check_target_url(target_url: str, source_url: str) -> None:
    try:
        parsed = make_url(target_url)
    except ArgumentError:
        raise CopyRefused(
            f"{target_url!r} is not a database URL "
            "(postgresql+psycopg://USER@HOST:PORT/DATABASE, or sqlite:///PATH)"
        ) from None
    backend = parsed.get_backend_name()
    if backend not in ("postgresql", "sqlite"):
        raise CopyRefused(
            f"the target must be PostgreSQL (postgresql+psycopg://...) or SQLite (sqlite:///...), "
            f"not {backend!r}"
        )
    if backend == "sqlite" and _sqlite_file(target_url) is None:
        raise CopyRefused(f"the target {_safe(target_url)} is not a SQLite file")
    if parsed.drivername not in ("postgresql", "postgresql+psycopg", "sqlite", "sqlite+pysqlite"):
        raise CopyRefused(
            f"the target driver {parsed.drivername!r} is not the one ichnode uses "
            "(postgresql+psycopg, or sqlite)"
        )
    target_file, source_file = _sqlite_file(target_url), _sqlite_file(source_url)
    same_file = (
        target_file is not None
        and source_file is not None
        and target_file.resolve() == source_file.resolve()
    )
    if same_file or _safe(target_url) == _safe(source_url):
        raise CopyRefused("the target is the node's current index; name another database")


def _open_source(source_url: str) -> Index:
    """The source index, checked to be at the Alembic head."""
    path = _sqlite_file(source_url)
    if path is not None and not path.exists():
        # Index() would create an empty file there.
        raise CopyRefused(f"no index at {path} (has `ichnode serve` run with this configuration?)")
    try:
        source = Index(source_url)
    except (ValueError, ArgumentError) as exc:
        raise CopyRefused(f"the source index: {exc}") from None
    try:
        revision, head = source.current_revision(), source.head_revision()
    except SQLAlchemyError as exc:
        source.dispose()
        raise CopyRefused(
            f"cannot read the index {_safe(source_url)}: {_first_line(exc)}"
        ) from None
    if revision is None:
        source.dispose()
        raise CopyRefused(
            f"no index schema at {_safe(source_url)} (has `ichnode serve` run with this "
            "configuration?)"
        )
    if revision != head:
        source.dispose()
        raise CopyRefused(
            f"the index {_safe(source_url)} is at schema revision {revision}, not {head}: "
            "start `ichnode serve` with this configuration once (it upgrades the schema) "
            "and stop it, then copy"
        )
    return source


def _activity(source: Index) -> tuple[list[int], list[int]]:
    """Ids of the ``open`` associations and ``running`` jobs of the source."""
    with source.session(readonly=True) as session:
        associations = list(
            session.scalars(
                select(AssociationRecord.id)
                .where(AssociationRecord.outcome == AssociationOutcome.OPEN)
                .order_by(AssociationRecord.id)
            )
        )
        jobs = list(
            session.scalars(select(Job.id).where(Job.state == JobState.RUNNING).order_by(Job.id))
        )
    return associations, jobs


def _tables_with_rows(conn: Connection) -> list[str]:
    """Tables of the connection's default schema that hold at least one row."""
    found = []
    for name in sorted(inspect(conn).get_table_names()):
        if name == _ALEMBIC_TABLE:
            continue
        if conn.execute(select(literal(1)).select_from(table(name)).limit(1)).first() is not None:
            found.append(name)
    return found


def _refuse_unless_empty(conn: Connection, target_url: str) -> None:
    full = _tables_with_rows(conn)
    if full:
        raise CopyRefused(
            f"the target {_safe(target_url)} is not empty ({', '.join(full)} hold rows); "
            "copy only into a new, empty database"
        )


def _integer_pk(tbl: Table) -> str | None:
    columns = list(tbl.primary_key.columns)
    if len(columns) == 1 and isinstance(columns[0].type, Integer):
        return columns[0].name
    return None


def _count(conn: Connection, tbl: Table) -> int:
    return int(conn.execute(select(func.count()).select_from(tbl)).scalar_one())


def _copy_table(
    source: Connection,
    target: Connection,
    tbl: Table,
    batch_size: int,
    progress: Callable[[str, int], None] | None,
) -> int:
    """Stream one table from ``source`` into ``target`` in batches; return the rows copied."""
    keys = [c.key for c in tbl.columns]
    statement = (
        select(tbl)
        .order_by(*tbl.primary_key.columns)
        .execution_options(yield_per=batch_size, stream_results=True)
    )
    insert = tbl.insert()
    copied = 0
    result = source.execute(statement)
    try:
        for batch in result.partitions(batch_size):
            rows: list[dict[str, Any]] = [dict(zip(keys, row, strict=True)) for row in batch]
            try:
                target.execute(insert, rows)
            except DBAPIError as exc:
                pk = _integer_pk(tbl)
                where = f" (rows from id {rows[0][pk]} to {rows[-1][pk]})" if pk else ""
                raise IndexCopyError(
                    f"copying {tbl.name} failed{where}: {_first_line(exc)}; "
                    "nothing was kept on the target, which stays empty"
                ) from None
            copied += len(rows)
            if progress is not None:
                progress(tbl.name, copied)
    finally:
        result.close()
    return copied


def _set_sequences(conn: Connection) -> list[str]:
    """Set every PostgreSQL sequence of an integer primary key to the table's largest id."""
    done = []
    for tbl in Base.metadata.sorted_tables:
        pk = _integer_pk(tbl)
        if pk is None:
            continue
        sequence = conn.execute(
            text("SELECT pg_get_serial_sequence(:table, :column)"),
            {"table": tbl.name, "column": pk},
        ).scalar_one()
        if sequence is None:
            continue
        largest = conn.execute(select(func.max(tbl.c[pk]))).scalar_one()
        # Empty table: the next id is 1 (is_called false); else the next is largest + 1.
        conn.execute(
            text("SELECT setval(:sequence, :value, :called)"),
            {
                "sequence": sequence,
                "value": 1 if largest is None else int(largest),
                "called": largest is not None,
            },
        )
        done.append(str(sequence))
    return done


def copy_index(
    source_url: str,
    target_url: str,
    *,
    force: bool = False,
    batch_size: int = BATCH_SIZE,
    progress: Callable[[str, int], None] | None = None,
) -> CopyReport:
    """Copy every row of the index at ``source_url`` into the empty database at ``target_url``.

    Parameters
    ----------
    source_url : str
        The node's index (``storage.effective_database_url``), normally SQLite.
    target_url : str
        ``postgresql+psycopg://...`` (``postgresql://`` means the same) or
        ``sqlite:///PATH``; the database must exist and hold no rows.
    force : bool
        Copy even when associations are ``open`` or jobs ``running`` in the
        source (rows a crash left behind; the node must still be stopped).
    batch_size : int
        Rows per INSERT and per fetch from the source.
    progress : callable, optional
        Called with ``(table, rows copied so far)`` after each batch.

    Raises
    ------
    CopyRefused
        Before anything is copied: a bad target URL, a source that is not at
        the Alembic head, a node that seems to be running, a target that
        cannot be reached or holds rows.
    IndexCopyError
        When the copy or its verification failed (the copy's transaction is
        rolled back; the target keeps only the empty schema).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    _check_target_url(target_url, source_url)
    source = _open_source(source_url)
    target: Index | None = None
    try:
        open_associations, running_jobs = _activity(source)
        if (open_associations or running_jobs) and not force:
            busy = []
            if open_associations:
                busy.append(
                    f"{len(open_associations)} association(s) open (id {_ids(open_associations)})"
                )
            if running_jobs:
                busy.append(f"{len(running_jobs)} job(s) running (id {_ids(running_jobs)})")
            raise CopyRefused(
                f"the node seems to be running: {' and '.join(busy)} in {_safe(source_url)}; "
                "stop `ichnode serve` first (pass --force only if it is stopped and these "
                "rows are left from a crash)"
            )
        revision = str(source.current_revision())
        try:
            target = Index(target_url)
        except (ValueError, ArgumentError) as exc:
            raise CopyRefused(f"the target: {exc}") from None
        try:
            with target.engine.connect() as conn:
                _refuse_unless_empty(conn, target_url)
        except SQLAlchemyError as exc:
            raise CopyRefused(
                f"cannot use the target {_safe(target_url)}: {_first_line(exc)}"
            ) from None
        from alembic.util import CommandError

        try:
            target.upgrade()
        except SQLAlchemyError as exc:
            raise CopyRefused(
                f"cannot create the schema on {_safe(target_url)}: {_first_line(exc)}"
            ) from None
        except CommandError as exc:  # a revision this ichnode does not know
            raise CopyRefused(
                f"cannot create the schema on {_safe(target_url)}: {exc} "
                "(was it made by a newer ichnode?)"
            ) from None
        copied, sequences = _copy(source, target, target_url, batch_size, progress)
        _verify(target, copied, revision)
    except SQLAlchemyError as exc:
        raise IndexCopyError(
            f"the copy failed: {_first_line(exc)}; nothing was kept on the target"
        ) from None
    finally:
        source.dispose()
        if target is not None:
            target.dispose()
    return CopyReport(
        source=_safe(source_url),
        target=_safe(target_url),
        revision=revision,
        tables=tuple(copied),
        sequences=tuple(sequences),
        open_associations=tuple(open_associations),
        running_jobs=tuple(running_jobs),
    )


def _copy(
    source: Index,
    target: Index,
    target_url: str,
    batch_size: int,
    progress: Callable[[str, int], None] | None,
) -> tuple[list[TableCopy], list[str]]:
    """Every table in one read snapshot of the source and one transaction on the target."""
    copied: list[TableCopy] = []
    sequences: list[str] = []
    # Index.session(readonly=True): a plain BEGIN, so the source is read from one
    # snapshot (SQLite WAL, PostgreSQL) and never locked against readers.
    with source.session(readonly=True) as session, target.engine.begin() as tconn:
        sconn = session.connection()
        if tconn.dialect.name == "postgresql":
            # Nobody else writes the tables while they are filled.
            names = ", ".join(tbl.name for tbl in Base.metadata.sorted_tables)
            tconn.exec_driver_sql(f"LOCK TABLE {names} IN EXCLUSIVE MODE")
        _refuse_unless_empty(tconn, target_url)  # again, under the lock
        for tbl in Base.metadata.sorted_tables:
            expected = _count(sconn, tbl)
            rows = _copy_table(sconn, tconn, tbl, batch_size, progress)
            if rows != expected:
                raise IndexCopyError(
                    f"{tbl.name}: read {rows} rows from the source, which counts {expected}; "
                    "nothing was kept on the target (is the node running?)"
                )
            logger.info("copied %s: %d rows", tbl.name, rows)
            copied.append(TableCopy(tbl.name, rows))
        if tconn.dialect.name == "postgresql":
            sequences = _set_sequences(tconn)
    return copied, sequences


def _verify(target: Index, copied: list[TableCopy], revision: str) -> None:
    """After commit: the target is at the source's revision and every count matches."""
    if target.current_revision() != revision:
        raise IndexCopyError(
            f"the target is at schema revision {target.current_revision()}, the source at "
            f"{revision}; do not use the target"
        )
    with target.engine.connect() as conn:
        for entry in copied:
            found = _count(conn, Base.metadata.tables[entry.table])
            if found != entry.rows:
                raise IndexCopyError(
                    f"verification failed: {entry.table} has {found} rows on the target, "
                    f"{entry.rows} in the source; do not use the target"
                )
