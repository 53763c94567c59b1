"""Cross-check with MONAI's own 3-D Grad-CAM (a peer library, test-only): on MONAI's DenseNet121 with
``spatial_dims=3`` (random weights), camlens finds the features entering its global pooling by
itself; its Grad-CAM equals ``monai.visualize.GradCAM`` at ``class_layers.relu`` (the same features)
before upsampling, and after MONAI's trilinear upsampling and per-volume min-max normalization
(which MONAI flips: max -> 0) equals ``1 - exp.normalized()``; CAM's identity holds on MONAI's
GAP + linear head."""

from __future__ import annotations

import pytest
import torch

import camlens

monai = pytest.importorskip("monai")
from monai.networks.nets import DenseNet121  # noqa: E402
from monai.visualize import GradCAM  # noqa: E402


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return DenseNet121(
        spatial_dims=3, in_channels=1, out_channels=3, init_features=8, growth_rate=4, block_config=(2, 2)
    ).eval()


@pytest.mark.slow
def test_gradcam_equals_monais_on_a_3d_densenet():
    net = _net()
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = [[1], [2]]
    both = camlens.explain(net, x, ["gradcam", "cam"], targets=targets)
    exp = both["gradcam"]
    assert exp.layer == "input of global pooling (class_layers.pool)"
    peer = GradCAM(nn_module=net, target_layers="class_layers.relu")
    for i, (c,) in enumerate(targets):
        raw = peer.compute_map(x[i : i + 1], class_idx=c, layer_idx=-1)[0].detach()  # (1, d, h, w)
        torch.testing.assert_close(exp.raw[i], raw, rtol=1e-4, atol=1e-7)
        assert float(raw.amax()) > 0
        # MONAI upsamples trilinearly, then maps (min, max) to (1, 0): its default normalizer flips the
        # scale on purpose (documented); camlens maps it to (0, 1)
        up = peer(x[i : i + 1], class_idx=c)[0, 0]
        torch.testing.assert_close(exp.normalized()[i, 0], 1 - up, rtol=1e-4, atol=1e-5)
    cam = both["cam"]  # CAM's identity on MONAI's GAP + linear head
    logits = net(x).detach().gather(1, cam.classes)
    bias = net.class_layers.out.bias.detach()[cam.classes]
    torch.testing.assert_close(cam.raw.mean((2, 3, 4)) + bias, logits, rtol=1e-4, atol=1e-5)
