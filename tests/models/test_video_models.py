"""torchvision's video classifiers by name (random weights, offline) and as objects: the automatic
layer is the input of their 3-D global pooling, CAM's identity holds on their GAP + linear head, and
Grad-CAM equals ReLU(CAM) / (d·h·w) there."""

from __future__ import annotations

import pytest
import torch

import camlens
from camlens.models.builders import available_models, video_models


def test_video_classifiers_are_zoo_names():
    assert {"r3d_18", "mc3_18", "r2plus1d_18"} <= set(video_models())
    assert set(video_models()) <= set(available_models())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_video_classifier_cam_identity_and_gradcam(name):
    model = camlens.load_model(name, weights="random")
    assert model.camlens.extra["inputs"].startswith("clips")
    clip = torch.randn(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    both = camlens.explain(model, clip, ["cam", "gradcam"], targets="top2")
    cam, grad = both["cam"], both["gradcam"]
    assert cam.layer == "input of global pooling (avgpool)"
    assert cam.shape == (2, 2, 8, 32, 32) and cam.random_weights
    d, h, w = cam.raw.shape[2:]
    logits = model.eval()(clip).detach().gather(1, cam.classes)
    fc = model.fc
    torch.testing.assert_close(cam.raw.mean((2, 3, 4)) + fc.bias[cam.classes].detach(), logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad.raw, cam.raw.relu() / (d * h * w), rtol=1e-4, atol=1e-7)
    # the object itself (not a zoo name) explains the same way
    again = camlens.explain(
        torch.nn.Sequential(
            model.stem,
            model.layer1,
            model.layer2,
            model.layer3,
            model.layer4,
            model.avgpool,
            torch.nn.Flatten(),
            model.fc,
        ),
        clip,
        "cam",
        targets=cam.classes,
    )
    torch.testing.assert_close(again.raw, cam.raw, rtol=1e-5, atol=1e-6)
