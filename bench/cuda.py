"""CUDA inference speed: ``python -m bench.cuda`` (needs a CUDA GPU).

Measures the node's CUDA path with the bundled weights:

* end to end, as ``bench.inference`` does on the CPU: a 40-slice 512 x 512
  phantom series from DICOM files to findings with Grad-CAM, model loaded once,
  median of several runs after a warm-up;
* the network stage alone (``Predictor.run`` on a 160-slice 512 x 512 HU array:
  windowing and resampling, the network, masks at 512 x 512, Grad-CAM) for
  each batch size with float16 autocast on and off, with the peak GPU memory.

Writes ``bench/results/cuda.json`` (or ``--json``) and the ``cuda`` section of
``docs/BENCHMARKS.md``. ``--report FILE`` writes that section again from a saved
JSON document on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, machine, time_end_to_end, write_benchmark_section

N_SLICES = 40
SWEEP_SLICES = 160
MATRIX = 512
BATCH_SIZES = (16, 32, 64, 128)


def measure(runs: int) -> dict[str, Any]:
    """Run the measurements on the GPU; return the report."""
    import torch

    from inference.phantom import generate_case
    from inference.predictor import Predictor

    predictor = Predictor(device="cuda")
    default_batch = predictor.batch_size

    sync = torch.cuda.synchronize
    totals, stages, findings = time_end_to_end(predictor, runs, N_SLICES, MATRIX, sync)
    big = generate_case(8, n_slices=SWEEP_SLICES, matrix=MATRIX,
                        subtypes=("subdural",), slice_thickness=1.0).hu
    sweep = []
    for amp in (True, False):
        for batch in BATCH_SIZES:
            predictor.amp = amp
            predictor.batch_size = batch
            predictor.run(big, explain=True)  # warm-up (cuDNN picks its kernels)
            torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(3):
                sync()
                t0 = time.perf_counter()
                predictor.run(big, explain=True)
                sync()
                times.append(time.perf_counter() - t0)
            best = min(times)
            sweep.append({
                "amp_float16": amp,
                "batch_size": batch,
                "seconds": round(best, 4),
                "slices_per_s": round(SWEEP_SLICES / best, 1),
                "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            })
    median = statistics.median(totals)
    props = torch.cuda.get_device_properties(0)
    return {
        "machine": machine(),
        "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "torch": str(torch.__version__),
        "cuda": str(torch.version.cuda),
        "model_version": predictor.model_version,
        "end_to_end": {
            "series": f"{N_SLICES} slices {MATRIX}x{MATRIX}, uncompressed, with Grad-CAM",
            "batch_size": default_batch,
            "amp_float16": True,
            "runs": runs,
            "median_s": round(median, 3),
            "min_s": round(min(totals), 3),
            "max_s": round(max(totals), 3),
            "slices_per_s": round(N_SLICES / median, 1),
            "median_stages_s": {k: round(v, 3) for k, v in stages.items()},
            "found_hemorrhage": bool(findings.hemorrhage_present),
        },
        "network_sweep": {
            "series": f"{SWEEP_SLICES} slices {MATRIX}x{MATRIX} HU array, with Grad-CAM",
            "best_of": 3,
            "rows": sweep,
        },
    }


def render(report: dict[str, Any]) -> str:
    """The ``cuda`` section of docs/BENCHMARKS.md."""
    e2e = report["end_to_end"]
    info = report["machine"]
    rows = "\n".join(
        f"| {'float16' if r['amp_float16'] else 'float32'} | {r['batch_size']} | "
        f"{r['seconds']:.3f} | {r['slices_per_s']:.0f} | {r['peak_gpu_mib']:.0f} |"
        for r in report["network_sweep"]["rows"]
    )
    if "median_stages_s" in e2e:
        stage_times = e2e["median_stages_s"]
        stage_title = f"Stages, median of the {e2e['runs']} runs each:"
    else:  # reports saved before per-stage medians hold one run's split
        stage_times = e2e["last_run_stages_s"]
        stage_title = (
            f"Stages of the last run only ({sum(stage_times.values()):.3f} s in all, "
            "so not a typical run):"
        )
    stages = "\n".join(f"| {k} | {v:.3f} |" for k, v in stage_times.items())
    return (
        "## Inference on a GPU (CUDA)\n\n"
        f"Card: {report['gpu']} ({report['gpu_memory_gib']} GiB), on a machine with "
        f"{info['nproc']} CPUs ({info['cpu']}), {info['date']}; torch {report['torch']}, "
        f"CUDA {report['cuda']}; model {report['model_version']}. Measured with "
        "`python -m bench.cuda` on a GPU machine lent for a few minutes; the node needs no "
        "GPU and CI has none.\n\n"
        f"End to end, {e2e['series']} (read, volume, network, masks, Grad-CAM), batch "
        f"{e2e['batch_size']}, float16 autocast, median of {e2e['runs']} runs after a "
        f"warm-up: **{e2e['median_s']:.3f} s, {e2e['slices_per_s']:.0f} slices/s** "
        f"(min {e2e['min_s']:.3f}, max {e2e['max_s']:.3f}).\n\n"
        f"{stage_title}\n\n| stage | seconds |\n| --- | --- |\n{stages}\n\n"
        f"Network stage alone ({report['network_sweep']['series']}; best of "
        f"{report['network_sweep']['best_of']}; windowing and resampling run on the CPU):\n\n"
        "| precision | batch | seconds | slices/s | peak GPU MiB |\n"
        "| --- | --- | --- | --- | --- |\n"
        f"{rows}\n"
    )


def main(argv: list[str] | None = None) -> int:
    """Measure (or re-render a saved report) and write the section."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "cuda.json")
    parser.add_argument("--report", type=Path, help="write the section from this saved JSON")
    args = parser.parse_args(argv)
    if args.report is not None:
        report = json.loads(args.report.read_text())
    else:
        import torch

        if not torch.cuda.is_available():
            print("bench.cuda: no CUDA GPU on this machine", flush=True)
            return 2
        report = measure(args.runs)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    write_benchmark_section("cuda", render(report))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
