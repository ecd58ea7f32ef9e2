"""The GPU benchmark's report: written from the saved measurement on a machine
without a GPU, and refused (not faked) when asked to measure without one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import cuda, run_all
from bench.common import REPO

SAVED = REPO / "bench" / "results" / "cuda.json"


def test_saved_measurement_renders_its_section(tmp_path: Path) -> None:
    report = json.loads(SAVED.read_text())
    text = cuda.render(report)
    e2e = report["end_to_end"]
    assert report["gpu"] in text
    assert f"{e2e['median_s']:.3f} s" in text
    # one table row per (precision, batch size) measured
    rows = [line for line in text.splitlines() if line.startswith(("| float16", "| float32"))]
    assert len(rows) == len(report["network_sweep"]["rows"]) == 2 * len(cuda.BATCH_SIZES)
    # the saved report holds one run's stage split, and says so with its total
    last = e2e["last_run_stages_s"]
    assert f"last run only ({sum(last.values()):.3f} s in all" in text
    report["end_to_end"] = {**e2e, "median_stages_s": last}
    del report["end_to_end"]["last_run_stages_s"]
    assert f"median of the {e2e['runs']} runs each" in cuda.render(report)
    row = run_all.cuda_row(report)
    assert row is not None and report["gpu"] in row and f"{e2e['median_s']:.3f}" in row
    assert run_all.cuda_row(None) is None


def test_report_flag_rewrites_the_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "BENCHMARKS.md"
    target.write_text("# Benchmarks\n\n<!-- cuda:start -->\nold\n<!-- cuda:end -->\n")
    real = cuda.write_benchmark_section
    monkeypatch.setattr(cuda, "write_benchmark_section",
                        lambda name, body: real(name, body, target))
    assert cuda.main(["--report", str(SAVED)]) == 0
    text = target.read_text()
    assert "old" not in text and "Inference on a GPU (CUDA)" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_measuring_without_a_gpu_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cuda.json"
    assert cuda.main(["--json", str(out)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().out
    assert not out.exists()


def test_thin_latency_row_judges_both_targets() -> None:
    doc = {
        "latency_s": {"p95": 14.7, "median": 13.6},
        "target_p95_s": 20.0,
        "worker_peak_rss_mb": 2817.5,
        "target_worker_peak_rss_mb": 3072,
        "series": 10,
        "slices": 320,
        "matrix": 512,
        "slice_mm": 0.625,
        "machine": {"date": "2026-12-01 20:00 UTC"},
    }
    row = run_all.thin_row(doc)
    assert row is not None and "| pass |" in row and "2818 MB" in row
    assert "**FAIL**" in (run_all.thin_row({**doc, "worker_peak_rss_mb": 3500.0}) or "")
    assert "**FAIL**" in (run_all.thin_row({**doc, "latency_s": {"p95": 25.0}}) or "")
    assert run_all.thin_row(None) is None


def test_notification_row_judges_its_target() -> None:
    doc = {
        "notification_s": {"series": 5, "median": 3.9, "p95": 4.4, "target_p95_s": 10.0},
        "machine": {"date": "2026-12-01 20:10 UTC"},
    }
    row = run_all.notification_row(doc)
    assert row is not None and "| pass |" in row and "5 positive series" in row
    late = {**doc, "notification_s": {**doc["notification_s"], "p95": 12.0}}
    assert "**FAIL**" in (run_all.notification_row(late) or "")
    assert run_all.notification_row({"latency_s": {}}) is None
    assert run_all.notification_row(None) is None
