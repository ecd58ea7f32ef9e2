"""The result of analysing one series: plain dataclasses shared by the node, the UI
and ``ichnode analyze --json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SUBTYPES: tuple[str, ...] = (
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
    "epidural",
)
CLASSES: tuple[str, ...] = ("any", *SUBTYPES)


@dataclass
class SubtypeFinding:
    """Series-level decision for one subtype."""

    present: bool
    probability: float
    volume_ml: float


@dataclass
class SliceResult:
    """Per-slice probabilities for ``any`` and each subtype."""

    sop_instance_uid: str
    probabilities: dict[str, float]


@dataclass
class SeriesFindings:
    """What the model found in one series.

    ``masks`` is a boolean array (5, z, y, x) in the order of ``SUBTYPES`` and of
    ``sop_instance_uids`` (the volume's slice order, sorted along the slice
    normal), at the source images' matrix size. ``gradcam`` is float32 (z, y, x)
    in [0, 1] for the ``any`` head, or None when not computed.
    """

    study_instance_uid: str
    series_instance_uid: str
    hemorrhage_present: bool
    hemorrhage_probability: float
    subtypes: dict[str, SubtypeFinding]
    slices: list[SliceResult]
    sop_instance_uids: list[str]
    masks: np.ndarray
    gradcam: np.ndarray | None = None
    model_name: str = "ichnode-ich"
    model_version: str = ""
    weights_sha256: str = ""
    thresholds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The per-series part of the ``analyze --json`` document (without outputs/skipped)."""
        return {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "hemorrhage": {
                "present": bool(self.hemorrhage_present),
                "probability": round(float(self.hemorrhage_probability), 4),
            },
            "subtypes": {
                name: {
                    "present": bool(f.present),
                    "probability": round(float(f.probability), 4),
                    "volume_ml": round(float(f.volume_ml), 2),
                }
                for name, f in self.subtypes.items()
            },
            "slices": [
                {
                    "sop_instance_uid": s.sop_instance_uid,
                    "probabilities": {k: round(float(v), 4) for k, v in s.probabilities.items()},
                }
                for s in self.slices
            ],
        }
