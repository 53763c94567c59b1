"""K-class gradients in one batched backward (issue 18) give what the per-class loop gives.

Oracles:

* the per-class loop (``grad_batching(False)``: one ``torch.autograd.grad`` per class) for every
  layer and pixel method, K up to 100, batch > 1, chunks that do not divide K;
* an independent reference computed here (plain autograd per class on the model, no camlens)
  for the layer-gradient reductions: reduced Grad-CAM / Grad-CAM++ / XGrad-CAM / LayerCAM /
  HiResCAM == the formulas applied to the full ``(N, K, C, h, w)`` gradient tensor;
* a model whose backward cannot be vmapped (a custom autograd function calling ``.item()``):
  camlens falls back to the loop, says why, and still gives the reference numbers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.attribution.registry import reductions_for
from camlens.core import engine
from camlens.core.capture import CaptureSpec
from camlens.core.engine import ForwardPass, class_grads, grad_batching

NUM_CLASSES = 120
LAYER_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")
PIXEL_METHODS = (
    "saliency",
    "input_x_gradient",
    "deconvnet",
    "guided_backprop",
    "guided_gradcam",
    "gradient_x_cam",
    "smoothgrad",
    "integrated_gradients",
)
PIXEL_OPTIONS = {"smoothgrad": {"n_samples": 2, "batch_size": 3}, "integrated_gradients": {"steps": 3, "batch_size": 4}}


class _NoVmap(torch.autograd.Function):
    """Identity whose backward reads a Python number from the gradient: vmap cannot batch it."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        _ = float(g.sum().item())
        return g


class Net(nn.Module):
    """conv-ReLU-conv-ReLU6(in place) features, a non-linear head (so gradients vary over space)."""

    def __init__(self, no_vmap: bool = False) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 5, 3, padding=1)
        self.act = nn.ReLU6(inplace=True)
        self.head = nn.Conv2d(5, 4, 1)
        self.fc = nn.Linear(4, NUM_CLASSES)
        self.no_vmap = no_vmap

    def forward(self, x):
        a = self.act(self.c2(F.relu(self.c1(x))))
        if self.no_vmap:
            a = _NoVmap.apply(a)
        h = torch.tanh(self.head(a)) * a[:, :4]
        return self.fc(h.mean((2, 3)))


def _data(no_vmap: bool = False):
    torch.manual_seed(0)
    net = Net(no_vmap).eval()
    x = torch.randn(3, 3, 8, 8) * 2
    return net, x


class CountGrad:
    """Wraps ``torch.autograd.grad`` to count batched and per-class calls."""

    def __init__(self, monkeypatch) -> None:
        self.batched = self.single = 0
        real = torch.autograd.grad

        def grad(*args, **kwargs):
            if kwargs.get("is_grads_batched"):
                self.batched += 1
            else:
                self.single += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(torch.autograd, "grad", grad)


def _explain(net, x, method, k, batched, chunk=None):
    opts = PIXEL_OPTIONS.get(method, {})
    with grad_batching(batched, chunk):
        return camlens.explain(net, x, method, targets=f"top{k}", layer="c2", **opts)


@pytest.mark.parametrize("method", LAYER_METHODS + PIXEL_METHODS)
def test_batched_equals_loop_every_method(method, monkeypatch):
    net, x = _data()
    k = 100 if method in LAYER_METHODS else 9
    loop = _explain(net, x, method, k, batched=False)
    count = CountGrad(monkeypatch)
    for chunk in (None, 7):  # the memory-derived chunk, and chunks that do not divide K
        res = _explain(net, x, method, k, batched=True, chunk=chunk)
        torch.testing.assert_close(res.raw, loop.raw, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res.maps, loop.maps, rtol=1e-5, atol=1e-6)
    assert count.batched > 0  # the batched path really ran
    if method in LAYER_METHODS:
        assert count.single == 0  # ... and no per-class backward at all
        # K = 100 in chunks of 7: ceil(100 / 7) batched backwards in the second call
        count.batched = 0
        _explain(net, x, method, k, batched=True, chunk=7)
        assert count.batched == 15


def _reference_layer_grads(net, x, classes):
    """Plain autograd, one class at a time: features at c2's ReLU6 output and d s_k / d A."""
    feats = []

    def hook(m, a, o):
        feats.append(o)

    h = net.act.register_forward_hook(hook)
    try:
        logits = net(x)
    finally:
        h.remove()
    A = feats[-1]
    gs = [
        torch.autograd.grad(logits.gather(1, classes[:, k : k + 1]).sum(), A, retain_graph=True)[0]
        for k in range(classes.shape[1])
    ]
    return A.detach(), torch.stack(gs, 1)


