"""Patient-level k-fold cross-validation on real CT: ``ichnode crossval``.

Every patient of a CT-ICH folder is put in one of ``--folds`` folds (stratified
by hemorrhage, shuffled by ``--fold-seed``). For each fold a network is trained
(``inference.train``, any of its options, typically fine-tuned from
phantom-pretrained weights with ``--init`` and mixed with phantom cases) on the
other folds' patients, and then scores the fold's patients, which it never saw.
The out-of-fold predictions of all patients give the table (series and slice
level, the seed paper's metrics plus ROC AUC, per subtype with at least
``MIN_SUBTYPE_PATIENTS`` positive patients), Dice of the predicted blood (union of
the subtype masks) on the slices with a published mask, ROC and confusion PNGs,
``oof_slices.csv`` and ``oof_series.csv`` with every probability, and
``thresholds.json``: the slice pooling and series thresholds chosen on the
out-of-fold predictions for the target sensitivity, for ``ichnode train
--thresholds-from``.

Two sets of decisions are reported: at the thresholds chosen on all
out-of-fold predictions (the ones the shipped weights use; the threshold has
seen every patient's score), and at thresholds chosen for each fold on the other
folds' predictions only (no patient's own score sets its threshold).

The run is resumable: a fold whose weights exist is not trained again, a fold
with a checkpoint resumes from it. Progress goes to ``<out>/crossval.log``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from inference.findings import CLASSES

if TYPE_CHECKING:
    from inference.datasets import CtIchDataset
    from inference.evaluate import BinaryMetrics, EvalResults

logger = logging.getLogger(__name__)

#: Target series sensitivity of the shipped thresholds.
TARGET_SENSITIVITY = 0.90
#: A subtype gets its own rows when at least this many patients have it.
MIN_SUBTYPE_PATIENTS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``ichnode crossval``: the training options plus the folds."""
    from inference.train import add_arguments as train_arguments

    train_arguments(parser)
    cv = parser.add_argument_group("cross-validation")
    cv.add_argument("--folds", type=int, default=5)
    cv.add_argument("--fold-seed", type=int, default=0, help="seed of the patient shuffle")
    cv.add_argument("--cv-dir", type=Path, default=Path("runs/crossval"),
                    help="folder for fold weights, checkpoints, predictions, table and plots")
    cv.add_argument("--target-sensitivity", type=float, default=TARGET_SENSITIVITY)
    cv.add_argument("--report-only", action="store_true",
                    help="train nothing: report from the fold weights already in --cv-dir")
    parser.set_defaults(data="ctich")


def run_cli(args: argparse.Namespace) -> int:
    """Exit 0 with the table on stdout; 2 and a one-line message on bad input."""
    from inference.datasets import DatasetError
    from inference.predictor import WeightsError

    try:
        table = crossval(args)
    except (DatasetError, WeightsError, ValueError, OSError) as exc:
        logger.debug("cross-validation stopped", exc_info=True)
        print(f"ichnode crossval: {exc}", file=sys.stderr)
        return 2
    print(table)
    return 0


def _fold_args(args: argparse.Namespace, fold_dir: Path, held_out: list[int],
               placeholder: Path) -> argparse.Namespace:
    fold = copy.copy(args)
    fold.data = "ctich"
    fold.exclude_patients = ",".join(str(n) for n in held_out)
    fold.thresholds_from = placeholder
    fold.out = fold_dir / "weights.pt"
    fold.checkpoint_dir = fold_dir / "checkpoint"
    fold.resume = (fold_dir / "checkpoint" / "checkpoint.pt").is_file()
    fold.stop_at = 0
    return fold


