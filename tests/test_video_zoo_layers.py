"""The default layers of torchvision's video zoo beyond the 3-D ResNets: S3D's last global pooling is
the mean of its 1x1x1 class map, so its card names the features entering its 2x7x7 average pooling
(Grad-CAM then has a 2x7x7 map at 16x224x224, not one voxel); Swin3D's is automatic (the input of its
3-D global pooling)."""

from __future__ import annotations

import pytest
import torch

import camlens


@pytest.mark.slow
def test_s3d_card_layer_gives_a_spatial_map():
    net = camlens.load_model("s3d", weights="random")
    assert (net.camlens.layer, net.camlens.capture) == ("avgpool", "input")
    assert net.camlens.extra["clip_size"] == (16, 224, 224)
    x = torch.randn(1, 3, 16, 224, 224, generator=torch.Generator().manual_seed(0))
    exp = camlens.explain(net, x, "gradcam")
    assert exp.layer == "input of avgpool" and exp.raw.shape == (1, 1, 2, 7, 7)
    assert float(exp.raw.amax()) > 0 and exp.shape == (1, 1, 16, 224, 224)


def test_swin3d_card_is_automatic():
    net = camlens.load_model("swin3d_t", weights="random")
    assert net.camlens.layer is None and net.camlens.extra["inputs"].startswith("clips")
