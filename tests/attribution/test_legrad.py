"""LeGrad (Bousselham et al.): a reference written here with plain autograd on a tiny torchvision
ViT (the forward written out, attention as an intermediate tensor), TorchCAM 0.5's ``LeGrad`` with its
mean-token head, the known heads reproducing the models' logits, and the refusals."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import camlens
from camlens.attribution.legrad import attention_blocks, known_head
from camlens.base.errors import CamlensError, MethodError
from tests.core.test_attention import TinyAttnNet
from tests.core.test_layout import tiny_timm_vit, tiny_tv_vit

pytest.importorskip("torchvision")


@pytest.fixture
def vit():
    return tiny_tv_vit(32)


@pytest.fixture
def vx():
    return torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def _attention(mha, x):
    """nn.MultiheadAttention written out: returns (output, A) with A (N, H, T, T) in the graph."""
    N, T, E = x.shape
    H = mha.num_heads
    q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(N, T, H, E // H).transpose(1, 2) for t in (q, k, v))
    A = (q @ k.transpose(-2, -1) / (E // H) ** 0.5).softmax(-1)
    o = (A @ v).transpose(1, 2).reshape(N, T, E)
    return mha.out_proj(o), A


def _reference(m, x, cls: int, rows: str = "all", last: int | None = None, mean_token: bool = False):
    """LeGrad from its definition: s_l = heads(ln(z_l)[:, 0]) per block, ReLU(d s_l / d A_l), mean over
    heads and query rows (or the class row), over the blocks; the patch keys on the 4x4 grid."""
    n = x.shape[0]
    t = m.conv_proj(x).flatten(2).transpose(1, 2)
    z = torch.cat([m.class_token.expand(n, -1, -1), t], 1) + m.encoder.pos_embedding
    zs, As = [], []
    for blk in m.encoder.layers:
        a, A = _attention(blk.self_attention, blk.ln_1(z))
        y = z + a
        z = y + blk.mlp(blk.ln_2(y))
        zs.append(z)
        As.append(A)
    maps = []
    blocks = range(len(zs))[-last:] if last else range(len(zs))
    for i in blocks:
        pooled = m.encoder.ln(zs[i].mean(1)) if mean_token else m.encoder.ln(zs[i])[:, 0]
        s = m.heads(pooled)[:, cls].sum()
        (g,) = torch.autograd.grad(s, As[i], retain_graph=True)
        g = g.relu().mean(1)
        e = g.mean(1) if rows == "all" else g[:, 0]
        maps.append(e[:, 1:].reshape(n, 4, 4))
    return torch.stack(maps).mean(0).detach()


@pytest.mark.parametrize("rows, last", [("all", None), ("cls", None), ("all", 1)])
def test_equals_the_reference_written_here(vit, vx, rows, last):
    opts = {"rows": rows} | ({"layers": last} if last else {})
    exp = camlens.explain(vit, vx, "legrad", targets=[[1, 3], [4, 0]], **opts)
    assert exp.raw.shape == (2, 2, 4, 4)
    for n, classes in enumerate([[1, 3], [4, 0]]):
        for j, c in enumerate(classes):
            ref = _reference(vit, vx[n : n + 1], c, rows, last)[0]
            assert float(ref.abs().max()) > 1e-4  # a real signal, not rounding noise
            torch.testing.assert_close(exp.raw[n, j], ref, rtol=1e-9, atol=1e-12)
    assert exp.extras["layers"] == (last or 2) and exp.extras["rows"] == rows


def test_rows_and_layers_change_the_map(vit, vx):
    base = camlens.explain(vit, vx, "legrad", targets=[[1], [4]]).raw
    for opts in ({"rows": "cls"}, {"layers": 1}):
        assert float((camlens.explain(vit, vx, "legrad", targets=[[1], [4]], **opts).raw - base).abs().max()) > 1e-6


def test_equals_torchcam_with_its_mean_token_head(vit, vx):
    tc = pytest.importorskip("torchcam.methods")
    m = copy.deepcopy(vit)
    with tc.LeGrad(m, list(m.encoder.layers)) as extractor:
        out = m(vx[:1])
        theirs = extractor(2, out)[0][0].detach().numpy()
    exp = camlens.explain(vit, vx[:1], "legrad", targets=[2], head=lambda z: vit.heads(vit.encoder.ln(z.mean(1))))
    ours = exp.raw[0, 0].numpy()
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.999
    ref = _reference(vit, vx[:1], 2, mean_token=True)[0].numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("build", [lambda: tiny_tv_vit(32), lambda: tiny_timm_vit(4), lambda: tiny_timm_vit(0, False)])
def test_known_heads_reproduce_the_logits_from_the_last_block(build):
    m = build()
    size = (32, 32) if "torchvision" in type(m).__module__ else (48, 64)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    blocks = attention_blocks(m)
    seen = []
    h = blocks[-1][1].register_forward_hook(lambda mod, a, o: seen.append(o))
    try:
        with torch.no_grad():
            logits = m(x)
    finally:
        h.remove()
    found = known_head(m)
    assert found is not None
    with torch.no_grad():
        torch.testing.assert_close(found[1](seen[0]), logits)


def test_timm_vit_with_register_tokens_drops_the_prefix():
    m = tiny_timm_vit(4)
    exp = camlens.explain(m, torch.randn(1, 3, 48, 64, dtype=torch.float64), "legrad")
    assert exp.raw.shape == (1, 1, 6, 8) and exp.extras["tokens"] == "53 = 5 prefix + 6x8 patches"


def test_unknown_head_is_refused_then_given():
    torch.manual_seed(0)
    net = TinyAttnNet().double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(MethodError, match="head="):
        camlens.explain(net, x, "legrad")
    exp = camlens.explain(net, x, "legrad", head=lambda z: net.head(net.norm(z[:, 0])))
    assert exp.raw.shape == (1, 1, 2, 2) and exp.extras["head"] == "head= (given)"


@pytest.mark.parametrize("opts, words", [({"rows": "max"}, "rows must be"), ({"layers": 0}, "layers must be")])
def test_bad_options(vit, vx, opts, words):
    with pytest.raises(MethodError, match=words):
        camlens.explain(vit, vx, "legrad", **opts)


def test_a_cnn_is_refused_before_any_work():
    from tests.conftest import TinyCNN

    with pytest.raises(CamlensError, match="self-attention"):
        camlens.explain(TinyCNN().eval(), torch.randn(1, 3, 8, 8), "legrad")


def test_hugging_face_vit_head_reproduces_the_logits():
    pytest.importorskip("transformers")
    from tests.models.test_transformers import tiny_hf_vit

    m = tiny_hf_vit().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    seen = []
    h = attention_blocks(m)[-1][1].register_forward_hook(lambda mod, a, o: seen.append(o))
    try:
        with torch.no_grad():
            logits = m(x).logits
    finally:
        h.remove()
    found = known_head(m)
    assert found is not None and found[0].startswith("vit.layernorm")
    tokens = seen[0][0] if isinstance(seen[0], tuple) else seen[0]
    with torch.no_grad():
        torch.testing.assert_close(found[1](tokens), logits)
    exp = camlens.explain(m, x, "legrad", targets=[[0], [2]])
    assert exp.raw.shape == (2, 1, 4, 4) and float(exp.raw.amax()) > 0
