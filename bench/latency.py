"""Latency of the whole loop: last instance stored to the SR acknowledged by the PACS.

``python -m bench.latency [--series N]`` starts a real Orthanc (the PACS) and a
real ``ichnode serve`` with the default settings (scheduler, one worker, outbox
backoff) and Orthanc as its destination, then, one study at a time, sends a
40-slice 512x512 phantom CT series with DCMTK ``storescu`` (``TCP_NODELAY=1``)
and measures the time from ``storescu``'s return (after the last instance's
success status and the release) to the delivery row of the SR being
acknowledged by Orthanc (``deliveries.acked_at``). Reports median and p95, the
per-stage breakdown from the index (the timings the metrics histograms
observe) and the node's own ``ichnode_stage_seconds`` histograms, in the
``latency`` section of ``docs/BENCHMARKS.md`` and ``bench/results/latency.json``.

``python -m bench.latency --thin`` sends thin reconstructions instead: 320 slices
of 0.625 mm at 512x512 per series (target p95 <= 20 s), and records the peak
resident memory of the worker process (VmHWM, target <= 3 GB); the results go
to the ``latency-thin`` section and ``bench/results/latency-thin.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from bench.common import REPO, dcmtk_env, machine, tool_version, write_benchmark_section
from storage.models import Delivery, Job, Result, ResultKind, Series

SLICES = 40
MATRIX = 512
THIN_SLICES = 320
THIN_MM = 0.625


def _worker_peak_rss_mb(pids: list[int]) -> float:
    """The largest VmHWM (peak resident set) among the worker processes ``pids``."""
    peak = 0.0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        if match:
            peak = max(peak, int(match.group(1)) / 1024)
    return peak


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _write_study(folder: Path, seed: int, thin: bool = False) -> tuple[str, list[Path]]:
    from pydicom import dcmread

    from inference.phantom import generate_case, write_series

    subtypes = ("intraparenchymal",) if seed % 2 else ()
    if thin:
        case = generate_case(
            seed, n_slices=THIN_SLICES, matrix=MATRIX, subtypes=subtypes,
            slice_thickness=THIN_MM,
        )
    else:
        case = generate_case(seed, n_slices=SLICES, matrix=MATRIX, subtypes=subtypes)
    files = write_series(case, folder, patient_id=f"BENCH-{seed}")
    return str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID), files


def _sr_row(node: Any, series_instance_uid: str) -> dict[str, Any] | None:
    with node.index.session(readonly=True) as session:
        row = session.execute(
            select(Delivery.acked_at, Job)
            .join(Result, Result.id == Delivery.result_id)
            .join(Job, Job.id == Result.job_id)
            .join(Series, Series.id == Result.series_id)
            .where(
                Series.series_instance_uid == series_instance_uid,
                Result.kind == ResultKind.SR,
                Delivery.acked_at.is_not(None),
            )
        ).first()
        if row is None:
            return None
        acked_at, job = row
        return {
            "acked_at": acked_at,
            "received_at": job.received_at,
            "queued_at": job.created_at,
            "claimed_at": job.claimed_at,
            "finished_at": job.finished_at,
            "inference_s": job.inference_seconds,
            "encoding_s": job.encoding_seconds,
        }


def _negative(node: Any, series_instance_uid: str) -> bool:
    """True once the series is done with no hemorrhage found (no notification then)."""
    row = node.series(series_instance_uid)
    return row is not None and row.status.value == "done" and row.hemorrhage is False


def _stage_histograms(text: str) -> dict[str, dict[str, float]]:
    stages: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "ichnode_stage_seconds":
            continue
        for sample in family.samples:
            stage = sample.labels.get("stage", "")
            if sample.name.endswith("_sum"):
                stages.setdefault(stage, {})["sum"] = sample.value
            elif sample.name.endswith("_count"):
                stages.setdefault(stage, {})["count"] = sample.value
    return {
        k: {"count": v.get("count", 0.0), "mean_s": v.get("sum", 0.0) / max(1.0, v.get("count", 0))}
        for k, v in stages.items()
    }


def run(n_series: int, workdir: Path, thin: bool = False) -> dict[str, Any]:
    """Run the benchmark in ``workdir``; return the results document."""
    from tests.interop import free_port
    from tests.loop.harness import Destination, NodeRunner
    from tests.loop.test_notify import MllpListener, WebhookReceiver
    from tests.orthanc import Orthanc

    studies = []
    for i in range(n_series):
        print(f"writing phantom series {i + 1}/{n_series}", file=sys.stderr)
        studies.append(_write_study(workdir / f"series-{i}", 1000 + i, thin=thin))
    orthanc = Orthanc(workdir / "orthanc")
    orthanc.start()
    # Triage notifications of positive findings: a webhook and an HL7 ORU over MLLP
    # to real listeners; their latency is measured beside the SR's.
    hook, ris = WebhookReceiver(free_port()), MllpListener(free_port())
    hook.start()
    ris.start()
    # Default settings: only ports, paths, the destination and the notifications.
    node = NodeRunner(
        workdir / "node",
        [Destination("pacs", orthanc.aet, orthanc.dicom_port)],
        sqlite_synchronous=None,
        device=None,
        extra_toml=(
            f'\n[[notifications]]\nname = "triage"\nkind = "webhook"\n'
            f'url = "http://127.0.0.1:{hook.port}/ich"\n'
            f'\n[[notifications]]\nname = "ris"\nkind = "hl7"\nhost = "127.0.0.1"\n'
            f"port = {ris.port}\n"
        ),
    )
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    try:
        node.start()
        for i, (series_uid, files) in enumerate(studies):
            run_ = subprocess.run(
                ["storescu", "-aet", "SCANNER", "-aec", node.ae_title, "127.0.0.1", str(node.port)]
                + [str(f) for f in files],
                env=dcmtk_env(),
                capture_output=True,
                text=True,
                check=False,
            )
            sent_at = dt.datetime.now(dt.UTC)
            if run_.returncode != 0:
                raise RuntimeError(f"storescu failed: {run_.stderr[-500:]}")
            deadline = time.monotonic() + 300
            row = None
            notified_at = None
            while time.monotonic() < deadline:
                if row is None:
                    row = _sr_row(node, series_uid)
                if notified_at is None and any(
                    doc.get("series_instance_uid") == series_uid for doc in hook.documents()
                ) and len(ris.messages) == len(hook.received):
                    notified_at = dt.datetime.now(dt.UTC)
                if row is not None and notified_at is not None:
                    break
                if row is not None and _negative(node, series_uid):
                    break  # no notification for a negative finding
                time.sleep(0.05)
            if row is None:
                raise RuntimeError(f"no SR acknowledged for series {i}: {node.log_tail()}")
            row["sent_at"] = sent_at
            row["latency_s"] = (row["acked_at"] - sent_at).total_seconds()
            row["notified_s"] = (
                None if notified_at is None else (notified_at - sent_at).total_seconds()
            )
            rows.append(row)
            print(f"series {i + 1}: {row['latency_s']:.2f} s", file=sys.stderr)
        time.sleep(2.0)  # the node observes finished stages once a second
        metrics = _stage_histograms(node.scrape())
        worker_peak_mb = _worker_peak_rss_mb(node.worker_pids())
    finally:
        node.stop()
        orthanc.stop()
        hook.stop()
        ris.stop()

    def stage(name: str, a: str, b: str) -> list[float]:
        return [(r[b] - r[a]).total_seconds() for r in rows]

    load_after = os.getloadavg()
    weights = re.search(r"loaded (\S+ \S+) on (\w+)", node.log_path.read_text())
    latencies = [r["latency_s"] for r in rows]
    notified = [r["notified_s"] for r in rows if r["notified_s"] is not None]
    breakdown = {
        "ready_wait_s": stage("ready", "received_at", "queued_at"),
        "queue_wait_s": stage("queue", "queued_at", "claimed_at"),
        "inference_s": [float(r["inference_s"]) for r in rows],
        "encoding_s": [float(r["encoding_s"]) for r in rows],
        "job_total_s": stage("job", "claimed_at", "finished_at"),
        "delivery_s": stage("delivery", "finished_at", "acked_at"),
    }
    return {
        "benchmark": "latency",
        "machine": machine(),
        "tools": {"storescu": tool_version("storescu"), "orthanc": "Orthanc (tests.orthanc)"},
        "series": n_series,
        "slices": THIN_SLICES if thin else SLICES,
        "slice_mm": THIN_MM if thin else None,
        "matrix": MATRIX,
        "worker_peak_rss_mb": round(worker_peak_mb, 1),
        "target_worker_peak_rss_mb": 3072 if thin else None,
        "settings": "defaults (series_quiet_seconds 5, 1 worker, cpu, release grace 1 s)",
        "model": weights.group(1) if weights else "",
        "device": weights.group(2) if weights else "",
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        "latency_s": {
            "median": statistics.median(latencies),
            "p95": _percentile(latencies, 0.95),
            "min": min(latencies),
            "max": max(latencies),
            "all": [round(v, 3) for v in latencies],
        },
        "notification_s": {
            "what": "last instance sent to the webhook's 2xx and the HL7 ACK (AA), positives",
            "series": len(notified),
            "median": statistics.median(notified) if notified else None,
            "p95": _percentile(notified, 0.95) if notified else None,
            "all": [round(v, 3) for v in notified],
            "target_p95_s": 10.0,
        },
        "stages_median_s": {k: statistics.median(v) for k, v in breakdown.items()},
        "stages_per_series_s": [
            {k: round(v[i], 3) for k, v in breakdown.items()} for i in range(len(rows))
        ],
        "metrics_histograms": metrics,
        "target_p95_s": 20.0 if thin else 10.0,
    }


def _markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lat = doc["latency_s"]
    lines = [
        "## Latency: last instance to the SR acknowledged by the PACS"
        + (f" (thin series, {doc['slices']} x {doc['slice_mm']} mm)" if doc.get("slice_mm") else ""),
        "",
        (
            f"Machine: {m['nproc']} CPU(s), {m['cpu']}; {m['date']}; Python {m['python']}; "
            f"load average {doc['load_average_1min']['before']:.1f} before, "
            f"{doc['load_average_1min']['after']:.1f} after (the CPUs are shared); "
            f"model {doc['model']} on {doc['device']}."
        ),
        (
            f"`python -m bench.latency`: {doc['series']} studies, one at a time, each a "
            f"{doc['slices']}-slice {doc['matrix']}x{doc['matrix']} phantom CT series sent with "
            "`storescu` (TCP_NODELAY=1) to `ichnode serve` (default settings, CPU, one worker) "
            "with a real Orthanc as destination. Time from `storescu` returning (last success "
            "status + release) to `deliveries.acked_at` of the SR."
        ),
        "",
        "| | median | p95 | min | max | target p95 |",
        "| --- | --- | --- | --- | --- | --- |",
        (
            f"| latency (s) | {lat['median']:.2f} | {lat['p95']:.2f} | {lat['min']:.2f} | "
            f"{lat['max']:.2f} | {doc['target_p95_s']:.0f} |"
        ),
        "",
        _notification_line(doc),
        "",
        "Stage breakdown (median over the series, from the index rows the metrics observe):",
        "",
        "| stage | median (s) |",
        "| --- | --- |",
    ]
    for name, value in doc["stages_median_s"].items():
        lines.append(f"| {name} | {value:.2f} |")
    lines += [
        "",
        f"Peak resident memory of the worker (VmHWM): {doc['worker_peak_rss_mb']:.0f} MB"
        + (
            f" (target <= {doc['target_worker_peak_rss_mb']} MB)."
            if doc.get("target_worker_peak_rss_mb") else "."
        ),
    ]
    lines += ["", "`ichnode_stage_seconds` histograms scraped from the node (mean):", ""]
    lines += ["| stage | count | mean (s) |", "| --- | --- | --- |"]
    for name, h in sorted(doc["metrics_histograms"].items()):
        lines.append(f"| {name} | {h['count']:.0f} | {h['mean_s']:.2f} |")
    return "\n".join(lines) + "\n"


def _notification_line(doc: dict[str, Any]) -> str:
    note = doc.get("notification_s") or {}
    if not note.get("series"):
        return "Triage notifications: no positive series in this run."
    return (
        f"Triage notifications (webhook 2xx and HL7 ORU^R01 ACK to real listeners), "
        f"{note['series']} positive series, time from `storescu` returning to both "
        f"acknowledged: median {note['median']:.2f} s, p95 {note['p95']:.2f} s "
        f"(target p95 <= {note['target_p95_s']:.0f} s)."
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: run, print the JSON, write the report section."""
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__)
    parser.add_argument("--series", type=int, default=10, help="studies to send (at least 10)")
    parser.add_argument("--no-write", action="store_true", help="do not update the report")
    parser.add_argument(
        "--thin", action="store_true",
        help=f"{THIN_SLICES}-slice {THIN_MM}-mm series (p95 target 20 s, worker peak RSS 3 GB)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ichnode-latency-") as tmp:
        doc = run(max(1, args.series), Path(tmp), thin=args.thin)
    print(json.dumps(doc, indent=2, default=str))
    if not args.no_write:
        name = "latency-thin" if args.thin else "latency"
        out = REPO / "bench" / "results" / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        write_benchmark_section(name, _markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
