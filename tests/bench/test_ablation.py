"""Smoke run of the Ablation-CAM / Recipro-CAM benchmark (``python -m benchmarks.ablation --quick``):
it runs, reports every contender and the agreement with pytorch-grad-cam. No timing is asserted
(timings belong to BENCHMARKS.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.mark.slow
def test_ablation_benchmark_quick(tmp_path):
    pytest.importorskip("pytorch_grad_cam")
    from benchmarks.ablation import main

    out = tmp_path / "ablation.json"
    assert main(["--quick", "--threads", "1", "--out", str(out)], log=lambda *a: None) == 0
    res = json.loads(out.read_text())
    names = [r["contender"] for r in res["rows"]]
    assert names[0].startswith("forward") and "camlens ablationcam" in names and "camlens reciprocam" in names
    assert any("pytorch-grad-cam" in n for n in names)
    assert all(r["median_ms"] > 0 for r in res["rows"])
    assert res["meta"]["camlens_head"].startswith("layers above the target only")
    assert res["meta"]["pearson_ablationcam_vs_pytorch_grad_cam"] > 0.999
