"""Smoke run of ``python -m benchmarks.transformers`` (no timing asserted) and its peer's transform."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

bench = pytest.importorskip("benchmarks.transformers")


def test_vit_reshape_transform_is_the_hand_written_one():
    t = torch.randn(2, 197, 8)
    want = t[:, 1:].reshape(2, 14, 14, 8).permute(0, 3, 1, 2)
    assert torch.equal(bench.vit_reshape_transform(t), want)


@pytest.mark.slow
def test_quick_run_writes_rows(tmp_path):
    n = torch.get_num_threads()
    try:
        out = tmp_path / "t.json"
        assert (
            bench.main(["--quick", "--models", "swin_t", "--threads", "1", "--out", str(out)], log=lambda s: None) == 0
        )
    finally:
        torch.set_num_threads(n)
    doc = json.loads(out.read_text())
    rows = {(r["task"], r["impl"]): r for r in doc["results"]}
    assert ("forward", "torch") in rows and ("gradcam", "camlens (auto layer)") in rows
    peer = rows.get(("gradcam", "pytorch-grad-cam"))
    if peer is not None:  # the same maps as camlens at the same layer
        assert peer["pearson_vs_ref"] > 0.999
