"""DICOM series to a volume in Hounsfield units with its geometry.

CONTRACT (the implementation is being written; keep these names and fields).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset


class SeriesSkipped(Exception):
    """A series that cannot be analysed; ``reason`` is a short human sentence."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Volume:
    """One series as a HU volume.

    ``hu`` is float32 (z, y, x), slices sorted along the slice normal (ascending
    position), rows and columns as stored. ``spacing`` is (dz, dy, dx) in mm with dz
    the median spacing between slice positions; ``slice_positions`` the position
    of each slice along the normal (mm), so variable spacing is kept.
    ``datasets`` are the source headers in the same order (pixel data may be
    dropped to save memory).
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    slice_positions: np.ndarray
    image_orientation: tuple[float, ...]
    origin: tuple[float, float, float]
    sop_instance_uids: list[str]
    datasets: list[Dataset]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str | None = None

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL from the true pixel spacing and slice spacing."""
        dz, dy, dx = self.spacing
        return float(dz * dy * dx) / 1000.0


def load_volume(datasets: Sequence[Dataset]) -> Volume:
    """Build the volume of one series; raise :class:`SeriesSkipped` when it cannot be analysed."""
    raise NotImplementedError


def read_series(paths: Iterable[Path]) -> tuple[dict[str, list[Dataset]], list[tuple[Path, str]]]:
    """Read files and folders (recursively) and group datasets by SeriesInstanceUID.

    Returns the groups and a list of (path, reason) for files that are not
    readable DICOM.
    """
    raise NotImplementedError
