"""Metrics on the bundled EfficientNet-Lite0 and real photos: the orderings a faithful map must show
and the sanity check of Adebayo et al. (2018).

Inputs are 128 x 128 (the model's features are then 4 x 4) to keep the suite fast on a CPU. The
photos are the cameraman ("tripod", p ~ 1.0) and the espresso cup ("coffeepot"): the orderings are
statistical properties, checked on the mean over the two images. (On ``chelsea`` at 128 px the cat
fills the frame and the "Egyptian cat" probability survives the deletion of the Grad-CAM region
about as long as that of a random region.)
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import camlens
from camlens import metrics as M
from camlens.base.io import sample_image
from camlens.core.inputs import prepare_inputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def photos(lite0):
    pp = dataclasses.replace(lite0.camlens.preprocess, size=(128, 128))
    x, _, _ = prepare_inputs([sample_image("camera"), sample_image("coffee")], lite0, pp)
    e = camlens.explain(lite0, x, "gradcam")
    return x, e.maps[:, 0], e.classes[:, 0]


@pytest.mark.slow
def test_deletion_insertion_order_gradcam_random_inverted(lite0, photos):
    x, g, cls = photos
    opts = {"steps": 6, "batch_size": 64}
    d = {
        name: float(M.deletion(lite0, x, m, cls, **opts).mean())
        for name, m in (("gradcam", g), ("random", "random"), ("inverted", -g))
    }
    i = {
        name: float(M.insertion(lite0, x, m, cls, **opts).mean())
        for name, m in (("gradcam", g), ("random", "random"), ("inverted", -g))
    }
    assert d["gradcam"] < d["random"] < d["inverted"], d
    assert i["gradcam"] > i["random"] > i["inverted"], i


@pytest.mark.slow
def test_road_morf_below_lerf(lite0, photos):
    x, g, cls = photos
    r = M.road_curves(lite0, x, g, cls, percentages=(0.2, 0.5, 0.8), batch_size=64)
    # removing what Grad-CAM points at hurts more than removing what it ignores, on every image
    assert torch.all(r.score("morf") < r.score("lerf")), (r.morf, r.lerf)
    assert float(r.score("combined").mean()) > 0.1


@pytest.mark.slow
def test_sanity_check_reproduces_adebayo(lite0, photos):
    x, _, cls = photos
    state = {k: v.clone() for k, v in lite0.state_dict().items()}
    res = M.sanity_randomization(
        lite0, x, ["gradcam", "guided_backprop", "saliency"], cls, layers=["_fc", "_bn1", "_conv_head"]
    )
    top = {m: float(res.values["spearman_abs"][m][1:].mean()) for m in res.methods}
    # classifier and head random: Guided Backprop barely changes, Grad-CAM and the gradient do
    assert top["guided_backprop"] > 0.95, top
    assert top["gradcam"] < 0.5, top
    assert top["saliency"] < 0.6, top
    assert float(res.values["ssim"]["guided_backprop"][1:].mean()) > 0.9
    assert all(torch.equal(v, lite0.state_dict()[k]) for k, v in state.items())  # a deep copy was used


def test_randomization_units_of_lite0(lite0, photos):
    units = M.randomization_layers(lite0, photos[0])
    assert units[:4] == ["_fc", "_bn1", "_conv_head", "_blocks.15"]
    assert units[-3:] == ["_blocks.0", "_bn0", "_conv_stem"] and len(units) == 21
