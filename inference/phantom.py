"""Synthetic head-CT phantom with per-voxel labels of the five hemorrhage subtypes.

This module owns the phantom the team trains and tests on (no patient data):
:func:`generate_case` draws one head (scalp, skull with both tables and diploe,
grey and white matter, ventricles, sulci and cisterns, falx, dural sinuses,
calcifications, skull-base streaks, noise) and paints 0-3 hemorrhages shaped as
radiology describes them; :func:`write_series` writes a case as a real DICOM CT
Image Storage series. Tissues, HU values and shapes are documented in
``docs/PHANTOM.md``.

Geometry: voxel (k, j, i) sits at x = (i - (m-1)/2) * px (patient left), y = (j -
(m-1)/2) * px (posterior), z = z0 + k * dz (superior), so slice 0 is the most
inferior one, as :func:`inference.volume.load_volume` orders slices. The head
has its own frame (u left, v posterior, w superior) shifted and rotated in plane.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inference.findings import SUBTYPES

logger = logging.getLogger(__name__)

# Tissue codes of ``PhantomCase.tissue``.
AIR, SCALP, BONE, CSF, VENTRICLE, GREY, WHITE, BLOOD, OEDEMA, CALCIFICATION, VESSEL, FALX, SOFT = (
    range(13)
)
TISSUES: dict[int, str] = {
    AIR: "air",
    SCALP: "scalp",
    BONE: "bone",
    CSF: "csf",
    VENTRICLE: "ventricle",
    GREY: "grey matter",
    WHITE: "white matter",
    BLOOD: "blood",
    OEDEMA: "oedema",
    CALCIFICATION: "calcification",
    VESSEL: "vessel or dural sinus",
    FALX: "falx",
    SOFT: "soft tissue",
}
SLICE_THICKNESSES: tuple[float, ...] = (1.0, 1.25, 2.0, 2.5, 3.0, 5.0)

_F32 = np.float32


@dataclass
class PhantomCase:
    """One generated head: ``hu`` float32 (z, y, x); ``labels`` bool (5, z, y, x) in
    ``inference.findings.SUBTYPES`` order; ``spacing`` (dz, dy, dx) mm.

    ``tissue`` is uint8 (z, y, x) with the codes of :data:`TISSUES` (the tissue at
    each voxel centre before blur and noise); ``volumes_ml`` the labelled volume of
    each present subtype; ``slice_positions`` the z of each slice (mm).
    """

    hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    subtypes: tuple[str, ...]
    seed: int
    tissue: np.ndarray | None = None
    volumes_ml: dict[str, float] = field(default_factory=dict)
    slice_positions: np.ndarray | None = None
    noise_sd: float = 0.0


@dataclass
class _Anatomy:
    """Random parameters of one head (mm in the head frame, HU)."""

    scale: float
    a: float  # outer semi-axes (scalp surface)
    b: float
    c: float
    scalp: float
    outer_table: float
    diploe: float
    inner_table: float
    csf: float
    cortex: float
    vent: float
    hu_outer: float
    hu_diploe: float
    hu_inner: float
    hu_grey: float
    hu_white: float
    hu_csf: float

    @property
    def skull_inner(self) -> float:
        """Depth of the inner table's inner surface below the scalp surface."""
        return self.scalp + self.outer_table + self.diploe + self.inner_table


class _Grid:
    """Voxel coordinates in the head frame and boxes around head-frame points."""

    def __init__(
        self,
        matrix: int,
        px: float,
        w: np.ndarray,
        dz: float,
        centre: tuple[float, float],
        theta: float,
    ) -> None:
        self.matrix = matrix
        self.px = px
        self.w = w.astype(_F32)
        self.dz = dz
        self.cx, self.cy = centre
        self.cos, self.sin = math.cos(theta), math.sin(theta)
        axis = ((np.arange(matrix, dtype=_F32) - (matrix - 1) / 2.0) * px).astype(_F32)
        self.x = axis
        x = axis[None, :] - _F32(self.cx)
        y = axis[:, None] - _F32(self.cy)
        self.u = (self.cos * x + self.sin * y).astype(_F32)
        self.v = (-self.sin * x + self.cos * y).astype(_F32)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Volume shape (z, y, x)."""
        return (len(self.w), self.matrix, self.matrix)

    def box(
        self, centre: Sequence[float], radius: float
    ) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray, np.ndarray] | None:
        """Index box around head-frame ``centre`` and the (u, v, w) arrays in it."""
        u0, v0, w0 = (float(c) for c in centre)
        x0 = self.cx + self.cos * u0 - self.sin * v0
        y0 = self.cy + self.sin * u0 + self.cos * v0
        half = (self.matrix - 1) / 2.0

        def span(c: float, step: float, size: int, offset: float) -> slice:
            lo = max(0, math.floor((c - radius) / step + offset))
            hi = min(size, math.ceil((c + radius) / step + offset) + 1)
            return slice(lo, max(lo, hi))

        sx = span(x0, self.px, self.matrix, half)
        sy = span(y0, self.px, self.matrix, half)
        sz = span(w0, self.dz, len(self.w), -float(self.w[0]) / self.dz)
        if sx.start >= sx.stop or sy.start >= sy.stop or sz.start >= sz.stop:
            return None
        u = self.u[None, sy, sx]
        v = self.v[None, sy, sx]
        w = self.w[sz, None, None]
        return (sz, sy, sx), u, v, w


def _ellipsoid(
    u: np.ndarray,
    v: np.ndarray,
    w: np.ndarray,
    centre: Sequence[float],
    semi: Sequence[float],
) -> np.ndarray:
    """Boolean mask of an axis-aligned ellipsoid in the head frame."""
    q = ((u - centre[0]) / semi[0]) ** 2 + ((v - centre[1]) / semi[1]) ** 2
    return np.asarray(q + ((w - centre[2]) / semi[2]) ** 2 <= 1.0)


def _segment_distance(
    u: np.ndarray, v: np.ndarray, w: np.ndarray, p0: Sequence[float], p1: Sequence[float]
) -> np.ndarray:
    """Distance of each point to the segment p0-p1 (head frame, mm)."""
    d = np.asarray(p1, dtype=float) - np.asarray(p0, dtype=float)
    length2 = float(d @ d)
    du, dv, dw = u - p0[0], v - p0[1], w - p0[2]
    t = np.clip((du * d[0] + dv * d[1] + dw * d[2]) / length2, 0.0, 1.0)
    return np.asarray(np.sqrt((du - t * d[0]) ** 2 + (dv - t * d[1]) ** 2 + (dw - t * d[2]) ** 2))


def _floor(v: np.ndarray, scale: float) -> np.ndarray:
    """Height of the skull base under each (u, v): anterior, middle, posterior fossa."""
    knots_v = np.array([-300.0, -32.0, -18.0, 6.0, 20.0, 300.0]) * scale
    knots_w = np.array([-16.0, -16.0, -36.0, -36.0, -56.0, -56.0]) * scale
    return np.interp(v, knots_v, knots_w).astype(_F32)


def _draw_anatomy(rng: np.random.Generator, fov: float) -> _Anatomy:
    scale = float(rng.uniform(0.86, 1.06))
    b = 92.0 * scale * float(rng.uniform(0.96, 1.04))
    b = min(b, fov / 2.0 - 14.0)
    return _Anatomy(
        scale=scale,
        a=74.0 * scale * float(rng.uniform(0.94, 1.04)),
        b=b,
        c=82.0 * scale,
        scalp=float(rng.uniform(3.5, 6.5)),
        outer_table=float(rng.uniform(1.5, 2.5)),
        diploe=float(rng.uniform(2.0, 4.5)),
        inner_table=float(rng.uniform(1.2, 2.2)),
        csf=float(rng.uniform(0.8, 2.5)),
        cortex=float(rng.uniform(2.5, 4.0)),
        vent=float(rng.uniform(0.75, 1.5)),
        hu_outer=float(rng.uniform(1500.0, 2000.0)),
        hu_diploe=float(rng.uniform(700.0, 1000.0)),
        hu_inner=float(rng.uniform(1400.0, 1900.0)),
        hu_grey=float(rng.uniform(35.0, 45.0)),
        hu_white=float(rng.uniform(22.0, 30.0)),
        hu_csf=float(rng.uniform(2.0, 12.0)),
    )


def _layers(an: _Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Breakpoints (depth below the scalp surface, mm) and HU of each layer."""
    d = [0.0, 1.2, an.scalp - 1.2]
    hu = [-1000.0, 40.0, -80.0, 40.0]
    depth = an.scalp
    for thick, value in (
        (an.outer_table, an.hu_outer),
        (an.diploe, an.hu_diploe),
        (an.inner_table, an.hu_inner),
        (an.csf, an.hu_csf),
        (an.cortex, an.hu_grey),
    ):
        d.append(depth)
        hu.append(value)
        depth += thick
    d.append(depth)
    hu.append(an.hu_white)
    return np.array(d), np.array(hu)


