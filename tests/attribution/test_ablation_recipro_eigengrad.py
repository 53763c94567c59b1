"""Issue 27: the methods the field added — Ablation-CAM, Recipro-CAM, EigenGrad-CAM.

Closed forms on hand-built networks, an independent reference written here (Recipro-CAM's loop
over the spatial masks), the "layers above only" shortcut equal to whole-network forwards, and the
peer (pytorch-grad-cam 1.5.7) on ResNet-18 with random weights whose scores are checked to be of
order one (so that the comparison cannot degenerate to rounding noise on another CPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from tests.api.test_hygiene import assert_untouched, snapshot

torchvision = pytest.importorskip("torchvision")


class GapNet(nn.Module):
    """conv -> ReLU (the explained layer ``act``) -> GAP -> linear."""

    def __init__(self, c: int = 6, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.act(self.conv(x)), 1).flatten(1))


@pytest.fixture
def gapnet():
    torch.manual_seed(0)
    net = GapNet().eval()
    with torch.no_grad():
        net.fc.bias.fill_(2.0)  # scores well away from 0 (the weights divide by them)
    return net


@pytest.fixture
def x8():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _features(net: GapNet, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.act(net.conv(x))


def _no_patches(model: nn.Module) -> bool:
    return all("forward" not in m.__dict__ for m in model.modules())


class TinyRes(nn.Module):
    """A stem, two residual blocks (nested, in-place ReLUs, a shared ReLU module) and a GAP + linear
    head: the shapes of torchvision's ResNet at a size the tests can afford."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(*[torchvision.models.resnet.BasicBlock(8, 8) for _ in range(2)])
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


@pytest.fixture(scope="module")
def tinyres():
    torch.manual_seed(0)
    net = TinyRes()
    for m in net.modules():  # non-trivial running statistics: eval-mode BatchNorm is not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def rx():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))


def test_resnet_scores_are_of_order_one(resnet18, rx):
    """The peer comparisons below are meaningful only if the random-weight scores are not tiny."""
    with torch.no_grad():
        s = resnet18(rx)[:, [3, 7]].abs()
    assert float(s.min()) > 0.05 and float(s.max()) < 1e3


# ----------------------------------------------------------------------------- Ablation-CAM
def test_ablationcam_closed_form_gap_linear(gapnet, x8):
    """Zeroing channel k of a GAP + linear head drops y_c by W_ck mean(A_k): w_k = W_ck mean(A_k) / y_c."""
    A = _features(gapnet, x8)
    y = gapnet(x8).detach()
    classes = [[0, 3], [2, 1]]
    e = camlens.explain(gapnet, x8, "ablationcam", layer="act", targets=classes)
    W = gapnet.fc.weight.detach()
    for n in range(2):
        for j, c in enumerate(classes[n]):
            w = W[c] * A[n].mean((1, 2)) / y[n, c]
            ref = torch.einsum("k,khw->hw", w, A[n]).relu()
            torch.testing.assert_close(e.raw[n, j], ref, rtol=1e-4, atol=1e-5)
    assert e.extras["forwards"] == int(A.flatten(2).ne(0).any(2).sum())


def test_ablationcam_unnormalized_and_signed(gapnet, x8):
    A = _features(gapnet, x8)
    e = camlens.explain(gapnet, x8, "ablationcam", layer="act", targets=1, normalize=False, relu=False)
    w = gapnet.fc.weight.detach()[1] * A.mean((2, 3))  # (N, C): the plain drop
    ref = torch.einsum("nk,nkhw->nhw", w, A)
    torch.testing.assert_close(e.raw[:, 0], ref, rtol=1e-4, atol=1e-5)
    assert e.signed


