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
    exp = camlens.explain(net, x, "gradcam", relu=False)
    assert exp.layer == "input of avgpool" and exp.raw.shape == (1, 1, 2, 7, 7) and exp.shape == (1, 1, 16, 224, 224)
    # closed form: the head is a 1x1x1 conv on the 2x7x7 average, so d logit_k / d A_c = W_kc / 98 and
    # Grad-CAM (before its ReLU) is the class's conv weights applied to the features, over 98
    feats: list[torch.Tensor] = []
    h = net.avgpool.register_forward_pre_hook(lambda m, a: feats.append(a[0]))
    try:
        with torch.no_grad():
            net(x)
    finally:
        h.remove()
    k = int(exp.classes[0, 0])
    w = net.classifier[1].weight[k, :, 0, 0, 0].detach()
    ref = torch.einsum("c,cdhw->dhw", w, feats[0][0]) / 98
    scale = ref.abs().amax()  # torchvision's random S3D gives tiny features (~1e-9): compare relative to it
    assert float(scale) > 0 and float(ref.amax() - ref.amin()) > 1e-3 * float(scale)  # not a constant map
    torch.testing.assert_close(exp.raw[0, 0] / scale, ref / scale, rtol=1e-4, atol=1e-5)


def test_swin3d_card_is_automatic():
    net = camlens.load_model("swin3d_t", weights="random")
    assert net.camlens.layer is None and net.camlens.extra["inputs"].startswith("clips")
