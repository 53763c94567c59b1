r"""Surrogate methods on superpixels: LIME and KernelSHAP. Black-box: only forwards of perturbed
copies of the input, no gradients, any target (classes, detections, segmentation, text).

Each image is cut into :math:`S` superpixels (``segments=``: a scikit-image algorithm, ``"slic"``
by default, ``"quickshift"`` or ``"felzenszwalb"``, or the caller's own integer label map
``(H, W)`` or ``(N, H, W)``). A binary vector :math:`z \in \{0, 1\}^S` keeps the superpixels with
:math:`z_j = 1` and replaces the others by a baseline :math:`b` (``"blur"``: the image blurred by a
Gaussian of :math:`\sigma = \max(H, W)/20` px; ``"mean"``: each superpixel's own mean colour, what
the ``lime`` package does; or a number): :math:`h_x(z) = x \odot M_z + b \odot (1 - M_z)`,
:math:`M_z` the pixel mask of :math:`z`. With :math:`f_k` the target score of the perturbed image
(softmax probability with ``weighting="prob"``, the logit with ``"logit"``; target objects give
their own score), a linear surrogate :math:`g_k(z) = \phi_{0,k} + \sum_j \phi_{j,k} z_j` is fitted
to ``n_samples`` pairs :math:`(z, f_k(h_x(z)))`; the map gives each pixel its superpixel's
:math:`\phi_{j,k}`. The ``K`` targets share the samples (one forward serves every target).

* ``lime`` — Ribeiro, Singh & Guestrin, "Why Should I Trust You?": Explaining the Predictions of
  Any Classifier, KDD 2016. The first sample is :math:`z = \mathbf 1`, the others draw every
  :math:`z_j` from Bernoulli(1/2). Weights :math:`\pi(z) = \exp(-d(z)^2 / 2\sigma^2)` with
  :math:`d` the cosine distance between :math:`z` and :math:`\mathbf 1`,
  :math:`d(z) = 1 - \sqrt{|z|/S}` (:math:`d(\mathbf 0) = 1`), :math:`\sigma` = ``kernel_width``
  (0.25, the ``lime`` package's images default). The fit is the weighted ridge regression

  .. math:: \min_{\phi_0, \phi} \sum_z \pi(z) (f(z) - \phi_0 - z^\top\phi)^2 + \alpha\,\|\phi\|^2

  (intercept not penalised; ``alpha=1`` as in ``lime``), solved in closed form after centring on
  the weighted means: :math:`\phi = (Z_c^\top \Pi Z_c + \alpha I)^{-1} Z_c^\top \Pi y_c`.
* ``kernelshap`` — Lundberg & Lee, "A Unified Approach to Interpreting Model Predictions",
  NeurIPS 2017. The Shapley kernel :math:`\pi(z) = (S - 1) / (\binom{S}{|z|}\,|z|\,(S - |z|))`
  weights the coalitions; it is infinite at :math:`z = \mathbf 0` and :math:`z = \mathbf 1`,
  whose two equations are enforced exactly as constraints: :math:`\phi_0 = f(\mathbf 0)` and
  :math:`\sum_j \phi_j = f(\mathbf 1) - f(\mathbf 0)` (the last :math:`\phi_S` is eliminated and
  the rest found by weighted least squares, no regularisation). When ``n_samples`` covers all
  :math:`2^S - 2` other coalitions they are enumerated with their exact kernel weights, and the
  result is the exact Shapley values of the superpixel game; otherwise ``n_samples - 2``
  coalitions are drawn from the kernel (a size :math:`k` with probability
  :math:`\propto (S-1)/(k(S-k))`, then a uniform subset of that size) and weighted 1.

``extras``: ``segments`` (``(N, H, W)`` labels ``0..S_n-1``), ``segment_weights`` (one ``(K, S_n)``
tensor per image), ``intercept`` (``(N, K)``: :math:`\phi_0`), ``r2`` (``(N, K)``: the weighted
:math:`R^2` of the fit on its samples), ``forwards``. Samples are drawn from a ``torch.Generator``
seeded with ``seed``, afresh for every image: an image's samples depend on its superpixels only,
not on ``batch_size`` nor on the other images of the batch (explained alone or in a batch, an image
gets the same map).
Captum's ``Lime`` (given ``SkLearnRidge(alpha=1)`` and this kernel over the binary vectors; its
defaults are a Lasso and a kernel over the perturbed images) and ``KernelShap`` give the same
numbers on the same coalitions (``tests/attribution/test_surrogate.py``, to 1e-4). Captum's ``KernelShap``
enforces the two constraints by a weight of :math:`10^6` (not exactly) and solves in float32: its
rounding then reaches ~1e-3 of the largest weight; with ``inf_weight = 1e5`` it agrees to ~1e-5.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import torch

from camlens.attribution.perturbation import _bar, _batch_size, _check_weighting, _class_scores
from camlens.attribution.registry import MethodOutput, register
from camlens.base._util import gaussian_blur
from camlens.base.errors import MethodError
from camlens.core.extra import rows as image_rows

ALGORITHMS = ("slic", "quickshift", "felzenszwalb")
#: scikit-image parameters per algorithm (``segment_options=`` overrides them); quickshift's are
#: the ``lime`` package's
DEFAULTS: dict[str, dict[str, Any]] = {
    "slic": {"n_segments": 50, "compactness": 10.0, "start_label": 0},
    "quickshift": {"kernel_size": 4, "max_dist": 200, "ratio": 0.2},
    "felzenszwalb": {"scale": 100.0, "sigma": 0.5, "min_size": 50},
}


# ---------------------------------------------------------------------------------------------
def _to_rgb01(img: torch.Tensor) -> np.ndarray:
    """``(C, H, W)`` preprocessed image -> ``(H, W, C)`` float64 in [0, 1], each channel stretched
    by its own min and max (undoes a per-channel mean/std normalisation up to contrast)."""
    a = img.detach().double().cpu()
    lo = a.amin(dim=(1, 2), keepdim=True)
    hi = a.amax(dim=(1, 2), keepdim=True)
    return ((a - lo) / (hi - lo).clamp_min(1e-12)).permute(1, 2, 0).numpy()


def _run_algorithm(name: str, img: np.ndarray, options: dict[str, Any]) -> np.ndarray:
    from skimage import segmentation  # a dependency; imported here so that importing methods stays light

    rgb = img.shape[-1] == 3
    kw = {**DEFAULTS[name], **options}
    if name == "slic":
        return segmentation.slic(img, channel_axis=-1, convert2lab=rgb, **kw)
    if name == "quickshift":
        if not rgb:
            kw.setdefault("convert2lab", False)
        return segmentation.quickshift(img, channel_axis=-1, **kw)
    return segmentation.felzenszwalb(img, channel_axis=-1, **kw)


def _relabel(lab: torch.Tensor) -> tuple[torch.Tensor, int]:
    uniq, inv = torch.unique(lab, return_inverse=True)
    return inv.long(), int(uniq.numel())


def superpixels(x: torch.Tensor, segments: Any = "slic", options: dict[str, Any] | None = None) -> list[torch.Tensor]:
    """One ``(H, W)`` long label map per image of ``x`` ``(N, C, H, W)``, labels ``0 .. S_n - 1``.

    ``segments``: a scikit-image algorithm name (run on each image stretched to [0, 1] per channel,
    with :data:`DEFAULTS` updated by ``options``), or integer labels ``(H, W)`` (every image) or
    ``(N, H, W)`` (a tensor or an array; any integer values, renumbered in increasing order)."""
    N, _, H, W = x.shape
    if isinstance(segments, str):
        name = segments.strip().lower()
        if name not in ALGORITHMS:
            raise MethodError(
                f"unknown segmentation {segments!r}: use one of {', '.join(ALGORITHMS)}, or pass your own integer "
                "label map of shape (H, W) or (N, H, W)"
            )
        try:
            labs = [
                torch.from_numpy(np.asarray(_run_algorithm(name, _to_rgb01(x[n]), options or {}))) for n in range(N)
            ]
        except TypeError as exc:
            raise MethodError(f"segment_options {options!r} do not suit skimage's {name}: {exc}") from exc
        return [_relabel(lab.to(x.device))[0] for lab in labs]
    lab = torch.as_tensor(np.asarray(segments) if not isinstance(segments, torch.Tensor) else segments)
    if lab.is_floating_point() or lab.dtype == torch.bool or lab.is_complex():
        raise MethodError(f"segments must hold integer labels, not {lab.dtype}: convert with .astype(int)")
    if lab.dim() == 2:
        lab = lab.expand(N, -1, -1)
    if lab.dim() != 3 or tuple(lab.shape) != (N, H, W):
        raise MethodError(
            f"segments of shape {tuple(lab.shape)} do not fit the input {tuple(x.shape)}: give one label map of "
            f"shape ({H}, {W}) for every image or ({N}, {H}, {W}), at the input's (preprocessed) resolution"
        )
    return [_relabel(lab[n].to(x.device))[0] for n in range(N)]


def _baseline(x: torch.Tensor, seg: list[torch.Tensor], baseline: Any) -> torch.Tensor:
    """The replacement ``b`` ``(N, C, H, W)`` for switched-off superpixels."""
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    if baseline == "blur":
        return gaussian_blur(x, max(x.shape[-2:]) / 20)
    if baseline == "mean":
        out = torch.empty_like(x)
        for n, s in enumerate(seg):
            S = int(s.max()) + 1
            flat = x[n].flatten(1)  # (C, HW)
            sums = torch.zeros(x.shape[1], S, dtype=x.dtype, device=x.device).index_add_(1, s.flatten(), flat)
            cnt = torch.bincount(s.flatten(), minlength=S).to(x.dtype)
            out[n] = (sums / cnt)[:, s]
        return out
    raise MethodError(f"baseline must be 'blur', 'mean' or a number, not {baseline!r}")


# ---------------------------------------------------------------------------------------------
def lime_samples(n_features: int, n_samples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """LIME's coalitions ``(n_samples, S)`` (the first all ones, then Bernoulli(1/2)) and an empty
    weight placeholder (LIME weighs them by the kernel afterwards)."""
    z = (torch.rand(n_samples, n_features, generator=generator) < 0.5).double()
    z[0] = 1
    return z, torch.ones(n_samples, dtype=torch.float64)


def lime_kernel(z: torch.Tensor, kernel_width: float) -> torch.Tensor:
    r""":math:`\exp(-d^2/2\sigma^2)`, :math:`d = 1 - \cos(z, \mathbf 1) = 1 - \sqrt{|z|/S}` (1 for ``z = 0``)."""
    d = 1 - torch.sqrt(z.sum(1) / z.shape[1])
    return torch.exp(-(d**2) / (2 * kernel_width**2))


def shapley_kernel(S: int, k: torch.Tensor) -> torch.Tensor:
    r""":math:`(S-1) / (\binom{S}{k} k (S-k))` for coalition sizes ``0 < k < S``."""
    kd = k.double()
    log_binom = math.lgamma(S + 1) - torch.lgamma(kd + 1) - torch.lgamma(S - kd + 1)
    return (S - 1) / (torch.exp(log_binom) * kd * (S - kd))


def kernelshap_samples(S: int, n_samples: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """KernelSHAP's coalitions ``(M, S)``: ``1``, ``0``, then every other coalition with its exact
    kernel weight when ``n_samples >= 2**S``, else ``n_samples - 2`` drawn from the kernel
    (weight 1). Returns the coalitions and the weights (those of ``1`` and ``0`` unused)."""
    ends = torch.stack([torch.ones(S), torch.zeros(S)]).double()
    if S <= 30 and n_samples >= 2**S:
        rows = [torch.zeros(S, dtype=torch.float64) for _ in range(2**S - 2)]
        i = 0
        for k in range(1, S):
            for c in combinations(range(S), k):
                rows[i][list(c)] = 1
                i += 1
        z = torch.stack(rows) if rows else torch.zeros(0, S, dtype=torch.float64)
        w = shapley_kernel(S, z.sum(1)) if rows else torch.zeros(0, dtype=torch.float64)
        return torch.cat([ends, z]), torch.cat([torch.ones(2, dtype=torch.float64), w / w.sum().clamp_min(1e-300)])
    m = n_samples - 2
    if S == 1 or m <= 0:
        return ends, torch.ones(2, dtype=torch.float64)
    sizes = torch.arange(1, S, dtype=torch.float64)
    p = (S - 1) / (sizes * (S - sizes))
    size = torch.multinomial(p / p.sum(), m, replacement=True, generator=generator) + 1  # (m,)
    order = torch.rand(m, S, generator=generator).argsort(dim=1)  # a uniform permutation per row
    z = (order < size[:, None]).double()  # the first k positions of the permutation switched on
    return torch.cat([ends, z]), torch.ones(m + 2, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
@dataclass
class Fit:
    """A surrogate's ``coef`` ``(S, K)``, ``intercept`` ``(K,)`` and weighted ``r2`` ``(K,)``."""

    coef: torch.Tensor
    intercept: torch.Tensor
    r2: torch.Tensor


