"""bench.cam_sites: evidence split over air, scalp, bone and the inside of the skull."""

from __future__ import annotations

import numpy as np
import pytest

from bench.cam_sites import SITES, site_shares


def _head() -> np.ndarray:
    """64 x 64 slice: air, a scalp ring, a skull ring, brain inside."""
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 32, xx - 32)
    hu = np.full((64, 64), -1000.0)
    hu[r < 26] = 40.0  # scalp
    hu[r < 23] = 1200.0  # skull
    hu[r < 20] = 35.0  # brain
    return hu


@pytest.mark.parametrize(
    ("where", "site"),
    [((32, 32), "intracranial"), ((2, 2), "air"), ((32, 7), "outside skull"),
     ((32, 10), "bone")],
)
def test_each_site_gets_the_evidence_put_on_it(where: tuple[int, int], site: str) -> None:
    cam = np.zeros((64, 64))
    cam[where] = 1.0
    shares = site_shares(_head(), cam)
    assert shares[site] == pytest.approx(1.0)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert set(shares) == set(SITES)


def test_evidence_split_in_proportion_and_empty_maps_are_undefined() -> None:
    cam = np.zeros((64, 64))
    cam[32, 32] = 3.0
    cam[1, 1] = 1.0
    shares = site_shares(_head(), cam)
    assert shares["intracranial"] == pytest.approx(0.75)
    assert shares["air"] == pytest.approx(0.25)
    assert all(np.isnan(v) for v in site_shares(_head(), np.zeros((64, 64))).values())
