"""Evaluation: metrics on hand-made examples and the ``ichnode evaluate`` command."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from inference.evaluate import (
    BinaryMetrics,
    EvalResults,
    compute_metrics,
    dice,
    format_table,
    mean_dice,
    pick_threshold,
    roc_auc,
    roc_curve,
)
from inference.findings import CLASSES

REPO = Path(__file__).resolve().parents[2]


def test_confusion_counts_and_rates_on_a_known_example() -> None:
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    decisions = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0], dtype=bool)
    m = BinaryMetrics.from_arrays(labels, decisions)
    assert (m.tp, m.fn, m.fp, m.tn) == (3, 1, 1, 5)
    assert m.accuracy == pytest.approx(0.8)
    assert m.sensitivity == pytest.approx(0.75)
    assert m.specificity == pytest.approx(5 / 6)
    assert m.precision == pytest.approx(0.75)
    assert m.f1 == pytest.approx(0.75)
    assert math.isnan(m.auc)


def test_auc_matches_the_pair_count_with_ties() -> None:
    labels = np.array([0, 0, 1, 1, 0, 1], dtype=bool)
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.8, 0.9])
    # pairs (pos, neg): 0.35>0.1, 0.35<0.4, 0.35<0.8; 0.8>0.1, 0.8>0.4, 0.8=0.8 (1/2);
    # 0.9 beats all three -> (1 + 2.5 + 3) / 9
    assert roc_auc(labels, scores) == pytest.approx(6.5 / 9)
    assert roc_auc(labels, -scores) == pytest.approx(1 - 6.5 / 9)
    assert roc_auc(np.ones(3, dtype=bool), np.arange(3.0)) != roc_auc(labels, scores)
    assert math.isnan(roc_auc(np.ones(3, dtype=bool), np.arange(3.0)))
    fpr, tpr = roc_curve(labels, scores)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(6.5 / 9)


def test_dice() -> None:
    a = np.zeros((4, 4), dtype=bool)
    b = np.zeros((4, 4), dtype=bool)
    a[:2] = True  # 8 voxels
    b[1:3] = True  # 8 voxels, 4 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    assert mean_dice({"subdural": [0.5, 1.0], "epidural": [], "subarachnoid": [0.25]}) == (
        pytest.approx((0.75 + 0.25) / 2)
    )


def test_threshold_keeps_the_sensitivity_and_sits_in_the_gap() -> None:
    labels = np.array([0] * 10 + [1] * 20, dtype=bool)
    neg = np.linspace(0.01, 0.3, 10)
    pos = np.concatenate([[0.2], np.linspace(0.6, 0.99, 19)])
    scores = np.concatenate([neg, pos])
    t = pick_threshold(labels, scores, 0.95)
    # 19 of 20 positives is exactly 0.95: the 0.2 positive may be missed (keeping
    # it lets negatives through), and the threshold lies between the top negative
    # (0.3) and the lowest kept positive (0.6)
    assert 0.3 < t < 0.6
    assert (scores[labels] >= t).mean() >= 0.95
    assert (scores[~labels] >= t).sum() == 0
    # Separated classes: no positive is given up for nothing. 95 % would allow a
    # threshold above the lowest positive (0.6), but keeping it costs no
    # specificity, so the threshold goes below it, into the gap above 0.3.
    separated = np.concatenate([neg, np.linspace(0.6, 0.99, 20)])
    t = pick_threshold(labels, separated, 0.95)
    assert 0.3 < t < 0.6
    assert (separated[labels] >= t).all() and not (separated[~labels] >= t).any()
    strict = pick_threshold(labels, scores, 1.0)
    assert strict < 0.2
    assert pick_threshold(np.ones(4, dtype=bool), np.arange(4.0) / 4, 0.95) == 0.5


def test_table_and_slice_metrics_use_the_stored_thresholds() -> None:
    n = len(CLASSES)
    series_labels = np.zeros((4, n), dtype=bool)
    series_labels[:2, 0] = True
    series_probs = np.array([[0.9] * n, [0.8] * n, [0.1] * n, [0.7] * n])
    results = EvalResults(
        series_labels=series_labels,
        series_probabilities=series_probs,
        series_decisions=series_probs >= 0.75,
        slice_labels=series_labels,
        slice_probabilities=series_probs,
        thresholds=dict.fromkeys(CLASSES, 0.5),
        dice={"subdural": [0.8]},
    )
    metrics = compute_metrics(results)
    s = metrics["series"]["any"]
    assert (s.tp, s.tn, s.fp, s.fn) == (2, 2, 0, 0)
    assert s.auc == pytest.approx(1.0)
    sl = metrics["slice"]["any"]  # threshold 0.5 makes the 0.7 negative a false positive
    assert (sl.tp, sl.tn, sl.fp, sl.fn) == (2, 1, 1, 0)
    table = format_table(metrics, results.dice)
    assert "series " in table and "slice " in table and "subdural" in table


def test_evaluate_cli_prints_the_table_and_writes_plots(tmp_path: Path) -> None:
    out = tmp_path / "eval"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "node.cli",
            "evaluate",
            "--data",
            "phantom",
            "--seeds",
            "1000000:1000004",
            "--phantom-slices",
            "12",
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "series " in proc.stdout and "AUC" in proc.stdout
    for name in ("roc_series.png", "roc_slice.png", "confusion_series.png", "confusion_slice.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["series"] == 4 and doc["slices"] == 48
    assert set(doc["metrics"]["series"]) == set(CLASSES)


def test_evaluate_cli_rejects_bad_input_in_one_line(tmp_path: Path) -> None:
    for extra in (["--seeds", "5:2"], ["--weights", str(tmp_path / "none.pt")], ["--data", "rsna"]):
        proc = subprocess.run(
            [sys.executable, "-m", "node.cli", "evaluate", *extra],
            check=False,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1].startswith("ichnode evaluate: ")
        assert "Traceback" not in proc.stderr
