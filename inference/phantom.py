"""Synthetic head-CT phantom with per-voxel labels of the five hemorrhage subtypes.

CONTRACT (the implementation is being written; keep these names and fields).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class PhantomCase:
    """One generated head: ``hu`` float32 (z, y, x); ``labels`` bool (5, z, y, x) in
    ``inference.findings.SUBTYPES`` order; ``spacing`` (dz, dy, dx) mm."""

    hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    subtypes: tuple[str, ...]
    seed: int


def generate_case(
    seed: int,
    *,
    n_slices: int = 32,
    matrix: int = 256,
    subtypes: Sequence[str] | None = None,
    slice_thickness: float | None = None,
) -> PhantomCase:
    """Generate one head. ``subtypes=None`` draws them at random (about half the
    cases negative); an empty sequence gives a negative case."""
    raise NotImplementedError


def write_series(case: PhantomCase, out_dir: Path, **options: object) -> list[Path]:
    """Write ``case`` as a real DICOM CT series into ``out_dir``; return the files."""
    raise NotImplementedError
