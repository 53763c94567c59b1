"""Attention capture (hooks only, model unchanged) and the attention methods against oracles:
NumPy rollout on a hand-built 2-layer 2-head model, an autograd reference for Chefer et al., the
modules' own attention weights and gradients, bit-identical logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import camlens
from camlens.base.errors import MethodError
from camlens.core.attention import attention_modules, capture_attention
from camlens.core.engine import ForwardPass
from tests.api.test_hygiene import assert_untouched, snapshot
from tests.core.test_layout import tiny_swin, tiny_timm_vit, tiny_tv_vit


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        h = self.ln1(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        x = x + a
        return x + self.mlp(self.ln2(x))


class TinyAttnNet(nn.Module):
    """8x8 image -> 4x4 patches (2x2 grid) + class token -> 2 blocks of 2-head attention -> head."""

    def __init__(self, d: int = 8, heads: int = 2, classes: int = 3):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 5, d) * 0.5)
        self.blocks = nn.Sequential(Block(d, heads), Block(d, heads))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def tokens(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(x), -1, -1), t], 1) + self.pos

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.tokens(x))[:, 0]))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TinyAttnNet().double().eval()


@pytest.fixture
def x8():
    return torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def module_attention(net, x) -> list[np.ndarray]:
    """Each block's (N, H, T, T) attention from nn.MultiheadAttention itself (need_weights=True)."""
    out = []

    def hook(block, args, output):
        h = block.ln1(args[0])
        _, w = block.attn(h, h, h, need_weights=True, average_attn_weights=False)
        out.append(w.detach().numpy())

    hs = [b.register_forward_hook(hook) for b in net.blocks]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in hs:
            h.remove()
    return out


def numpy_rollout(mats, fusion="mean", discard=0.0):
    N, _, T, _ = mats[0].shape
    R = np.broadcast_to(np.eye(T), (N, T, T)).copy()
    for a in mats:
        f = {"mean": a.mean(1), "max": a.max(1), "min": a.min(1)}[fusion].copy()
        k = int(discard * T * T)
        for n in range(N):
            flat = f[n].ravel()
            flat[np.argsort(flat)[:k]] = 0.0
            f[n] = flat.reshape(T, T)
        ah = 0.5 * (f + np.eye(T))
        ah = ah / ah.sum(-1, keepdims=True)
        R = ah @ R
    return R[:, 0, 1:].reshape(N, 2, 2)


def test_captured_attention_equals_the_modules_own_weights(net, x8):
    ref = module_attention(net, x8)
    with capture_attention(net) as found, torch.no_grad():
        net(x8)
    assert len(found) == 2
    for a, r in zip(found, ref):
        np.testing.assert_allclose(a.numpy(), r, rtol=1e-12, atol=1e-14)
    assert all(len(m._forward_pre_hooks) == 0 and len(m._forward_hooks) == 0 for m in net.modules())


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard", [0.0, 0.3])
def test_rollout_equals_numpy_formula(net, x8, fusion, discard):
    exp = camlens.explain(net, x8, "attention_rollout", targets="top2", head_fusion=fusion, discard_ratio=discard)
    want = numpy_rollout(module_attention(net, x8), fusion, discard)
    assert exp.raw.shape == (2, 2, 2, 2)
    for k in range(2):  # class-agnostic
        np.testing.assert_allclose(exp.raw[:, k].numpy(), want, rtol=1e-10)
    assert exp.extras["head_fusion"] == fusion and exp.extras["attention_layers"] == 2


