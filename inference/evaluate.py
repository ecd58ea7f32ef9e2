"""Evaluation of weights on held-out data: ``ichnode evaluate``.

Owns the metrics (confusion counts, accuracy, precision, sensitivity,
specificity, F1, ROC AUC by the Mann-Whitney statistic, Dice), the threshold
choice used by training (highest threshold that keeps the target sensitivity,
then the middle of the gap to the next lower score), the table printed on
stdout and the ROC and confusion-matrix PNGs. Series-level metrics use the
predictor's own decisions; slice-level decisions use the same thresholds on the
per-slice probabilities. Dice is reported per subtype for lesions of 1 mL or
more. Torch and matplotlib are imported inside the functions.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.findings import CLASSES, SUBTYPES

if TYPE_CHECKING:
    from inference.datasets import LabelledVolume
    from inference.predictor import Predictor

logger = logging.getLogger(__name__)

#: Lesions at least this large (mL) count for Dice.
DICE_MIN_ML = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ichnode evaluate`` (imports nothing heavy)."""
    parser.add_argument("--weights", default="", help="weights file (default: bundled)")
    parser.add_argument("--data", choices=["phantom", "rsna", "cq500", "ctich"],
                        default="phantom")
    parser.add_argument("--seeds", default="1000000:1000200", help="phantom seeds A:B")
    parser.add_argument("--phantom-slices", type=int, default=32)
    parser.add_argument("--phantom-matrix", type=int, default=256)
    parser.add_argument("--rsna-csv", type=Path)
    parser.add_argument("--rsna-dir", type=Path)
    parser.add_argument("--cq500-reads", type=Path)
    parser.add_argument("--cq500-dir", type=Path)
    parser.add_argument("--ctich-dir", type=Path,
                        help="CT-ICH folder (v1.0.0 JPEG or v1.3.1 NIfTI layout)")
    parser.add_argument("--out", type=Path, help="folder for ROC/confusion PNGs and metrics.json")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32"],
        default="auto",
        help="auto: float16 autocast on CUDA, bfloat16 on CPUs with AMX (as the node runs)",
    )


# --- metrics ------------------------------------------------------------------


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); NaN without both classes."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    thresholds = np.unique(s)[::-1]
    n_pos, n_neg = max(1, int(y.sum())), max(1, int((~y).sum()))
    tpr = [0.0] + [float((s[y] >= t).sum()) / n_pos for t in thresholds]
    fpr = [0.0] + [float((s[~y] >= t).sum()) / n_neg for t in thresholds]
    return np.array(fpr), np.array(tpr)


@dataclass
class BinaryMetrics:
    """Confusion counts and the usual rates of one binary decision."""

    tp: int
    tn: int
    fp: int
    fn: int
    auc: float = float("nan")

    @classmethod
    def from_arrays(
        cls, labels: np.ndarray, decisions: np.ndarray, scores: np.ndarray | None = None
    ) -> BinaryMetrics:
        """Count ``decisions`` against ``labels``; AUC from ``scores`` when given."""
        y = np.asarray(labels, dtype=bool)
        d = np.asarray(decisions, dtype=bool)
        return cls(
            tp=int((y & d).sum()),
            tn=int((~y & ~d).sum()),
            fp=int((~y & d).sum()),
            fn=int((y & ~d).sum()),
            auc=roc_auc(y, scores) if scores is not None else float("nan"),
        )

    @property
    def n(self) -> int:
        return self.tp + self.tn + self.fp + self.fn

    @staticmethod
    def _ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    @property
    def accuracy(self) -> float:
        return self._ratio(self.tp + self.tn, self.n)

    @property
    def precision(self) -> float:
        return self._ratio(self.tp, self.tp + self.fp)

    @property
    def sensitivity(self) -> float:
        return self._ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        return self._ratio(self.tn, self.tn + self.fp)

    @property
    def f1(self) -> float:
        return self._ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    def to_dict(self) -> dict[str, float | int]:
        """Counts and rates for ``metrics.json``."""
        return {
            "n": self.n, "tp": self.tp, "tn": self.tn, "fp": self.fp, "fn": self.fn,
            "accuracy": self.accuracy, "precision": self.precision,
            "sensitivity": self.sensitivity, "specificity": self.specificity,
            "f1": self.f1, "auc": self.auc,
        }


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom


def blood_dice(item: LabelledVolume, masks: np.ndarray) -> list[tuple[int, float, int, int, int]]:
    """Dice of the predicted blood (union of the subtype ``masks``, (5, z, y, x)) on each
    slice of ``item`` with a published any-blood mask (``item.blood_slices``):
    ``(slice index, dice, intersection, predicted pixels, true pixels)``."""
    out: list[tuple[int, float, int, int, int]] = []
    if item.blood_slices is None or item.masks is None:
        return out
    for k in np.flatnonzero(item.blood_slices):
        pred = np.asarray(masks[:, k].any(axis=0), dtype=bool)
        truth = np.asarray(item.masks[:, k].any(axis=0), dtype=bool)
        out.append((int(k), dice(pred, truth), int((pred & truth).sum()), int(pred.sum()),
                    int(truth.sum())))
    return out


def pick_threshold(labels: np.ndarray, scores: np.ndarray, sensitivity: float) -> float:
    """The decision threshold for at least ``sensitivity`` with the best specificity.

    The highest threshold that keeps the sensitivity sets the best specificity.
    From there the threshold goes down past every further positive score that
    lets no further negative through: at that specificity it is as sensitive as
    the data allow (on well-separated validation data every positive is kept, not
    just the required share). It is then moved down to the middle (in log-odds)
    of the gap to the next lower score, so a small shift of the scores does not
    cost sensitivity. Without positives or negatives: 0.5.
    """
    y = np.asarray(labels, dtype=bool)
    s = np.clip(np.asarray(scores, dtype=np.float64), 1e-6, 1 - 1e-6)
    if y.all() or not y.any():
        logger.warning("threshold: validation set lacks positives or negatives, using 0.5")
        return 0.5
    positives = np.sort(s[y])[::-1]
    negatives = s[~y]
    k = max(1, math.ceil(sensitivity * len(positives) - 1e-9))
    t = positives[k - 1]
    let_through = np.count_nonzero(negatives >= t)
    for p in positives[k:]:
        if np.count_nonzero(negatives >= p) > let_through:
            break
        t = p
    below = s[s < t]

    def logit(p: float) -> float:
        return math.log(p / (1 - p))

    low = logit(float(below.max())) if below.size else logit(t) - 2.0
    mid = (logit(float(t)) + low) / 2.0
    return float(1.0 / (1.0 + math.exp(-mid)))


# --- collection ---------------------------------------------------------------


@dataclass
class EvalResults:
    """Everything evaluation needs, gathered over the data set."""

    series_labels: np.ndarray
    series_probabilities: np.ndarray
    series_decisions: np.ndarray
    slice_labels: np.ndarray
    slice_probabilities: np.ndarray
    thresholds: dict[str, float]
    dice: dict[str, list[float]] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    per_series_slices: list[np.ndarray] = field(default_factory=list)
    #: Dice of the predicted blood (union of subtype masks) on slices with a published
    #: any-blood mask (CT-ICH), one value a slice.
    blood_dice: list[float] = field(default_factory=list)


def collect(
    predictor: Predictor, items: Iterable[LabelledVolume], *, explain: bool = False
) -> EvalResults:
    """Run ``predictor`` on every item and gather labels, scores and Dice."""
    series_labels, series_probs, series_dec = [], [], []
    slice_labels, slice_probs = [], []
    dices: dict[str, list[float]] = {name: [] for name in SUBTYPES}
    keys = []
    per_series: list[np.ndarray] = []
    blood_dice_values: list[float] = []
    for item in items:
        findings = predictor.predict(item.volume, explain=explain)
        keys.append(item.key)
        per_series.append(
            np.array([[s.probabilities[c] for c in CLASSES] for s in findings.slices])
        )
        series_labels.append(np.asarray(item.series_labels, dtype=bool))
        series_probs.append(
            [findings.hemorrhage_probability]
            + [findings.subtypes[n].probability for n in SUBTYPES]
        )
        series_dec.append(
            [findings.hemorrhage_present] + [findings.subtypes[n].present for n in SUBTYPES]
        )
        if item.slice_labels is not None:
            slice_labels.append(np.asarray(item.slice_labels, dtype=bool))
            slice_probs.append(
                np.array([[s.probabilities[c] for c in CLASSES] for s in findings.slices])
            )
        if item.blood_slices is not None:
            blood_dice_values.extend(d[1] for d in blood_dice(item, findings.masks))
        elif item.masks is not None:
            voxel_ml = item.volume.voxel_volume_ml
            for i, name in enumerate(SUBTYPES):
                if float(item.masks[i].sum()) * voxel_ml >= DICE_MIN_ML:
                    dices[name].append(dice(findings.masks[i], item.masks[i]))
        logger.debug("evaluated %s", item.key)
    if not series_labels:
        raise ValueError("no series to evaluate")
    n_cls = len(CLASSES)
    return EvalResults(
        series_labels=np.array(series_labels, dtype=bool),
        series_probabilities=np.array(series_probs, dtype=np.float64),
        series_decisions=np.array(series_dec, dtype=bool),
        slice_labels=(
            np.concatenate(slice_labels) if slice_labels else np.zeros((0, n_cls), dtype=bool)
        ),
        slice_probabilities=(
            np.concatenate(slice_probs) if slice_probs else np.zeros((0, n_cls))
        ),
        thresholds=dict(predictor.thresholds),
        dice=dices,
        keys=keys,
        per_series_slices=per_series,
        blood_dice=blood_dice_values,
    )