def crossval(args: argparse.Namespace) -> str:
    """Train the folds (unless done), predict out of fold, write the report; return the table."""
    from inference.datasets import CtIchDataset, DatasetError, patient_folds
    from inference.train import train

    if args.ctich_dir is None:
        raise DatasetError("ichnode crossval needs --ctich-dir")
    out = Path(args.cv_dir)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "crossval.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        dataset = CtIchDataset(args.ctich_dir)
        patients = dataset.series
        folds = patient_folds([p.key for p in patients],
                              [bool(p.series_labels[0]) for p in patients],
                              args.folds, args.fold_seed)
        plan = {k: [p.number for p, f in zip(patients, folds, strict=True) if f == k]
                for k in range(args.folds)}
        (out / "folds.json").write_text(json.dumps(
            {"fold_seed": args.fold_seed, "folds": plan, "command": _command()}, indent=2))
        placeholder = out / "fold-thresholds.json"
        placeholder.write_text(json.dumps({
            "pooling": "max", "thresholds": dict.fromkeys(CLASSES, 0.5),
            "source": "cross-validation fold (thresholds unused)"}))
        started = time.monotonic()
        for k in range(args.folds):
            fold_dir = out / f"fold{k}"
            if (fold_dir / "weights.pt").is_file():
                logger.info("fold %d: weights exist, not trained again", k)
                continue
            if args.report_only:
                raise DatasetError(f"--report-only: {fold_dir / 'weights.pt'} is missing")
            logger.info("fold %d: training without patients %s", k, plan[k])
            t0 = time.monotonic()
            train(_fold_args(args, fold_dir, plan[k], placeholder))
            logger.info("fold %d trained in %.0f s", k, time.monotonic() - t0)
        predictions = predict_out_of_fold(args, dataset, folds, out)
        table = report(predictions, out, args.target_sensitivity)
        logger.info("cross-validation done in %.0f s", time.monotonic() - started)
        return table
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _command() -> str:
    import shlex

    argv = sys.argv[1:]
    tail = argv[argv.index("crossval") + 1 :] if "crossval" in argv else argv
    return shlex.join(["ichnode", "crossval", *tail])


