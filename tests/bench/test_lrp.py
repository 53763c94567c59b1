"""Smoke run of the LRP / AttnLRP benchmark (``python -m benchmarks.lrp --quick``): it runs, reports
every contender and agrees with Zennit. No timing is asserted (timings belong to BENCHMARKS.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.mark.slow
def test_lrp_benchmark_quick(tmp_path):
    pytest.importorskip("zennit")
    from benchmarks.lrp import main

    out = tmp_path / "lrp.json"
    assert main(["--quick", "--threads", "1", "--out", str(out)], log=lambda *a: None) == 0
    res = json.loads(out.read_text())
    names = [r["contender"] for r in res["rows"]]
    assert names[0].startswith("forward") and "camlens lrp (epsilon_plus)" in names and "camlens attnlrp" in names
    assert any("Zennit" in n for n in names)
    assert all(r["median_ms"] > 0 for r in res["rows"])
    assert res["meta"]["max_abs_difference_vs_zennit_relative"] < 1e-2