def test_ablationcam_skips_the_layers_below_and_equals_whole_network(tinyres):
    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    # a block output, a conv inside a block (its residual input comes from below), the automatic layer
    for layer in ("blocks.1", "blocks.1.conv1", "blocks.0.bn2", None):
        fast = camlens.explain(tinyres, x, "ablationcam", targets=[[0, 2], [1, 4], [3, 3]], layer=layer, batch_size=3)
        slow = camlens.explain(
            tinyres, x, "ablationcam", targets=[[0, 2], [1, 4], [3, 3]], layer=layer, skip_below=False
        )
        assert fast.extras["head"].startswith("layers above the target only"), fast.extras["head"]
        assert slow.extras["head"].startswith("whole network")
        torch.testing.assert_close(fast.raw, slow.raw, rtol=1e-4, atol=1e-5 * float(slow.raw.abs().max()))
        assert float(fast.raw.abs().max()) > 0
    assert _no_patches(tinyres)


def test_ablationcam_leaves_no_trace_even_when_the_target_raises(tinyres):
    rx, resnet18 = torch.randn(2, 3, 12, 12), tinyres
    before = snapshot(resnet18)
    calls = []

    def target(logits):
        calls.append(len(logits))
        if len(calls) > 2:  # the clean pass and the shortcut check pass; the first ablations raise
            raise ValueError("boom")
        return logits[:, 3]

    with pytest.raises(ValueError, match="boom"):
        camlens.explain(resnet18, rx, "ablationcam", targets=target, layer="blocks.1", batch_size=2)
    assert _no_patches(resnet18)
    assert_untouched(resnet18, before)


def test_ablationcam_batch_size_is_checked(gapnet, x8):
    with pytest.raises(camlens.base.errors.MethodError, match="batch_size"):
        camlens.explain(gapnet, x8, "ablationcam", layer="act", batch_size=0)


def _pgc_normalized(raw: torch.Tensor, size) -> np.ndarray:
    """pytorch-grad-cam's min-max scaling at feature resolution, resize, scaling again."""

    def scale(m: torch.Tensor) -> torch.Tensor:
        m = m - m.amin(dim=(-2, -1), keepdim=True)
        return m / (m.amax(dim=(-2, -1), keepdim=True) + 1e-7)

    return scale(F.interpolate(scale(raw), size=size, mode="bilinear", align_corners=False))[:, 0].numpy()


def _pgc(cls_name: str, net, x, classes, layer) -> np.ndarray:
    pgc = pytest.importorskip("pytorch_grad_cam")
    targets_mod = pytest.importorskip("pytorch_grad_cam.utils.model_targets")
    with getattr(pgc, cls_name)(model=net, target_layers=[layer]) as cam:
        return cam(input_tensor=x, targets=[targets_mod.ClassifierOutputTarget(c) for c in classes])


@pytest.mark.slow
def test_ablationcam_equals_pytorch_grad_cam(resnet18, rx):
    """At a post-ReLU layer pytorch-grad-cam's AblationLayer zeroes the channel too (see the module)."""
    classes, x = [7], rx[:1]
    theirs = _pgc("AblationCAM", resnet18, x, classes, resnet18.layer3[-1])
    raw = camlens.explain(resnet18, x, "ablationcam", targets=classes, layer="layer3.1").raw
    assert raw.shape[-2:] == (4, 4) and float(raw.amax()) > 0
    ours = _pgc_normalized(raw, x.shape[-2:])
    for a, b in zip(ours, theirs):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999


# ----------------------------------------------------------------------------- Recipro-CAM
def _hand_reciprocam(net: nn.Module, layer: nn.Module, x: torch.Tensor, classes, gaussian: bool, prob: bool):
    """The reference: one whole-network forward per image and spatial position, the layer's output
    masked by a plain forward hook."""
    with torch.no_grad():
        feats = []
        h0 = layer.register_forward_hook(lambda m, a, o: feats.append(o))
        net(x)
        h0.remove()
        A = feats[0]
        N, _, h, w = A.shape
        k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
        out = torch.zeros(N, len(classes[0]), h, w)
        for n in range(N):
            for i in range(h):
                for j in range(w):
                    m = torch.zeros(h, w)
                    if gaussian:
                        for di in (-1, 0, 1):
                            for dj in (-1, 0, 1):
                                if 0 <= i + di < h and 0 <= j + dj < w:
                                    m[i + di, j + dj] = k[1 + di, 1 + dj]
                    else:
                        m[i, j] = 1.0
                    hk = layer.register_forward_hook(lambda mod, a, o, m=m, n=n: A[n : n + 1] * m)
                    try:
                        logits = net(x[n : n + 1])
                    finally:
                        hk.remove()
                    s = logits.softmax(1) if prob else logits
                    out[n, :, i, j] = s[0, classes[n]]
    return out


