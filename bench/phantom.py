"""Phantom and loader speed: ``python -m bench.phantom``.

Times :func:`inference.phantom.generate_case` at the sizes the trainer uses and
the round trip of a 40-slice 512 x 512 series through ``write_series``,
``read_series`` and ``load_volume`` (uncompressed and JPEG-LS). Writes the
``phantom`` section of ``docs/BENCHMARKS.md`` and ``bench/results/phantom.json``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import REPO, machine, write_benchmark_section
from inference.phantom import generate_case, write_series
from inference.volume import load_volume, read_series


def _median_seconds(fn: Callable[[int], object], runs: int) -> float:
    times = []
    for seed in range(runs):
        start = time.perf_counter()
        fn(seed)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    """Run the benchmark and write its report."""
    results: dict[str, float] = {}
    for n_slices, matrix, runs in ((32, 128, 20), (32, 256, 10), (40, 512, 5)):
        key = f"generate_case_{n_slices}x{matrix}x{matrix}_s"
        results[key] = _median_seconds(
            lambda seed, n=n_slices, m=matrix: generate_case(seed, n_slices=n, matrix=m), runs
        )
    case = generate_case(1, n_slices=40, matrix=512, slice_thickness=5.0)
    for syntax in ("explicit", "jpegls"):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            write_series(case, Path(tmp), transfer_syntax=syntax)
            results[f"write_series_40x512_{syntax}_s"] = time.perf_counter() - start
            start = time.perf_counter()
            groups, _ = read_series([Path(tmp)])
            load_volume(next(iter(groups.values())))
            results[f"read_and_load_40x512_{syntax}_s"] = time.perf_counter() - start
    info = machine()
    report = {"machine": info, "results": {k: round(v, 4) for k, v in results.items()}}
    out = REPO / "bench" / "results" / "phantom.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in results.items())
    body = (
        "## Phantom and series loader\n\n"
        f"Machine: {info['nproc']} CPUs, {info['cpu']}, {info['date']}, "
        "median of 20/10/5 seeds for generate_case, one run for the series; the CPUs "
        "were shared with a model-training job, so these are upper bounds.\n\n"
        f"| step | seconds |\n| --- | --- |\n{rows}\n"
    )
    write_benchmark_section("phantom", body)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
