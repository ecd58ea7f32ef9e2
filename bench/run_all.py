"""``make bench``: run every benchmark, then write the summary of ``docs/BENCHMARKS.md``.

``python -m bench.run_all`` runs ``bench.ingest``, ``bench.latency`` (also with ``--thin``) and
``bench.inference`` one after the other, each in its own process (each rewrites
its own section of ``docs/BENCHMARKS.md`` and its ``bench/results/NAME.json``),
then rewrites the ``summary`` section at the top of the file from
``bench/results/*.json``: the machine, the date, each figure beside its target
with pass or fail, and the peers side by side with the ratios. A benchmark that
fails is reported (its exit code, the tail of its output) and the summary is
still written from the results on disk, with that row marked as not refreshed.

``--only NAME`` / ``--skip NAME`` choose benchmarks; ``--summary-only`` runs
none and rewrites only the summary.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import REPO, machine, write_benchmark_section

logger = logging.getLogger(__name__)

BENCHMARKS: tuple[str, ...] = ("ingest", "latency", "latency-thin", "inference", "scale")
#: How each benchmark is run: ``python -m bench.MODULE ARGS``.
COMMANDS: dict[str, tuple[str, list[str]]] = {
    "ingest": ("ingest", []),
    "latency": ("latency", []),
    "latency-thin": ("latency", ["--thin"]),
    "inference": ("inference", []),
    "scale": ("scale", []),
}
RESULTS = REPO / "bench" / "results"
REPORT = REPO / "docs" / "BENCHMARKS.md"

#: Targets of the issues: ingest at least as fast as Orthanc in the same run
#: (issue 2), latency p95 <= 10 s (issue 5), inference of a 40x512 series <= 3 s.
INGEST_TARGET_RATIO = 1.0
LATENCY_TARGET_P95_S = 10.0
INFERENCE_TARGET_S = 3.0


@dataclass
class Run:
    """The outcome of one benchmark process."""

    name: str
    returncode: int
    seconds: float
    tail: str


def run_benchmark(name: str, extra: list[str]) -> Run:
    """Run benchmark ``name`` (see :data:`COMMANDS`) in its own process; how it ended."""
    module, args = COMMANDS.get(name, (name, []))
    command = [sys.executable, "-m", f"bench.{module}", *args, *extra]
    print(f"bench.run_all: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    started = time.monotonic()
    proc = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, check=False, env=dict(os.environ)
    )
    seconds = time.monotonic() - started
    output = (proc.stdout + proc.stderr).strip().splitlines()
    tail = "\n".join(output[-15:])
    status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
    print(f"bench.run_all: bench.{name} {status} in {seconds:.0f} s", file=sys.stderr, flush=True)
    if proc.returncode != 0:
        print(tail, file=sys.stderr, flush=True)
    return Run(name, proc.returncode, seconds, tail)


def memory_total_gib() -> float | None:
    """MemTotal of ``/proc/meminfo`` in GiB (None when unreadable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        return None
    return None


def load_result(name: str) -> dict[str, Any] | None:
    """``bench/results/NAME.json``, or None when missing or unreadable."""
    path = RESULTS / f"{name}.json"
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("cannot read %s: %s", path, exc)
        return None


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("pass" if ok else "**FAIL**")


def _date(doc: dict[str, Any] | None) -> str:
    if doc is None:
        return "no result"
    info = doc.get("machine") or {}
    return str(info.get("date", "?"))


def _fmt(value: float | None, pattern: str = "{:.0f}") -> str:
    return "-" if value is None else pattern.format(value)


def ingest_rows(doc: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """Rows of the figures table and of the peer table for the ingest benchmark."""
    if doc is None:
        return ["| ingest | no result | - | - | n/a | - |"], []
    medians: dict[str, dict[str, float]] = doc.get("median_instances_per_s", {})
    modes = sorted({m for peer in medians.values() for m in peer}, key=lambda m: m != "single")
    figures: list[str] = []
    peers = [
        ("| mode | ichnode | storescp | Orthanc | pynetdicom no-op | ichnode / Orthanc "
        "| ichnode / storescp |"),
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode in modes:

        def rate(peer: str, mode: str = mode) -> float | None:
            value = medians.get(peer, {}).get(mode)
            return None if value is None else float(value)

        # The best of ichnode's set-ups (SQLite or PostgreSQL, 1 or N receivers).
        variants = {p: rate(p) for p in medians if p.startswith("ichnode")}
        best = max(variants, key=lambda p: variants[p] or 0.0, default="ichnode")
        ours, orthanc, storescp = variants.get(best), rate("orthanc"), rate("storescp")
        vs_orthanc = ours / orthanc if ours and orthanc else None
        vs_storescp = ours / storescp if ours and storescp else None
        ok = None if vs_orthanc is None else vs_orthanc >= INGEST_TARGET_RATIO
        figures.append(
            f"| ingest, {mode} (instances/s, {best}) | {_fmt(ours)} | >= Orthanc ({_fmt(orthanc)}) "
            f"| {_fmt(vs_orthanc, '{:.2f}')}x Orthanc | {_verdict(ok)} | {_date(doc)} |"
        )
        peers.append(
            f"| {mode} ({best}) | {_fmt(ours)}/s | {_fmt(storescp)}/s | {_fmt(orthanc)}/s "
            f"| {_fmt(rate('pynetdicom-noop'))}/s | {_fmt(vs_orthanc, '{:.2f}')} "
            f"| {_fmt(vs_storescp, '{:.2f}')} |"
        )
    return figures, peers


def latency_row(doc: dict[str, Any] | None) -> str:
    """The figures-table row of the latency benchmark."""
    if doc is None:
        return "| latency p95 (s) | no result | <= 10 | - | n/a | - |"
    lat = doc.get("latency_s", {})
    p95 = lat.get("p95")
    target = float(doc.get("target_p95_s", LATENCY_TARGET_P95_S))
    ok = None if p95 is None else float(p95) <= target
    return (
        f"| latency p95, last instance to SR acked (s) | {_fmt(p95, '{:.2f}')} | <= {target:g} "
        f"| median {_fmt(lat.get('median'), '{:.2f}')}, {doc.get('series', '?')} series "
        f"{doc.get('slices', '?')}x{doc.get('matrix', '?')} | {_verdict(ok)} | {_date(doc)} |"
    )


def notification_row(doc: dict[str, Any] | None) -> str | None:
    """The figures-table row of the triage notifications (from ``bench.latency``)."""
    note = (doc or {}).get("notification_s")
    if not note or not note.get("series"):
        return None
    p95 = note.get("p95")
    target = float(note.get("target_p95_s", 10.0))
    ok = None if p95 is None else float(p95) <= target
    return (
        f"| latency p95, last instance to webhook and HL7 acked (s) | {_fmt(p95, '{:.2f}')} "
        f"| <= {target:g} | median {_fmt(note.get('median'), '{:.2f}')}, "
        f"{note['series']} positive series | {_verdict(ok)} | {_date(doc or {})} |"
    )


def thin_row(doc: dict[str, Any] | None) -> str | None:
    """The figures-table row of the thin-series latency (``bench.latency --thin``)."""
    if doc is None:
        return None
    lat = doc.get("latency_s", {})
    p95 = lat.get("p95")
    target = float(doc.get("target_p95_s", 20.0))
    peak = doc.get("worker_peak_rss_mb")
    peak_target = doc.get("target_worker_peak_rss_mb") or 3072
    ok = None if p95 is None or peak is None else (
        float(p95) <= target and float(peak) <= float(peak_target)
    )
    return (
        f"| latency p95, thin series to SR acked (s) | {_fmt(p95, '{:.2f}')} | <= {target:g}; "
        f"worker <= {float(peak_target) / 1024:g} GB | median "
        f"{_fmt(lat.get('median'), '{:.2f}')}, {doc.get('series', '?')} series "
        f"{doc.get('slices', '?')}x{doc.get('matrix', '?')} of {doc.get('slice_mm', '?')} mm; "
        f"worker peak {_fmt(peak, '{:.0f}')} MB | {_verdict(ok)} | {_date(doc)} |"
    )


def inference_row(doc: dict[str, Any] | None) -> str:
    """The figures-table row of the inference benchmark."""
    if doc is None:
        return "| inference 40x512 (s) | no result | <= 3 | - | n/a | - |"
    median = doc.get("median_s")
    target = float(doc.get("target_s", INFERENCE_TARGET_S))
    ok = None if median is None else float(median) <= target
    how = doc.get("device", "?")
    if doc.get("precision"):
        how += f", {doc['precision']}"
    if doc.get("fp32"):
        how += f"; float32 {_fmt(doc['fp32'].get('median_s'), '{:.2f}')} s"
    return (
        f"| inference, 40x512 series with Grad-CAM (s) | {_fmt(median, '{:.2f}')} "
        f"| <= {target:g} | {doc.get('slices_per_s', '?')} slices/s on {how} "
        f"| {_verdict(ok)} | {_date(doc)} |"
    )


def soak_row(doc: dict[str, Any] | None) -> str | None:
    """The figures-table row of the soak (written by ``bench.soak``), when there is one."""
    if doc is None:
        return None
    growth = doc.get("rss_growth_mb")
    bound = doc.get("rss_growth_bound_mb")
    ok = doc.get("passed")
    return (
        f"| soak, RSS growth last third vs first (MB) | {_fmt(growth, '{:.1f}')} "
        f"| <= {_fmt(bound, '{:g}')} | {doc.get('series', '?')} series, SR exactly once: "
        f"{doc.get('sr_exactly_once', '?')}, peak {_fmt(doc.get('peak_rss_mb'), '{:.0f}')} MB "
        f"| {_verdict(None if ok is None else bool(ok))} | {_date(doc)} |"
    )


def cuda_row(doc: dict[str, Any] | None) -> str | None:
    """The figures-table row of the GPU benchmark (``bench.cuda``, run on a lent GPU)."""
    if doc is None:
        return None
    e2e = doc.get("end_to_end", {})
    return (
        f"| inference on a GPU, 40x512 series with Grad-CAM (s) | "
        f"{_fmt(e2e.get('median_s'), '{:.3f}')} | none | {e2e.get('slices_per_s', '?')} "
        f"slices/s on {doc.get('gpu', '?')}, float16 autocast | n/a | {_date(doc)} |"
    )


def scale_row(doc: dict[str, Any] | None) -> str | None:
    """The figures-table row of the scale-out benchmark (no target: it is measured)."""
    if doc is None or not doc.get("runs"):
        return None
    runs = doc["runs"]
    rates = ", ".join(f"{r['workers']}: {r['series_per_minute']:.0f}" for r in runs)
    return (
        f"| scale-out, series/min by worker processes ({doc.get('series')} queued) | {rates} "
        f"| measured | - | n/a | {_date(doc)} |"
    )


def summary_text(runs: list[Run], started: dt.datetime) -> str:
    """The markdown of the ``summary`` section."""
    info = machine()
    mem = memory_total_gib()
    load = os.getloadavg()
    ingest, latency, thin, inference, scale = (load_result(n) for n in BENCHMARKS)
    figures, peers = ingest_rows(ingest)
    figures.append(latency_row(latency))
    notification_figure = notification_row(latency)
    if notification_figure is not None:
        figures.append(notification_figure)
    thin_figure = thin_row(thin)
    if thin_figure is not None:
        figures.append(thin_figure)
    figures.append(inference_row(inference))
    soak = soak_row(load_result("soak"))
    if soak is not None:
        figures.append(soak)
    scale_figure = scale_row(scale)
    if scale_figure is not None:
        figures.append(scale_figure)
    cuda = cuda_row(load_result("cuda"))
    if cuda is not None:
        figures.append(cuda)
    lines = [
        "## Summary",
        "",
        (f"Machine: {info['nproc']} CPUs ({info['cpu']}), "
        f"{_fmt(mem, '{:.1f}')} GiB memory, Python {info['python']}; "
        f"summary written {info['date']} (`make bench` started "
        f"{started.strftime('%Y-%m-%d %H:%M UTC')}, load average at the end "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}). The CPUs are shared with "
        "other work (model training, other engineers' tests), so absolute numbers are "
        "upper bounds for times and lower bounds for rates; the ingest peers alternate "
        "within one run, so their ratios compare like with like."),
        "",
    ]
    if runs:
        done = ", ".join(
            f"{r.name} {'ok' if r.returncode == 0 else f'FAILED (exit {r.returncode})'} "
            f"in {r.seconds:.0f} s"
            for r in runs
        )
        lines += [f"This run: {done}. A row whose date is older was not refreshed.", ""]
    lines += [
        "| figure | ichnode | target | context | verdict | measured |",
        "| --- | --- | --- | --- | --- | --- |",
        *figures,
    ]
    if peers:
        lines += ["", "Ingest, the peers side by side (median instances/s, same run):", "", *peers]
    lines += [
        "",
        ("Targets: ingest at least as fast as Orthanc with fsync and index, single "
        "association and 8 in parallel (issue 2); latency p95 <= 10 s with default "
        "settings (issue 5), triage notifications acknowledged p95 <= 10 s (issue 16); thin 320 x 0.625-mm series p95 <= 20 s with the worker "
        "<= 3 GB (issue 14); inference of a 40-slice 512x512 series <= 3 s on CPU. "
        "Details of each below."),
    ]
    return "\n".join(lines) + "\n"


def write_summary(body: str, path: Path = REPORT) -> None:
    """Write the ``summary`` section, placed right under the title when it is new."""
    start = "<!-- summary:start -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start not in text:
        head, sep, rest = text.partition("\n")
        if not head.startswith("# "):
            head, sep, rest = "# Benchmarks", "\n", text
        text = f"{head}{sep}\n{start}\n<!-- summary:end -->\n{rest}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    write_benchmark_section("summary", body, path)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks and write the summary; exit 1 when one of them failed."""
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__)
    parser.add_argument("--only", action="append", choices=BENCHMARKS, default=[])
    parser.add_argument("--skip", action="append", choices=BENCHMARKS, default=[])
    parser.add_argument(
        "--summary-only", action="store_true", help="run nothing; rewrite the summary"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = dt.datetime.now(dt.UTC)
    chosen = [] if args.summary_only else [
        n for n in (args.only or BENCHMARKS) if n not in args.skip
    ]
    runs = [run_benchmark(name, []) for name in chosen]
    body = summary_text(runs, started)
    write_summary(body)
    print(body)
    return 0 if all(r.returncode == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
