"""Layer methods on video transformers: tubelet tokens ``(N, p + t*h*w, D)`` and channels-last 5-D
stages ``(N, t, h, w, D)`` seen as ``(N, D, t, h, w)`` features, giving ``(N, K, T, H, W)`` maps.

Oracles: on a hand-built tubelet ViT (a strided Conv3d embedding, a class token, one encoder layer),
Grad-CAM over the tokens equals an autograd reference reshaped by hand; on tiny torchvision MViT and
Swin3D networks the same holds at their token / channels-last outputs, and CAM's identity holds on
Swin3D's GAP + linear head. The grid of torchvision's ``mvit_v2_s`` is inferred as it computes it."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from torchvision.models.video.mvit import MSBlockConfig, MViT
from torchvision.models.video.swin_transformer import SwinTransformer3d

import camlens
from camlens.base.errors import CamlensError, LayoutError
from camlens.core.layout import embed_grid, infer_layout, tubelet_grid


class TubeletViT(nn.Module):
    """A 2x4x4 tubelet embedding, a class token, one encoder layer, a head on the mean token."""

    def __init__(self, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Conv3d(3, dim, (2, 4, 4), stride=(2, 4, 4))
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.block = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = self.block(torch.cat([self.cls.expand(len(t), -1, -1), t], 1))
        return self.head(t.mean(1))


def _reference_gradcam(model: nn.Module, module: nn.Module, x: torch.Tensor, classes, to_ndhwc) -> torch.Tensor:
    """Grad-CAM by hand: the module's output and its gradient, turned into (N, t, h, w, D) by
    ``to_ndhwc``; weights = spatial mean of the gradient; map = ReLU(sum_d w_d A_d)."""
    seen: list[torch.Tensor] = []
    h = module.register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        out = model(x.clone())
    finally:
        h.remove()
    maps = []
    for k in range(classes.shape[1]):
        score = out.gather(1, classes[:, k : k + 1]).sum()
        (g,) = torch.autograd.grad(score, seen[0], retain_graph=True)
        A, G = to_ndhwc(seen[0].detach()), to_ndhwc(g)
        w = G.mean((1, 2, 3))  # (N, D)
        maps.append(torch.einsum("nd,nthwd->nthw", w, A).relu())
    return torch.stack(maps, 1)


def test_gradcam_over_tubelet_tokens_equals_a_hand_reshaped_reference():
    torch.manual_seed(0)
    model = TubeletViT().eval()
    x = torch.randn(2, 3, 4, 16, 12, generator=torch.Generator().manual_seed(1))  # grid 2x4x3 + 1 class token
    exp = camlens.explain(model, x, "gradcam", layer="block", targets="top2")
    assert exp.shape == (2, 2, 4, 16, 12) and exp.raw.shape == (2, 2, 2, 4, 3)
    assert "1 prefix token(s) dropped, 2x4x3 tubelet grid" in exp.extras["layout"]

    def by_hand(t: torch.Tensor) -> torch.Tensor:  # tokens 1.. in (t, h, w) row-major order
        n, _, d = t.shape
        return t[:, 1:].reshape(n, 2, 4, 3, d)

    ref = _reference_gradcam(model, model.block, x, exp.classes, by_hand)
    assert float(ref.amax()) > 1e-4  # not a degenerate zero map
    torch.testing.assert_close(exp.raw, ref, rtol=1e-4, atol=1e-6)
    for spec in [(2, 4, 3), (1, 2, 4, 3)]:  # the grid by hand: the same maps
        again = camlens.explain(model, x, "gradcam", layer="block", targets=exp.classes, reshape=spec)
        torch.testing.assert_close(again.raw, exp.raw)
    with pytest.raises(LayoutError, match="does not fit 25 tokens"):
        camlens.explain(model, x, "gradcam", layer="block", reshape=(2, 3, 4, 3))


def _tiny_mvit() -> MViT:
    cfg = [
        MSBlockConfig(1, 8, 8, [3, 3, 3], [3, 3, 3], [1, 1, 1], [1, 2, 2]),
        MSBlockConfig(1, 8, 16, [3, 3, 3], [3, 3, 3], [1, 2, 2], [1, 1, 1]),
        MSBlockConfig(2, 16, 16, [3, 3, 3], [3, 3, 3], [1, 1, 1], [1, 1, 1]),
    ]
    torch.manual_seed(0)
    return MViT(
        spatial_size=(32, 32),
        temporal_size=4,
        block_setting=cfg,
        residual_pool=True,
        residual_with_cls_embed=False,
        rel_pos_embed=True,
        proj_after_attn=True,
        num_classes=5,
    ).eval()


def test_mvit_tokens_give_clip_maps_and_attention_methods_are_refused():
    model = _tiny_mvit()
    x = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    exp = camlens.explain(model, x, "gradcam", targets="top2")  # no layer: the norm before the last attention
    assert exp.layer == "output of blocks.2.norm1" and exp.shape == (2, 2, 4, 32, 32)
    assert "2x4x4 tubelet grid (from the 2x8x8 patch-embedding grid" in exp.extras["layout"]

    def by_hand(t: torch.Tensor) -> torch.Tensor:
        n, _, d = t.shape
        return t[:, 1:].reshape(n, 2, 4, 4, d)

    ref = _reference_gradcam(model, model.blocks[2].norm1, x, exp.classes, by_hand)
    assert float(ref.amax()) > 1e-5
    torch.testing.assert_close(exp.raw, ref, rtol=1e-4, atol=1e-7)
    # a block returns (tokens, thw): its tokens are captured as the next block's input
    block = camlens.explain(model, x, "gradcam", layer="blocks.2", capture="input", targets=exp.classes)
    assert block.raw.shape == (2, 2, 2, 4, 4) and "2x4x4 tubelet grid" in block.extras["layout"]
    with pytest.raises(CamlensError, match="attention_rollout"):
        camlens.explain(model, x, "attention_rollout")


@pytest.mark.slow
def test_mvit_v2_s_grid_is_inferred_as_torchvision_computes_it():
    net = camlens.load_model("mvit_v2_s", weights="random")
    assert net.camlens.layer == "blocks.15.norm1" and net.camlens.extra["clip_size"] == (16, 224, 224)
    emb = embed_grid(net, (16, 224, 224))
    assert emb == (8, 56, 56)
    # the token counts of its four stages (query pooling by 2 in space at blocks 1, 3 and 14)
    for T, grid in [(1 + 8 * 56 * 56, (8, 56, 56)), (1 + 8 * 28 * 28, (8, 28, 28)), (1 + 8 * 7 * 7, (8, 7, 7))]:
        assert tubelet_grid(T, emb) == (1, *grid)
    lay = infer_layout((1, 393, 768), (16, 224, 224), embed=emb)
    assert (lay.kind, lay.prefix, lay.grid) == ("tokens", 1, (8, 7, 7))
    with pytest.raises(LayoutError, match="no tubelet grid fits"):
        infer_layout((1, 393, 768), (16, 224, 224))  # no embedding known: the grid is not guessed


def test_swin3d_channels_last_stages_and_cam_identity():
    torch.manual_seed(0)
    model = SwinTransformer3d(
        patch_size=[2, 4, 4],
        embed_dim=8,
        depths=[1, 1],
        num_heads=[1, 1],
        window_size=[2, 2, 2],
        num_classes=5,
        stochastic_depth_prob=0.0,
        norm_layer=partial(nn.LayerNorm, eps=1e-5),
    ).eval()
    x = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    both = camlens.explain(model, x, ["cam", "gradcam"], targets="top2")
    cam = both["cam"]
    assert cam.layer == "input of global pooling (avgpool)" and cam.shape == (2, 2, 4, 32, 32)
    logits = model(x).detach().gather(1, cam.classes)
    torch.testing.assert_close(
        cam.raw.mean((2, 3, 4)) + model.head.bias.detach()[cam.classes], logits, rtol=1e-4, atol=1e-5
    )
    stage = camlens.explain(model, x, "gradcam", layer="features.2", targets=cam.classes)
    assert stage.extras["layout"].startswith("channels-last (N, d, h, w, D)") and stage.raw.shape == (2, 2, 2, 4, 4)
    ref = _reference_gradcam(model, model.features[2], x, cam.classes, lambda t: t)
    assert float(ref.amax()) > 1e-5
    torch.testing.assert_close(stage.raw, ref, rtol=1e-4, atol=1e-7)
    with pytest.raises(CamlensError, match="attention_rollout does not apply"):
        camlens.explain(model, x, "attention_rollout")