def _profile_mean(
    depth: np.ndarray, footprint: np.ndarray, breaks: np.ndarray, values: np.ndarray
) -> np.ndarray:
    """Mean HU of the layered profile over ``depth +- footprint/2`` (partial volume)."""
    far = 1.0e4
    knots = np.concatenate(([-far], breaks, [far]))
    # Cumulative integral of the piecewise-constant profile, exact at the knots.
    seg = np.diff(knots) * values
    cum = np.concatenate(([0.0], np.cumsum(seg)))
    half = footprint * _F32(0.5)
    upper = np.interp(depth + half, knots, cum)
    lower = np.interp(depth - half, knots, cum)
    return ((upper - lower) / footprint).astype(_F32)


def _head(
    grid: _Grid, an: _Anatomy, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scalp, skull, brain surface, sulci and fissures.

    Returns ``hu``, ``tissue`` and ``dd``, the depth into the cranial cavity below
    the inner table or above the skull base (mm; negative outside it).
    """
    m2 = grid.matrix * grid.matrix
    u2, v2, w1 = grid.u, grid.v, grid.w
    a2, b2, c2 = an.a**2, an.b**2, an.c**2
    r2_plane = (u2 / an.a) ** 2 + (v2 / an.b) ** 2
    g2_plane = (u2 / a2) ** 2 + (v2 / b2) ** 2 + _F32(1e-12)
    g2_axis = ((w1 / c2) ** 2).astype(_F32)
    r = r2_plane[None] + ((w1 / an.c) ** 2).astype(_F32)[:, None, None]
    np.sqrt(r, out=r)
    g = g2_plane[None] + g2_axis[:, None, None]
    np.sqrt(g, out=g)
    d_ell = _F32(1.0) - r
    d_ell *= r
    d_ell /= g  # approximate distance below the scalp surface (mm)
    del r, g
    si = an.skull_inner
    above_floor = w1[:, None, None] - _floor(v2, an.scale)[None]
    floor_depth = above_floor + _F32(si)
    from_floor = (floor_depth < d_ell) & (d_ell > si)
    depth = np.where(from_floor, floor_depth, d_ell)
    del floor_depth
    # Below the floor the skull base is solid bone (diploe-like), then soft tissue.
    in_base = from_floor & (above_floor < 0)
    base_bone = _F32(si - an.inner_table - 0.5 * an.diploe)
    np.maximum(depth, base_bone, where=in_base, out=depth)

    # Layers with partial volume, computed only where the profile is not constant.
    margin = max(grid.px, grid.dz) / 2.0 + 0.05
    inner = si + an.csf + an.cortex
    hu = np.where(depth < 0, _F32(-1000.0), _F32(an.hu_white))
    tissue = np.where(depth < 0, np.uint8(AIR), np.uint8(WHITE))
    idx = np.flatnonzero((depth > -margin) & (depth < inner + margin))
    depth_s = depth.reshape(-1)[idx]
    zi, yx = np.divmod(idx, m2)
    nz2 = g2_axis[zi] / (g2_plane.reshape(-1)[yx] + g2_axis[zi])
    px2, dz2 = grid.px**2, grid.dz**2
    footprint = np.sqrt(px2 + (dz2 - px2) * nz2).astype(_F32)
    footprint[from_floor.reshape(-1)[idx]] = grid.dz
    breaks, values = _layers(an)
    hu.reshape(-1)[idx] = _profile_mean(depth_s, footprint, breaks, values)
    level = (
        (depth_s >= 0).astype(np.uint8)
        + (depth_s >= an.scalp)
        + (depth_s >= si)
        + (depth_s >= si + an.csf)
        + (depth_s >= inner)
    )
    lut = np.array([AIR, SCALP, BONE, CSF, GREY, WHITE], dtype=np.uint8)
    tissue.reshape(-1)[idx] = lut[level]
    dd = depth
    dd -= _F32(si)
    dd[in_base] = -1.0
    base_soft = in_base & (above_floor < -10.0 * an.scale) & (d_ell > an.scalp + an.outer_table)
    hu[base_soft] = 40.0
    tissue[base_soft] = SOFT
    del d_ell, from_floor, in_base, base_soft

    # Sulci: two interleaved sinusoidal families on the cortex, deeper with atrophy.
    phi = np.arctan2(v2 / an.b, u2 / an.a).astype(_F32).reshape(-1)
    elev = (w1 / an.c).astype(_F32)
    k1, k2 = float(rng.uniform(9, 14)), float(rng.uniform(6, 10))
    p = rng.uniform(0, 2 * np.pi, size=4)
    sulc_depth = float(rng.uniform(8.0, 16.0))
    width = float(rng.uniform(0.10, 0.18)) * an.vent
    idx = np.flatnonzero((dd >= an.csf) & (dd < sulc_depth) & (above_floor > 4.0))
    del above_floor
    zi, yx = np.divmod(idx, m2)
    phi_s, elev_s = phi[yx], elev[zi]
    s1 = np.abs(
        np.sin(_F32(k1) * phi_s + _F32(1.6) * np.sin(_F32(5.0) * elev_s + _F32(p[0])) + _F32(p[1]))
    )
    s2 = np.abs(
        np.sin(
            _F32(k2 * np.pi / 2) * elev_s
            + _F32(1.2) * np.sin(_F32(4.0) * phi_s + _F32(p[2]))
            + _F32(p[3])
        )
    )
    pattern = np.minimum(s1, s2)
    flat_hu, flat_tissue = hu.reshape(-1), tissue.reshape(-1)
    lining = idx[(pattern < width + 0.25) & (flat_tissue[idx] == WHITE)]
    flat_hu[lining] = an.hu_grey
    flat_tissue[lining] = GREY
    sulcus = idx[(pattern < width) & (dd.reshape(-1)[idx] < sulc_depth - 2.0)]
    flat_hu[sulcus] = an.hu_csf
    flat_tissue[sulcus] = CSF

    # Sylvian fissures: oblique sheets from the lateral surface running anteromedially.
    tilt = math.tan(math.radians(float(rng.uniform(25.0, 40.0))))
    sheet = np.abs(np.abs(u2) * tilt + v2 + 0.15 * an.b - 0.6 * an.a * tilt)
    ys, xs = np.nonzero((sheet < 1.0 + 0.7 * an.vent) & (np.abs(u2) > 0.35 * an.a))
    zs = (w1 > -30.0 * an.scale) & (w1 < 6.0 * an.scale)
    _paint_columns(hu, tissue, dd, (zs, ys, xs), lambda d: (d > 0) & (d < 26.0), an.hu_csf, CSF)
    # Interhemispheric fissure (the falx is painted in it later).
    ys, xs = np.nonzero(np.abs(u2) < 0.8 + 0.6 * an.vent)
    far = (np.abs(v2) > 0.5 * an.b)[ys, xs]
    zs = w1 > -12.0 * an.scale
    _paint_columns(
        hu, tissue, dd, (zs, ys, xs), lambda d: (d > 0) & ((d < 38.0) | far), an.hu_csf, CSF
    )
    return hu, tissue, dd


def _paint_columns(
    hu: np.ndarray,
    tissue: np.ndarray,
    dd: np.ndarray,
    columns: tuple[np.ndarray, np.ndarray, np.ndarray],
    condition: Callable[[np.ndarray], np.ndarray],
    value: float,
    code: int,
) -> np.ndarray:
    """Paint ``value``/``code`` where ``condition(dd block)`` holds in some columns.

    ``columns`` is (slice mask over z, ys, xs); the block is (z, n). Working on
    columns keeps thin structures (fissures, falx, sinuses) cheap on big matrices.
    Returns the painted (z, n) mask.
    """
    zs, ys, xs = columns
    ks = np.flatnonzero(zs)
    if ks.size == 0 or ys.size == 0:
        return np.zeros((0, ys.size), dtype=bool)
    block = (ks[:, None], ys[None, :], xs[None, :])
    m = np.asarray(condition(dd[block]))
    hu[block] = np.where(m, _F32(value), hu[block])
    tissue[block] = np.where(m, np.uint8(code), tissue[block])
    return m


def _paint_deep(
    grid: _Grid, an: _Anatomy, hu: np.ndarray, tissue: np.ndarray, dd: np.ndarray
) -> None:
    """Deep grey nuclei, brainstem, cisterns and ventricles (in this order)."""
    s = an.scale
    vf = an.vent

    def paint(centre: Sequence[float], semi: Sequence[float], value: float, code: int) -> None:
        centre = [c * s for c in centre]
        semi = [x * s for x in semi]
        box = grid.box(centre, max(semi))
        if box is None:
            return
        sl, u, v, w = box
        m = _ellipsoid(u, v, w, centre, semi) & (dd[sl] > 0)
        hu[sl][m] = value
        tissue[sl][m] = code

    grey, white, csf = an.hu_grey, an.hu_white, an.hu_csf
    for side in (-1.0, 1.0):
        paint((side * 15, -20, 8), (5, 9, 8), grey - 2, GREY)  # caudate head
        paint((side * 23, -5, 0), (6, 13, 9), grey - 3, GREY)  # lentiform nucleus
        paint((side * 10, 10, 2), (7, 11, 8), grey - 4, GREY)  # thalamus
    paint((0, 10, -20), (15, 15, 5), csf, CSF)  # ambient / quadrigeminal cistern
    paint((0, -12, -25), (11, 7, 4), csf, CSF)  # suprasellar cistern
    paint((0, 8, -22), (10, 9, 7), white + 3, WHITE)  # midbrain
    paint((0, -3, -43), (8, 5, 8), csf, CSF)  # prepontine cistern
    paint((0, 10, -43), (11, 9, 10), white + 3, WHITE)  # pons
    for centre, semi in _ventricle_parts(vf):
        paint(centre, semi, csf, VENTRICLE)


def _ventricle_parts(vf: float) -> list[tuple[tuple[float, ...], tuple[float, ...]]]:
    """Ellipsoids (centre, semi-axes; unit head scale) making up the ventricles."""
    parts: list[tuple[tuple[float, ...], tuple[float, ...]]] = []
    for side in (-1.0, 1.0):
        parts += [
            ((side * (8 + 3 * vf), -28, 10), (4.0 * vf, 13, 8 * vf)),  # frontal horn
            ((side * (9 + 4 * vf), -5, 17), (4.5 * vf, 22, 5 * vf)),  # body
            ((side * (14 + 4 * vf), 20, 10), (6.0 * vf, 9, 7 * vf)),  # atrium
            ((side * (14 + 3 * vf), 35, 6), (3.5 * vf, 12, 4.5 * vf)),  # occipital horn
            ((side * 28, 0, -18), (2.5 * vf, 12, 3 * vf)),  # temporal horn
        ]
    parts += [
        ((0, -2, -2), (1.5 * vf, 14, 10)),  # third ventricle
        ((0, 30, -45), (5 * vf, 3.5 * vf, 6)),  # fourth ventricle
    ]
    return parts


def _paint_confounders(
    grid: _Grid,
    an: _Anatomy,
    hu: np.ndarray,
    tissue: np.ndarray,
    dd: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Falx, dural sinuses, dense vessels, calcifications: bright but not blood."""
    s = an.scale
    u2, v2, w1 = grid.u, grid.v, grid.w
    # Falx: a thin dense sheet in the interhemispheric fissure.
    falx_hu = float(rng.uniform(50.0, 90.0))
    ys, xs = np.nonzero(np.abs(u2) < 0.6)
    far = (np.abs(v2) > 0.5 * an.b)[ys, xs]
    _paint_columns(
        hu,
        tissue,
        dd,
        (w1 > -10.0 * s, ys, xs),
        lambda d: (d > 0) & ((d < 36.0) | far),
        falx_hu,
        FALX,
    )
    if rng.random() < 0.3:  # calcified falx plaque
        box = grid.box((0.0, float(rng.uniform(-40, 20)) * s, float(rng.uniform(20, 45)) * s), 6)
        if box is not None:
            sl, bu, bv, bw = box
            m = (tissue[sl] == FALX) & (np.abs(bv - bv.mean()) < 5)
            hu[sl][m] = float(rng.uniform(150, 400))
            tissue[sl][m] = CALCIFICATION
    # Superior sagittal sinus: triangle on the midline under the inner table.
    sinus_hu = float(rng.uniform(58.0, 72.0))
    sss_depth = 7.0 * s
    ys, xs = np.nonzero(np.abs(u2) < 0.7 * sss_depth)
    width = np.abs(u2[ys, xs]) / 0.7
    posterior = (v2 > 0)[ys, xs]
    above = (w1 > 0)[:, None]
    _paint_columns(
        hu,
        tissue,
        dd,
        (w1 > -30.0 * s, ys, xs),
        lambda d: (d > 0) & (d < sss_depth - width) & (above[w1 > -30.0 * s] | posterior),
        sinus_hu,
        VESSEL,
    )
    # Transverse sinuses along the occipital inner table at the tentorium level.
    w_ts = -33.0 * s
    ys, xs = np.nonzero(v2 > 0.2 * an.b)
    zs = np.abs(w1 - w_ts) < 3.5 + 0.06 * float(np.abs(u2).max())
    offset = (0.06 * np.abs(u2[ys, xs]))[None, :]
    near = (np.abs(w1[zs][:, None] - w_ts - offset) < 3.5) if zs.any() else None
    if near is not None:
        _paint_columns(
            hu, tissue, dd, (zs, ys, xs), lambda d: (d > 0) & (d < 5.5) & near, sinus_hu, VESSEL
        )
    # Dense arteries: basilar and middle cerebral.
    vessel_hu = float(rng.uniform(45.0, 70.0))
    tubes = [((0.0, -9.0, -55.0), (0.0, -9.0, -26.0), 1.6)]
    for side in (-1.0, 1.0):
        tubes.append(((side * 8.0, -12.0, -24.0), (side * 42.0, -6.0, -14.0), 1.4))
    for p0, p1, radius in tubes:
        p0s = [c * s for c in p0]
        p1s = [c * s for c in p1]
        mid = [(a + b) / 2 for a, b in zip(p0s, p1s, strict=True)]
        half = math.dist(p0s, p1s) / 2 + radius
        box = grid.box(mid, half)
        if box is None:
            continue
        sl, bu, bv, bw = box
        m = (_segment_distance(bu, bv, bw, p0s, p1s) < radius) & (dd[sl] > 0)
        hu[sl][m] = vessel_hu
        tissue[sl][m] = VESSEL
    # Calcified pineal gland and choroid plexus (usual in adults).
    calcs: list[tuple[tuple[float, float, float], float]] = []
    if rng.random() < 0.75:
        calcs.append(((0.0, 19.0, 1.0), float(rng.uniform(1.5, 3.5))))
    if rng.random() < 0.65:
        for side in (-1.0, 1.0):
            calcs.append(((side * (14 + 4 * an.vent), 21.0, 9.0), float(rng.uniform(1.5, 3.5))))
    for centre, radius in calcs:
        cs = [c * s for c in centre]
        box = grid.box(cs, radius)
        if box is None:
            continue
        sl, bu, bv, bw = box
        m = _ellipsoid(bu, bv, bw, cs, (radius, radius, radius))
        hu[sl][m] = float(rng.uniform(110.0, 500.0))
        tissue[sl][m] = CALCIFICATION


def _paint_streaks(grid: _Grid, an: _Anatomy, hu: np.ndarray, rng: np.random.Generator) -> None:
    """Beam-hardening streaks between the petrous bones near the skull base."""
    s = an.scale
    w_pet = -38.0 * s
    amp = float(rng.uniform(15.0, 60.0))
    ends = [(-24.0 * s, 18.0 * s), (24.0 * s, 18.0 * s)]
    angles = rng.uniform(-0.5, 0.5, size=(len(ends), 2))
    signs = rng.choice([-1.0, 1.0], size=(len(ends), 2))
    head = hu > -500
    for k, wk in enumerate(grid.w):
        fall = math.exp(-(((wk - w_pet) / (5.0 * s)) ** 2))
        if fall < 0.05:
            continue
        img = np.zeros((grid.matrix, grid.matrix), dtype=_F32)
        for e, (eu, ev) in enumerate(ends):
            for n in range(angles.shape[1]):
                ang = angles[e, n] + (0.0 if n % 2 else np.pi / 2)
                dist = np.abs((grid.u - eu) * math.sin(ang) - (grid.v - ev) * math.cos(ang))
                img += _F32(signs[e, n]) * np.exp(-((dist / 1.2) ** 2)).astype(_F32)
        hu[k] += np.where(head[k], _F32(amp * fall) * img, _F32(0.0))


def _log_volume(rng: np.random.Generator) -> float:
    """Target lesion volume (mL): from ~0.2 to over 30, median ~5, most >= 1."""
    return float(np.clip(math.exp(rng.normal(math.log(5.0), 1.0)), 0.15, 80.0))


def _surface_point(an: _Anatomy, phi: float, w0: float) -> tuple[float, float, float]:
    """Point on the inner table at azimuth ``phi`` (0 = left, pi/2 = posterior), height w0."""
    si = an.skull_inner
    a_in, b_in, c_in = an.a - si, an.b - si, an.c - si
    rho = math.sqrt(max(0.05, 1.0 - (w0 / c_in) ** 2))
    return (a_in * rho * math.cos(phi), b_in * rho * math.sin(phi), w0)


class _Painter:
    """Paints hemorrhages; each subtype's label is exactly the voxels it painted."""

    def __init__(
        self,
        grid: _Grid,
        an: _Anatomy,
        hu: np.ndarray,
        tissue: np.ndarray,
        dd: np.ndarray,
        rng: np.random.Generator,
    ) -> None:
        self.grid, self.an, self.hu, self.tissue, self.dd, self.rng = grid, an, hu, tissue, dd, rng
        self.labels = np.zeros((len(SUBTYPES), *grid.shape), dtype=bool)

    def _slab_height(self) -> float:
        w = self.grid.w
        lo = max(float(w[0]), -12.0 * self.an.scale)
        hi = min(float(w[-1]), (self.an.c - self.an.skull_inner) * 0.75)
        if lo > hi:
            return float(np.clip((float(w[0]) + float(w[-1])) / 2, -30.0, 40.0))
        return float(self.rng.uniform(lo, hi))

    def _commit(
        self, name: str, sl: tuple[slice, slice, slice], m: np.ndarray, value: float
    ) -> bool:
        free = ~np.asarray(self.labels.any(axis=0))[sl]
        m = m & free
        if not m.any():
            return False
        k = SUBTYPES.index(name)
        self.labels[k][sl] |= m
        self.hu[sl][m] = value
        self.tissue[sl][m] = BLOOD
        return True

    def blood_hu(self) -> float:
        return float(self.rng.uniform(55.0, 85.0))

    def epidural(self, volume_ml: float) -> bool:
        rng = self.rng
        k = float(rng.uniform(2.0, 3.2))
        thick = (2000.0 * volume_ml / (math.pi * k * k)) ** (1.0 / 3.0)
        radius = k * thick
        side = 0.0 if rng.random() < 0.5 else math.pi
        phi = side + float(rng.uniform(-1.1, 1.1))
        centre = _surface_point(self.an, phi, self._slab_height())
        box = self.grid.box(centre, radius + 3.0)
        if box is None:
            return False
        sl, u, v, w = box
        dd = self.dd[sl]
        dist2 = (u - centre[0]) ** 2 + (v - centre[1]) ** 2 + (w - centre[2]) ** 2
        s2 = np.maximum(dist2 - dd**2, 0.0)
        # Lentiform, with blunt edges at least a quarter of the centre's thickness:
        # a sub-millimetre rim against the inner table is bone on the image, not blood.
        lens = np.maximum(1.0 - s2 / radius**2, 0.25)
        m = (dd >= 0) & (s2 < radius**2) & (dd < thick * lens)
        return self._commit("epidural", sl, m, self.blood_hu())

    def subdural(self, volume_ml: float) -> bool:
        rng = self.rng
        radius = float(rng.uniform(30.0, 70.0)) * self.an.scale
        thick = 1500.0 * volume_ml / (math.pi * radius**2)
        if thick < 4.0 or thick > 18.0:
            thick = float(np.clip(thick, 4.0, 18.0))
            radius = math.sqrt(1500.0 * volume_ml / (math.pi * thick))
        side = 1.0 if rng.random() < 0.5 else -1.0
        phi = (0.0 if side > 0 else math.pi) + float(rng.uniform(-0.7, 0.7))
        centre = _surface_point(self.an, phi, self._slab_height())
        box = self.grid.box(centre, radius + 3.0)
        if box is None:
            return False
        sl, u, v, w = box
        dd = self.dd[sl]
        dist2 = (u - centre[0]) ** 2 + (v - centre[1]) ** 2 + (w - centre[2]) ** 2
        s2 = np.maximum(dist2 - dd**2, 0.0)
        # Crescent thinning towards its tips, but never under half its thickness
        # (>= 2 mm): thinner blood against the inner table blurs into the bone.
        profile = np.sqrt(np.maximum(1.0 - s2 / radius**2, 0.25))
        m = (dd >= 0) & (s2 < radius**2) & (dd < thick * profile) & (u * side > 1.5)
        return self._commit("subdural", sl, m, float(rng.uniform(50.0, 80.0)))

    def intraparenchymal(self, volume_ml: float) -> bool:
        rng = self.rng
        an = self.an
        r0 = (3000.0 * volume_ml / (4.0 * math.pi)) ** (1.0 / 3.0)
        semi = np.array(rng.uniform(0.75, 1.3, size=3))
        semi = semi / np.prod(semi) ** (1.0 / 3.0) * r0
        centre: tuple[float, float, float] | None = None
        for _ in range(60):
            if rng.random() < 0.5:  # hypertensive: basal ganglia / thalamus
                cand = (
                    float(rng.choice([-1.0, 1.0]) * rng.uniform(10, 28) * an.scale),
                    float(rng.uniform(-15, 15) * an.scale),
                    self._slab_height(),
                )
            else:  # lobar
                phi = float(rng.uniform(0, 2 * math.pi))
                surf = _surface_point(an, phi, self._slab_height())
                depth = float(rng.uniform(0.35, 0.7))
                cand = (surf[0] * depth, surf[1] * depth, surf[2])
            box = self.grid.box(cand, 0.0)
            if box is None:
                continue
            sl, *_ = box
            if float(self.dd[sl].min()) > 3.0 and self.tissue[sl].max() in (GREY, WHITE):
                centre = cand
                break
        if centre is None:
            return False
        lobes = rng.uniform(-0.22, 0.22, size=3)
        freq = rng.integers(2, 5, size=3)
        phase = rng.uniform(0, 2 * math.pi, size=3)
        rim = float(rng.uniform(1.5, 5.0))
        box = self.grid.box(centre, float(semi.max()) * 1.3 + rim + 1.0)
        if box is None:
            return False
        sl, u, v, w = box
        du, dv, dw = (u - centre[0]) / semi[0], (v - centre[1]) / semi[1], (w - centre[2]) / semi[2]
        rho = np.sqrt(du**2 + dv**2 + dw**2)
        az = np.arctan2(dv, du)
        el = np.arctan2(dw, np.sqrt(du**2 + dv**2))
        bumpy = 1.0 + lobes[0] * np.sin(freq[0] * az + phase[0])
        bumpy = (
            bumpy
            + lobes[1] * np.sin(freq[1] * el + phase[1])
            + lobes[2] * np.cos(freq[2] * (az + el) + phase[2])
        )
        parenchyma = np.isin(self.tissue[sl], (GREY, WHITE, CSF, VESSEL)) & (self.dd[sl] > 1.0)
        m = (rho < bumpy) & parenchyma
        if not self._commit("intraparenchymal", sl, m, self.blood_hu()):
            return False
        oedema = (rho < bumpy * (1.0 + rim / r0)) & ~m & np.isin(self.tissue[sl], (GREY, WHITE))
        self.hu[sl][oedema] = float(rng.uniform(10.0, 19.0))
        self.tissue[sl][oedema] = OEDEMA
        return True

    def intraventricular(self, volume_ml: float) -> bool:
        rng = self.rng
        s = self.an.scale
        vent = self.tissue == VENTRICLE
        if not vent.any():
            return False
        y = np.broadcast_to(
            (self.grid.sin * self.grid.u + self.grid.cos * self.grid.v)[None], vent.shape
        )
        if rng.random() < 0.25:  # cast of one lateral ventricle
            side = 1.0 if rng.random() < 0.5 else -1.0
            u = np.broadcast_to(self.grid.u[None], vent.shape)
            m = vent & (u * side > 2.0 * s)
            if not m.any():
                m = vent
            return self._commit("intraventricular", (slice(None),) * 3, m, self.blood_hu())
        # Layering in the dependent (posterior) parts; gravity is along image +y.
        posterior = vent & (np.broadcast_to(self.grid.v[None], vent.shape) > 12.0 * s)
        pool = posterior if posterior.any() else vent
        if rng.random() < 0.4:  # one side only
            side = 1.0 if rng.random() < 0.5 else -1.0
            one = pool & (np.broadcast_to(self.grid.u[None], vent.shape) * side > 0)
            pool = one if one.any() else pool
        ys = y[pool]
        voxel_ml = self.grid.px**2 * self.grid.dz / 1000.0
        frac = float(np.clip(volume_ml / (ys.size * voxel_ml), 0.08, 0.85))
        level = float(np.quantile(ys, 1.0 - frac))
        m = pool & (y >= level)
        return self._commit("intraventricular", (slice(None),) * 3, m, self.blood_hu())

    def subarachnoid(self, volume_ml: float) -> bool:
        rng = self.rng
        an = self.an
        csf = self.tissue == CSF
        if not csf.any():
            return False
        w = self.grid.w
        basal_level = -22.0 * an.scale
        covers_base = float(w[0]) < basal_level + 6 and float(w[-1]) > basal_level - 6
        if covers_base and rng.random() < 0.5:
            centre: tuple[float, float, float] = (0.0, -8.0 * an.scale, basal_level)
            frac = 0.35
        else:
            phi = float(rng.uniform(0, 2 * math.pi))
            surf = _surface_point(an, phi, self._slab_height())
            centre = (surf[0] * 0.95, surf[1] * 0.95, surf[2])
            frac = 0.085
        radius = float(np.clip((3000.0 * volume_ml / (4 * math.pi * frac)) ** (1 / 3), 8.0, 50.0))
        box = self.grid.box(centre, radius)
        if box is None:
            return False
        sl, u, v, ww = box
        dist2 = (u - centre[0]) ** 2 + (v - centre[1]) ** 2 + (ww - centre[2]) ** 2
        # Sulci, fissures and cisterns, not the 0.8-2.5 mm CSF layer under the inner
        # table: blood there blurs into the bone (a label the image would not show).
        m = csf[sl] & (dist2 < radius**2) & (self.dd[sl] > an.csf + 0.5)
        return self._commit("subarachnoid", sl, m, float(rng.uniform(50.0, 80.0)))


def _blur_inplane(a: np.ndarray) -> np.ndarray:
    """[1, 2, 1]/4 along y and x (the reconstruction kernel's in-plane blur)."""
    b = a.copy()
    b[:, 1:-1, :] += a[:, 1:-1, :]
    b[:, 1:-1, :] += a[:, :-2, :]
    b[:, 1:-1, :] += a[:, 2:, :]
    b[:, 1:-1, :] *= _F32(0.25)
    out = b.copy()
    out[:, :, 1:-1] += b[:, :, 1:-1]
    out[:, :, 1:-1] += b[:, :, :-2]
    out[:, :, 1:-1] += b[:, :, 2:]
    out[:, :, 1:-1] *= _F32(0.25)
    return out


def generate_case(
    seed: int,
    *,
    n_slices: int = 32,
    matrix: int = 256,
    subtypes: Sequence[str] | None = None,
    slice_thickness: float | None = None,
    noise_sd: float | None = None,
    fov: float | None = None,
) -> PhantomCase:
    """Generate one head.

    Parameters
    ----------
    seed
        Everything is drawn from ``numpy.random.default_rng(seed)``.
    n_slices, matrix
        Volume shape ``(n_slices, matrix, matrix)``.
    subtypes
        ``None`` draws them (about half the cases negative, positives with 1-3
        subtypes); an empty sequence gives a negative case.
    slice_thickness
        Slice thickness and spacing in mm; ``None`` draws one of
        :data:`SLICE_THICKNESSES`.
    noise_sd
        Standard deviation of the image noise in HU; ``None`` draws 3-12.
    fov
        Field of view in mm; ``None`` draws 220-250. Pixel spacing is fov / matrix.

    Returns
    -------
    PhantomCase
    """
    if n_slices < 1 or matrix < 16:
        raise ValueError("n_slices must be >= 1 and matrix >= 16")
    rng = np.random.default_rng(seed)
    if subtypes is None:
        if rng.random() < 0.5:
            chosen: tuple[str, ...] = ()
        else:
            count = int(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))
            picked = set(rng.choice(len(SUBTYPES), size=count, replace=False).tolist())
            chosen = tuple(name for i, name in enumerate(SUBTYPES) if i in picked)
    else:
        unknown = [name for name in subtypes if name not in SUBTYPES]
        if unknown:
            raise ValueError(f"unknown subtype(s) {unknown}; expected some of {list(SUBTYPES)}")
        chosen = tuple(name for name in SUBTYPES if name in set(subtypes))
    fov = float(fov) if fov is not None else float(rng.uniform(220.0, 250.0))
    dz = (
        float(slice_thickness)
        if slice_thickness is not None
        else float(rng.choice(SLICE_THICKNESSES))
    )
    if dz <= 0:
        raise ValueError("slice_thickness must be positive")
    sd = float(noise_sd) if noise_sd is not None else float(rng.uniform(3.0, 12.0))
    an = _draw_anatomy(rng, fov)
    px = fov / matrix

    # The slab: whole head when it fits, otherwise a part that crosses the ventricles
    # when an intraventricular bleed is asked for, else anywhere in the cranium.
    height = dz * n_slices
    top, bottom = an.c - 4.0, -62.0 * an.scale
    if height >= top - bottom:
        mid = (top + bottom) / 2.0
    elif "intraventricular" in chosen:
        mid = float(rng.uniform(2.0, 18.0)) * an.scale
    else:
        mid = float(rng.uniform(max(bottom + height / 2, -30.0), min(top - height / 2, 45.0)))
    w = (mid + (np.arange(n_slices) - (n_slices - 1) / 2.0) * dz).astype(np.float64)
    margin = max(2.0, fov / 2.0 - an.b - 6.0)
    centre = (float(rng.uniform(-margin, margin)) * 0.6, float(rng.uniform(-margin, margin)) * 0.6)
    theta = math.radians(float(rng.uniform(-15.0, 15.0)))
    grid = _Grid(matrix, px, w, dz, centre, theta)

    hu, tissue, dd = _head(grid, an, rng)
    _paint_deep(grid, an, hu, tissue, dd)
    _paint_confounders(grid, an, hu, tissue, dd, rng)

    painter = _Painter(grid, an, hu, tissue, dd, rng)
    for name in chosen:
        volume = _log_volume(rng)
        paint = getattr(painter, name)
        for attempt in range(12):
            if paint(volume * (1.6 ** (attempt // 3))):
                break
        else:
            raise ValueError(f"could not place a {name} bleed in this slab (seed {seed})")
    _paint_streaks(grid, an, hu, rng)

    if sd > 0:
        # White noise blurred with the image: the [1, 2, 1] kernel keeps 0.375 of its sd.
        noise = rng.standard_normal(grid.shape, dtype=_F32)
        noise *= _F32(sd / 0.375)
        hu += noise
        del noise
    hu = _blur_inplane(hu)
    labels = painter.labels
    voxel_ml = px * px * dz / 1000.0
    volumes = {name: float(labels[SUBTYPES.index(name)].sum()) * voxel_ml for name in chosen}
    z0 = float(rng.uniform(-60.0, 60.0))
    return PhantomCase(
        hu=hu.astype(_F32, copy=False),
        labels=labels,
        spacing=(dz, px, px),
        subtypes=chosen,
        seed=seed,
        tissue=tissue,
        volumes_ml=volumes,
        slice_positions=(z0 + w).astype(np.float64),
        noise_sd=sd,
    )


TRANSFER_SYNTAXES: dict[str, str] = {
    "explicit": "1.2.840.10008.1.2.1",
    "implicit": "1.2.840.10008.1.2",
    "deflated": "1.2.840.10008.1.2.1.99",
    "rle": "1.2.840.10008.1.2.5",
    "jpegls": "1.2.840.10008.1.2.4.80",
    "jpeg2000": "1.2.840.10008.1.2.4.90",
}
"""Names accepted by ``write_series(transfer_syntax=...)``; a UID is accepted too."""

_WRITE_OPTIONS = frozenset(
    {
        "patient_name",
        "patient_id",
        "study_instance_uid",
        "series_instance_uid",
        "frame_of_reference_uid",
        "series_description",
        "series_number",
        "study_date",
        "transfer_syntax",
        "signed",
        "rescale_intercept",
        "rescale_slope",
        "padding_value",
        "gantry_tilt",
        "tilt_positions",
        "slice_positions",
        "shuffle",
        "suffix",
        "overrides",
    }
)


def _uid(*parts: object) -> str:
    """A UID determined by ``parts`` (so a seed always writes the same UIDs)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["ichnode-phantom", *(str(p) for p in parts)]))


def write_series(case: PhantomCase, out_dir: Path, **options: object) -> list[Path]:
    """Write ``case`` as a real DICOM CT Image Storage series into ``out_dir``.

    Parameters
    ----------
    case
        The phantom; slice k of ``case.hu`` becomes one instance.
    out_dir
        Created if missing.
    **options
        ``patient_name`` (``"Phantom^Head"``), ``patient_id`` (``"PHANTOM-<seed>"``),
        ``study_instance_uid``, ``series_instance_uid``, ``frame_of_reference_uid``
        (default: UIDs derived from the seed and the options), ``series_description``,
        ``series_number``, ``study_date``;
        ``transfer_syntax``: a key of :data:`TRANSFER_SYNTAXES` or a UID (default
        explicit VR little endian; compressed ones are lossless);
        ``signed`` (default True: PixelRepresentation 1, intercept 0; False:
        unsigned 12-bit storage with intercept -1024), ``rescale_intercept``,
        ``rescale_slope``;
        ``padding_value``: stored value written outside the reconstruction circle
        and declared as PixelPaddingValue;
        ``gantry_tilt`` (degrees): oblique ImageOrientationPatient and
        GantryDetectorTilt; ``tilt_positions`` ``"normal"`` (default: positions step
        along the tilted normal) or ``"table"`` (positions step along z, as scanners
        do, by spacing / cos(tilt));
        ``slice_positions``: the position of each slice along the normal (mm), for
        variable spacing (default ``case.slice_positions``);
        ``shuffle``: random file names and InstanceNumbers that do not follow the
        position; ``suffix`` (default ``".dcm"``; ``""`` for none);
        ``overrides``: a mapping of DICOM keyword to value set on every instance.

    Returns
    -------
    list of Path
        ``paths[k]`` holds slice k.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, CTImageStorage

    unknown = sorted(set(options) - _WRITE_OPTIONS)
    if unknown:
        raise TypeError(f"unknown write_series option(s): {', '.join(unknown)}")
    opt = dict(options)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_slices, rows, cols = case.hu.shape
    dz, dy, dx = case.spacing

    ts_name = str(opt.get("transfer_syntax", "explicit"))
    ts_value = TRANSFER_SYNTAXES.get(ts_name, ts_name)
    if not all(part.isdigit() for part in ts_value.split(".")):
        raise ValueError(
            f"unknown transfer syntax {ts_name!r}; use one of {list(TRANSFER_SYNTAXES)}"
        )
    transfer_syntax = UID(ts_value)
    if not transfer_syntax.is_transfer_syntax:
        raise ValueError(f"unknown transfer syntax {ts_name!r}")
    signed = bool(opt.get("signed", True))
    intercept = float(opt.get("rescale_intercept", 0.0 if signed else -1024.0))  # type: ignore[arg-type]
    slope = float(opt.get("rescale_slope", 1.0))  # type: ignore[arg-type]
    if slope <= 0:
        raise ValueError("rescale_slope must be positive")
    # Unsigned data are stored in 12 bits, like most scanners, unless the slope needs more.
    top = (float(case.hu.max()) - intercept) / slope
    bits_stored = 16 if signed or top > 4095 else 12
    lo, hi = (-(2**15), 2**15 - 1) if signed else (0, 2**bits_stored - 1)
    padding = opt.get("padding_value")
    if padding is not None and not lo <= int(padding) <= hi:  # type: ignore[call-overload]
        raise ValueError(f"padding_value {padding} does not fit the stored range {lo}..{hi}")

    tilt = float(opt.get("gantry_tilt", 0.0))  # type: ignore[arg-type]
    t = math.radians(tilt)
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, math.cos(t), math.sin(t)])
    normal = np.cross(row_dir, col_dir)
    positions = opt.get("slice_positions")
    if positions is None:
        positions = (
            case.slice_positions if case.slice_positions is not None else np.arange(n_slices) * dz
        )
    along = np.asarray(positions, dtype=float)
    if along.shape != (n_slices,):
        raise ValueError(f"slice_positions needs {n_slices} values, got {along.shape}")
    tilt_positions = str(opt.get("tilt_positions", "normal"))
    if tilt_positions not in ("normal", "table"):
        raise ValueError("tilt_positions must be 'normal' or 'table'")
    corner = -(cols - 1) / 2.0 * dx * row_dir - (rows - 1) / 2.0 * dy * col_dir
    if tilt_positions == "table" and tilt:
        # The table moves along z; the slices are sheared, the normal spacing is kept.
        ipp = [corner + np.array([0.0, 0.0, 1.0]) * p / math.cos(t) for p in along]
    else:
        ipp = [corner + normal * p for p in along]

    seed = case.seed
    variant = repr(sorted((k, repr(v)) for k, v in opt.items() if "uid" not in k))
    study_uid = str(opt.get("study_instance_uid") or _uid(seed, "study"))
    series_uid = str(opt.get("series_instance_uid") or _uid(seed, "series", variant, study_uid))
    frame_uid = str(opt.get("frame_of_reference_uid") or _uid(seed, "frame", series_uid))
    description = str(opt.get("series_description", f"PHANTOM HEAD {dz:g}MM"))
    study_date = str(opt.get("study_date", "20260101"))
    overrides = opt.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise TypeError("overrides must be a mapping of DICOM keyword to value")

    rng = np.random.default_rng([seed, 7919])
    order = rng.permutation(n_slices) if opt.get("shuffle") else np.arange(n_slices)
    suffix = str(opt.get("suffix", ".dcm"))
    yy, xx = np.mgrid[0:rows, 0:cols]
    outside = ((yy - (rows - 1) / 2.0) ** 2 + (xx - (cols - 1) / 2.0) ** 2) > (
        min(rows, cols) / 2.0
    ) ** 2

    paths: list[Path] = []
    for k in range(n_slices):
        stored = np.rint((case.hu[k].astype(np.float64) - intercept) / slope)
        stored = np.clip(stored, lo, hi)
        if padding is not None:
            stored[outside] = int(padding)  # type: ignore[call-overload]
        pixels = stored.astype(np.int16 if signed else np.uint16)
        sop_uid = _uid(series_uid, k)

        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study_date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "120000"
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "ichnode synthetic phantom"
        ds.ManufacturerModelName = "generate_case"
        ds.SoftwareVersions = "1"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "HEAD PHANTOM"
        ds.SeriesDescription = description
        ds.PatientName = str(opt.get("patient_name", "Phantom^Head"))
        ds.PatientID = str(opt.get("patient_id", f"PHANTOM-{seed}"))
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "HEAD"
        ds.SliceThickness = f"{dz:g}"
        ds.KVP = "120"
        ds.DataCollectionDiameter = "250"
        ds.ReconstructionDiameter = f"{cols * dx:.3f}"
        ds.GantryDetectorTilt = f"{tilt:g}"
        ds.TableHeight = "150"
        ds.ConvolutionKernel = "SMOOTH"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = str(opt.get("series_number", 2))
        ds.AcquisitionNumber = "1"
        ds.InstanceNumber = str(int(order[k]) + 1)
        ds.ImagePositionPatient = [f"{c:.4f}" for c in ipp[k]]
        ds.ImageOrientationPatient = [f"{c:.6f}" for c in (*row_dir, *col_dir)]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{along[k]:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.PixelSpacing = [f"{dy:.6f}", f"{dx:.6f}"]
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 1 if signed else 0
        if padding is not None:
            ds.PixelPaddingValue = int(padding)  # type: ignore[call-overload]
        ds.WindowCenter = "40"
        ds.WindowWidth = "80"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleType = "HU"
        for keyword, value in overrides.items():
            setattr(ds, keyword, value)

        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        if transfer_syntax.is_compressed:
            ds.file_meta.TransferSyntaxUID = UID(TRANSFER_SYNTAXES["explicit"])
            ds.compress(transfer_syntax, pixels, generate_instance_uid=False)
        else:
            ds.file_meta.TransferSyntaxUID = transfer_syntax
            ds.PixelData = pixels.tobytes()
        name = f"IM{int(rng.integers(0, 10**8)):08d}" if opt.get("shuffle") else f"CT{k + 1:04d}"
        path = out_dir / f"{name}{suffix}"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    logger.debug("wrote %d phantom instances to %s", len(paths), out_dir)
    return paths
