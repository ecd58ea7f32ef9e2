"""Start-up re-indexing of archived files that have no index row.

The C-STORE path makes the file durable (fsync, rename, folder fsync) and then
commits the row. With ``storage.sqlite_synchronous = "NORMAL"`` (the default) a
commit survives a crash of the process but not a power loss: the last
transactions may be gone after one while their files are on disk. Those
instances were acknowledged to the sender, which will not send them again.

:func:`reindex_unindexed` finds such files and indexes them from their own
headers. It looks only at series folders changed since shortly before the
newest row (``margin_s``), so its cost does not grow with the archive; with an
empty index it looks at everything (a lost or deleted index file is rebuilt).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

import pydicom
from pydicom.errors import InvalidDicomError

from storage.archive import Archive
from storage.index import Index, InstanceMeta, MissingAttributeError, UIDConflictError

logger = logging.getLogger(__name__)

#: How far before the newest row the scan starts (seconds): more than any
#: write-back delay of the index, so every file of a lost commit is covered.
DEFAULT_MARGIN_S = 600.0


@dataclass(frozen=True)
class RecoveryReport:
    """What :func:`reindex_unindexed` looked at and did."""

    scanned: int
    reindexed: int
    unreadable: int


def reindex_unindexed(
    archive: Archive, index: Index, *, margin_s: float = DEFAULT_MARGIN_S
) -> RecoveryReport:
    """Index the archived files that have no row; return what was done.

    A file that cannot be read as DICOM, or lacks a required UID, is left in
    place and logged; it never stops the node from starting.
    """
    newest = index.newest_received_at()
    since = 0.0 if newest is None else newest.replace(tzinfo=dt.UTC).timestamp() - margin_s
    files = archive.files_changed_since(since)
    if not files:
        return RecoveryReport(0, 0, 0)
    known = index.known_sop_instance_uids([path.stem for path in files])
    reindexed = unreadable = 0
    for path in files:
        if path.stem in known:
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
            meta = InstanceMeta.from_dataset(ds, transfer_syntax_uid=transfer_syntax)
        except (InvalidDicomError, MissingAttributeError, AttributeError, OSError,
                ValueError) as exc:
            logger.warning("cannot re-index %s: %s", path, exc)
            unreadable += 1
            continue
        if meta.sop_instance_uid != path.stem:
            logger.warning("cannot re-index %s: its SOPInstanceUID is %s", path,
                           meta.sop_instance_uid)
            unreadable += 1
            continue
        stat = path.stat()
        try:
            index.record_instance(
                meta,
                path=path,
                size=stat.st_size,
                calling_ae=str(ds.file_meta.get("SourceApplicationEntityTitle", "") or "").strip(),
                received_at=dt.datetime.fromtimestamp(stat.st_mtime, dt.UTC),
            )
        except UIDConflictError as exc:
            # Left on disk for a person to look at; the indexed patient's data wins.
            logger.warning("cannot re-index %s: %s", path, exc)
            unreadable += 1
            continue
        reindexed += 1
    if reindexed:
        logger.warning(
            "re-indexed %d instance(s) found on disk without an index row (index commits "
            "lost by a power failure or a crash of the machine)",
            reindexed,
        )
    return RecoveryReport(len(files), reindexed, unreadable)
