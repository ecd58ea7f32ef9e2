"""Where the network finds its evidence in real heads without hemorrhage.

For each CT-ICH patient without hemorrhage, scored by the cross-validation
network that never saw it (``--cv-dir``) or by given weights, takes the slice
with the highest ``any`` probability and splits its Grad-CAM map (the evidence
for ``any``) over four sites of that slice:

* ``air``: outside the head (at or below -200 HU, outside the skull);
* ``outside skull``: scalp, muscle and the rest of the soft tissue outside the
  skull (above -200 HU, not enclosed by bone);
* ``bone``: 300 HU and above;
* ``intracranial``: enclosed by bone on all four sides along its row and column.

A network that reads blood reads it intracranially; evidence on the air says
that something other than the head (how much of the matrix it fills, the
headrest) moves the score. ``python -m bench.cam_sites --ctich-dir
../shared/data/ct-ich --cv-dir runs/cv2 [--weights W] [--json out.json]``.
Prints a table per fold and overall; needs torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.inner_table import BONE_HU, enclosed_by_bone

AIR_HU = -200.0
SITES = ("air", "outside skull", "bone", "intracranial")


def site_shares(hu: np.ndarray, cam: np.ndarray) -> dict[str, float]:
    """Share of the map's mass on each site of one slice (``hu`` and ``cam`` (y, x))."""
    cam = np.clip(cam.astype(np.float64), 0.0, None)
    total = float(cam.sum())
    bone = hu >= BONE_HU
    inside = enclosed_by_bone(bone) & ~bone
    outside = ~inside & ~bone
    masks = {
        "air": outside & (hu <= AIR_HU),
        "outside skull": outside & (hu > AIR_HU),
        "bone": bone,
        "intracranial": inside,
    }
    if total <= 0.0:
        return {name: float("nan") for name in SITES}
    return {name: float(cam[m].sum() / total) for name, m in masks.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cam_sites", description=__doc__)
    parser.add_argument("--ctich-dir", type=Path, required=True)
    parser.add_argument("--cv-dir", type=Path, help="cross-validation folder (fold weights)")
    parser.add_argument("--weights", help="one weights file for every patient ('' = bundled)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if (args.cv_dir is None) == (args.weights is None):
        parser.error("give --cv-dir or --weights")

    from inference.datasets import CtIchDataset
    from inference.predictor import Predictor

    dataset = CtIchDataset(args.ctich_dir)
    fold_of: dict[int, int] = {}
    if args.cv_dir is not None:
        folds = json.loads((args.cv_dir / "folds.json").read_text())["folds"]
        fold_of = {int(n): int(k) for k, members in folds.items() for n in members}
    predictors: dict[str, Predictor] = {}
    rows: list[dict[str, Any]] = []
    for ref in dataset.series:
        if ref.series_labels[0]:
            continue
        item = dataset.load(ref)
        number = int(item.key.removeprefix("ctich"))
        fold = fold_of.get(number, -1)
        weights = (str(args.cv_dir / f"fold{fold}" / "weights.pt") if args.cv_dir is not None
                   else args.weights)
        if weights not in predictors:
            predictors[weights] = Predictor(weights or None, device="cpu")
        raw = predictors[weights].run(item.volume.hu, explain=True)
        assert raw.gradcam is not None
        k = int(np.argmax(raw.slice_probabilities[:, 0]))
        rows.append({"patient": item.key, "fold": fold, "slice": k,
                     "height": k / max(1, item.volume.hu.shape[0] - 1),
                     "p_any": float(raw.slice_probabilities[k, 0]),
                     **site_shares(item.volume.hu[k], raw.gradcam[k])})

    def line(label: str, group: list[dict[str, Any]]) -> str:
        shares = [np.nanmean([r[s] for r in group]) for s in SITES]
        mostly_air = sum(r["air"] > 0.5 for r in group)
        return (f"{label:<8}{len(group):>4}" + "".join(f"{v:>15.2f}" for v in shares)
                + f"{mostly_air:>12}")

    print("Grad-CAM of the highest-scored slice of each real head without hemorrhage:"
          " share of the evidence by site (mean over patients)")
    print(f"{'fold':<8}{'n':>4}" + "".join(f"{s:>15}" for s in SITES) + f"{'air > 0.5':>12}")
    for fold in sorted({r["fold"] for r in rows}):
        print(line(str(fold) if fold >= 0 else "-", [r for r in rows if r["fold"] == fold]))
    print(line("all", rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
