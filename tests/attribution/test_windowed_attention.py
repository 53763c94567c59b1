"""Windowed attention (Swin, MaxViT): the attention methods refuse it before any work with an error
that says why (windows, shifts, patch merging: no attention over one token sequence) and names the
alternative — the CAM family on a stage output — which then works on the same model."""

from __future__ import annotations

import pytest
import torch

import camlens
from camlens.attribution.registry import ATTENTION_MODELS
from camlens.attribution.traits import model_traits
from camlens.base.errors import NotApplicableError
from camlens.core.attention import attention_modules, windowed_attention_modules
from tests.core.test_layout import tiny_swin

ATTENTION_METHODS = sorted(n for n, i in camlens.methods().items() if i.applies_to is ATTENTION_MODELS)


def tiny_timm_swin():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.models.swin_transformer.SwinTransformer(
        img_size=32, patch_size=4, embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=2, num_classes=3
    )
    return m.double().eval()


MODELS = {"torchvision": (tiny_swin, "features.1"), "timm": (tiny_timm_swin, "layers.0")}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_attention_methods_refuse_windowed_attention_naming_the_alternative(family):
    build, stage = MODELS[family]
    model = build()
    assert {"attention_rollout", "generic_attention", "legrad"} <= set(ATTENTION_METHODS)
    assert windowed_attention_modules(model) and not attention_modules(model)
    traits = model_traits(model)
    assert traits.windowed and "windowed-attention transformer" in traits.describe()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    for method in ATTENTION_METHODS:
        with pytest.raises(NotApplicableError) as err:
            camlens.explain(model, x, method)
        msg = str(err.value)
        assert "windows" in msg and "patch merging" in msg and "gradcam" in msg and "stage output" in msg, msg
    # the alternative it names works on the same model, at a stage output
    exp = camlens.explain(model, x, "gradcam", layer=stage, targets=[[0, 2]])
    assert exp.raw.shape == (1, 2, 8, 8) and torch.isfinite(exp.maps).all()
    assert float(exp.raw.amax()) > 0


def test_a_cnn_keeps_its_own_hint():
    from tests.conftest import TinyCNN

    with pytest.raises(NotApplicableError, match="use a layer method such as gradcam") as err:
        camlens.explain(TinyCNN().eval(), torch.randn(1, 3, 12, 12), "attention_rollout")
    assert "windows" not in str(err.value) and "(a CNN classifier)" in str(err.value)
