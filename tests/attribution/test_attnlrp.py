"""AttnLRP on vision transformers: equal to the paper's rules written out in relevance form on a small
torchvision ViT, exact conservation of the conservative variant on bias-free ViTs (torchvision and
timm), and nothing left on the model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.base.errors import NotApplicableError
from tests.api.test_hygiene import assert_untouched, snapshot
from tests.conftest import TinyCNN
from tests.core.test_layout import tiny_timm_vit, tiny_tv_vit


def _x(n: int = 1, size: int = 16, seed: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _with_biases(model: nn.Module) -> nn.Module:
    """Random biases, position embedding and class token everywhere (torchvision zero-initialises
    several): the rules must let each of them absorb its share."""
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "pos_embed" in name or "_token" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _bias_free(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "pos_embed" in name or "position_embeddings" in name or "_token" in name:
                p.zero_()
    return model


# ----------------------------------------------------------------- the rules in relevance form
def _lrp0(f, x: torch.Tensor, z: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Epsilon rule (eps -> 0) of a linear map ``f`` (without its bias) whose full output is ``z``:
    :math:`R_x = x \\odot J_f^\\top (R / z)`."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(f(x), x, R / z)
    return x.detach() * g


def _ln_rule(ln: nn.LayerNorm, x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Layer norm: the epsilon rule on (x - mean) / sigma * w with sigma a constant."""
    sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln.eps)
    return _lrp0(lambda v: (v - v.mean(-1, keepdim=True)) / sigma * ln.weight, x, ln(x), R)


