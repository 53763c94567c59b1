"""``python -m benchmarks.gpu --dry-run``: the GPU benchmark runs end to end on the CPU with tiny
models and inputs and prints one JSON object with every part (the numbers mean nothing there)."""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu


@pytest.mark.slow
def test_gpu_benchmark_dry_run_end_to_end(capsys):
    assert gpu.main(["--dry-run", "--tests", "tests/core/test_cuda.py"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["meta"]["dry_run"] is True and out["meta"]["device"] == "cpu"
    tests = out["tests"]
    assert tests["returncode"] in (0, 5) and tests["counts"].get("failed", 0) == 0  # all skipped without a GPU
    assert len(out["grid"]) == 3 * 2  # models x precisions (batch 2)
    for key, cell in out["grid"].items():
        for task in ("forward", "camlens gradcam", "camlens top100", "camlens guided_backprop", "camlens scorecam"):
            if task == "camlens guided_backprop" and key.startswith("tiny vit"):  # no ReLU: camlens refuses
                assert "no ReLU" in cell[task]["not_applicable"]
                continue
            assert cell[task]["seconds"] > 0, (task, cell[task])
        assert cell["camlens gradcam"]["vs_forward"] > 0
    resnet = out["grid"]["resnet18 (dry run) | batch 2 | bf16"]
    assert any(k.startswith("pytorch-grad-cam") for k in resnet) and any(k.startswith("Captum") for k in resnet)
    for name in ("small photos", "phone photos 4032x3024"):
        rows = out["pipeline"][name]["rows"]
        assert rows["camlens pipeline (stream), Grad-CAM"]["images_per_s"] > 0
        assert rows["bare forward, preloaded on the device"]["vs_bare_forward"] == 1.0


def test_gpu_benchmark_refuses_to_run_without_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 2
    assert "--dry-run" in json.loads(capsys.readouterr().out)["error"]