def compute_metrics(results: EvalResults) -> dict[str, dict[str, BinaryMetrics]]:
    """``{"series": {class: metrics}, "slice": {...}}`` (slice level only with slice labels)."""
    out: dict[str, dict[str, BinaryMetrics]] = {"series": {}}
    for i, name in enumerate(CLASSES):
        out["series"][name] = BinaryMetrics.from_arrays(
            results.series_labels[:, i],
            results.series_decisions[:, i],
            results.series_probabilities[:, i],
        )
    if len(results.slice_labels):
        out["slice"] = {}
        for i, name in enumerate(CLASSES):
            probs = results.slice_probabilities[:, i]
            out["slice"][name] = BinaryMetrics.from_arrays(
                results.slice_labels[:, i], probs >= results.thresholds[name], probs
            )
    return out


def format_table(
    metrics: dict[str, dict[str, BinaryMetrics]], dices: dict[str, list[float]]
) -> str:
    """The plain-text table printed by ``ichnode evaluate``."""

    def f(v: float) -> str:
        return "   nan" if math.isnan(v) else f"{v:6.3f}"

    head = (
        f"{'level':<7}{'class':<17}{'n':>6}{'TP':>6}{'TN':>6}{'FP':>6}{'FN':>6}"
        f"{'acc':>7}{'prec':>7}{'sens':>7}{'spec':>7}{'F1':>7}{'AUC':>7}"
    )
    lines = [head, "-" * len(head)]
    for level, per_class in metrics.items():
        for name, m in per_class.items():
            lines.append(
                f"{level:<7}{name:<17}{m.n:>6}{m.tp:>6}{m.tn:>6}{m.fp:>6}{m.fn:>6}"
                f" {f(m.accuracy)} {f(m.precision)} {f(m.sensitivity)} {f(m.specificity)}"
                f" {f(m.f1)} {f(m.auc)}"
            )
    if any(dices.values()):
        lines.append("")
        lines.append(f"Dice, lesions >= {DICE_MIN_ML:g} mL: {'subtype':<17}{'n':>5}{'mean':>8}")
        all_values: list[float] = []
        for name, values in dices.items():
            all_values += values
            mean = float(np.mean(values)) if values else float("nan")
            lines.append(f"{'':<27}{name:<17}{len(values):>5}  {f(mean)}")
        lines.append(f"{'':<27}{'all lesions':<17}{len(all_values):>5}  "
                     f"{f(float(np.mean(all_values)))}")
        per_subtype = [float(np.mean(v)) for v in dices.values() if v]
        lines.append(f"{'':<27}{'mean of subtypes':<17}{len(per_subtype):>5}  "
                     f"{f(float(np.mean(per_subtype)))}")
    return "\n".join(lines)


def mean_dice(dices: dict[str, list[float]]) -> float:
    """Mean over subtypes of the per-subtype mean Dice (subtypes without lesions left out)."""
    per_subtype = [float(np.mean(v)) for v in dices.values() if v]
    return float(np.mean(per_subtype)) if per_subtype else float("nan")


