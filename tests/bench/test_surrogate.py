"""Smoke run of the LIME / KernelSHAP / ONNX Runtime benchmark (``python -m benchmarks.surrogate --quick``,
also a task of ``python -m benchmarks``): every contender is reported, per sample and against one
batched forward, and the report renders it. No timing is asserted (timings belong to BENCHMARKS.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.mark.slow
def test_surrogate_benchmark_quick(tmp_path):
    pytest.importorskip("captum")
    pytest.importorskip("onnxruntime")
    from benchmarks.report import surrogate_lines
    from benchmarks.surrogate import main

    out = tmp_path / "surrogate.json"
    assert main(["--quick", "--threads", "1", "--out", str(out)], log=lambda *a: None) == 0
    res = json.loads(out.read_text())
    names = [r["contender"] for r in res["rows"]]
    assert names == [
        "forward (inference, batch 64)",
        "camlens lime",
        "camlens kernelshap",
        "captum Lime",
        "captum KernelShap",
        "camlens rise (PyTorch)",
        "camlens rise (ONNX Runtime)",
    ]
    first = res["rows"][0]
    assert first["per_sample_vs_forward"] == pytest.approx(1.0)
    for r in res["rows"]:
        assert r["median_ms"] > 0 and r["per_sample_ms"] == pytest.approx(
            r["median_ms"] / {True: 64, False: 24}["forward" in r["contender"]]
        )
    assert res["meta"]["rise onnx vs torch max rel diff"] < 1e-4  # the same maps through ONNX Runtime
    text = "\n".join(surrogate_lines(res))
    assert "## LIME, KernelSHAP and ONNX Runtime" in text and "| captum KernelShap |" in text


def test_runner_knows_the_surrogate_task_and_quick_mode_skips_it():
    from benchmarks.cases import TASKS
    from benchmarks.runner import _apply_quick, build_parser

    args = build_parser().parse_args([])
    assert "surrogate" in TASKS and "surrogate" in args.tasks  # `python -m benchmarks` runs it
    _apply_quick(args)
    assert "surrogate" not in args.tasks  # the smoke run stays fast