@pytest.mark.parametrize("gaussian", [False, True])
def test_reciprocam_equals_a_hand_loop_over_the_spatial_masks(tinyres, gaussian):
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    classes = [[0, 2], [4, 1]]
    for name, weighting in (("blocks.1", "prob"), ("blocks.1.conv1", "logit")):
        layer = dict(tinyres.named_modules())[name]
        ref = _hand_reciprocam(tinyres, layer, x, classes, gaussian, weighting == "prob")
        e = camlens.explain(
            tinyres, x, "reciprocam", layer=name, targets=classes, gaussian=gaussian, weighting=weighting, batch_size=7
        )
        assert e.extras["head"].startswith("layers above the target only")
        assert float(ref.std()) > 1e-3  # not a constant map
        torch.testing.assert_close(e.raw, ref, rtol=1e-4, atol=1e-6)
    assert _no_patches(tinyres)


def test_reciprocam_closed_form_gap_linear(gapnet, x8):
    """GAP + linear head: the masked features' logits are b + W A(p) / (hw)."""
    A = _features(gapnet, x8)
    e = camlens.explain(gapnet, x8, "reciprocam", layer="act", targets=[[0], [3]], weighting="logit")
    W, b = gapnet.fc.weight.detach(), gapnet.fc.bias.detach()
    logits = torch.einsum("kc,nchw->nkhw", W, A) / 64 + b[None, :, None, None]
    torch.testing.assert_close(e.raw[:, 0], torch.stack([logits[0, 0], logits[1, 3]]), rtol=1e-4, atol=1e-5)
    assert e.signed


def test_reciprocam_weighting_is_checked(gapnet, x8):
    with pytest.raises(camlens.base.errors.MethodError, match="weighting"):
        camlens.explain(gapnet, x8, "reciprocam", layer="act", weighting="softmax")


# ----------------------------------------------------------------------------- EigenGrad-CAM
def _np_projection(P: np.ndarray) -> np.ndarray:
    """Centred first-principal-component projection of ``P`` ``(C, h, w)``, oriented along the
    uncentred mean (NumPy, float64)."""
    C, h, w = P.shape
    M = P.reshape(C, -1).T.astype(np.float64)
    mean = M.mean(0)
    v = np.linalg.svd(M - mean, full_matrices=False)[2][0]
    proj = (M - mean) @ v
    return (proj if mean @ v >= 0 else -proj).reshape(h, w)


def test_eigengradcam_closed_form_gap_linear(gapnet, x8):
    """GAP + linear: G_k = W_ck / (hw), so P = W_c ⊙ A / 64 in closed form."""
    A = _features(gapnet, x8).numpy()
    W = gapnet.fc.weight.detach().numpy()
    classes = [[1, 2], [0, 3]]
    e = camlens.explain(gapnet, x8, "eigengradcam", layer="act", targets=classes)
    for n in range(2):
        for j, c in enumerate(classes[n]):
            ref = np.maximum(_np_projection(W[c][:, None, None] * A[n] / 64), 0)
            np.testing.assert_allclose(e.raw[n, j].numpy(), ref, rtol=1e-4, atol=1e-6)
    assert float(e.raw.amax()) > 0