class OutOfFold:
    """Every patient's labels and out-of-fold scores."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.folds: list[int] = []
        self.slice_numbers: list[list[int]] = []
        self.slice_labels: list[np.ndarray] = []
        self.slice_probs: list[np.ndarray] = []
        self.series_labels: list[np.ndarray] = []
        self.dice: list[tuple[str, int, float, int, int, int]] = []

    def series_scores(self, pooling: str) -> np.ndarray:
        from inference.predictor import pool_slices

        return np.stack([pool_slices(p, pooling) for p in self.slice_probs])


def predict_out_of_fold(
    args: argparse.Namespace, dataset: CtIchDataset, folds: list[int], out: Path
) -> OutOfFold:
    """Score each patient with the network of its fold; Dice on published masks."""
    from inference.evaluate import blood_dice
    from inference.predictor import Predictor

    oof = OutOfFold()
    predictors: dict[int, Predictor] = {}
    precision = getattr(args, "eval_precision", "auto")
    for ref, fold in zip(dataset.series, folds, strict=True):
        if fold not in predictors:
            predictors[fold] = Predictor(out / f"fold{fold}" / "weights.pt",
                                         device=args.device, precision=precision)
        item = dataset.load(ref)
        raw = predictors[fold].run(item.volume.hu, explain=False)
        oof.keys.append(item.key)
        oof.folds.append(fold)
        oof.slice_numbers.append([int(u.rsplit(".", 1)[1]) for u in item.volume.sop_instance_uids])
        oof.slice_labels.append(np.asarray(item.slice_labels, dtype=bool))
        oof.slice_probs.append(raw.slice_probabilities.astype(np.float64))
        oof.series_labels.append(np.asarray(item.series_labels, dtype=bool))
        oof.dice.extend((item.key, *d) for d in blood_dice(item, raw.masks))
        logger.info("scored %s (fold %d)", item.key, fold)
    return oof


def choose(oof: OutOfFold, target: float, members: np.ndarray | None = None
           ) -> tuple[str, dict[str, float]]:
    """Pooling (best out-of-fold ``any`` AUC) and per-class thresholds for ``target``
    sensitivity, from the patients in ``members`` (all when None)."""
    from inference.evaluate import pick_threshold, roc_auc
    from inference.predictor import POOLINGS

    labels = np.stack(oof.series_labels)
    idx = np.arange(len(labels)) if members is None else np.flatnonzero(members)
    best: tuple[float, str] | None = None
    for pooling in POOLINGS:
        auc = roc_auc(labels[idx, 0], oof.series_scores(pooling)[idx, 0])
        if best is None or auc > best[0] + 1e-9:
            best = (auc, pooling)
    if best is None:
        raise ValueError("no pooling to choose from (inference.predictor.POOLINGS is empty)")
    pooling = best[1]
    scores = oof.series_scores(pooling)[idx]
    thresholds = {name: pick_threshold(labels[idx, i], scores[:, i], target)
                  for i, name in enumerate(CLASSES)}
    return pooling, thresholds


def _eval_results(
    oof: OutOfFold, pooling: str, thresholds: dict[str, float],
    per_fold: dict[int, tuple[str, dict[str, float]]] | None = None,
) -> tuple[EvalResults, np.ndarray]:
    """Series decisions as the predictor makes them (subtypes gated by ``any``), and the
    threshold each slice row is decided at (its fold's with ``per_fold``), (slices, 6)."""
    from inference.evaluate import EvalResults
    from inference.predictor import decide, series_probabilities

    decisions, probs = [], []
    for p, fold in zip(oof.slice_probs, oof.folds, strict=True):
        pool, thr = (pooling, thresholds) if per_fold is None else per_fold[fold]
        pr = series_probabilities(p, pool)
        d = decide(pr, thr)
        probs.append([pr[c] for c in CLASSES])
        decisions.append([d[c] for c in CLASSES])
    slice_thr_rows = np.concatenate([
        np.tile([(thresholds if per_fold is None else per_fold[f][1])[c] for c in CLASSES],
                (len(p), 1))
        for p, f in zip(oof.slice_probs, oof.folds, strict=True)])
    results = EvalResults(
        series_labels=np.stack(oof.series_labels),
        series_probabilities=np.array(probs, dtype=np.float64),
        series_decisions=np.array(decisions, dtype=bool),
        slice_labels=np.concatenate(oof.slice_labels),
        slice_probabilities=np.concatenate(oof.slice_probs),
        thresholds=dict(thresholds),
        keys=list(oof.keys),
        per_series_slices=list(oof.slice_probs),
    )
    return results, slice_thr_rows


def _metrics(results: EvalResults, rows: np.ndarray,
             min_patients: int) -> dict[str, dict[str, BinaryMetrics]]:
    from inference.evaluate import BinaryMetrics

    out: dict[str, dict[str, BinaryMetrics]] = {"series": {}, "slice": {}}
    for i, name in enumerate(CLASSES):
        if name != "any" and int(results.series_labels[:, i].sum()) < min_patients:
            continue
        out["series"][name] = BinaryMetrics.from_arrays(
            results.series_labels[:, i], results.series_decisions[:, i],
            results.series_probabilities[:, i])
        probs = results.slice_probabilities[:, i]
        out["slice"][name] = BinaryMetrics.from_arrays(
            results.slice_labels[:, i], probs >= rows[:, i], probs)
    return out


def report(oof: OutOfFold, out: Path, target: float) -> str:
    """Write thresholds.json, the CSVs, metrics.json and the PNGs; return the table."""
    from inference.evaluate import format_table, write_plots

    labels = np.stack(oof.series_labels)
    pooling, thresholds = choose(oof, target)
    folds = np.array(oof.folds)
    per_fold = {int(f): choose(oof, target, folds != f) for f in np.unique(folds)}
    shipped, shipped_rows = _eval_results(oof, pooling, thresholds)
    honest, honest_rows = _eval_results(oof, pooling, thresholds, per_fold)
    m_shipped = _metrics(shipped, shipped_rows, MIN_SUBTYPE_PATIENTS)
    m_honest = _metrics(honest, honest_rows, MIN_SUBTYPE_PATIENTS)
    dices = [d[2] for d in oof.dice]
    inter = sum(d[3] for d in oof.dice)
    total = sum(d[4] + d[5] for d in oof.dice)
    pooled_dice = 2 * inter / total if total else float("nan")
    (out / "thresholds.json").write_text(json.dumps({
        "pooling": pooling,
        "thresholds": thresholds,
        "target_sensitivity": target,
        "source": f"ichnode crossval out-of-fold predictions ({out})",
    }, indent=2))
    with (out / "oof_slices.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient", "fold", "slice_number",
                    *[f"label_{c}" for c in CLASSES], *[f"p_{c}" for c in CLASSES]])
        for key, fold, numbers, lab, prob in zip(oof.keys, oof.folds, oof.slice_numbers,
                                                 oof.slice_labels, oof.slice_probs, strict=True):
            for n, lrow, prow in zip(numbers, lab, prob, strict=True):
                w.writerow([key, fold, n, *[int(v) for v in lrow], *[f"{v:.6f}" for v in prow]])
    with (out / "oof_series.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient", "fold", *[f"label_{c}" for c in CLASSES],
                    *[f"p_{c}" for c in CLASSES], "decision_any"])
        for i, key in enumerate(oof.keys):
            w.writerow([key, oof.folds[i], *[int(v) for v in labels[i]],
                        *[f"{v:.6f}" for v in shipped.series_probabilities[i]],
                        int(shipped.series_decisions[i, 0])])
    write_plots(shipped, m_shipped, out)
    doc = {
        "patients": len(oof.keys),
        "slices": int(sum(len(p) for p in oof.slice_probs)),
        "pooling": pooling,
        "thresholds": thresholds,
        "metrics_at_shipped_thresholds": {
            lvl: {n: m.to_dict() for n, m in d.items()} for lvl, d in m_shipped.items()},
        "metrics_at_fold_thresholds": {
            lvl: {n: m.to_dict() for n, m in d.items()} for lvl, d in m_honest.items()},
        "fold_thresholds": {str(k): {"pooling": v[0], "any": v[1]["any"]}
                            for k, v in per_fold.items()},
        "dice_masked_slices": {"n": len(dices),
                               "mean": float(np.mean(dices)) if dices else None,
                               "pooled": pooled_dice,
                               "per_slice": [list(d) for d in oof.dice]},
    }
    (out / "metrics.json").write_text(json.dumps(doc, indent=2, default=_nan_none))

    def dice_line() -> str:
        mean = float(np.mean(dices)) if dices else float("nan")
        return (f"Dice of predicted blood on the {len(dices)} slices with a published mask: "
                f"mean {mean:.3f}, pooled {pooled_dice:.3f}")

    lines = [
        (f"cross-validation: {len(oof.keys)} patients "
         f"({int(labels[:, 0].sum())} with hemorrhage), {doc['slices']} slices, "
         f"{len(per_fold)} folds; pooling {pooling}"),
        "",
        (f"At the shipped thresholds (chosen on all out-of-fold scores for series "
         f"sensitivity >= {target:.2f}; any {thresholds['any']:.4f}):"),
        format_table(m_shipped, {}),
        "",
        "At thresholds chosen for each fold on the other folds' scores only:",
        format_table(m_honest, {}),
        "",
        dice_line(),
    ]
    table = "\n".join(lines)
    (out / "table.txt").write_text(table + "\n")
    return table


def _nan_none(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"cannot serialise {type(value).__name__}")


__all__ = ["OutOfFold", "add_arguments", "choose", "crossval", "report", "run_cli"]
