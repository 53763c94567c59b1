"""Device-agnostic engine: every registered method gives the same result on an accelerator as on
the CPU, and nothing is copied back to the host. Skipped where no accelerator exists (CI)."""

from __future__ import annotations

import copy

import pytest
import torch

import camlens
from camlens.attribution.registry import applicable
from camlens.attribution.traits import model_traits

DEVICES = [
    d
    for d in ("cuda", "mps")
    if (d == "cuda" and torch.cuda.is_available())
    or (d == "mps" and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
]
pytestmark = pytest.mark.skipif(not DEVICES, reason="no accelerator on this machine")

FAST_OPTIONS = {"smoothgrad": {"n_samples": 4}, "integrated_gradients": {"steps": 8}}


@pytest.mark.parametrize("device", DEVICES)
def test_all_methods_match_cpu(tiny, tiny_x, device):
    gpu = copy.deepcopy(tiny).to(device)
    for name in applicable(model_traits(tiny)):  # AttnLRP and the attention methods need a transformer
        opts = FAST_OPTIONS.get(name, {})
        if name == "smoothgrad":
            opts = {**opts, "noise_level": 0.0}
        cpu = camlens.explain(tiny, tiny_x, method=name, targets="top2", **opts)
        dev = camlens.explain(gpu, tiny_x.to(device), method=name, targets="top2", **opts)
        assert dev.maps.device.type == device, name
        torch.testing.assert_close(dev.maps.cpu(), cpu.maps, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_lite0_on_device(lite0, cat, device):
    model = copy.deepcopy(lite0).to(device)
    res = camlens.explain(model, [cat, cat], method=["cam", "gradcam"], targets="top2")
    cpu = camlens.explain(lite0, [cat, cat], method=["cam", "gradcam"], targets="top2")
    for m in res:
        assert res[m].maps.device.type == device
        torch.testing.assert_close(res[m].maps.cpu(), cpu[m].maps, rtol=1e-3, atol=1e-3 * float(cpu[m].maps.max()))
