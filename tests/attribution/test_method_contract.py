"""The contract every registered method keeps, checked over the registry: registering a method is
enough to get it tested here.

For each method, on the first tiny model it applies to (a CAM-ready CNN, then a tiny Vision
Transformer for the attention methods), in float64:

* **batch == per image**: the maps of a batch of 3 equal the maps of each image explained alone;
* **nothing left on the model**: no hook on any module, train/eval flags and ``requires_grad``
  restored, no ``.grad`` on a parameter, the model's output bit-identical before and after, and
  the caller's input tensor unmodified;
* **finite maps** of the documented shape ``(N, K, H, W)``;
* **same alone and with other methods**: a method computed inside a list of methods (one shared
  pass) equals the method computed alone;
* **deterministic**: two calls give bit-identical maps (black-box methods seed themselves).

Methods that only explain detectors are listed in ``DETECTOR_ONLY`` with the test that covers them.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import camlens
from camlens.base.errors import CamlensError
from tests.conftest import TinyCNN
from tests.core.test_layout import tiny_tv_vit

DETECTOR_ONLY = {
    "drise": "tests/targets/test_tasks.py (D-RISE on Faster R-CNN)",
    "generic_attention_detr": "tests/attribution/test_decoder_attention.py (DETR)",
}

# Cheap settings for the options that scale a method's cost (only those a method has are passed).
CHEAP: dict[str, object] = {
    "n_masks": 48,
    "n_samples": 6,
    "steps": 6,
    "window": 4,
    "stride": 4,
    "batch_size": 16,
}

MODELS: dict[str, Callable[[], nn.Module]] = {
    "cnn": lambda: TinyCNN(c1=6, c2=5, classes=4),
    "vit": lambda: tiny_tv_vit(16),
}


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[kind]().double().eval()


def _input(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(7))


def _options(name: str) -> dict[str, object]:
    opts = camlens.methods()[name].options()
    return {k: v for k, v in CHEAP.items() if k in opts}


def _explain(model: nn.Module, x: torch.Tensor, method, **kw):
    opts = {} if isinstance(method, list) else _options(method)
    return camlens.explain(model, x, method, targets=kw.pop("targets", None), **opts, **kw)


def _applicable_model(name: str) -> tuple[str, nn.Module]:
    """The first tiny model the method runs on; the refusals of the others must be CamlensErrors."""
    refusals = []
    for kind in MODELS:
        model = _model(kind)
        try:
            _explain(model, _input(1), name)
        except CamlensError as exc:
            refusals.append(f"{kind}: {exc}")
            continue
        return kind, model
    raise AssertionError(f"{name} runs on none of the tiny models: {refusals}")


def _state(model: nn.Module) -> dict[str, object]:
    hooks = sum(
        len(d)
        for m in model.modules()
        for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)
    )
    return {
        "hooks": hooks,
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad is not None for p in model.parameters()],
    }


METHODS = [n for n in camlens.methods() if n not in DETECTOR_ONLY]


@pytest.mark.parametrize("name", METHODS)
def test_method_contract(name):
    kind, model = _applicable_model(name)
    x = _input(3)
    x_before = x.clone()
    # a mixed train/eval model with one frozen parameter: both must come back as they were
    model.train()
    first = next(model.parameters())
    first.requires_grad_(False)
    with torch.no_grad():
        model.eval()
        out_before = model(x)
        model.train()
    state = _state(model)

    targets = [[0, 1], [1, 2], [2, 0]]
    exp = _explain(model, x, name, targets=targets)
    maps = exp.maps

    assert _state(model) == state, f"{name} left a trace on the {kind} model"
    assert torch.equal(x, x_before), f"{name} modified the caller's input"
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), out_before), f"{name} changed the model's output"
        model.train()

    assert maps.shape == (3, 2, 16, 16)
    assert torch.isfinite(maps).all(), f"{name} gave non-finite maps"

    for i in range(3):
        alone = _explain(model, x[i : i + 1], name, targets=[targets[i]]).maps
        torch.testing.assert_close(alone[0], maps[i], rtol=1e-7, atol=1e-9, msg=f"{name}: batch != image {i} alone")

    again = _explain(model, x, name, targets=targets).maps
    assert torch.equal(again, maps), f"{name} is not deterministic"

    other = "eigencam" if name != "eigencam" else "gradcam"
    if kind == "vit":
        other = "attention_rollout" if name != "attention_rollout" else "generic_attention"
    together = camlens.explain(model, x, [name, other], targets=targets, **_options(name))
    torch.testing.assert_close(together[name].maps, maps, rtol=1e-7, atol=1e-9, msg=f"{name}: changed by {other}")


def test_every_method_is_covered():
    """A new method is tested here unless it is listed, with its covering test, in DETECTOR_ONLY."""
    assert set(METHODS) | set(DETECTOR_ONLY) == set(camlens.methods())
    assert set(DETECTOR_ONLY) <= set(camlens.methods())