def reference_chefer(net: TinyAttnNet, x, classes):
    """The same network written out with explicit attention matrices, and the formula."""
    t = net.tokens(x)
    As = []
    for blk in net.blocks:
        h = blk.ln1(t)
        m = blk.attn
        q, k, v = torch.nn.functional.linear(h, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1)
        N, T, E = q.shape
        H = m.num_heads

        qh, kh, vh = (z.reshape(N, T, H, E // H).transpose(1, 2) for z in (q, k, v))
        A = (qh @ kh.transpose(-1, -2) / (E // H) ** 0.5).softmax(-1)
        As.append(A)
        o = (A @ vh).transpose(1, 2).reshape(N, T, E)
        t = t + m.out_proj(o)
        t = t + blk.mlp(blk.ln2(t))
    logits = net.head(net.norm(t[:, 0]))
    torch.testing.assert_close(logits, net(x))
    maps = []
    for c in range(classes.shape[1]):
        grads = torch.autograd.grad(logits.gather(1, classes[:, c : c + 1]).sum(), As, retain_graph=True)
        R = np.broadcast_to(np.eye(5), (len(x), 5, 5)).copy()
        for A, G in zip(As, grads):
            abar = np.clip(G.detach().numpy() * A.detach().numpy(), 0, None).mean(1)
            R = R + abar @ R
        maps.append(R[:, 0, 1:].reshape(len(x), 2, 2))
    return np.stack(maps, 1)


def test_generic_attention_equals_autograd_reference(net, x8):
    before = snapshot(net)
    exp = camlens.explain(net, x8, "generic_attention", targets="top2")
    want = reference_chefer(net, x8, exp.classes)
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(exp.raw.numpy(), want, rtol=1e-9, atol=1e-12)
    assert not np.allclose(want[:, 0], want[:, 1])  # class-specific
    assert_untouched(net, before)
    alias = camlens.explain(net, x8, "chefer", targets="top2")
    assert torch.equal(alias.raw, exp.raw)


def test_timm_attention_weights_and_gradients_match_the_unfused_module():
    fused = tiny_timm_vit(reg_tokens=4)
    x = torch.randn(2, 3, 48, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    probs, handles = [], []
    for blk in fused.blocks:
        blk.attn.fused_attn = True
    ctx = ForwardPass.run(fused, x, None, targets="top2", needs=frozenset({"attention_grads"}))
    got_a, got_g = ctx.attention(), ctx.attention_grads()
    ref_model = tiny_timm_vit(reg_tokens=4)  # same seed: same weights, unfused path with explicit attn
    for blk in ref_model.blocks:
        blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_hook(lambda m, a, o: probs.append(o)))
    try:
        logits = ref_model(x)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(ctx.logits, logits)
    for a, p in zip(got_a, probs):
        torch.testing.assert_close(a, p.detach(), rtol=1e-10, atol=1e-12)
    for k in range(2):
        score = logits.gather(1, ctx.targets.classes[:, k : k + 1]).sum()
        ref_g = torch.autograd.grad(score, probs, retain_graph=True)
        for g, r in zip(got_g, ref_g):
            torch.testing.assert_close(g[:, k], r, rtol=1e-9, atol=1e-12)


def test_huggingface_attention_weights_and_gradients_match_eager_outputs():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
        num_labels=3,
        attn_implementation="eager",
    )
    hf = ViTForImageClassification(cfg).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert len(attention_modules(hf)) == 2
    ctx = ForwardPass.run(hf, x, None, targets="top1", needs=frozenset({"attention_grads"}))
    out = hf(pixel_values=x, output_attentions=True)
    torch.testing.assert_close(ctx.logits, out.logits)
    score = out.logits.gather(1, ctx.targets.classes).sum()
    ref_g = torch.autograd.grad(score, out.attentions)
    for a, g, ra, rg in zip(ctx.attention(), ctx.attention_grads(), out.attentions, ref_g):
        # Hugging Face's eager softmax runs in float32 even for a float64 model: float32 tolerances
        torch.testing.assert_close(a, ra.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g[:, 0], rg, rtol=1e-5, atol=1e-7)


def _no_trace(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in vars(m) for m in model.modules())


def _vit_b_16():
    from torchvision.models import vit_b_16

    torch.manual_seed(0)
    model = vit_b_16(weights=None, image_size=64).eval()  # the real architecture, 4x4 patches at 64 px
    nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


@pytest.mark.parametrize(
    "build", [pytest.param(_vit_b_16, marks=pytest.mark.slow, id="vit_b_16"), pytest.param(tiny_tv_vit, id="tiny")]
)
def test_tv_vit_logits_bit_identical_with_weight_capture_and_nothing_left(build):
    model = build().float()
    x = torch.randn(2, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(4))
    n_layers = len(model.encoder.layers)
    side = model.image_size // model.patch_size
    before = snapshot(model)
    with torch.no_grad():
        plain = model(x)
    ctx = ForwardPass.run(model, x, None, needs=frozenset({"attention"}))
    assert torch.equal(ctx.logits, plain) and len(ctx.attention()) == n_layers
    with torch.enable_grad():
        plain_g = model(x)
    ctx = ForwardPass.run(model, x, None, needs=frozenset({"attention_grads"}))
    assert torch.equal(ctx.logits.detach(), plain_g.detach())  # + exactly zero: bit-identical
    assert len(ctx.attention_grads()) == n_layers
    del ctx
    for method in ("attention_rollout", "generic_attention"):
        exp = camlens.explain(model, x, method)
        assert exp.raw.shape == (2, 1, side, side) and torch.isfinite(exp.raw).all()
    assert _no_trace(model)
    assert_untouched(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), plain)


def test_restored_when_the_forward_raises(net, x8):
    before = snapshot(net)

    def boom(module, args, out):
        raise RuntimeError("boom")

    h = net.blocks[1].mlp.register_forward_hook(boom)
    try:
        for method in ("attention_rollout", "generic_attention"):
            with pytest.raises(RuntimeError, match="boom"):
                camlens.explain(net, x8, method)
    finally:
        h.remove()
    assert _no_trace(net)
    assert_untouched(net, before)


def test_windowed_attention_and_cnns_get_a_clear_error():
    swin = tiny_swin()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with pytest.raises(MethodError, match="no global self-attention.*gradcam"):
        camlens.explain(swin, x, "attention_rollout")
    from tests.conftest import TinyCNN

    with pytest.raises(MethodError, match="no global self-attention"):
        camlens.explain(TinyCNN().eval(), torch.randn(1, 3, 12, 12), "generic_attention")


def test_options_validated_and_under_inference_mode(net, x8):
    with pytest.raises(MethodError, match="head_fusion"):
        camlens.explain(net, x8, "attention_rollout", head_fusion="median")
    with pytest.raises(MethodError, match="discard_ratio"):
        camlens.explain(net, x8, "attention_rollout", discard_ratio=1.0)
    ref = camlens.explain(net, x8, ["attention_rollout", "generic_attention", "gradcam"], layer="blocks.1.ln1")
    with torch.inference_mode():
        got = camlens.explain(net, x8, ["attention_rollout", "generic_attention", "gradcam"], layer="blocks.1.ln1")
    for k in ref:
        torch.testing.assert_close(got[k].raw, ref[k].raw)


def test_tv_vit_auto_layer_and_rollout_maps_at_input_resolution():
    model = tiny_tv_vit()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    exp = camlens.explain(model, x, ["attention_rollout", "generic_attention", "gradcam"])
    assert all(e.maps.shape == (1, 1, 32, 32) for e in exp.values())
    assert exp["attention_rollout"].layer is None and "ln_1" in exp["gradcam"].layer


def test_capture_ignores_other_threads_forwards(net, x8):
    """A forward of the same model in another thread while a capture is open records nothing and
    gets the plain output."""
    import threading

    with torch.no_grad():
        plain = net(x8)
    seen = {}
    with capture_attention(net, grads=True) as found, torch.enable_grad():

        def other():
            with torch.no_grad():
                seen["out"] = net(x8)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert found == []
        net(x8)
    assert len(found) == 2 and torch.equal(seen["out"], plain)


@pytest.mark.parametrize("family", ["timm", "hf", "mha"])
def test_logits_bit_identical_with_capture_in_every_family(family, net, x8):
    from tests.models.test_transformers import tiny_hf_vit

    if family == "timm":
        model, x = tiny_timm_vit(reg_tokens=4).float(), torch.randn(2, 3, 48, 64)
    elif family == "hf":
        model, x = tiny_hf_vit(), torch.randn(2, 3, 32, 32)
    else:
        model, x = net, x8
    for needs, grad in (("attention", False), ("attention_grads", True)):
        with torch.set_grad_enabled(grad):
            plain = model(x)
            plain = getattr(plain, "logits", plain)
        ctx = ForwardPass.run(model, x, None, needs=frozenset({needs}))
        assert torch.equal(ctx.logits.detach(), plain.detach()), (family, needs)
        assert len(ctx.attention()) == 2
    assert _no_trace(model)
