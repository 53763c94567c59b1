"""Smoke run of the FullGrad / RefineCAM / LeGrad benchmark (``python -m benchmarks.newmethods --quick``):
it runs, reports every contender and the agreement with the peers. No timing is asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.mark.slow
def test_newmethods_benchmark_quick(tmp_path):
    pytest.importorskip("pytorch_grad_cam")
    pytest.importorskip("torchcam")
    from benchmarks.newmethods import main

    out = tmp_path / "newmethods.json"
    assert main(["--quick", "--threads", "1", "--out", str(out)], log=lambda *a: None) == 0
    res = json.loads(out.read_text())
    names = [r["contender"] for r in res["rows"]]
    for name in ("camlens fullgrad", "pytorch-grad-cam FullGrad", "camlens legrad", "TorchCAM LeGrad"):
        assert name in names
    assert all(r["median_ms"] > 0 for r in res["rows"])
    agree = [v for k, v in res["meta"].items() if k.startswith("pearson")]
    assert len(agree) == 4 and min(agree) > 0.999
