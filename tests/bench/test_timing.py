"""The end-to-end timing of the inference benchmarks reports typical stages, not one run's."""

from __future__ import annotations

import time
from typing import Any

from bench.common import time_end_to_end


class _SlowOnce:
    """A predictor whose third counted run is slow; each call sleeps the next delay."""

    def __init__(self, delays: list[float]) -> None:
        self.delays = list(delays)

    def predict(self, volume: Any, *, explain: bool) -> str:
        assert explain and volume.hu.shape[0] == 3
        time.sleep(self.delays.pop(0))
        return "findings"


def test_stages_are_medians_over_the_counted_runs() -> None:
    # warm-up, then three counted runs of which the last is slow
    predictor = _SlowOnce([0.0, 0.01, 0.01, 0.4])
    totals, stages, findings = time_end_to_end(predictor, 3, n_slices=3, matrix=64)
    assert findings == "findings" and not predictor.delays
    assert len(totals) == 3 and max(totals) >= 0.4
    assert set(stages) == {"read_series_s", "load_volume_s", "predict_with_gradcam_s"}
    # the slow last run does not set the predict stage
    assert 0.01 <= stages["predict_with_gradcam_s"] < 0.2
    assert all(v > 0 for v in stages.values())