def _add_rule(a: torch.Tensor, b: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return a * R / (a + b), b * R / (a + b)


def _block_forward(blk, h: torch.Tensor) -> SimpleNamespace:
    s = SimpleNamespace(h=h)
    mha = blk.self_attention
    E, H = mha.embed_dim, mha.num_heads
    T, d = h.shape[1], E // H
    s.split = lambda t: t.reshape(1, T, H, d).transpose(1, 2)
    s.merge = lambda t: t.transpose(1, 2).reshape(1, T, E)
    s.W = mha.in_proj_weight.chunk(3)
    s.u = blk.ln_1(h)
    s.QKV = [s.u @ W.T + b for W, b in zip(s.W, mha.in_proj_bias.chunk(3))]
    s.Qh, s.Kh, s.Vh = s.split(s.QKV[0]) * d**-0.5, s.split(s.QKV[1]), s.split(s.QKV[2])
    s.L = s.Qh @ s.Kh.transpose(-2, -1)
    s.A = s.L.softmax(-1)
    s.O = s.A @ s.Vh
    s.Om = s.merge(s.O)
    s.a = mha.out_proj(s.Om)
    s.x1 = h + s.a
    lin1, lin2 = blk.mlp[0], blk.mlp[3]
    s.u2 = blk.ln_2(s.x1)
    s.h1 = lin1(s.u2)
    s.g1 = F.gelu(s.h1)
    s.m = lin2(s.g1)
    s.out = s.x1 + s.m
    return s


def _block_relevance(blk, s: SimpleNamespace, R_out: torch.Tensor) -> torch.Tensor:
    lin1, lin2, Wo = blk.mlp[0], blk.mlp[3], blk.self_attention.out_proj.weight
    R_x1, R_m = _add_rule(s.x1, s.m, R_out)
    R_h1 = _lrp0(lambda v: v @ lin2.weight.T, s.g1, s.m, R_m)  # identity rule at the GELU: R_h1 = R_g1
    R_u2 = _lrp0(lambda v: v @ lin1.weight.T, s.u2, s.h1, R_h1)
    R_x1 = R_x1 + _ln_rule(blk.ln_2, s.x1, R_u2)
    R_h, R_a = _add_rule(s.h, s.a, R_x1)
    G = s.split(_lrp0(lambda v: v @ Wo.T, s.Om, s.a, R_a)) / s.O
    R_A = 0.5 * s.A * (G @ s.Vh.transpose(-2, -1))  # uniform rule on A V
    R_V = 0.5 * s.Vh * (s.A.transpose(-2, -1) @ G)
    R_L = s.L * (R_A - s.A * R_A.sum(-1, keepdim=True))  # softmax rule
    G2 = R_L / s.L
    R_Q = 0.5 * s.Qh * (G2 @ s.Kh)  # uniform rule on Q K^T (the 1/sqrt(d) scaling keeps relevance)
    R_K = 0.5 * s.Kh * (G2.transpose(-2, -1) @ s.Qh)
    R_u = sum(_lrp0(lambda v, W=W: v @ W.T, s.u, z, s.merge(R)) for W, z, R in zip(s.W, s.QKV, (R_Q, R_K, R_V)))
    return R_h + _ln_rule(blk.ln_1, s.h, R_u)


def reference_attnlrp(model, x: torch.Tensor, k: int) -> torch.Tensor:
    """AttnLRP of class ``k`` for one image through a torchvision ViT, rule by rule."""
    with torch.no_grad():
        conv = model.conv_proj
        p = conv(x)
        t0 = torch.cat([model.class_token, p.flatten(2).transpose(1, 2)], 1)
        pos = model.encoder.pos_embedding
        h = t0 + pos
        saved = []
        for blk in model.encoder.layers:
            saved.append(_block_forward(blk, h))
            h = saved[-1].out
        hf = model.encoder.ln(h)
        z = model.heads.head(hf[:, 0])
        R_z = torch.zeros_like(z)
        R_z[0, k] = z[0, k]  # relevance starts as the logit
        R_hf = torch.zeros_like(hf)
        R_hf[:, 0] = _lrp0(lambda v: v @ model.heads.head.weight.T, hf[:, 0], z, R_z)
        R_h = _ln_rule(model.encoder.ln, h, R_hf)
        for blk, s in reversed(list(zip(model.encoder.layers, saved))):
            R_h = _block_relevance(blk, s, R_h)
        R_t0, _ = _add_rule(t0, pos.expand_as(t0), R_h)  # the position embedding absorbs its share
        R_p = R_t0[:, 1:].transpose(1, 2).reshape(p.shape)  # the class token's share is dropped
        return _lrp0(lambda v: F.conv2d(v, conv.weight, None, conv.stride), x, p, R_p)


def test_attnlrp_equals_the_rules_written_out_on_a_small_vit():
    model = _with_biases(tiny_tv_vit(16))
    x = _x(2)
    targets = [[1, 3], [4, 0]]
    exp = camlens.explain(model, x, "attnlrp", targets=targets)
    for n in range(2):
        for j, k in enumerate(targets[n]):
            ref = reference_attnlrp(model, x[n : n + 1], k)
            torch.testing.assert_close(exp.raw[n, j], ref[0], rtol=1e-8, atol=1e-11)
    assert exp.extras["rules_applied"] == {"attention": 2, "norm": 5, "activation": 2}
    # not gradient x input: the rules change the backward
    gxi = camlens.explain(model, x, "input_x_gradient", targets=targets).raw
    assert not torch.allclose(gxi, exp.raw, rtol=1e-2)


# ----------------------------------------------------------------- conservation
def _hf_vit() -> nn.Module:
    from tests.models.test_transformers import tiny_hf_vit

    return tiny_hf_vit().double()


@pytest.mark.parametrize(
    "build", [lambda: tiny_tv_vit(16), lambda: tiny_timm_vit().double(), _hf_vit], ids=["torchvision", "timm", "hf"]
)
def test_conservative_attention_conserves_the_logit_on_a_bias_free_vit(build):
    model = _bias_free(build().eval())
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.weight.mul_(1 / head.weight.abs().mean())  # logits of order one (timm initialises the head small)
    size = 16 if hasattr(model, "conv_proj") else 32
    assert camlens.explain(model, _x(1, size), "attnlrp", attention="cp").extras["rules_applied"]["attention"] == 2
    exp = camlens.explain(model, _x(2, size), "attnlrp", targets="top2", attention="cp")
    assert (exp.scores.abs() > 0.1).all(), exp.scores  # not a degenerate oracle
    torch.testing.assert_close(exp.extras["relevance_sum"], exp.scores, rtol=1e-9, atol=0)
    # the AttnLRP softmax rule does not conserve: its Taylor bias absorbs relevance
    full = camlens.explain(model, _x(2, size), "attnlrp", targets="top2")
    assert ((full.extras["conservation"] - 1).abs() > 1e-3).all()


# ----------------------------------------------------------------- hygiene, refusals
def test_nothing_left_on_the_vit_even_when_the_call_raises():
    model = _with_biases(tiny_tv_vit(16))
    before = snapshot(model)
    x = _x(2)
    with torch.no_grad():
        out = model(x)
    calls = []

    def target(logits):
        calls.append(1)
        if len(calls) == 2:  # attnlrp's own forward
            raise RuntimeError("boom")
        return logits[:, 0]

    with pytest.raises(RuntimeError, match="boom"):
        camlens.explain(model, x, "attnlrp", targets=target)
    assert_untouched(model, before)
    with torch.no_grad():
        assert torch.equal(model(x), out)


def test_attnlrp_refuses_cnns_and_bad_options():
    with pytest.raises(NotApplicableError, match="attnlrp does not apply"):
        camlens.explain(TinyCNN(), torch.randn(1, 3, 16, 16), "attnlrp")
    with pytest.raises(camlens.CamlensError, match="attention must be one of"):
        camlens.explain(tiny_tv_vit(16), _x(1), "attnlrp", attention="rollout")
