"""Why a phantom-trained network calls the inner table of the skull a subdural.

Measures, on the CT-ICH patients without hemorrhage and on negative phantom heads:

1. the image: in bands of distance inside the inner table (bone >= 300 HU), the
   share of intracranial pixels in the range where acute blood lies (55-150 HU,
   bright in the subdural window), and their mean HU;
2. the network: for each weights file (or the fold weights of a cross-validation
   folder, each patient scored by the network that did not train on it), the
   series called positive and where the predicted blood lies: the share of
   predicted mask pixels within 3 mm of bone.

``python -m bench.inner_table --ctich-dir ../shared/data/ct-ich [--weights W ...]
[--cv-dir runs/crossval] [--json out.json]``. Prints a table; needs torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

BONE_HU = 300.0
BLOOD_HU = (55.0, 150.0)
BANDS_MM = ((0.0, 1.0), (1.0, 2.0), (2.0, 3.0), (3.0, 5.0), (5.0, 10.0))
WORK = 256


def enclosed_by_bone(bone: np.ndarray) -> np.ndarray:
    """(..., y, x) bool: pixels with bone somewhere left, right, above and below them."""
    b = bone.astype(np.uint8)
    inside = np.ones_like(bone, dtype=bool)
    for axis in (-2, -1):
        inside &= np.maximum.accumulate(b, axis=axis).astype(bool)
        inside &= np.flip(np.maximum.accumulate(np.flip(b, axis), axis=axis), axis).astype(bool)
    return inside


def _distance_inside(hu: np.ndarray, pixel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """(z, S, S) HU at the working matrix to (intracranial mask, distance to bone in mm).

    Intracranial: not bone, soft-tissue density, with bone on both sides along its
    row and its column. Distance by repeated 3x3 dilation (chessboard).
    """
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(hu.astype(np.float32))[:, None]
    bone = t >= BONE_HU
    free = ~bone
    outside = ~torch.from_numpy(enclosed_by_bone(bone[:, 0].numpy()))[:, None]
    inside = free & ~outside & (t > -50) & (t < 200)
    dist = torch.full_like(t, 1e9)
    front = bone.clone()
    dist[front] = 0
    for step in range(1, int(10.0 / pixel_mm) + 2):
        front = F.max_pool2d(front.float(), 3, 1, 1) > 0
        newly = front & (dist > 1e8)
        dist[newly] = step * pixel_mm
    return inside[:, 0].numpy(), dist[:, 0].numpy()


def _resample(hu: np.ndarray, pixel_mm: float) -> tuple[np.ndarray, float]:
    import torch

    from inference.windows import resize_plane

    small = resize_plane(torch.from_numpy(hu.astype(np.float32))[:, None], (WORK, WORK))
    return small[:, 0].numpy(), pixel_mm * hu.shape[-1] / WORK


def image_profile(volumes: list[tuple[np.ndarray, float]]) -> list[dict[str, float]]:
    """Per distance band: share of intracranial pixels at blood density, mean HU."""
    counts = np.zeros((len(BANDS_MM), 3))
    for hu, pixel_mm in volumes:
        small, px = _resample(hu, pixel_mm)
        inside, dist = _distance_inside(small, px)
        for b, (lo, hi) in enumerate(BANDS_MM):
            sel = inside & (dist > lo) & (dist <= hi)
            values = small[sel]
            counts[b] += (len(values), int(((values >= BLOOD_HU[0])
                                            & (values <= BLOOD_HU[1])).sum()), float(values.sum()))
    return [{"band_mm": f"{lo:g}-{hi:g}", "pixels": int(n),
             "blood_density_share": float(k / n) if n else float("nan"),
             "mean_hu": float(s / n) if n else float("nan")}
            for (lo, hi), (n, k, s) in zip(BANDS_MM, counts, strict=True)]


def network_profile(predictions: list[tuple[np.ndarray, float, np.ndarray, bool]]
                    ) -> dict[str, Any]:
    """``(hu, pixel_mm, masks (5,z,y,x), called positive)`` per negative patient."""
    import torch

    near = total = 0
    per_subtype = np.zeros(5)
    for hu, pixel_mm, masks, _ in predictions:
        small, px = _resample(hu, pixel_mm)
        _, dist = _distance_inside(small, px)
        m = torch.from_numpy(masks.astype(np.float32))  # (5, z, y, x)
        from inference.windows import resize_plane

        ms = resize_plane(m.permute(1, 0, 2, 3), (WORK, WORK)).permute(1, 0, 2, 3).numpy() > 0.5
        union = ms.any(axis=0)
        total += int(union.sum())
        near += int((union & (dist <= 3.0)).sum())
        per_subtype += ms.reshape(5, -1).sum(axis=1)
    from inference.findings import SUBTYPES

    return {
        "patients": len(predictions),
        "called_positive": int(sum(p[3] for p in predictions)),
        "mask_pixels": total,
        "share_within_3mm_of_bone": near / total if total else float("nan"),
        "mask_pixels_by_subtype": {n: int(v) for n, v in zip(SUBTYPES, per_subtype, strict=True)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inner_table", description=__doc__)
    parser.add_argument("--ctich-dir", type=Path, required=True)
    parser.add_argument("--weights", nargs="*", default=[], help="weights files ('' = bundled)")
    parser.add_argument("--cv-dir", type=Path, help="cross-validation folder (fold weights)")
    parser.add_argument("--phantoms", type=int, default=26)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from inference.datasets import CtIchDataset
    from inference.phantom import generate_case
    from inference.predictor import Predictor

    dataset = CtIchDataset(args.ctich_dir)
    negatives = [r for r in dataset.series if not r.series_labels[0]]
    items = [dataset.load(r) for r in negatives]
    real = [(it.volume.hu, it.volume.spacing[1]) for it in items]
    phantoms = []
    for seed in range(1_000_000, 1_000_000 + args.phantoms):
        case = generate_case(seed, n_slices=32, matrix=256, subtypes=(), slice_thickness=5.0)
        phantoms.append((np.asarray(case.hu), float(case.spacing[1])))
    doc: dict[str, Any] = {"image": {"ctich_negatives": image_profile(real),
                                     "phantom_negatives": image_profile(phantoms)},
                           "network": {}}
    runs: dict[str, Any] = {}
    for w in args.weights:
        runs[w or "bundled"] = lambda key, w=w: w or None
    if args.cv_dir is not None:
        folds = json.loads((args.cv_dir / "folds.json").read_text())["folds"]
        fold_of = {int(n): int(k) for k, members in folds.items() for n in members}
        runs[f"out-of-fold {args.cv_dir}"] = (
            lambda key: str(args.cv_dir / f"fold{fold_of[int(key[5:])]}" / "weights.pt"))
    for name, weights_for in runs.items():
        predictors: dict[str | None, Predictor] = {}
        preds = []
        for item in items:
            w = weights_for(item.key)
            if w not in predictors:
                predictors[w] = Predictor(w, device="cpu")
            raw = predictors[w].run(item.volume.hu, explain=False)
            findings = predictors[w].findings(item.volume, raw)
            preds.append((item.volume.hu, item.volume.spacing[1], raw.masks,
                          findings.hemorrhage_present))
        doc["network"][name] = network_profile(preds)

    print(f"{'band inside the inner table':<30}{'CT-ICH negatives':>28}{'phantom negatives':>28}")
    print(f"{'':<30}{'55-150 HU share, mean HU':>28}{'55-150 HU share, mean HU':>28}")
    for r, p in zip(doc["image"]["ctich_negatives"], doc["image"]["phantom_negatives"],
                    strict=True):
        print(f"{r['band_mm'] + ' mm':<30}{r['blood_density_share']:>18.3f}{r['mean_hu']:>10.1f}"
              f"{p['blood_density_share']:>18.3f}{p['mean_hu']:>10.1f}")
    for name, n in doc["network"].items():
        print(f"{name}: {n['called_positive']}/{n['patients']} negative patients called "
              f"positive; {n['mask_pixels']} mask pixels, "
              f"{n['share_within_3mm_of_bone']:.3f} of them within 3 mm of bone; "
              f"by subtype {n['mask_pixels_by_subtype']}")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
