"""Smoke run of the detection / RISE benchmarks (``python -m benchmarks.tasks --quick``): it runs and
reports every contender. No timing is asserted (timings belong to BENCHMARKS.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.mark.slow
def test_tasks_benchmark_quick(tmp_path):
    from benchmarks.tasks import main

    out = tmp_path / "tasks.json"
    assert main(["--quick", "--out", str(out)], log=lambda *a: None) == 0
    res = json.loads(out.read_text())
    det = [r["contender"] for r in res["groups"]["detector_gradcam"]["rows"]]
    assert det[0] == "forward (inference)" and "camlens gradcam, K boxes" in det
    assert any("pytorch-grad-cam" in c for c in det)
    rise = res["groups"]["rise_cost"]["rows"]
    assert len(rise) == 3 and all(r["median_ms"] > 0 for r in rise)
