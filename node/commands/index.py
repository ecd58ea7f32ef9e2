"""``ichnode index copy --to URL``: move the node's index into an empty database.

A site that started with the embedded SQLite index and grows to several
machines moves its index to PostgreSQL with this, while the node is stopped:
every row is copied with its primary key (:func:`storage.copy.copy_index`),
then the user points ``storage.database_url`` at the new database and starts
the node again. Prints one line per table (``instances: 12345 rows``) and the
next step on stdout; a refusal is one line on stderr with exit code 2, a
failed copy one line with exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sqlalchemy.exc import SQLAlchemyError

from config import load_settings
from storage.copy import CopyRefused, IndexCopyError, copy_index

logger = logging.getLogger(__name__)

_PROGRESS_EVERY = 100_000


def _progress(table: str, rows: int) -> None:
    if rows % _PROGRESS_EVERY == 0:
        logger.info("copying %s: %d rows so far", table, rows)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``ichnode index``."""
    if args.action != "copy":  # argparse allows only the actions it knows
        print(f"ichnode index: unknown action {args.action!r}", file=sys.stderr)
        return 2
    settings = load_settings(args.config)
    source = settings.storage.effective_database_url
    try:
        report = copy_index(source, args.to, force=args.force, progress=_progress)
    except CopyRefused as exc:
        print(f"ichnode index copy: {exc}", file=sys.stderr)
        return 2
    except (IndexCopyError, SQLAlchemyError, OSError) as exc:
        print(f"ichnode index copy: {exc}", file=sys.stderr)
        return 1
    if report.open_associations or report.running_jobs:
        print(
            "ichnode index copy: --force: copied as they were "
            f"{len(report.open_associations)} open association(s) and "
            f"{len(report.running_jobs)} running job(s) (the scheduler queues such a job "
            "again once its heartbeat is stale)",
            file=sys.stderr,
        )
    for entry in report.tables:
        print(f"{entry.table}: {entry.rows} rows")
    print(
        f"copied {report.rows} rows to {report.target} (schema {report.revision}); next: set "
        f'storage.database_url = "{report.target}" in the configuration (or '
        "ICHNODE_STORAGE__DATABASE_URL) and restart `ichnode serve`"
    )
    return 0
