"""Helpers shared by the storage and receiver tests: small CT datasets, a running SCP."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid

from bench.common import make_ct_dataset
from config.settings import NodeSettings, StorageSettings
from node.scp import IngestListener, StorageSCP
from storage.archive import Archive
from storage.index import Index
from tests.interop import free_port


def small_ct(
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    index: int = 0,
    *,
    size: int = 32,
    sop_instance_uid: str | None = None,
    pixel_seed: int = 0,
) -> Dataset:
    """Return a small CT slice (``size`` x ``size``) with file meta."""
    return make_ct_dataset(
        study_instance_uid or generate_uid(),
        series_instance_uid or generate_uid(),
        index,
        rows=size,
        columns=size,
        sop_instance_uid=sop_instance_uid,
        pixel_seed=pixel_seed,
    )


def ct_series(count: int, *, size: int = 32) -> list[Dataset]:
    """Return ``count`` slices of one new series."""
    study, series = generate_uid(), generate_uid()
    return [small_ct(study, series, i, size=size) for i in range(count)]


def dataset_bytes(ds: Dataset) -> bytes:
    """Encode ``ds`` without file meta, in the transfer syntax of its file meta."""
    ts = ds.file_meta.TransferSyntaxUID
    buffer = DicomBytesIO()
    buffer.is_little_endian = ts.is_little_endian
    buffer.is_implicit_VR = ts.is_implicit_VR
    write_dataset(buffer, ds)
    return buffer.getvalue()


@dataclass
class RunningSCP:
    """An SCP listening on loopback, with its archive and index."""

    scp: StorageSCP
    index: Index
    archive: Archive
    port: int
    ae_title: str
    root: Path


@contextmanager
def running_scp(
    root: Path,
    *,
    ae_title: str = "ICHNODE",
    allowed_calling_aets: list[str] | None = None,
    min_free_disk_mb: int = 0,
    max_associations: int = 16,
    listeners: list[IngestListener] | None = None,
    synchronous: str = "NORMAL",
    shutdown_grace_s: float = 0.0,
    database_url: str = "",
) -> Iterator[RunningSCP]:
    """Start a :class:`StorageSCP` on a free loopback port; stop it afterwards.

    The index is ``root/index.sqlite`` unless ``database_url`` names another.
    """
    port = free_port()
    node = NodeSettings(
        ae_title=ae_title,
        port=port,
        allowed_calling_aets=allowed_calling_aets or [],
        max_associations=max_associations,
    )
    storage = StorageSettings(root=root, min_free_disk_mb=min_free_disk_mb)
    index = Index(
        database_url or f"sqlite:///{root / 'index.sqlite'}",
        sqlite_synchronous=synchronous,  # type: ignore[arg-type]
    )
    index.upgrade()
    archive = Archive(root)
    scp = StorageSCP(
        node, storage, archive, index, listeners or [], shutdown_grace_s=shutdown_grace_s
    )
    scp.start()
    try:
        yield RunningSCP(scp, index, archive, port, ae_title, root)
    finally:
        scp.stop()
        index.dispose()
