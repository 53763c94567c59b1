"""Smoke run of the volumes benchmark (``python -m benchmarks.volumes --quick``): both cases, the three
contenders each, ratios to the same case's forward and to MONAI, the load average, and camlens's
Grad-CAM maps equal to MONAI's on both networks. No timing is asserted (timings belong to
BENCHMARKS.md)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_volumes_benchmark_quick(tmp_path):
    pytest.importorskip("monai")
    from benchmarks.volumes import main

    out = tmp_path / "volumes.json"
    assert main(["--quick", "--threads", "1", "--out", str(out)], log=lambda *a: None) == 0
    res = json.loads(out.read_text())
    contenders = [(r["case"].split(" ")[0], r["contender"]) for r in res["rows"]]
    assert contenders == [
        (case, c) for case in ("r3d_18", "MONAI") for c in ("forward (inference)", "camlens gradcam", "MONAI GradCAM")
    ]
    for r in res["rows"]:
        assert r["median_ms"] > 0 and r["reps"] == 1
        if r["contender"] == "forward (inference)":
            assert r["vs_forward"] == pytest.approx(1.0)
        if r["contender"] == "camlens gradcam":
            assert r["vs_monai"] > 0
    assert len(res["machine"]["loadavg_start"]) == 3 and len(res["machine"]["loadavg_end"]) == 3
    for agree in res["meta"]["cases"].values():  # the same maps as MONAI's, raw and upsampled
        assert agree["raw max"] > 0
        assert agree["raw pearson"] > 0.9999 and agree["raw max diff / max"] < 1e-4
        assert agree["normalized max abs diff"] < 1e-4


def test_rows_give_ratios_to_the_forward_and_to_monai():
    from benchmarks.tasks import Job
    from benchmarks.volumes import _rows

    keys = ["c: forward (inference)", "c: camlens gradcam", "c: MONAI GradCAM"]
    times = {keys[0]: [1.0, 3.0, 2.0], keys[1]: [2.0, 2.5, 3.0], keys[2]: [10.0, 5.0, 6.0]}
    rows = _rows([Job(k, lambda: None) for k in keys], times, log=lambda *a: None)
    assert [r["vs_forward"] for r in rows] == pytest.approx([1.0, 1.25, 3.0])
    assert rows[1]["vs_monai"] == pytest.approx(2.5 / 6.0)
    assert (rows[2]["min_ms"], rows[2]["max_ms"]) == pytest.approx((5000.0, 10000.0))
    # per-round ratios: round i of one contender against round i of the forward
    assert rows[1]["vs_forward_rounds"] == pytest.approx({"median": 1.5, "min": 5 / 6, "max": 2.0})
    assert rows[1]["vs_monai_rounds"] == pytest.approx({"median": 0.5, "min": 0.2, "max": 0.5})
