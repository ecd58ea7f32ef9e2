"""The file archive: one DICOM Part 10 file per received instance.

Files live at ``<root>/dicom/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``
and hold the dataset bytes exactly as they arrived (transfer syntax preserved)
behind a File Meta Information header. A file is written to a temporary name in
its final folder, fsynced (fdatasync), renamed over the final name and the folder fsynced,
so after :meth:`Archive.store` returns the file survives a crash or power loss,
and a reader never sees a half-written file. Storing the same SOP Instance UID
again replaces the file atomically.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info

from storage.runtime import process_gone

logger = logging.getLogger(__name__)

PREAMBLE = b"\x00" * 128 + b"DICM"
#: An incoming file this old is removed at start-up whoever wrote it (seconds).
STALE_INCOMING_SECONDS = 24 * 3600.0

# DICOM UIDs are digits and dots; tolerate the letters some old devices use,
# but never anything that could step out of the archive (slashes, "..").
_SAFE_UID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$")


class ArchiveError(Exception):
    """The archive cannot store an instance (bad UID for a path, I/O failure)."""


class UnsafeUIDError(ArchiveError, ValueError):
    """A UID that cannot be used as a file or folder name."""


@dataclass(frozen=True)
class StoredFile:
    """Where an instance was stored and how large its file is."""

    path: Path
    size: int


def check_uid(value: str, name: str) -> str:
    """Return ``value`` when it can name a file or folder, else raise :class:`UnsafeUIDError`."""
    if not _SAFE_UID.match(value) or ".." in value:
        raise UnsafeUIDError(f"{name} {value!r} is not a usable UID")
    return value


_SHORT_VRS = {"UI": b"\x00", "SH": b" ", "AE": b" ", "CS": b" "}


def _fast_encode(file_meta: FileMetaDataset) -> bytes | None:
    """Encode a usual File Meta group by hand (pydicom's writer costs ~1 ms a file).

    Returns ``None`` for any element it does not handle; the caller falls back to pydicom.
    """
    parts: list[bytes] = []
    for elem in sorted(file_meta.elements(), key=lambda e: e.tag):
        tag = int(elem.tag)
        if tag == 0x00020000:
            continue
        head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        vr = str(elem.VR)
        if vr in _SHORT_VRS and isinstance(elem.value, str):
            value = elem.value.encode("ascii")
            if len(value) % 2:
                value += _SHORT_VRS[vr]
            parts.append(head + vr.encode() + struct.pack("<H", len(value)) + value)
        elif vr == "OB" and isinstance(elem.value, bytes):
            value = elem.value + (b"\x00" if len(elem.value) % 2 else b"")
            parts.append(head + b"OB\x00\x00" + struct.pack("<I", len(value)) + value)
        else:
            return None
    body = b"".join(parts)
    return b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<I", len(body)) + body


def encode_file_meta(file_meta: FileMetaDataset) -> bytes:
    """Return the encoded File Meta Information group, group length included."""
    if "FileMetaInformationVersion" not in file_meta:
        file_meta.FileMetaInformationVersion = b"\x00\x01"
    try:
        fast = _fast_encode(file_meta)
    except UnicodeEncodeError:
        fast = None
    if fast is not None:
        return fast
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_file_meta_info(buffer, file_meta, enforce_standard=True)
    return buffer.getvalue()


_datasync = getattr(os, "fdatasync", os.fsync)

#: The folder (inside ``<root>/dicom``) of files still being written.
INCOMING = ".incoming"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Archive:
    """The folder tree of received instances under ``<root>/dicom``.

    Parameters
    ----------
    root : Path
        The storage root (``storage.root``); the archive uses ``root / "dicom"``.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.dicom_root = self.root / "dicom"
        self.dicom_root.mkdir(parents=True, exist_ok=True)
        # Files being written live here until renamed into their series folder:
        # inside the archive, so the rename stays on one file system, and in one
        # folder, so tidying after a crash never walks the whole archive.
        self.incoming = self.dicom_root / INCOMING
        # Folders already known to exist and be durable (their parent fsynced).
        self._known_dirs: set[Path] = set()

    def path_for(
        self, study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str
    ) -> Path:
        """Return the final path of an instance (UIDs are checked)."""
        return (
            self.dicom_root
            / check_uid(study_instance_uid, "StudyInstanceUID")
            / check_uid(series_instance_uid, "SeriesInstanceUID")
            / f"{check_uid(sop_instance_uid, 'SOPInstanceUID')}.dcm"
        )

    def free_bytes(self) -> int:
        """Return the free space, in bytes, of the file system holding the archive."""
        return shutil.disk_usage(self.dicom_root).free

    def _ensure_dir(self, folder: Path) -> None:
        if folder in self._known_dirs:
            return
        missing: list[Path] = []
        current = folder
        while not current.exists():
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                pass  # another association created it at the same moment
            # The new entry must be durable in its parent before files inside count.
            _fsync_dir(path.parent)
        self._known_dirs.add(folder)

    def store(
        self,
        study_instance_uid: str,
        series_instance_uid: str,
        sop_instance_uid: str,
        file_meta: FileMetaDataset,
        dataset_bytes: bytes | memoryview,
    ) -> StoredFile:
        """Write one instance durably and return where it is.

        Parameters
        ----------
        study_instance_uid, series_instance_uid, sop_instance_uid : str
            The UIDs that name the folders and the file.
        file_meta : pydicom.dataset.FileMetaDataset
            File Meta Information (Transfer Syntax UID must say how
            ``dataset_bytes`` are encoded).
        dataset_bytes : bytes or memoryview
            The encoded dataset exactly as received (a view avoids a copy).

        Raises
        ------
        UnsafeUIDError
            When a UID cannot name a file or folder.
        ArchiveError
            When the file cannot be written (the temporary file is removed).
        """
        final = self.path_for(study_instance_uid, series_instance_uid, sop_instance_uid)
        header = PREAMBLE + encode_file_meta(file_meta)
        folder = final.parent
        # Unique per instance, process and thread: two associations sending the
        # same instance at once never share a temporary file.
        # The holder (host:pid) is in the name: a receiver starting up removes only
        # the leftovers of processes that are gone, never another receiver's file.
        tmp = self.incoming / (
            f".incoming-{sop_instance_uid}~{socket.gethostname()}~{os.getpid()}"
            f"~{threading.get_ident()}.tmp"
        )
        try:
            self._ensure_dir(self.incoming)
            self._ensure_dir(folder)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise ArchiveError(f"cannot create a file in {folder}: {exc}") from exc
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(header)
                fh.write(dataset_bytes)
                fh.flush()
                # fdatasync: the data and the size, not the access times.
                _datasync(fh.fileno())
            os.replace(tmp, final)
            _fsync_dir(folder)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ArchiveError(f"cannot write {final}: {exc}") from exc
        return StoredFile(path=final, size=len(header) + len(dataset_bytes))

    def remove(self, path: Path | str) -> None:
        """Remove a file of the archive (e.g. the old copy of a re-sent instance)."""
        target = Path(path)
        if self.dicom_root not in target.parents:
            raise ArchiveError(f"{target} is not inside the archive {self.dicom_root}")
        target.unlink(missing_ok=True)

    def files_changed_since(self, since: float) -> list[Path]:
        """Instance files changed at or after ``since`` (epoch seconds), sorted.

        Looks inside a series folder only when the folder itself changed since
        then (renaming a file into it updates its mtime), so the cost follows
        the recent series, not the size of the archive.
        """
        found: list[Path] = []
        with os.scandir(self.dicom_root) as studies:
            for study in studies:
                if not study.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(study.path) as series_dirs:
                    for series in series_dirs:
                        if (
                            not series.is_dir(follow_symlinks=False)
                            or series.stat(follow_symlinks=False).st_mtime < since
                        ):
                            continue
                        with os.scandir(series.path) as files:
                            found.extend(
                                Path(entry.path)
                                for entry in files
                                if entry.name.endswith(".dcm")
                                and entry.is_file(follow_symlinks=False)
                                and entry.stat(follow_symlinks=False).st_mtime >= since
                            )
        return sorted(found)

    def cleanup_incoming(self) -> int:
        """Remove temporary files left by a crash mid-write; return how many.

        Several receivers may share the archive: a file is removed when the
        process named in it (``host`` and ``pid``) is a process of this host that
        no longer runs, or when it is older than :data:`STALE_INCOMING_SECONDS`
        (a writer on another host that died). Only the incoming folder is read,
        so the cost does not grow with the archive.
        """
        count = 0
        now = time.time()
        for tmp in self.incoming.glob(".incoming-*.tmp"):
            holder = _incoming_holder(tmp.name)
            try:
                age = now - tmp.stat().st_mtime
            except FileNotFoundError:
                continue
            if age < STALE_INCOMING_SECONDS and not process_gone(holder):
                continue
            tmp.unlink(missing_ok=True)
            count += 1
        if count:
            logger.info("removed %d partial files left by an earlier stop", count)
        return count


def _incoming_holder(name: str) -> str | None:
    """``host:pid`` of the writer of an incoming file name; ``None`` when not readable.

    Names are ``.incoming-<uid>~<host>~<pid>~<thread>.tmp`` (neither a UID nor a
    host name has a ``~``). Names of older versions (``<uid>-<pid>-<thread>``)
    read as this host's.
    """
    stem = name[len(".incoming-") : -len(".tmp")]
    parts = stem.rsplit("~", 3)
    if len(parts) == 4 and parts[2].isdigit():
        return f"{parts[1]}:{parts[2]}"
    legacy = stem.rsplit("-", 2)
    if len(legacy) == 3 and legacy[1].isdigit():
        return f"{socket.gethostname()}:{legacy[1]}"
    return None
