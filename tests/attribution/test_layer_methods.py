"""Every layer method against an independent reference computed in the test (plain autograd + NumPy)
on a small hand-built network, plus closed forms where they exist."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import camlens

LAYER = "conv2"  # pre-ReLU output: gradients vary over space (d y / d A = W/(hw) * [A > 0])


def reference(model, x, classes):
    """Features A (N,C,h,w) and gradients G (N,K,C,h,w) of logits[classes] by plain full autograd."""
    x = x.clone().requires_grad_(True)
    A = model.conv2(model.act1(model.conv1(x)))
    logits = model.fc(model.pool(model.act2(A)).flatten(1))
    G = []
    for k in range(classes.shape[1]):
        s = logits.gather(1, classes[:, k : k + 1]).sum()
        G.append(torch.autograd.grad(s, A, retain_graph=True)[0])
    return A.detach().numpy(), torch.stack(G, 1).numpy(), logits.detach()


def relu(a):
    return np.maximum(a, 0)


def np_methods(A, G):
    """The formulas of each paper, written independently in NumPy. A: (N,C,h,w); G: (N,K,C,h,w)."""
    Ak = A[:, None]  # (N,1,C,h,w)
    out = {}
    w = G.mean(axis=(3, 4))
    out["gradcam"] = relu(np.einsum("nkc,nchw->nkhw", w, A))
    g2, g3 = G**2, G**3
    denom = 2 * g2 + A.sum(axis=(2, 3))[:, None, :, None, None] * g3
    alpha = np.divide(g2, denom, out=np.zeros_like(g2), where=denom != 0)
    out["gradcam++"] = relu(np.einsum("nkc,nchw->nkhw", (alpha * relu(G)).sum(axis=(3, 4)), A))
    wx = (G * Ak).sum(axis=(3, 4)) / (A.sum(axis=(2, 3))[:, None] + 1e-7)
    out["xgradcam"] = relu(np.einsum("nkc,nchw->nkhw", wx, A))
    out["layercam"] = relu((relu(G) * Ak).sum(axis=2))
    out["hirescam"] = relu((G * Ak).sum(axis=2))
    return out


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"])
def test_gradient_methods_match_numpy_reference(tiny, tiny_x, method):
    classes = torch.tensor([[0, 2], [1, 3], [3, 0]])
    exp = camlens.explain(tiny, tiny_x, method=method, targets=classes, layer=LAYER)
    A, G, logits = reference(tiny, tiny_x, classes)
    ref = np_methods(A, G)[method]
    assert np.abs(ref).max() > 1e-3  # the oracle is not trivially zero
    np.testing.assert_allclose(exp.raw.numpy(), ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(exp.scores.numpy(), logits.gather(1, classes).numpy(), rtol=1e-12)
    up = F.interpolate(torch.from_numpy(ref), size=(12, 12), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(exp.maps.numpy(), up.float().numpy(), rtol=1e-5, atol=1e-6)


def test_gradient_closed_form_on_tiny(tiny, tiny_x):
    """d logit_c / d A = W_c / (h w) * [A > 0] for A the pre-ReLU conv2 output before GAP + linear."""
    exp = camlens.explain(tiny, tiny_x, method="hirescam", targets=1, layer=LAYER)
    A = tiny.conv2(tiny.act1(tiny.conv1(tiny_x))).detach()
    h, w = A.shape[-2:]
    W = tiny.fc.weight.detach()[1]
    G = W[None, :, None, None] / (h * w) * (A > 0)
    np.testing.assert_allclose(exp.raw[:, 0].numpy(), (G * A).sum(1).relu().numpy(), rtol=1e-12)


def test_gradcam_rms_option_and_no_relu(tiny, tiny_x):
    classes = torch.tensor([[2], [2], [2]])
    A, G, _ = reference(tiny, tiny_x, classes)
    Gn = G / (np.sqrt((G**2).mean(axis=(2, 3, 4), keepdims=True)) + 1e-5)
    ref = np.einsum("nkc,nchw->nkhw", Gn.mean(axis=(3, 4)), A)
    exp = camlens.explain(tiny, tiny_x, method="gradcam", targets=2, layer=LAYER, grad_norm="rms", relu=False)
    np.testing.assert_allclose(exp.raw.numpy(), ref, rtol=1e-9, atol=1e-12)
    assert (exp.raw < 0).any()  # signed map kept


def test_cam_matches_head_weights_and_logits(tiny, tiny_x):
    exp = camlens.explain(tiny, tiny_x, method="cam", targets="top2")
    A = tiny.act2(tiny.conv2(tiny.act1(tiny.conv1(tiny_x)))).detach()
    W, b = tiny.fc.weight.detach(), tiny.fc.bias.detach()
    ref = torch.einsum("nkc,nchw->nkhw", W[exp.classes], A)
    torch.testing.assert_close(exp.raw, ref, rtol=1e-12, atol=1e-12)
    # spatial mean + bias == logit (no ReLU in CAM)
    torch.testing.assert_close(exp.raw.mean((2, 3)) + b[exp.classes], exp.scores, rtol=1e-12, atol=1e-12)


def test_eigencam_matches_numpy_svd(tiny, tiny_x):
    exp = camlens.explain(tiny, tiny_x, method="eigencam", targets="top2", layer="act2")
    A = tiny.act2(tiny.conv2(tiny.act1(tiny.conv1(tiny_x)))).detach().numpy()
    for n in range(A.shape[0]):
        C, h, w = A[n].shape
        M = A[n].reshape(C, -1).T
        _, _, vt = np.linalg.svd(M, full_matrices=False)
        p = (M @ vt[0]).reshape(h, w)
        p = p if p.sum() >= 0 else -p
        for k in range(2):
            np.testing.assert_allclose(exp.raw[n, k].numpy(), relu(p), rtol=1e-8, atol=1e-10)


def scorecam_reference(model, x, A, classes, weighting="prob"):
    """One masked forward per channel per image, no batching, no de-duplication."""
    N, C, h, w = A.shape
    out = np.zeros((N, classes.shape[1], h, w))
    for n in range(N):
        s = np.zeros((C, classes.shape[1]))
        for c in range(C):
            m = F.interpolate(A[n : n + 1, c : c + 1], size=x.shape[-2:], mode="bilinear", align_corners=False)
            lo, hi = m.min(), m.max()
            m = (m - lo) / (hi - lo) if hi - lo > 1e-8 else torch.zeros_like(m)
            with torch.no_grad():
                logits = model(x[n : n + 1] * m)[0]
            src = logits.softmax(0) if weighting == "prob" else logits
            s[c] = src[classes[n]].numpy()
        if weighting == "channel_softmax":
            s = np.exp(s - s.max(0)) / np.exp(s - s.max(0)).sum(0)
        out[n] = relu(np.einsum("ck,chw->khw", s, A[n].numpy()))
    return out


@pytest.mark.parametrize("weighting", ["prob", "channel_softmax"])
def test_scorecam_matches_unbatched_reference(tiny, tiny_x, weighting):
    classes = torch.tensor([[0, 1], [2, 3], [1, 1]])
    A = tiny.act2(tiny.conv2(tiny.act1(tiny.conv1(tiny_x)))).detach()
    ref = scorecam_reference(tiny, tiny_x, A, classes, weighting)
    for bs, dedupe in [(1, False), (7, True), (64, True)]:
        exp = camlens.explain(
            tiny,
            tiny_x,
            method="scorecam",
            targets=classes,
            layer="act2",
            batch_size=bs,
            dedupe=dedupe,
            weighting=weighting,
        )
        np.testing.assert_allclose(exp.raw.numpy(), ref, rtol=1e-9, atol=1e-12)


def test_scorecam_dedupe_shares_forwards_for_dead_channels(tiny, tiny_x):
    """Channels that are constant (dead after ReLU) all give the zero mask: one forward for all."""
    with torch.no_grad():
        tiny.conv2.bias[:3] = -100.0  # channels 0-2 dead everywhere
    exp = camlens.explain(tiny, tiny_x, method="scorecam", targets=0, layer="act2")
    assert exp.extras["forwards"] == [3, 3, 3]  # 2 live channels + 1 shared zero mask
    A = tiny.act2(tiny.conv2(tiny.act1(tiny.conv1(tiny_x)))).detach()
    ref = scorecam_reference(tiny, tiny_x, A, torch.zeros(3, 1, dtype=torch.long))
    np.testing.assert_allclose(exp.raw.numpy(), ref, rtol=1e-9, atol=1e-12)


def test_scorecam_max_channels_keeps_top_channels(tiny, tiny_x):
    A = tiny.act2(tiny.conv2(tiny.act1(tiny.conv1(tiny_x)))).detach()
    exp = camlens.explain(tiny, tiny_x[:1], method="scorecam", targets=0, layer="act2", max_channels=2)
    keep = A[0].mean((1, 2)).topk(2).indices
    # only the kept channels are masked, scored and summed; the others get weight 0
    s = []
    for c in keep.tolist():
        m = F.interpolate(A[:1, c : c + 1], size=(12, 12), mode="bilinear", align_corners=False)
        m = (m - m.min()) / (m.max() - m.min())
        with torch.no_grad():
            s.append(tiny(tiny_x[:1] * m).softmax(1)[0, 0])
    direct = relu(np.einsum("c,chw->hw", torch.stack(s).numpy(), A[0, keep].numpy()))
    np.testing.assert_allclose(exp.raw[0, 0].numpy(), direct, rtol=1e-9, atol=1e-12)
    assert exp.extras["forwards"] == [2]


def test_topk_equals_single_class_calls(tiny, tiny_x):
    methods = ["cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "scorecam"]
    multi = camlens.explain(tiny, tiny_x, method=methods, targets="top3")
    for k in range(3):
        single = camlens.explain(tiny, tiny_x, method=methods, targets=multi["cam"].classes[:, k].tolist())
        for m in methods:
            torch.testing.assert_close(multi[m].raw[:, k], single[m].raw[:, 0], rtol=1e-10, atol=1e-12)


def test_batch_equals_per_image_calls(tiny, tiny_x):
    methods = ["cam", "gradcam", "gradcam++", "layercam", "scorecam", "eigencam"]
    batch = camlens.explain(tiny, tiny_x, method=methods, targets="top2")
    for n in range(tiny_x.shape[0]):
        one = camlens.explain(tiny, tiny_x[n : n + 1], method=methods, targets="top2")
        for m in methods:
            torch.testing.assert_close(batch[m].raw[n], one[m].raw[0], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(batch[m].maps[n], one[m].maps[0])


def test_method_list_equals_separate_calls(tiny, tiny_x):
    names = ["gradcam", "cam", "xgradcam"]
    together = camlens.explain(tiny, tiny_x, method=names, targets=1)
    assert list(together) == names
    for m in names:
        torch.testing.assert_close(together[m].raw, camlens.explain(tiny, tiny_x, method=m, targets=1).raw)


def test_callable_target(tiny, tiny_x):
    """A callable score (here: logit 1 + logit 3) is explained like a class: Grad-CAM is linear in it."""
    e = camlens.explain(tiny, tiny_x, method="gradcam", targets=lambda z: z[:, 1] + z[:, 3], layer=LAYER, relu=False)
    a = camlens.explain(tiny, tiny_x, method="gradcam", targets=[[1, 3]] * 3, layer=LAYER, relu=False)
    torch.testing.assert_close(e.raw[:, 0], a.raw[:, 0] + a.raw[:, 1])
    assert e.classes.tolist() == [[-1]] * 3 and torch.isnan(e.probs).all()


def test_methods_registry_lists_papers():
    ms = camlens.methods()
    for name in ["cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "scorecam", "eigencam"]:
        assert name in ms and ms[name].paper and ms[name].summary
    assert "Zhou" in ms["cam"].paper and "Selvaraju" in ms["gradcam"].paper