@pytest.mark.slow
def test_eigengradcam_equals_pytorch_grad_cam_projection_up_to_sign(resnet18, rx):
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    feats, grads = [], []

    def keep(m, a, o):
        feats.append(o)
        o.register_hook(grads.append)

    h = resnet18.layer3.register_forward_hook(keep)
    try:
        resnet18(rx)[:, 7].sum().backward()
    finally:
        h.remove()
        resnet18.zero_grad(set_to_none=True)
    theirs = torch.from_numpy(get_2d_projection((grads[0] * feats[0]).detach().numpy()))  # LAPACK's sign
    ours = camlens.explain(resnet18, rx, "eigengradcam", layer="layer3", targets=7).raw[:, 0]
    assert float(ours.amax()) > 0
    for o, p in zip(ours, theirs):
        tol = dict(rtol=1e-3, atol=1e-4 * float(p.abs().max()))
        assert torch.allclose(o, p.relu(), **tol) or torch.allclose(o, (-p).relu(), **tol)


# ----------------------------------------------------------------------------- Finer-CAM
def test_finercam_closed_form_gap_linear(gapnet, x8):
    """GAP + linear: dA_k s = sum_m (ds/dy_m) W_mk / (hw); s written here class by class."""
    A = _features(gapnet, x8)
    W = gapnet.fc.weight.detach()
    e = camlens.explain(gapnet, x8, "finercam", layer="act", targets=[[0], [2]], alpha=0.7, n_compare=2)
    for n, c in enumerate([0, 2]):
        y = gapnet(x8[n : n + 1])[0].detach().requires_grad_(True)
        others = sorted((j for j in range(4) if j != c), key=lambda j: abs(float((y[j] - y[c]).detach())))[:2]
        assert e.extras["compared"][n][0] == others
        p = y.softmax(0)
        s = sum(p[j] * (y[c] - 0.7 * y[j]) for j in others) / (sum(p[j] for j in others) + 1e-9)
        (ds,) = torch.autograd.grad(s, y)
        w = (ds @ W) / 64  # (C,): the spatial mean of the gradient per channel
        ref = torch.einsum("k,khw->hw", w, A[n]).relu()
        torch.testing.assert_close(e.raw[n, 0], ref, rtol=1e-4, atol=1e-6)
        assert float(ref.amax()) > 0


def test_finercam_alpha_zero_is_gradcam_and_needs_class_targets(gapnet, x8):
    f = camlens.explain(gapnet, x8, "finercam", layer="act", targets="top2", alpha=0.0).raw
    g = camlens.explain(gapnet, x8, "gradcam", layer="act", targets="top2").raw
    torch.testing.assert_close(f, g, rtol=1e-5, atol=1e-7)
    with pytest.raises(camlens.base.errors.MethodError, match="class indices"):
        camlens.explain(gapnet, x8, "finercam", layer="act", targets=lambda z: z[:, 0])
    with pytest.raises(camlens.base.errors.MethodError, match="n_compare"):
        camlens.explain(gapnet, x8, "finercam", layer="act", n_compare=4)


@pytest.mark.slow
def test_finercam_equals_pytorch_grad_cam(resnet18, rx):
    pgc = pytest.importorskip("pytorch_grad_cam")
    with pgc.FinerCAM(model=resnet18, target_layers=[resnet18.layer3]) as cam:
        theirs = cam(input_tensor=rx, targets=None)  # the top class against the 3 closest logits, alpha 1
    resnet18.zero_grad(set_to_none=True)
    raw = camlens.explain(resnet18, rx, "finercam", layer="layer3", targets="top1").raw
    assert float(raw.amax()) > 0
    for a, b in zip(_pgc_normalized(raw, rx.shape[-2:]), theirs):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999


