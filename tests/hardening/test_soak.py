"""Soak: a stream of series through the whole loop to a real Orthanc, without memory growth.

Runs :func:`bench.soak.run_soak` with ``ICHNODE_SOAK_SERIES`` series (default
24 in CI, about 40 s on 2 shared CPUs: 8 batches of 3, so each third of the
soak after the warm-up batch holds several samples). The full soak is
``ICHNODE_SOAK_SERIES=100`` or ``python -m bench.soak --series 100``; its
numbers are in ``docs/BENCHMARKS.md``. Every series
must come back to Orthanc as exactly one SR, the node must send each SR once,
and the node's total RSS (main process and worker, sampled after each batch)
must not grow by more than :data:`bench.soak.RSS_GROWTH_BOUND_MB` from the
first third of the soak to the last.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from bench.soak import RSS_GROWTH_BOUND_MB, run_soak

logger = logging.getLogger(__name__)

SOAK_SERIES = int(os.environ.get("ICHNODE_SOAK_SERIES", "24"))


@pytest.mark.slow
@pytest.mark.interop
def test_soak_no_memory_growth_and_every_sr_once(tmp_path: Path) -> None:
    result = run_soak(SOAK_SERIES, tmp_path, batch_size=3)
    doc = result.document(RSS_GROWTH_BOUND_MB)
    logger.warning(
        "soak: %d series in %.0f s, peak RSS main %.0f MB worker %.0f MB, growth %.1f MB",
        doc["series"], doc["seconds"], doc["main_peak_rss_mb"], doc["worker_peak_rss_mb"],
        doc["rss_growth_mb"],
    )
    assert not result.failures, result.failures
    assert len(result.samples) == -(-SOAK_SERIES // 3)
    assert all(s.main_rss_mb > 0 and s.workers_rss_mb > 0 for s in result.samples), doc["samples"]
    missing = {k: v for k, v in result.sr_per_study.items() if v != 1}
    assert not missing, f"studies without exactly one SR in Orthanc: {missing}"
    assert result.sr_exactly_once, result.sr_deliveries_per_series
    assert result.rss_growth_mb <= RSS_GROWTH_BOUND_MB, doc["samples"]
