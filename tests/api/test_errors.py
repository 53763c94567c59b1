"""Bad input gets a clear error that names the problem and the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import camlens
from camlens.base.errors import HeadError, InputError, LayerNotFoundError, MethodError, TargetError


def test_misspelt_layer_lists_closest_names(tiny, tiny_x):
    with pytest.raises(LayerNotFoundError) as err:
        camlens.explain(tiny, tiny_x, method="gradcam", layer="conv_2")
    msg = str(err.value)
    assert "'conv_2'" in msg and "conv2" in msg and "camlens layers" in msg


def test_misspelt_layer_on_real_model(lite0):
    with pytest.raises(LayerNotFoundError, match=r"_blocks\.15"):
        camlens.explain(lite0, torch.zeros(1, 3, 64, 64), layer="_block.15")


@pytest.mark.parametrize("bad", [4, -1, [[0, 7]], "top5"])
def test_class_index_out_of_range(tiny, tiny_x, bad):
    with pytest.raises(TargetError) as err:
        camlens.explain(tiny, tiny_x[:1], method="gradcam", targets=bad)
    assert "4 classes" in str(err.value) or "k must be" in str(err.value)


def test_out_of_range_message_names_index_and_count(tiny, tiny_x):
    with pytest.raises(TargetError, match=r"class index 9 .*4 classes"):
        camlens.explain(tiny, tiny_x, targets=[0, 9, 1])


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.zeros(3, 12, 12), "unsqueeze"),
        (torch.zeros(12, 12), r"\(N, C, H, W\)"),
        (torch.zeros(1, 3, 12, 12, dtype=torch.uint8), "floating-point"),
        (torch.zeros(1, 3, 12, 12, dtype=torch.long), "floating-point"),
        (torch.zeros(0, 3, 12, 12), "empty"),
        (np.zeros((2, 3, 12, 12)), "HxW"),
        (object(), "cannot use object"),
    ],
)
def test_non_image_inputs(tiny, x, match):
    with pytest.raises(InputError, match=match):
        camlens.explain(tiny, x)


def test_cam_on_non_gap_head_suggests_gradcam():
    class MLPHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc1 = nn.Linear(4, 8)
            self.fc2 = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(self.pool(torch.relu(self.conv(x))).flatten(1))))

    m = MLPHead().eval()
    with pytest.raises(HeadError, match="gradcam"):
        camlens.explain(m, torch.randn(1, 3, 8, 8), method="cam")
    assert camlens.explain(m, torch.randn(1, 3, 8, 8), method="gradcam").maps.shape == (1, 1, 8, 8)


def test_cam_with_wrong_layer_explains_what_is_needed(tiny, tiny_x):
    with pytest.raises(HeadError, match="global average pool"):
        camlens.explain(tiny, tiny_x, method="cam", layer="conv2")  # pre-ReLU: does not give the logits


def test_unknown_method_and_option(tiny, tiny_x):
    with pytest.raises(MethodError, match="gradcam"):
        camlens.explain(tiny, tiny_x, method="gradcma")
    with pytest.raises(MethodError, match=r"unknown option\(s\) stepz .*valid options"):
        camlens.explain(tiny, tiny_x, method="gradcam", stepz=3)


def test_model_that_does_not_return_logits(tiny_x):
    class Dict(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 2, 3)

        def forward(self, x):
            return {"out": self.c(x).mean((2, 3))}

    with pytest.raises(InputError, match=r"logits of shape \(N, num_classes\)"):
        camlens.explain(Dict().double(), tiny_x)


def test_unknown_zoo_model_suggests():
    with pytest.raises(camlens.CamlensError, match="resnet50"):
        camlens.load_model("resnet_50")


def test_missing_torchvision_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(camlens.base.errors.WeightsNotFoundError, match="never downloads") as err:
        camlens.load_model("resnet18")
    assert "weights=" in str(err.value) and str(tmp_path) in str(err.value)