def write_plots(results: EvalResults, metrics: dict[str, dict[str, BinaryMetrics]],
                out: Path) -> list[Path]:
    """ROC curves and confusion matrices as PNGs in ``out``; return the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    levels = {"series": (results.series_labels, results.series_probabilities)}
    if len(results.slice_labels):
        levels["slice"] = (results.slice_labels, results.slice_probabilities)
    for level, (labels, probs) in levels.items():
        fig, ax = plt.subplots(figsize=(6, 6))
        for i, name in enumerate(CLASSES):
            if labels[:, i].all() or not labels[:, i].any() or name not in metrics[level]:
                continue
            fpr, tpr = roc_curve(labels[:, i], probs[:, i])
            ax.plot(fpr, tpr, label=f"{name} (AUC {metrics[level][name].auc:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01),
               title=f"ROC, {level} level")
        ax.legend(loc="lower right", fontsize=8)
        path = out / f"roc_{level}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

        shown = [name for name in CLASSES if name in metrics[level]]
        if not shown:
            continue
        fig, axes = plt.subplots(1, len(shown), figsize=(3 * len(shown), 3.2), squeeze=False)
        for ax, name in zip(axes[0], shown, strict=True):
            m = metrics[level][name]
            grid = np.array([[m.tn, m.fp], [m.fn, m.tp]])
            ax.imshow(grid, cmap="Blues")
            for (r, c), v in np.ndenumerate(grid):
                ax.text(c, r, str(v), ha="center", va="center",
                        color="white" if v > grid.max() / 2 else "black")
            ax.set_xticks([0, 1], ["absent", "present"])
            ax.set_yticks([0, 1], ["absent", "present"])
            ax.set(xlabel="predicted", ylabel="truth", title=name)
        fig.suptitle(f"Confusion matrices, {level} level")
        fig.tight_layout()
        path = out / f"confusion_{level}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def evaluate_items(
    predictor: Predictor, items: Iterable[LabelledVolume], out: Path | None = None
) -> tuple[str, dict[str, Any]]:
    """Collect, compute and (with ``out``) write plots and ``metrics.json``.

    Returns the printed table and the metrics document.
    """
    results = collect(predictor, items)
    metrics = compute_metrics(results)
    doc: dict[str, Any] = {
        "model_version": predictor.model_version,
        "weights_sha256": predictor.weights_sha256,
        "thresholds": results.thresholds,
        "series": len(results.series_labels),
        "slices": len(results.slice_labels),
        "metrics": {lvl: {n: m.to_dict() for n, m in d.items()} for lvl, d in metrics.items()},
        "dice": {n: {"n": len(v), "mean": float(np.mean(v)) if v else None}
                 for n, v in results.dice.items()},
        "mean_dice": mean_dice(results.dice),
        "blood_dice": {"n": len(results.blood_dice),
                       "mean": float(np.mean(results.blood_dice)) if results.blood_dice else None},
    }
    if out is not None:
        doc["plots"] = [str(p) for p in write_plots(results, metrics, out)]
        (out / "metrics.json").write_text(json.dumps(doc, indent=2, default=_json_default))
    table = format_table(metrics, results.dice)
    if results.blood_dice:
        table += (f"\nDice of predicted blood on the {len(results.blood_dice)} slices with a "
                  f"published mask: mean {float(np.mean(results.blood_dice)):.3f}")
    return table, doc


def _json_default(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"cannot serialise {type(value).__name__}")


def run_cli(args: argparse.Namespace) -> int:
    """``ichnode evaluate``: table on stdout, exit 0; a one-line message and 2 on bad input."""
    from inference.datasets import (
        Cq500Dataset,
        CtIchDataset,
        DatasetError,
        RsnaDataset,
        iter_loaded,
        parse_seeds,
        phantom_cases,
    )
    from inference.predictor import Predictor, WeightsError

    try:
        predictor = Predictor(args.weights or None, device=args.device, precision=args.precision)
        items: Iterable[LabelledVolume]
        if args.data == "phantom":
            seeds = parse_seeds(args.seeds)
            items = phantom_cases(seeds, n_slices=args.phantom_slices, matrix=args.phantom_matrix)
            source = f"phantom seeds {args.seeds}"
        elif args.data == "rsna":
            if args.rsna_csv is None or args.rsna_dir is None:
                raise DatasetError("--data rsna needs --rsna-csv and --rsna-dir")
            rsna = RsnaDataset(args.rsna_csv, args.rsna_dir)
            items, source = iter_loaded(rsna, rsna.series), f"RSNA {args.rsna_dir}"
        elif args.data == "ctich":
            if args.ctich_dir is None:
                raise DatasetError("--data ctich needs --ctich-dir")
            ctich = CtIchDataset(args.ctich_dir)
            items = iter_loaded(ctich, ctich.series)
            source = f"CT-ICH {ctich.layout} {args.ctich_dir}"
        else:
            if args.cq500_reads is None or args.cq500_dir is None:
                raise DatasetError("--data cq500 needs --cq500-reads and --cq500-dir")
            cq500 = Cq500Dataset(args.cq500_reads, args.cq500_dir)
            items, source = iter_loaded(cq500, cq500.series), f"CQ500 {args.cq500_dir}"
        table, doc = evaluate_items(predictor, items, args.out)
    except (DatasetError, WeightsError, ValueError) as exc:
        print(f"ichnode evaluate: {exc}", file=sys.stderr)
        return 2
    print(f"model {predictor.model_name} {predictor.model_version} "
          f"(sha256 {predictor.weights_sha256[:12]}, {predictor.device} "
          f"{predictor.precision_label}) on {source}: "
          f"{doc['series']} series, {doc['slices']} slices")
    print(table)
    if args.out is not None:
        print(f"plots and metrics.json in {args.out}")
    return 0
