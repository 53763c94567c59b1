"""LIME and KernelSHAP on superpixels. Oracles: a model linear in the superpixel indicators (both
recover its coefficients), exact Shapley values by enumeration of every coalition (KernelSHAP),
an independent NumPy weighted ridge (LIME's fit with its default penalty), and Captum's ``Lime`` /
``KernelShap`` fed the same segments, baseline and coalitions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.attribution.surrogate import kernelshap_samples, lime_samples, superpixels
from camlens.base._util import gaussian_blur
from camlens.base.errors import MethodError

H = W = 12
S = 6
#: six vertical bands of two columns
BANDS = torch.arange(S).repeat_interleave(2)[None].expand(H, -1).clone()
COEF = torch.tensor([[0.9, -0.6, 1.3, -1.2, 0.5, 0.7], [0.2, 1.1, -0.4, -0.8, 1.6, -1.0]], dtype=torch.float64)
BIAS = torch.tensor([0.5, -1.0], dtype=torch.float64)


class BandLinear(nn.Module):
    """Two logits, linear in the fraction of each band's channel-0 pixels kept: with the input all
    ones and the baseline 0, logit k = BIAS[k] + sum_j COEF[k, j] z_j."""

    def forward(self, x):
        r = torch.stack([x[:, 0][:, j == BANDS].mean(1) for j in range(S)], 1).double()
        return (r @ COEF.T + BIAS).float()


def small_cnn(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.Softplus(),
        nn.Conv2d(6, 6, 3, padding=1, stride=2),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(1),
        nn.Linear(24, classes),
    ).eval()


KW = dict(segments=BANDS, baseline=0.0, weighting="logit", progress=False)


@pytest.mark.parametrize("method", ["lime", "kernelshap"])
def test_a_model_linear_in_the_superpixels_gives_back_its_coefficients(method):
    x = torch.ones(2, 3, H, W)
    opts = {"alpha": 0.0} if method == "lime" else {}
    e = camlens.explain(BandLinear(), x, method, targets=[[0, 1], [1, 0]], n_samples=200, **KW, **opts)
    for n, order in enumerate([[0, 1], [1, 0]]):
        torch.testing.assert_close(e.extras["segment_weights"][n].double(), COEF[order], rtol=0, atol=1e-3)
        # the map gives each pixel its superpixel's weight
        torch.testing.assert_close(e.maps[n], e.extras["segment_weights"][n][:, BANDS])
    assert torch.allclose(e.extras["r2"], torch.ones(2, 2), atol=1e-6)
    # LIME's intercept is the score with every superpixel off; KernelSHAP's phi_0 is f(baseline)
    torch.testing.assert_close(e.extras["intercept"][0].double(), BIAS, rtol=0, atol=1e-3)
    assert e.maps.shape == (2, 2, H, W) and e.extras["signed"]


@pytest.mark.slow
def test_lime_with_its_ridge_penalty_recovers_the_coefficients_with_enough_samples():
    """alpha=1 (the lime package's) shrinks the weights by ~alpha / sum(weights): 1e-3 at 40 000 samples."""
    e = camlens.explain(
        BandLinear(), torch.ones(1, 3, H, W), "lime", targets=[[0, 1]], n_samples=40000, batch_size=4000, **KW
    )
    torch.testing.assert_close(e.extras["segment_weights"][0].double(), COEF, rtol=0, atol=1e-3)


def _numpy_weighted_ridge(z: np.ndarray, y: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """Independent reference: [1, z] with an unpenalised intercept, normal equations in NumPy."""
    a = np.hstack([np.ones((len(z), 1)), z])
    pen = alpha * np.eye(a.shape[1])
    pen[0, 0] = 0
    return np.linalg.solve(a.T @ (w[:, None] * a) + pen, a.T @ (w[:, None] * y))  # (1 + S, K)


def test_lime_is_lime_weighted_ridge_with_the_cosine_kernel():
    net = small_cnn()
    x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(1))
    e = camlens.explain(net, x, "lime", targets=[[0, 2]], n_samples=300, seed=3, **KW)
    z = lime_samples(S, 300, torch.Generator().manual_seed(3))[0].numpy()  # image 0 uses seed + 0
    masks = torch.from_numpy(z).float()[:, BANDS][:, None]  # (M, 1, H, W)
    with torch.no_grad():
        y = net(x * masks)[:, [0, 2]].double().numpy()
    cos = z.sum(1) / (np.sqrt(z.sum(1)) * np.sqrt(S) + 1e-300)
    w = np.exp(-((1 - cos) ** 2) / (2 * 0.25**2))
    ref = _numpy_weighted_ridge(z, y, w, 1.0)
    np.testing.assert_allclose(e.extras["segment_weights"][0].numpy(), ref[1:].T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(e.extras["intercept"][0].numpy(), ref[0], rtol=1e-4, atol=1e-6)
    pred = ref[0] + z @ ref[1:]
    r2 = 1 - (w[:, None] * (y - pred) ** 2).sum(0) / (w[:, None] * (y - np.average(y, 0, w)) ** 2).sum(0)
    np.testing.assert_allclose(e.extras["r2"][0].numpy(), r2, rtol=1e-4)
    assert (r2 < 0.999).all()  # a non-linear model: the surrogate does not fit exactly


def _exact_shapley(value: dict[tuple[int, ...], torch.Tensor], n: int) -> torch.Tensor:
    phi = torch.zeros(n, next(iter(value.values())).shape[0], dtype=torch.float64)
    for j in range(n):
        others = [i for i in range(n) if i != j]
        for k in range(n):
            for t in itertools.combinations(others, k):
                wgt = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
                phi[j] += wgt * (value[tuple(sorted((*t, j)))] - value[t])
    return phi


@pytest.mark.parametrize("n_seg", [2, 5, 8])
def test_kernelshap_equals_exact_shapley_values_by_enumeration(n_seg):
    net = small_cnn()
    seg = (torch.arange(W) * n_seg // W)[None].expand(H, -1).clone()
    x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(2)) * 2
    e = camlens.explain(
        net,
        x,
        "kernelshap",
        targets=[[0, 1, 2]],
        n_samples=2**n_seg,
        segments=seg,
        baseline=0.0,
        weighting="logit",
        progress=False,
    )
    value = {}
    with torch.no_grad():
        for k in range(n_seg + 1):
            for t in itertools.combinations(range(n_seg), k):
                keep = torch.isin(seg, torch.tensor(t, dtype=torch.long)).float()
                value[t] = net(x * keep)[0].double()
    phi = _exact_shapley(value, n_seg)
    assert float(phi.abs().max()) > 0.01  # a real game, not a degenerate one
    torch.testing.assert_close(e.extras["segment_weights"][0].double(), phi.T, rtol=1e-4, atol=1e-5)
    assert e.extras["forwards"] == 2**n_seg
    # efficiency: the weights sum to f(x) - f(baseline)
    torch.testing.assert_close(phi.sum(0), value[tuple(range(n_seg))] - value[()])


def test_same_samples_serve_every_target_and_batching_changes_nothing():
    net = small_cnn()
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(4))
    for method in ("lime", "kernelshap"):
        # 40 < 2**6 coalitions: KernelSHAP samples too (it enumerates, deterministically, from 64 on)
        both = camlens.explain(net, x, method, targets="top2", n_samples=40, batch_size=5, **KW)
        again = camlens.explain(net, x, method, targets="top2", n_samples=40, batch_size=64, **KW)
        torch.testing.assert_close(both.maps, again.maps, rtol=1e-5, atol=1e-6)
        cls = both.classes
        for k in range(2):
            one = camlens.explain(net, x, method, targets=cls[:, k : k + 1].tolist(), n_samples=40, **KW)
            torch.testing.assert_close(one.maps[:, 0], both.maps[:, k], rtol=1e-5, atol=1e-6)
        assert both.extras["forwards"] == 2 * 40
        other = camlens.explain(net, x, method, targets="top2", n_samples=40, seed=7, **KW)
        assert not torch.allclose(other.maps, both.maps)


def test_kernelshap_samples_follow_the_shapley_kernel():
    z, w = kernelshap_samples(16, 20002, torch.Generator().manual_seed(0))  # 20000 < 2**16: sampled
    assert z.shape == (20002, 16) and z[0].sum() == 16 and z[1].sum() == 0 and torch.all(w == 1)
    sizes = torch.bincount(z[2:].sum(1).long(), minlength=17).double() / 20000
    k = torch.arange(1, 16).double()
    p = 15 / (k * (16 - k))
    torch.testing.assert_close(sizes[1:16], p / p.sum(), rtol=0, atol=0.01)
    assert sizes[0] == 0 and sizes[16] == 0
    # every superpixel equally likely within a size
    torch.testing.assert_close(
        z[2:].mean(0), torch.full((16,), float(z[2:].mean()), dtype=torch.float64), rtol=0, atol=0.02
    )
    # from 2**S samples on: every coalition once, weighted by the exact kernel
    z, w = kernelshap_samples(4, 16, torch.Generator().manual_seed(0))
    assert len({tuple(r.tolist()) for r in z}) == 16
    size = z[2:].sum(1)
    ref = 3 / (torch.tensor([math.comb(4, int(k)) for k in size]) * size * (4 - size))
    torch.testing.assert_close(w[2:], (ref / ref.sum()).double())


# --------------------------------------------------------------------------------------- Captum
#: Captum's KernelShap enforces the two constraint coalitions with a weight (default 1e6) and solves in
#: float32 (it casts the samples and scores to float32 before sklearn): at 1e6 its own rounding is
#: ~1e-3 of the largest weight (measured: 1.45e-4 of 0.15; the float64 solve with weight 1e6 agrees
#: with our exact constraints to 1e-7), at 1e5 both its rounding and its O(1/weight) slack are ~1e-6.
INF_WEIGHT = 1e5


def _captum_inputs(method: str):
    skimage = pytest.importorskip("skimage.segmentation")
    net = small_cnn()
    with torch.no_grad():
        net[-1].weight.mul_(20)  # logits that move by whole units when a superpixel goes
    torch.manual_seed(0)
    x = F.interpolate(torch.randn(1, 3, 6, 6), size=(24, 24), mode="nearest") * 2 + 0.2 * torch.randn(1, 3, 24, 24)
    rgb = x[0].permute(1, 2, 0).numpy().astype(np.float64)
    seg = torch.from_numpy(skimage.slic((rgb - rgb.min()) / np.ptp(rgb), n_segments=25, start_label=0))
    seg = superpixels(x, seg)[0]  # renumbered 0..S-1
    n_seg = int(seg.max()) + 1
    assert 10 <= n_seg <= 40  # 2**n_seg > n_samples: KernelSHAP samples (Captum's weights of 1 apply)
    base = gaussian_blur(x, 24 / 20)
    return net, x, seg, n_seg, base


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lime", "kernelshap"])
def test_equals_captum_on_the_same_samples(method):
    captum_attr = pytest.importorskip("captum.attr")
    linear = pytest.importorskip("captum._utils.models.linear_model")
    net, x, seg, n_seg, base = _captum_inputs(method)
    n = 160
    ours = camlens.explain(
        net,
        x,
        method,
        targets=[[0, 2]],
        segments=seg,
        baseline="blur",
        n_samples=n,
        seed=5,
        weighting="logit",
        progress=False,
    )
    draw = lime_samples if method == "lime" else kernelshap_samples
    z = draw(n_seg, n, torch.Generator().manual_seed(5))[0]

    def perturb(original_inp, **kwargs):  # Captum's coalitions: exactly ours
        for row in z:
            yield row[None].long()

    if method == "lime":

        def similarity(original, perturbed, interpretable, **kwargs):  # exponential kernel, cosine distance
            cos = F.cosine_similarity(interpretable.float(), torch.ones_like(interpretable, dtype=torch.float), dim=1)
            return torch.exp(-((1 - cos) ** 2) / (2 * 0.25**2))

        explainer = captum_attr.Lime(
            net, linear.SkLearnRidge(alpha=1.0), similarity_func=similarity, perturb_func=perturb
        )
    else:
        explainer = captum_attr.KernelShap(net)
        explainer.perturb_func = perturb
        explainer.inf_weight = INF_WEIGHT
    for k, cls in enumerate([0, 2]):
        ref = explainer.attribute(
            x, baselines=base, target=cls, feature_mask=seg[None, None], n_samples=len(z), perturbations_per_eval=32
        )
        assert ref.shape == x.shape
        assert float(ref.abs().max()) > 0.02  # a real attribution, not rounding noise
        torch.testing.assert_close(ours.maps[0, k], ref[0, 0], rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


# ----------------------------------------------------------------------------- segments, baseline
def test_segmentation_algorithms_and_label_maps():
    skimage_data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(skimage_data.astronaut()[::8, ::8].copy()).permute(2, 0, 1).float()[None] / 255  # 64x64
    x = (img - 0.45) / 0.225  # a preprocessed input: the segmentation stretches it back
    for algo in ("slic", "quickshift", "felzenszwalb"):
        (lab,) = superpixels(x, algo)
        assert lab.shape == (64, 64) and lab.dtype == torch.long
        uniq = torch.unique(lab)
        assert torch.equal(uniq, torch.arange(len(uniq))) and len(uniq) >= 4, algo
    (slic,) = superpixels(x, "slic", {"n_segments": 10})
    (more,) = superpixels(x, "SLIC", {"n_segments": 40})
    assert int(slic.max()) < int(more.max())
    # user maps: (H, W) for every image, (N, H, W) per image, any integer values renumbered
    two = torch.cat([x, x.flip(-1)])
    own = np.where(np.arange(64)[None, :] < 20, 7, -3).repeat(64, 0)
    a, b = superpixels(two, own)
    assert torch.equal(a, b) and set(a.unique().tolist()) == {0, 1} and a[0, 0] == 1  # -3 < 7: label 0
    per = torch.stack([torch.zeros(64, 64, dtype=torch.int32), torch.from_numpy(own)])
    a, b = superpixels(two, per)
    assert int(a.max()) == 0 and int(b.max()) == 1


def test_mean_baseline_is_each_superpixels_mean_colour():
    net = BandLinear()
    x = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(0))
    e = camlens.explain(
        net,
        x,
        "kernelshap",
        targets=[[0]],
        segments=BANDS,
        baseline="mean",
        n_samples=64,
        weighting="logit",
        progress=False,
    )
    # the band means of channel 0 replace the bands: f(0) = BIAS + COEF . band means of x
    band_mean = torch.stack([x[0, 0][j == BANDS].mean() for j in range(S)]).double()
    torch.testing.assert_close(
        e.extras["intercept"][0, 0].double(), BIAS[0] + COEF[0] @ band_mean, rtol=1e-5, atol=1e-6
    )
    # and phi_j = COEF_j * (mean of x over band j - the band's mean colour) = 0: the mean keeps the band's mean
    assert float(e.extras["segment_weights"][0].abs().max()) < 1e-5


def test_bad_options_name_the_fix():
    net = small_cnn()
    x = torch.rand(2, 3, H, W)
    with pytest.raises(MethodError, match="slic"):
        camlens.explain(net, x, "lime", segments="watershed")
    with pytest.raises(MethodError, match=r"\(12, 12\) for every image or \(2, 12, 12\)"):
        camlens.explain(net, x, "lime", segments=np.zeros((10, 10), int))
    with pytest.raises(MethodError, match="integer labels"):
        camlens.explain(net, x, "kernelshap", segments=np.zeros((12, 12)))
    with pytest.raises(MethodError, match="baseline must be 'blur', 'mean' or a number"):
        camlens.explain(net, x, "lime", segments=BANDS, baseline="zeros")
    with pytest.raises(MethodError, match="n_samples"):
        camlens.explain(net, x, "kernelshap", segments=BANDS, n_samples=0)
    with pytest.raises(MethodError, match="segment_options"):
        camlens.explain(net, x, "lime", segment_options={"bogus": 1})


def test_callable_target_and_probabilities():
    net = small_cnn()
    x = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(0))
    diff = camlens.explain(
        net,
        x,
        "kernelshap",
        targets=lambda z: z[:, 0] - z[:, 1],
        segments=BANDS,
        n_samples=64,
        baseline=0.0,
        progress=False,
    )
    sep = camlens.explain(
        net,
        x,
        "kernelshap",
        targets=[[0, 1]],
        segments=BANDS,
        n_samples=64,
        baseline=0.0,
        weighting="logit",
        progress=False,
    )
    torch.testing.assert_close(diff.maps[0, 0], sep.maps[0, 0] - sep.maps[0, 1], rtol=1e-4, atol=1e-5)
    prob = camlens.explain(
        net, x, "kernelshap", targets=[[0]], segments=BANDS, n_samples=64, baseline=0.0, progress=False
    )
    with torch.no_grad():
        p = net(x).softmax(1)[0, 0] - net(torch.zeros_like(x)).softmax(1)[0, 0]
    torch.testing.assert_close(
        prob.extras["segment_weights"][0].sum(), p, rtol=1e-4, atol=1e-6
    )  # efficiency on probabilities


def test_select_slices_the_per_image_fits():
    net = small_cnn()
    x = torch.rand(3, 3, H, W, generator=torch.Generator().manual_seed(0))
    seg = torch.stack([BANDS, BANDS.T.contiguous(), (BANDS // 2)])
    e = camlens.explain(net, x, "lime", targets="top2", segments=seg, n_samples=20, progress=False)
    assert [len(w[0]) for w in e.extras["segment_weights"]] == [6, 6, 3]
    sub = e.select([2, 0])
    assert [len(w[0]) for w in sub.extras["segment_weights"]] == [3, 6]
    assert torch.equal(sub.extras["segments"][0], BANDS // 2) and sub.extras["r2"].shape == (2, 2)
    torch.testing.assert_close(sub.extras["intercept"], e.extras["intercept"][[2, 0]])


def test_a_single_superpixel_is_said():
    net = small_cnn()
    x = torch.rand(1, 3, H, W)
    with pytest.warns(RuntimeWarning, match="single superpixel.*segment_options"):
        e = camlens.explain(net, x, "kernelshap", segments=np.zeros((H, W), int), n_samples=4, progress=False)
    assert e.extras["segment_weights"][0].shape == (1, 1)
