"""Token and channels-last layouts seen as (N, D, h, w): oracles are hand-written reshapes and
Grad-CAM computed in the test with plain autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import camlens
from camlens.base.errors import CamlensError, LayoutError
from camlens.core.engine import ForwardPass
from camlens.core.layers import resolve_layer
from camlens.core.layout import grid_fits, infer_layout, token_grid
from tests.api.test_hygiene import assert_untouched, snapshot


def tiny_timm_vit(reg_tokens: int = 4, class_token: bool = True, img_size=(48, 64)) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(
        img_size=img_size,
        patch_size=8,
        embed_dim=16,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        reg_tokens=reg_tokens,
        class_token=class_token,
        global_pool="token" if class_token else "avg",
        num_classes=4,
        dynamic_img_size=True,
    )
    return m.double().eval()


def tiny_tv_vit(image_size: int = 32) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(
        image_size=image_size, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    )
    nn.init.normal_(m.heads.head.weight, std=0.5)  # torchvision zero-initialises the head
    return m.double().eval()


def tiny_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    m = SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2], num_classes=3
    )
    return m.double().eval()


def hand_tokens_to_map(tokens: torch.Tensor, prefix: int, h: int, w: int) -> torch.Tensor:
    """The test's own reshape: drop the prefix, rows of the grid, then channels first."""
    n, _, d = tokens.shape
    return tokens[:, prefix:].reshape(n, h, w, d).permute(0, 3, 1, 2)


def hook_output(model: nn.Module, name: str):
    store = {}
    h = model.get_submodule(name).register_forward_hook(lambda m, a, o: store.__setitem__("out", o))
    return store, h


def reference_gradcam(model, x, name, prefix, h, w, cls, tokens=True):
    """Grad-CAM with plain autograd on the hooked output and the hand-written reshape."""
    store, hd = hook_output(model, name)
    try:
        with torch.enable_grad():
            logits = model(x)
            (g,) = torch.autograd.grad(logits[torch.arange(len(x)), cls].sum(), store["out"])
    finally:
        hd.remove()
    out = store["out"].detach()
    if tokens:
        A, G = hand_tokens_to_map(out, prefix, h, w), hand_tokens_to_map(g, prefix, h, w)
    else:  # channels-last
        A, G = out.permute(0, 3, 1, 2), g.permute(0, 3, 1, 2)
    wts = G.mean(dim=(2, 3))
    return torch.einsum("nc,nchw->nhw", wts, A).relu()


def test_grid_rules():
    assert token_grid(197, (224, 224), (16, 16)) == (1, 14, 14)
    assert token_grid(197, (224, 224)) == (1, 14, 14)  # without the patch size: from the count
    assert token_grid(201, (224, 224)) == (5, 14, 14)  # class + 4 register tokens
    assert token_grid(196, (224, 224)) == (0, 14, 14)
    assert token_grid(1 + 6 * 8, (48, 64), (8, 8)) == (1, 6, 8)
    assert token_grid(1 + 6 * 8, (48, 64)) == (1, 6, 8)  # 49 = 7x7 does not fit 48x64
    assert token_grid(2 + 24 * 32, (384, 512)) == (2, 24, 32)  # DeiT distilled, non-square
    # 7 tokens fit no grid without a prefix: the squarest grid with the fewest prefix tokens wins (3 + 2x2)
    assert token_grid(7, (224, 224)) == (3, 2, 2)
    assert token_grid(2, (224, 224)) == (1, 1, 1)
    assert grid_fits(7, 7, 224, 224) and grid_fits(8, 8, 225, 225) and not grid_fits(7, 768, 224, 224)
    assert not grid_fits(5, 5, 64, 96)


def test_infer_layout_4d_and_overrides():
    hw = (224, 224)
    assert infer_layout((2, 768, 7, 7), hw).kind == "nchw"
    assert infer_layout((2, 7, 7, 768), hw).kind == "nhwc"
    assert infer_layout((2, 56, 56, 96), hw).kind == "nhwc"
    assert infer_layout((2, 7, 7, 7), hw).kind == "nchw"  # ambiguous: channels first
    assert infer_layout((2, 7, 7, 768), hw, reshape="none").kind == "nchw"
    lay = infer_layout((2, 197, 64), hw, reshape=(14, 14))
    assert (lay.kind, lay.prefix, lay.grid) == ("tokens", 1, (14, 14))
    lay = infer_layout((2, 197, 64), hw, reshape=(5, 12, 16))
    assert (lay.prefix, lay.grid) == (5, (12, 16))
    with pytest.raises(LayoutError, match="does not fit 197 tokens"):
        infer_layout((2, 197, 64), hw, reshape=(10, 10))
    with pytest.raises(LayoutError, match="reshape=\\(h, w\\)"):
        infer_layout((2, 5000, 64), (32, 32))
    with pytest.raises(LayoutError, match="not a layout"):
        infer_layout((2, 197, 64), hw, reshape="sideways")
    assert issubclass(LayoutError, CamlensError)


@pytest.mark.parametrize("size", [(48, 64), (40, 24)])
@pytest.mark.parametrize("reg", [0, 4])
def test_token_features_equal_a_hand_written_reshape(size, reg):
    model = tiny_timm_vit(reg_tokens=reg)
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    h, w = size[0] // 8, size[1] // 8
    prefix = 1 + reg
    store, hd = hook_output(model, "blocks.1.norm1")
    with torch.no_grad():
        plain = model(x)
    hd.remove()
    spec = resolve_layer(model, "blocks.1.norm1")
    ctx = ForwardPass.run(model, x, spec, needs=frozenset({"features", "layer_grads"}))
    assert torch.equal(ctx.features.detach(), hand_tokens_to_map(store["out"], prefix, h, w))
    assert torch.equal(ctx.logits.detach(), plain)  # the model went on with bit-identical values
    assert (ctx.layout.prefix, ctx.layout.grid) == (prefix, (h, w))