def test_reductions_equal_the_full_tensor_formulas():
    net, x = _data()
    k = 30
    spec = CaptureSpec(net.act, "act", "output")
    needs = frozenset({"features", "layer_grads:mean", "layer_grads:xgradcam", "layer_grads:gradcam++"})
    with grad_batching(True, chunk=4):
        ctx = ForwardPass.run(net, x, spec, targets=f"top{k}", needs=needs, reductions=reductions_for(needs))
        means = ctx.layer_grad_sums("mean")
        assert ctx.grad_info.mode == "batched" and ctx.grad_info.chunk == 4
        assert "full" not in ctx._layer_sums  # the (N, K, C, h, w) tensor was never stacked
        assert {"mean", "xgradcam", "gradcam++"} <= set(ctx._layer_sums)  # one sweep computed all declared
    A, G = _reference_layer_grads(net, x, ctx.targets.classes)
    torch.testing.assert_close(ctx.features.detach(), A)
    torch.testing.assert_close(ctx.layer_grads(), G, rtol=1e-5, atol=1e-7)  # full tensor on request
    torch.testing.assert_close(means, G.mean((3, 4)), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ctx.layer_grad_sums("sqmean"), G.pow(2).mean((2, 3, 4)), rtol=1e-5, atol=1e-9)
    # the methods built on the reductions == the formulas on the full reference tensor
    res = camlens.explain(net, x, list(LAYER_METHODS), targets=f"top{k}", layer="act")
    Ab = A[:, None]
    ref = {
        "gradcam": torch.einsum("nkc,nchw->nkhw", G.mean((3, 4)), A).relu(),
        "xgradcam": torch.einsum("nkc,nchw->nkhw", (G * Ab).sum((3, 4)) / (A.sum((2, 3))[:, None] + 1e-7), A).relu(),
        "layercam": (G.relu() * Ab).sum(2).relu(),
        "hirescam": (G * Ab).sum(2).relu(),
    }
    g2, g3 = G.pow(2), G.pow(3)
    den = 2 * g2 + A.sum((2, 3))[:, None, :, None, None] * g3
    alpha = torch.where(den != 0, g2 / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(den))
    ref["gradcam++"] = torch.einsum("nkc,nchw->nkhw", (alpha * G.relu()).sum((3, 4)), A).relu()
    for name, r in ref.items():
        torch.testing.assert_close(res[name].raw, r, rtol=1e-4, atol=1e-6, msg=name)
    rms = camlens.explain(net, x, "gradcam", targets=f"top{k}", layer="act", grad_norm="rms")
    Gn = G / (G.pow(2).mean((2, 3, 4), keepdim=True).sqrt() + 1e-5)
    torch.testing.assert_close(rms.raw, torch.einsum("nkc,nchw->nkhw", Gn.mean((3, 4)), A).relu(), rtol=1e-4, atol=1e-6)


def test_fallback_to_the_loop_when_the_backward_cannot_be_vmapped(monkeypatch):
    net, x = _data(no_vmap=True)
    spec = CaptureSpec(net.c2, "c2", "output")
    with grad_batching(True, chunk=3), pytest.warns(RuntimeWarning, match="one backward per class"):
        ctx = ForwardPass.run(
            net, x, spec, targets="top5", needs=frozenset({"features", "layer_grads:mean", "input_grads"})
        )
        g_in = ctx.input_grads()
    info = ctx.grad_info
    assert info.mode == "loop" and "batched backward failed" in info.reason and "item" in info.reason
    with grad_batching(False):
        ref = ForwardPass.run(
            net, x, spec, targets="top5", needs=frozenset({"features", "layer_grads:mean", "input_grads"})
        )
        torch.testing.assert_close(g_in, ref.input_grads())
        assert ref.grad_info.reason == "grad_batching(False)"
    # through explain, for a layer and a pixel method, with a planned (graph-freeing) backward
    for method in ("gradcam", "saliency"):
        with grad_batching(True, chunk=2), pytest.warns(RuntimeWarning):
            a = camlens.explain(net, x, method, targets="top5", layer="c2")
        with grad_batching(False):
            b = camlens.explain(net, x, method, targets="top5", layer="c2")
        torch.testing.assert_close(a.raw, b.raw)


def test_class_grads_chunks_free_the_graph_and_handle_unused_inputs():
    torch.manual_seed(1)
    w = torch.randn(4, 6)
    x = torch.randn(2, 4, requires_grad=True)
    unused = torch.randn(2, 3, requires_grad=True)
    scores = torch.tanh(x @ w)
    ref = torch.stack([torch.autograd.grad(scores[:, k].sum(), x, retain_graph=True)[0] for k in range(6)], 1)
    info = engine.GradInfo()
    with grad_batching(True, chunk=6):
        got = engine.stacked_grads(scores, x, free_graph=True, info=info)
    torch.testing.assert_close(got, ref)
    assert info.mode == "batched"
    with pytest.raises(RuntimeError, match="second time"):  # the probe kept it, the second half freed it
        torch.autograd.grad(scores.sum(), x)
    scores = torch.tanh(x @ w)
    chunks = list(class_grads(scores, unused, info=info))
    assert all(bool((g == 0).all()) for _, g in chunks) and sum(g.shape[1] for _, g in chunks) == 6
    # the memory budget sets the chunk: at most GRAD_CHUNK_BYTES of gradients per backward
    assert engine.chunk_size(100, torch.empty(16, 1280, 7, 7)) == engine.GRAD_CHUNK_BYTES // (16 * 1280 * 49 * 4)
    assert engine.chunk_size(3, torch.empty(1, 1)) == 3
    with pytest.raises(ValueError), grad_batching(True, chunk=0):
        pass