# ----------------------------------------------------------------------------- KPCA-CAM
class ConstFeatures(nn.Module):
    """Features that take two values: ``a`` on the left columns, ``b`` on the right ones."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        a = torch.tensor([2.0, 1.0, 0.5])[:, None, None].expand(3, 4, 1)
        b = torch.tensor([0.1, 0.2, 0.0])[:, None, None].expand(3, 4, 3)
        f = self.feat(torch.cat([a, b], 2)[None].expand(len(x), -1, -1, -1) + 0 * x[:, :1, :4, :4])
        return self.fc(f.mean((2, 3)))


@pytest.mark.parametrize("kernel", ["sigmoid", "rbf", "linear"])
def test_kpcacam_two_valued_features_closed_form(kernel):
    """Two distinct points, n_a = 4 and n_b = 12 times: the centred kernel matrix has rank one, its
    eigenvector is proportional to n_b on the a's and -n_a on the b's, so after the ReLU the map is
    one positive constant on the more active a's and 0 on the b's."""
    net = ConstFeatures().eval()
    e = camlens.explain(net, torch.zeros(1, 3, 4, 4), "kpcacam", layer="feat", kernel=kernel)
    m = e.raw[0, 0]
    assert torch.allclose(m[:, 1:], torch.zeros(4, 3), atol=1e-6)
    assert float(m[:, 0].min()) > 0 and torch.allclose(m[:, 0], m[0, 0].expand(4), rtol=1e-5)


def test_kpcacam_equals_scikit_learn_kernel_pca_up_to_sign(resnet18, rx):
    decomposition = pytest.importorskip("sklearn.decomposition")
    with torch.no_grad():
        feats = resnet18.layer3(
            resnet18.layer2(resnet18.layer1(resnet18.maxpool(resnet18.relu(resnet18.bn1(resnet18.conv1(rx))))))
        )
    ours = camlens.explain(resnet18, rx, "kpcacam", layer="layer3").raw[:, 0]
    assert float(ours.amax()) > 0
    for o, f in zip(ours, feats):
        X = f.flatten(1).T.double().numpy()
        p = decomposition.KernelPCA(n_components=1, kernel="sigmoid").fit_transform(X - X.mean(0))[:, 0]
        p = torch.from_numpy(p).float().view(o.shape)
        tol = dict(rtol=1e-3, atol=1e-4 * float(p.abs().max()))
        assert torch.allclose(o, p.relu(), **tol) or torch.allclose(o, (-p).relu(), **tol)


# ----------------------------------------------------------------------------- ShapleyCAM
def test_shapleycam_closed_form_gap_linear_rest(gapnet, x8):
    """GAP + linear, ReST score s = 2 y_c - logsumexp(y): G_k = (2 W_c - p W)_k / (hw) and
    (H A)_k = -(1/hw) sum_l [W^T (diag p - p p^T) W]_kl mean(A_l), constant over space."""
    A = _features(gapnet, x8)
    W = gapnet.fc.weight.detach()
    y = gapnet(x8).detach()
    classes = [[1], [3]]
    e = camlens.explain(gapnet, x8, "shapleycam", layer="act", targets=classes)
    for n, (c,) in enumerate(classes):
        p = y[n].softmax(0)
        g = (2 * W[c] - p @ W) / 64
        hA = -(W.T @ (torch.diag(p) - torch.outer(p, p)) @ W) @ A[n].mean((1, 2)) / 64
        ref = torch.einsum("k,khw->hw", g - 0.5 * hA, A[n]).relu()
        torch.testing.assert_close(e.raw[n, 0], ref, rtol=1e-4, atol=1e-6)
        assert float(ref.amax()) > 0
    # the logit of a linear head has no curvature: ShapleyCAM = Grad-CAM
    s = camlens.explain(gapnet, x8, "shapleycam", layer="act", targets="top2", rest=False).raw
    torch.testing.assert_close(s, camlens.explain(gapnet, x8, "gradcam", layer="act", targets="top2").raw)


@pytest.mark.slow
def test_shapleycam_equals_pytorch_grad_cam_with_rest(resnet18, rx):
    pgc = pytest.importorskip("pytorch_grad_cam")
    targets_mod = pytest.importorskip("pytorch_grad_cam.utils.model_targets")
    with pgc.ShapleyCAM(model=resnet18, target_layers=[resnet18.layer3]) as cam:
        theirs = cam(input_tensor=rx, targets=[targets_mod.ClassifierOutputReST(c) for c in (3, 7)])
    resnet18.zero_grad(set_to_none=True)
    raw = camlens.explain(resnet18, rx, "shapleycam", layer="layer3", targets=[3, 7]).raw
    assert float(raw.amax()) > 0
    for a, b in zip(_pgc_normalized(raw, rx.shape[-2:]), theirs):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
