"""Phantom series written once per test session, for any test that needs real CT files.

Other test packages can use the fixture by importing it into their module:
``from tests.inference.conftest import phantom_series  # noqa: F401``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from inference.phantom import PhantomCase, generate_case, write_series


@dataclass(frozen=True)
class PhantomSeries:
    """A phantom case and the files of its series (``paths[k]`` holds slice k)."""

    case: PhantomCase
    paths: list[Path]

    @property
    def folder(self) -> Path:
        """The folder holding only this series."""
        return self.paths[0].parent


@pytest.fixture(scope="session")
def phantom_series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PhantomSeries]:
    """Small CT series (96 x 96, 5 mm slices over the whole head), one folder each.

    ``"negative"``: no bleed; ``"epidural"``: an epidural hematoma;
    ``"mixed"``: intraparenchymal + intraventricular, unsigned storage, shuffled
    file names, no ``.dcm`` suffix.
    """
    root = tmp_path_factory.mktemp("phantom-series")
    specs: dict[str, tuple[int, tuple[str, ...], dict[str, object]]] = {
        "negative": (101, (), {}),
        "epidural": (102, ("epidural",), {}),
        "mixed": (
            103,
            ("intraparenchymal", "intraventricular"),
            {"signed": False, "shuffle": True, "suffix": ""},
        ),
    }
    out: dict[str, PhantomSeries] = {}
    for name, (seed, subtypes, options) in specs.items():
        case = generate_case(seed, n_slices=32, matrix=96, subtypes=subtypes, slice_thickness=5.0)
        paths = write_series(case, root / name, patient_id=f"PHANTOM-{name}", **options)
        out[name] = PhantomSeries(case, paths)
    return out
