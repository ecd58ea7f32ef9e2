"""End-to-end inference speed: ``python -m bench.inference``.

Times a 40-slice 512 x 512 phantom CT series from DICOM files on disk to
findings with Grad-CAM: ``read_series``, ``load_volume``, ``Predictor.predict``
(windowing, resampling, the network, masks at the source matrix, Grad-CAM). The
model is loaded once beforehand, as the node's warm workers do. Reports the
median of several runs and of each stage, in the default precision and, where
that autocasts (bfloat16 on CPUs with AMX), in float32 too; writes the ``inference``
section of ``docs/BENCHMARKS.md`` and ``bench/results/inference.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from bench.common import REPO, machine, time_end_to_end, write_benchmark_section
from inference.predictor import Predictor

TARGET_S = 3.0
N_SLICES = 40
MATRIX = 512


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    predictor = Predictor(device=args.device)
    totals, stages, findings = time_end_to_end(predictor, args.runs, N_SLICES, MATRIX)
    median = statistics.median(totals)
    # Where the default autocasts (bfloat16 on CPUs with AMX), float32 is measured
    # too: the figure for machines without those units, and the gain.
    exact: dict[str, float] | None = None
    if predictor.amp:
        fp32_totals, _, _ = time_end_to_end(
            Predictor(device=args.device, precision="fp32"), args.runs, N_SLICES, MATRIX
        )
        fp32_median = statistics.median(fp32_totals)
        exact = {"median_s": round(fp32_median, 3),
                 "slices_per_s": round(N_SLICES / fp32_median, 1)}
    info = machine()
    report = {
        "machine": info,
        "device": predictor.device,
        "precision": predictor.precision_label,
        "torch_threads": torch.get_num_threads(),
        "series": f"{N_SLICES} slices {MATRIX}x{MATRIX}, uncompressed",
        "model_version": predictor.model_version,
        "runs": args.runs,
        "median_s": round(median, 3),
        "min_s": round(min(totals), 3),
        "max_s": round(max(totals), 3),
        "slices_per_s": round(N_SLICES / median, 1),
        "median_stages_s": {k: round(v, 3) for k, v in stages.items()},
        "target_s": TARGET_S,
        "meets_target": median <= TARGET_S,
        "found_hemorrhage": bool(findings.hemorrhage_present),
        "fp32": exact,
    }
    out = REPO / "bench" / "results" / "inference.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    stage_rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in stages.items())
    fp32_row = (
        f"| float32 (`--precision fp32`): median (s), slices/s | {exact['median_s']:.3f}, "
        f"{exact['slices_per_s']:.1f} |\n"
        if exact
        else ""
    )
    body = (
        "## Inference, end to end\n\n"
        f"Machine: {info['nproc']} CPUs, {info['cpu']}, {info['date']}; device "
        f"{predictor.device} ({predictor.precision_label}), {torch.get_num_threads()} torch "
        "threads, model "
        f"{predictor.model_version}. A {N_SLICES}-slice {MATRIX}x{MATRIX} phantom series "
        "from DICOM files to findings with Grad-CAM (read, volume, network, masks at "
        f"512x512, Grad-CAM), model loaded once; median of {args.runs} runs after one "
        "warm-up. The machine is a shared virtual one, so figures vary from day to day: "
        "compare figures measured together. The CUDA path is measured by `bench.cuda` on "
        "a lent GPU (its own section).\n\n"
        f"| measure | value |\n| --- | --- |\n"
        f"| median end to end (s) | {median:.3f} |\n"
        f"| min / max (s) | {min(totals):.3f} / {max(totals):.3f} |\n"
        f"| slices per second | {N_SLICES / median:.1f} |\n"
        f"| target (s) | {TARGET_S:.1f} ({'met' if median <= TARGET_S else 'NOT met'}) |\n"
        f"{fp32_row}\n"
        f"Stages, median of the {args.runs} runs each:\n\n"
        f"| stage | seconds |\n| --- | --- |\n{stage_rows}\n"
    )
    write_benchmark_section("inference", body)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
