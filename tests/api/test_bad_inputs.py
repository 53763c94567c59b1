"""Bad tensors and arguments (issue 12 item 18): each a CamlensError naming the problem and the fix;
a user callable (target or model) that raises propagates its own exception unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import camlens
from camlens.base.errors import InputError, MethodError, TargetError


@pytest.mark.parametrize("channels", [1, 4])
def test_wrong_channel_count(tiny, channels):
    x = torch.randn(1, channels, 12, 12, dtype=torch.float64)
    with pytest.raises(InputError, match=rf"takes 3-channel images but the input has {channels} channel") as e:
        camlens.explain(tiny, x)
    assert "x[:, :3]" in str(e.value) and "expand" in str(e.value)
    with pytest.raises(InputError, match="3-channel"):
        camlens.predict(tiny, x)


@pytest.mark.parametrize("size", [8, 1])
def test_too_small_image(lite0, size):
    with pytest.raises(InputError, match=rf"\({size}x{size} px\) are too small.*Resize"):
        camlens.explain(lite0, torch.randn(1, 3, size, size))


def test_meta_model():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(InputError, match=r"'meta' device.*load_state_dict"):
        camlens.explain(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(InputError, match="meta"):
        camlens.predict(model, torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("bad", [3.5, float("nan"), float("inf"), -0.5])
def test_float_class_id(tiny, tiny_x, bad):
    with pytest.raises(TargetError, match="not an integer; pass an int class id"):
        camlens.explain(tiny, tiny_x, targets=bad)


def test_integral_float_class_id_is_that_class(tiny, tiny_x):
    # consistent with integral float arrays, which were already accepted
    a = camlens.explain(tiny, tiny_x, targets=3.0)
    b = camlens.explain(tiny, tiny_x, targets=3)
    assert a.classes.tolist() == [[3]] * 3
    torch.testing.assert_close(a.maps, b.maps)


@pytest.mark.parametrize("bad", [None, 3, ["gradcam", 2], 1.5])
def test_bad_method_type(tiny, tiny_x, bad):
    with pytest.raises(MethodError, match=r"method must be a method name .*camlens.methods\(\)"):
        camlens.explain(tiny, tiny_x, method=bad)


def test_empty_method_list(tiny, tiny_x):
    with pytest.raises(MethodError, match="no method given"):
        camlens.explain(tiny, tiny_x, method=[])


@pytest.mark.parametrize("layer", [None, "conv2"])
def test_misspelt_capture(tiny, tiny_x, layer):
    with pytest.raises(InputError, match=r"capture must be 'output' or 'input'.*did you mean 'input'"):
        camlens.explain(tiny, tiny_x, layer=layer, capture="inptu")


def test_bad_layer_type(tiny, tiny_x):
    with pytest.raises(InputError, match="layer must be a dotted module name"):
        camlens.explain(tiny, tiny_x, layer=3)


@pytest.mark.parametrize("method", ["gradcam", "saliency", "integrated_gradients"])
def test_detached_callable_target(tiny, tiny_x, method):
    with pytest.raises(TargetError, match=r"do not depend on the logits.*\.detach\(\)"):
        camlens.explain(tiny, tiny_x, method=method, targets=lambda logits: logits[:, 0].detach())


def test_callable_without_grad_is_fine_for_gradient_free_methods(tiny, tiny_x):
    exp = camlens.explain(tiny, tiny_x, method="scorecam", targets=lambda logits: logits[:, 0].detach())
    assert exp.maps.shape == (3, 1, 12, 12)


class Mine(Exception):
    pass


@pytest.mark.parametrize("method", ["gradcam", "cam", "saliency", "scorecam"])
def test_user_target_exception_propagates_unchanged(tiny, tiny_x, method):
    err = Mine("from the user's target")

    def target(logits):
        raise err

    with pytest.raises(Mine) as e:
        camlens.explain(tiny, tiny_x, method=method, targets=target)
    assert e.value is err


def test_user_model_runtime_error_propagates_unchanged(tiny_x):
    err = RuntimeError("my model's own failure")

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)

        def forward(self, x):
            raise err

    with pytest.raises(RuntimeError) as e:
        camlens.explain(Broken().double(), tiny_x)
    assert e.value is err
