"""Chefer et al.'s generic attention through a DETR's encoder, decoder self- and cross-attention,
against the rules written out in closed form for one encoder and one decoder layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import camlens
from camlens.base.errors import MethodError
from camlens.models.detectors import as_detector
from camlens.targets import Detection

pytest.importorskip("transformers")
from tests.models.test_detr import build


def _rownorm(R: np.ndarray) -> np.ndarray:
    """R - I, each row divided by its sum (zero rows kept), + I: the paper's eq. 8-9, by loops."""
    out = R - np.eye(len(R))
    for r in range(len(out)):
        s = out[r].sum()
        out[r] = out[r] / s if s > 0 else 0.0
    return out + np.eye(len(R))


def _reference(net, ad, image: torch.Tensor):
    """One encoder layer E, one decoder layer with self-attention S and cross-attention C (each
    ``mean_h (grad * A)^+`` for the best detection's class score): R_ii = I + E, R_qq = I + S,
    R_qi = 0 + S 0 + rownorm(R_qq)^T C rownorm(R_ii); the map is the query's row of R_qi."""
    config = net.config
    impl = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        (pv, pm), _ = ad.transform([image.clone().requires_grad_(True)])  # ImageNet-normalized
        out = net(pixel_values=pv, pixel_mask=pm, output_attentions=True)
    finally:
        config._attn_implementation = impl
    p = out.logits[0].softmax(-1)[:, :-1]
    q, c = divmod(int(p.detach().flatten().argmax()), p.shape[1])
    mats = [out.encoder_attentions[0], out.decoder_attentions[0], out.cross_attentions[0]]
    grads = torch.autograd.grad(p[q, c], mats)
    E, S, C = ((g * a).clamp_min(0).mean(1)[0].detach().double().numpy() for g, a in zip(grads, mats))
    Rii = np.eye(len(E)) + E
    Rqq = np.eye(len(S)) + S
    Rqi = _rownorm(Rqq).T @ C @ _rownorm(Rii)
    return Rqi[q], q


def test_generic_attention_through_the_decoder_equals_the_closed_form():
    net, _ = build("detr")  # 1 encoder layer, 1 decoder layer
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(3))
    ad = as_detector(net, threshold=0.0)
    e = camlens.explain(ad, image[None], "generic_attention_detr", targets=Detection(score_threshold=0.0, max_boxes=1))
    ref, q = _reference(net, ad, image)
    assert int(e.extras["queries"][0, 0]) == q
    h, w = e.raw.shape[-2:]
    assert (h, w) == (3, 4)  # the 96x128 image at stride 32
    assert ref.max() > 0
    np.testing.assert_allclose(e.raw[0, 0].double().numpy().ravel(), ref, rtol=1e-4, atol=1e-7 * ref.max())
    assert e.maps.shape == (1, 1, 96, 128)
    assert net.config._attn_implementation == "sdpa"  # the model's attention implementation given back
    assert all(p.grad is None for p in net.parameters())


def test_generic_attention_detr_refuses_other_detectors():
    net, _ = build("rt_detr")
    with pytest.raises(MethodError, match="deformable|DETR"):
        camlens.explain(
            as_detector(net, threshold=0.0),
            torch.rand(1, 3, 96, 128),
            "generic_attention_detr",
            targets=Detection(score_threshold=0.0, max_boxes=1),
        )