def weighted_r2(y: torch.Tensor, pred: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted :math:`R^2 = 1 - \\sum w (y - \\hat y)^2 / \\sum w (y - \\bar y_w)^2` per column
    (1 when ``y`` is constant and fitted)."""
    ybar = (w[:, None] * y).sum(0) / w.sum()
    res = (w[:, None] * (y - pred) ** 2).sum(0)
    tot = (w[:, None] * (y - ybar) ** 2).sum(0)
    tiny = 1e-12 * (1 + (w[:, None] * y**2).sum(0))
    return torch.where(tot > tiny, 1 - res / tot.clamp_min(1e-300), torch.where(res <= tiny, 1.0, 0.0))


def ridge_fit(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, alpha: float) -> Fit:
    """Weighted ridge with an unpenalised intercept (float64 closed form; ``alpha=0``: least squares)."""
    sw = w.sum()
    zbar = (w[:, None] * z).sum(0) / sw
    ybar = (w[:, None] * y).sum(0) / sw
    zc, yc = z - zbar, y - ybar
    a = zc.T @ (w[:, None] * zc) + alpha * torch.eye(z.shape[1], dtype=z.dtype)
    coef = (
        torch.linalg.lstsq(a, zc.T @ (w[:, None] * yc)).solution
        if alpha == 0
        else torch.linalg.solve(a, zc.T @ (w[:, None] * yc))
    )
    intercept = ybar - zbar @ coef
    return Fit(coef, intercept, weighted_r2(y, z @ coef + intercept, w))


def kernelshap_fit(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> Fit:
    """Rows 0 and 1 of ``z`` are ``1`` and ``0``: :math:`\\phi_0 = f(0)`, :math:`\\sum\\phi = f(1) - f(0)`
    exactly; the other rows are fitted by weighted least squares with :math:`\\phi_S` eliminated."""
    f1, f0 = y[0], y[1]
    zs, ys, ws = z[2:], y[2:], w[2:]
    S = z.shape[1]
    if S == 1 or zs.shape[0] == 0:  # no other coalition: the constraint shared equally
        coef = ((f1 - f0) / S)[None].repeat(S, 1)
        return Fit(coef, f0.clone(), torch.ones_like(f0))
    a = zs[:, :-1] - zs[:, -1:]  # y - f0 - z_S (f1 - f0) = sum_{j<S} phi_j (z_j - z_S)
    b = ys - f0 - zs[:, -1:] * (f1 - f0)
    sq = ws.sqrt()[:, None]
    head = torch.linalg.lstsq(sq * a, sq * b).solution  # (S-1, K)
    coef = torch.cat([head, (f1 - f0 - head.sum(0))[None]])
    return Fit(coef, f0.clone(), weighted_r2(ys, f0 + zs @ coef, ws))


# ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What to forward for one call: the input, its baseline, the label maps and the coalitions."""

    x: torch.Tensor
    base: torch.Tensor
    seg: list[torch.Tensor]
    z: list[torch.Tensor]
    batch_size: int | None
    weighting: str
    progress: bool | None
    desc: str


def _forward_samples(ctx: Any, plan: Plan) -> list[torch.Tensor]:
    """``(M_n, K)`` float64 target scores of every coalition of every image, batched across images."""
    x, base = plan.x, plan.base
    jobs = [(n, i) for n in range(len(plan.z)) for i in range(plan.z[n].shape[0])]
    out = [torch.empty(z.shape[0], ctx.k, dtype=torch.float64) for z in plan.z]
    bs = _batch_size(plan.batch_size, x)
    zdev = [z.to(device=x.device, dtype=x.dtype) for z in plan.z]
    bar = _bar(len(jobs), plan.desc, plan.progress)
    try:
        with torch.inference_mode():
            for start in range(0, len(jobs), bs):
                chunk = jobs[start : start + bs]
                rows = [n for n, _ in chunk]
                m = torch.stack([zdev[n][i][plan.seg[n]] for n, i in chunk])[:, None]  # (B, 1, H, W)
                imgs = x[rows] * m + base[rows] * (1 - m)
                with image_rows(rows):
                    raw = ctx.model(imgs)
                s = _class_scores(ctx, raw, rows, plan.weighting).double().cpu()
                for r, (n, i) in enumerate(chunk):
                    out[n][i] = s[r]
                bar.update(len(chunk))
    finally:
        bar.close()
    return out


def _output(fits: list[Fit], seg: list[torch.Tensor], forwards: int, device: torch.device) -> MethodOutput:
    maps = torch.stack([f.coef.T.float().to(device)[:, s] for f, s in zip(fits, seg)])  # (N, K, H, W)
    extras = {
        "segments": torch.stack(seg).cpu(),
        "segment_weights": [f.coef.T.float() for f in fits],
        "intercept": torch.stack([f.intercept.float() for f in fits]),
        "r2": torch.stack([f.r2.float() for f in fits]),
        "forwards": forwards,
        "signed": True,
    }
    return MethodOutput(maps, maps=maps, extras=extras)


def _prepare(ctx: Any, segments: Any, segment_options: dict[str, Any] | None, baseline: Any, n_samples: int, desc: str):
    x = ctx.x.detach() if isinstance(ctx.x, torch.Tensor) else None
    if x is None:
        raise MethodError(f"{desc} needs a batch of images of one size")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise MethodError(f"n_samples must be an integer >= 1, not {n_samples!r}")
    seg = superpixels(x, segments, segment_options)
    one = [n for n, s in enumerate(seg) if int(s.max()) == 0]
    if one:  # e.g. slic on noise: the map would be one constant
        warnings.warn(
            f"{desc}: image(s) {one[:8]} have a single superpixel, so their map is constant; pass "
            "segment_options (e.g. {'n_segments': 100, 'compactness': 1}) or your own label map as segments=",
            RuntimeWarning,
            stacklevel=3,
        )
    return x, seg, _baseline(x, seg, baseline)


@register(
    "lime",
    paper="Ribeiro et al., Why Should I Trust You? (LIME), KDD 2016",
    summary="weighted ridge surrogate on superpixels: each superpixel's weight (black-box)",
    kind="pixel",
    needs=(),
    blackbox=True,
    title="LIME",
)
def lime(
    ctx,
    *,
    segments: Any = "slic",
    segment_options: dict[str, Any] | None = None,
    baseline: Any = "blur",
    n_samples: int = 1000,
    kernel_width: float = 0.25,
    alpha: float = 1.0,
    seed: int = 0,
    batch_size: int | None = None,
    weighting: str = "prob",
    progress: bool | None = None,
) -> MethodOutput:
    _check_weighting(weighting)
    if not kernel_width > 0 or not alpha >= 0:
        raise MethodError(f"kernel_width must be > 0 and alpha >= 0 (got {kernel_width}, {alpha})")
    x, seg, base = _prepare(ctx, segments, segment_options, baseline, n_samples, "lime")
    zs = [lime_samples(int(s.max()) + 1, n_samples, torch.Generator().manual_seed(seed))[0] for s in seg]
    ys = _forward_samples(ctx, Plan(x, base, seg, zs, batch_size, weighting, progress, "lime"))
    fits = [ridge_fit(z, y, lime_kernel(z, kernel_width), alpha) for z, y in zip(zs, ys)]
    return _output(fits, seg, sum(z.shape[0] for z in zs), x.device)


@register(
    "kernelshap",
    paper="Lundberg & Lee, A Unified Approach to Interpreting Model Predictions (SHAP), NeurIPS 2017",
    summary="Shapley values of superpixels by Shapley-kernel regression (black-box)",
    kind="pixel",
    needs=(),
    blackbox=True,
    title="KernelSHAP",
    aliases=("kernel_shap", "shap"),
)
def kernelshap(
    ctx,
    *,
    segments: Any = "slic",
    segment_options: dict[str, Any] | None = None,
    baseline: Any = "blur",
    n_samples: int = 1000,
    seed: int = 0,
    batch_size: int | None = None,
    weighting: str = "prob",
    progress: bool | None = None,
) -> MethodOutput:
    _check_weighting(weighting)
    x, seg, base = _prepare(ctx, segments, segment_options, baseline, n_samples, "kernelshap")
    drawn = [kernelshap_samples(int(s.max()) + 1, n_samples, torch.Generator().manual_seed(seed)) for s in seg]
    zs = [z for z, _ in drawn]
    ys = _forward_samples(ctx, Plan(x, base, seg, zs, batch_size, weighting, progress, "kernelshap"))
    fits = [kernelshap_fit(z, y, w) for (z, w), y in zip(drawn, ys)]
    return _output(fits, seg, sum(z.shape[0] for z in zs), x.device)
