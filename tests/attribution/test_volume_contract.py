"""The method contract (see tests/attribution/test_method_contract.py) on volumes: every method registered with
``volumes=True`` runs on a tiny 3-D CNN and an ``(N, C, D, H, W)`` batch, in float64 — maps of shape
``(N, K, D, H, W)``, finite, batch == per volume, deterministic, nothing left on the model, the
caller's input untouched; every other method is refused with a :class:`CamlensError` before any work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import camlens
from camlens.base.errors import NotApplicableError
from tests.attribution.test_method_contract import CHEAP, DETECTOR_ONLY, _state

SHAPE = (3, 2, 5, 6, 7)  # N, C, D, H, W
VOLUME_METHODS = sorted(n for n, i in camlens.methods().items() if i.volumes)
IMAGE_ONLY = sorted(n for n, i in camlens.methods().items() if not i.volumes and n not in DETECTOR_ONLY)
# RISE's default 7-cell grids are larger than these 5-7 voxel volumes
OPTIONS = {"rise": {"cell": 3}, "occlusion": {"window": 3, "stride": 2}}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv3d(4, 5, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    ).double()


def _explain(model, x, name, targets):
    opts = {k: v for k, v in CHEAP.items() if k in camlens.methods()[name].options()}
    opts |= OPTIONS.get(name, {})
    return camlens.explain(model, x, name, targets=targets, **opts)


def test_the_usual_methods_declare_volumes():
    expected = {"cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "scorecam", "eigencam"}
    expected |= {"saliency", "input_x_gradient", "smoothgrad", "integrated_gradients", "guided_backprop"}
    expected |= {"deconvnet", "guided_gradcam", "rise", "occlusion"}
    assert expected <= set(VOLUME_METHODS)


@pytest.mark.parametrize("name", VOLUME_METHODS)
def test_volume_method_contract(name):
    model = _model()
    x = torch.randn(*SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_before = x.clone()
    model.train()
    next(model.parameters()).requires_grad_(False)
    state = _state(model)
    targets = [[0, 1], [1, 2], [2, 0]]
    maps = _explain(model, x, name, targets).maps

    assert _state(model) == state, f"{name} left a trace on the model"
    assert torch.equal(x, x_before), f"{name} modified the caller's input"
    assert maps.shape == (3, 2, 5, 6, 7)
    assert torch.isfinite(maps).all()
    assert float(maps.abs().amax()) > 0, f"{name} gave all-zero maps"
    for i in (0, 2):
        alone = _explain(model, x[i : i + 1], name, [targets[i]]).maps
        torch.testing.assert_close(alone[0], maps[i], rtol=1e-7, atol=1e-9, msg=f"{name}: batch != volume {i} alone")
    assert torch.equal(_explain(model, x, name, targets).maps, maps), f"{name} is not deterministic"


@pytest.mark.parametrize("name", IMAGE_ONLY)
def test_image_only_methods_are_refused_on_volumes(name):
    model = _model()
    state = _state(model)
    with pytest.raises(NotApplicableError, match=name):
        camlens.explain(model, torch.zeros(1, 2, 5, 6, 7, dtype=torch.float64), name)
    assert _state(model) == state