@pytest.mark.parametrize("size", [(48, 64), (32, 32)])
def test_gradcam_on_a_vit_block_equals_autograd_reference(size):
    model = tiny_timm_vit(reg_tokens=4)
    before = snapshot(model)
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    cls = [1, 3]
    exp = camlens.explain(model, x, "gradcam", targets=cls, layer="blocks.1.norm1")
    ref = reference_gradcam(model, x, "blocks.1.norm1", 5, size[0] // 8, size[1] // 8, cls)
    assert ref.abs().max() > 0
    torch.testing.assert_close(exp.raw[:, 0].double(), ref, rtol=1e-9, atol=1e-12)
    assert "5 prefix token(s) dropped" in exp.extras["layout"]
    assert_untouched(model, before)


def test_torchvision_vit_class_token_and_auto_layer():
    model = tiny_tv_vit()
    before = snapshot(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    exp = camlens.explain(model, x, "gradcam")
    assert exp.layer == "output of encoder.layers.encoder_layer_1.ln_1"  # norm before the last attention
    cls = exp.classes[:, 0].tolist()
    ref = reference_gradcam(model, x, "encoder.layers.encoder_layer_1.ln_1", 1, 4, 4, cls)
    torch.testing.assert_close(exp.raw[:, 0].double(), ref, rtol=1e-9, atol=1e-12)
    assert exp.maps.shape == (2, 1, 32, 32)
    assert_untouched(model, before)


def test_reshape_override_and_pixel_graph_path():
    """reshape=(h, w) gives the same as the detected layout; a pass that keeps the graph down to the
    input, for saliency) adapts the features the same way."""
    model = tiny_timm_vit(reg_tokens=4)
    x = torch.randn(1, 3, 48, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    a = camlens.explain(model, x, "gradcam", layer="blocks.1.norm1")
    b = camlens.explain(model, x, "gradcam", layer="blocks.1.norm1", reshape=(6, 8))
    torch.testing.assert_close(a.raw, b.raw)
    assert "reshape=(6, 8)" in b.extras["layout"]
    both = camlens.explain(model, x, ["gradcam", "saliency"], layer="blocks.1.norm1")  # graph kept
    torch.testing.assert_close(both["gradcam"].raw, a.raw)
    with pytest.raises(LayoutError):
        camlens.explain(model, x, "gradcam", layer="blocks.1.norm1", reshape=(5, 5))


def test_channels_last_swin_stage_equals_permuted_reference():
    model = tiny_swin()
    before = snapshot(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    store, hd = hook_output(model, "features.3")
    with torch.no_grad():
        model(x)
    hd.remove()
    assert store["out"].shape[1:3] == (4, 4)  # (N, h, w, D)
    exp = camlens.explain(model, x, "gradcam", targets=[0, 2], layer="features.3")
    assert exp.extras["layout"].startswith("channels-last")
    ref = reference_gradcam(model, x, "features.3", 0, 4, 4, [0, 2], tokens=False)
    torch.testing.assert_close(exp.raw[:, 0].double(), ref, rtol=1e-9, atol=1e-12)
    auto = camlens.explain(model, x, "gradcam", targets=[0, 2])
    assert "global pooling" in auto.layer and "layout" not in auto.extras  # Swin pools an NCHW map
    assert_untouched(model, before)


def test_no_prefix_tokens_model():
    model = tiny_timm_vit(reg_tokens=0, class_token=False)
    x = torch.randn(1, 3, 48, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    exp = camlens.explain(model, x, "gradcam", layer="blocks.1.norm1")
    assert "prefix" not in exp.extras["layout"] and "6x8" in exp.extras["layout"]
    ref = reference_gradcam(model, x, "blocks.1.norm1", 0, 6, 8, exp.classes[:, 0].tolist())
    torch.testing.assert_close(exp.raw[:, 0].double(), ref, rtol=1e-9, atol=1e-12)


def test_convnext_channels_last_norm_inside_a_block():
    """torchvision's CNBlock normalises in (N, h, w, C): detected when unambiguous, forced with
    reshape='nhwc' when C equals the grid side (8 channels on an 8x8 map is both layouts)."""
    from tests.models.test_transformers import tiny_convnext

    model = tiny_convnext().double()
    before = snapshot(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    exp = camlens.explain(model, x, "gradcam", targets=[0, 1], layer="features.3.0.block.2")  # (N, 4, 4, 16)
    assert exp.extras["layout"].startswith("channels-last") and exp.raw.shape[-2:] == (4, 4)
    ref = reference_gradcam(model, x, "features.3.0.block.2", 0, 4, 4, [0, 1], tokens=False)
    torch.testing.assert_close(exp.raw[:, 0], ref, rtol=1e-9, atol=1e-12)
    forced = camlens.explain(model, x, "gradcam", targets=[0, 1], layer="features.1.0.block.2", reshape="nhwc")
    ref = reference_gradcam(model, x, "features.1.0.block.2", 0, 8, 8, [0, 1], tokens=False)
    torch.testing.assert_close(forced.raw[:, 0], ref, rtol=1e-9, atol=1e-12)
    assert_untouched(model, before)


def test_reshape_none_on_tokens_is_a_clear_error():
    model = tiny_timm_vit(reg_tokens=0)
    x = torch.randn(1, 3, 48, 64, dtype=torch.float64)
    with pytest.raises(CamlensError, match=r"not \(N, C, h, w\).*reshape="):
        camlens.explain(model, x, "gradcam", layer="blocks.1.norm1", reshape="none")
