r"""Pixel attributions from input gradients: saliency, input × gradient, SmoothGrad, Integrated Gradients.

For an input :math:`x` ``(C, H, W)`` and a target score :math:`f_c` (a logit, or a callable target):

* ``saliency`` — Simonyan, Vedaldi & Zisserman, "Deep Inside Convolutional Networks", ICLRW 2014:
  :math:`A = \partial f_c / \partial x`.
* ``input_x_gradient`` — Shrikumar et al., "Not Just a Black Box", arXiv 1605.01713, 2016:
  :math:`A = x \odot \partial f_c / \partial x` (in the preprocessed input space).
* ``smoothgrad`` — Smilkov et al., "SmoothGrad: removing noise by adding noise", ICMLW 2017:
  :math:`\hat A(x) = \frac1n \sum_{j=1}^n A(x + \epsilon_j)`, :math:`\epsilon_j \sim \mathcal N(0, \sigma^2)`,
  :math:`\sigma = \text{noise\_level}\cdot(\max x - \min x)` per image (over all channels of the
  preprocessed input). ``base=`` picks the wrapped method :math:`A`: ``saliency`` (default),
  ``deconvnet``, ``guided_backprop``, ``input_x_gradient`` (:math:`(x+\epsilon)\odot\nabla f(x+\epsilon)`)
  or ``integrated_gradients`` (each noisy copy integrated from the baseline).
  ``batch_size`` noisy images run per forward, across images (default: 8 on the CPU, 64 on an
  accelerator, :func:`camlens.base.defaults.method_batch`); with ``base="integrated_gradients"``,
  ``extras["completeness_error"]`` is the mean over the noisy copies. The noise of sample :math:`j` is drawn
  from a generator seeded with ``(seed, j)`` (one ``(C, H, W)`` draw shared by all images, scaled by
  each image's :math:`\sigma`; drawn on the CPU), so an image's result does not depend on the rest
  of the batch and is reproducible across devices; ``seed=None`` draws a fresh seed.
* ``integrated_gradients`` — Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep Networks",
  ICML 2017: :math:`A = (x - x') \odot \int_0^1 \nabla f_c(x' + \alpha (x - x'))\,d\alpha`, with the
  integral by ``quadrature="gauss_legendre"`` (default; ``steps`` Gauss–Legendre nodes on [0, 1],
  exact for polynomials of degree ``2·steps−1``) or ``"trapezoid"`` (``steps`` equally spaced
  points including both ends). ``steps·N`` path points run ``batch_size`` per forward (default as
  SmoothGrad's).
  Baselines :math:`x'`: ``None``/``"zeros"`` (zeros *in the preprocessed space*: the dataset
  mean colour for mean/std normalization), a float (constant), ``"blur"`` (the input blurred by a
  Gaussian of :math:`\sigma = \max(H, W)/20` pixels, after Sturmfels et al., Distill 2020), or a
  tensor broadcastable to the input ``(N, C, H, W)``. Completeness
  :math:`\sum_i A_i = f_c(x) - f_c(x')` holds up to the quadrature error, reported as
  ``extras["completeness_error"]`` (``(N, K)``: :math:`\sum A - (f(x) - f(x'))`) and
  ``extras["relative_completeness_error"]`` (divided by :math:`|f(x) - f(x')|`). For a ReLU
  network the integrand is piecewise constant along the path (a jump at every ReLU/ReLU6 kink),
  so no rule converges smoothly; Gauss–Legendre gave about a quarter of the trapezoid rule's
  error on EfficientNet-Lite0 (BENCHMARKS.md, "Measurements behind defaults"), hence the default.
  Check the reported error and raise ``steps`` if needed (the paper: "between 20 and 300 steps", within 5 %).

**Output.** ``raw`` is the input-shaped attribution ``(N, K, C, H, W)``; ``maps`` ``(N, K, H, W)``
reduces the channels by ``reduce=``: ``"absmax"`` :math:`\max_c |A_c|` (Simonyan et al.; the
default for gradient-like methods), ``"sum"`` :math:`\sum_c A_c` (the default for
``input_x_gradient`` and ``integrated_gradients``, so that the map still sums to the attribution
total), ``"abssum"`` :math:`\sum_c |A_c|`, ``"l2"`` :math:`\sqrt{\sum_c A_c^2}`, ``"max"``
:math:`\max_c A_c`.

Gradients flow to the input only (``torch.autograd.grad``), never into parameters' ``.grad``.

Volumes and clips ``(N, C, D, H, W)`` work the same way (``raw`` ``(N, K, C, D, H, W)``, maps
``(N, K, D, H, W)``); only the ``"blur"`` baseline is for images.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from camlens.attribution.registry import Cost, MethodOutput, get_method, register
from camlens.base._util import gaussian_blur
from camlens.base.defaults import method_batch
from camlens.base.errors import MethodError
from camlens.core.engine import ForwardPass, gradient_pass, model_input
from camlens.core.extra import rows
from camlens.targets import Targets, take_rows

REDUCTIONS = ("absmax", "abssum", "sum", "l2", "max")
QUADRATURES = ("gauss_legendre", "trapezoid")
#: The pixel methods SmoothGrad can wrap -> the ReLU rule of their gradient.
SMOOTHABLE = {
    "saliency": "backprop",
    "deconvnet": "deconvnet",
    "guided_backprop": "guided",
    "input_x_gradient": "backprop",
    "integrated_gradients": "backprop",
}
SIGNED_REDUCTIONS = ("sum", "max")
DEFAULT_REDUCE = {"input_x_gradient": "sum", "integrated_gradients": "sum"}


def reduce_channels(a: torch.Tensor, how: str = "absmax") -> torch.Tensor:
    """Reduce ``(N, K, C, H, W)`` attributions to ``(N, K, H, W)`` maps (see the module docstring);
    volumes' ``(N, K, C, D, H, W)`` to ``(N, K, D, H, W)``."""
    if how == "absmax":
        return a.abs().amax(dim=2)
    if how == "abssum":
        return a.abs().sum(dim=2)
    if how == "sum":
        return a.sum(dim=2)
    if how == "l2":
        return a.pow(2).sum(dim=2).sqrt()
    if how == "max":
        return a.amax(dim=2)
    raise MethodError(f"reduce must be one of {', '.join(REDUCTIONS)}, not {how!r}")


def pixel_output(
    raw: torch.Tensor, reduce: str | None, method: str, extras: dict[str, Any] | None = None
) -> MethodOutput:
    """``MethodOutput`` with ``maps`` reduced from ``raw`` by ``reduce`` (or the method's default)."""
    how = reduce if reduce is not None else DEFAULT_REDUCE.get(method, "absmax")
    # "sum" and "max" keep the sign (input x gradient, Integrated Gradients); |.| reductions do not
    flags = {"signed": how in SIGNED_REDUCTIONS}
    return MethodOutput(raw, reduce_channels(raw, how).float(), {**(extras or {}), **flags})


def require_relus(relu_calls: int, method: str, model: torch.nn.Module) -> None:
    """Raise when a ReLU-rule method ran on a forward pass where no ReLU call was seen."""
    if relu_calls != 0:
        return
    acts = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if type(m).__module__ == "torch.nn.modules.activation" or "swish" in type(m).__name__.lower()
        }
    )
    seen = f" (activation modules found: {', '.join(acts)})" if acts else ""
    raise MethodError(
        f"{method} changes how ReLUs back-propagate, but no ReLU ran in this model's forward pass{seen}: "
        "the result would silently equal the plain gradient. camlens intercepts nn.ReLU, F.relu, torch.relu, "
        "relu_, ReLU6/relu6 and hardtanh(0, u); for other activations use method='saliency', "
        "'integrated_gradients' or 'smoothgrad'."
    )


def _check_positive(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise MethodError(f"{name} must be an integer >= {minimum}, not {value!r}")
    return int(value)


def _chunks(n_images: int, n_per_image: int, batch_size: int):
    """Rows ``r = j * N + n`` (sample/step-major) in chunks: yields ``(image ids, sample ids)``."""
    total = n_images * n_per_image
    for start in range(0, total, batch_size):
        r = torch.arange(start, min(start + batch_size, total))
        yield r % n_images, r // n_images


def _row_targets(ctx: ForwardPass, n: torch.Tensor) -> Targets:
    obj = ctx.targets.obj
    return Targets(ctx.targets.classes[n], ctx.targets.fn, None if obj is None else take_rows(obj, n.tolist()))


# ---------------------------------------------------------------------------------------------
@register(
    "saliency",
    paper="Simonyan et al., Deep Inside Convolutional Networks, ICLR Workshops 2014",
    summary="gradient of the class score w.r.t. the input pixels",
    kind="pixel",
    needs=("input_grads",),
    title="Saliency",
    aliases=("vanilla", "gradient"),
    volumes=True,
)
def saliency(ctx: ForwardPass, *, reduce: str | None = None) -> MethodOutput:
    return pixel_output(ctx.input_grads("backprop"), reduce, "saliency")


@register(
    "input_x_gradient",
    paper="Shrikumar et al., Not Just a Black Box, arXiv 1605.01713, 2016",
    summary="input times its gradient (first-order Taylor contribution of each pixel)",
    kind="pixel",
    needs=("input_grads",),
    title="Input x Gradient",
    volumes=True,
)
def input_x_gradient(ctx: ForwardPass, *, reduce: str | None = None) -> MethodOutput:
    raw = ctx.x.detach()[:, None] * ctx.input_grads("backprop")
    return pixel_output(raw, reduce, "input_x_gradient")


# ---------------------------------------------------------------------------------------------
def _noise(seed: int, j: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise of sample ``j``: drawn on the CPU in float64 from a generator seeded
    with ``(seed, j)``, so that it is the same on every device and dtype."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + j) % (2**63 - 1))
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=like.device, dtype=like.dtype)


def smoothgrad_cost(ctx, *, base: str = "saliency", n_samples: int = 50, steps: int = 128, **_) -> Cost:
    """``n_samples`` noisy copies of each image, each a forward and a backward (with an Integrated
    Gradients base: its path points and two scoring forwards per copy)."""
    N, S = len(ctx.x), _check_positive("n_samples", n_samples)
    if get_method(base).name == "integrated_gradients":
        points = N * _check_positive("steps", steps)
        return Cost(S * (points + 2 * N), "forwards", backwards=S * points)
    return Cost(N * S, "noisy forwards", backwards=N * S)


def ig_cost(ctx, *, steps: int = 128, **_) -> Cost:
    """``steps`` path points per image (a forward and a backward each) and the baseline's forward."""
    N = len(ctx.x)
    points = N * _check_positive("steps", steps)
    return Cost(points + N, "forwards", backwards=points)


@register(
    "smoothgrad",
    paper="Smilkov et al., SmoothGrad: removing noise by adding noise, ICML Workshops 2017",
    summary="a pixel method averaged over noisy copies of the input",
    kind="pixel",
    needs=(),
    title="SmoothGrad",
    cost=smoothgrad_cost,
    volumes=True,
)
def smoothgrad(
    ctx: ForwardPass,
    *,
    base: str = "saliency",
    n_samples: int = 50,
    noise_level: float = 0.15,
    batch_size: int | None = None,
    seed: int | None = 0,
    steps: int = 128,
    baseline: Any = None,
    quadrature: str = "gauss_legendre",
    reduce: str | None = None,
) -> MethodOutput:
    base_name = get_method(base).name
    if base_name not in SMOOTHABLE:
        raise MethodError(f"smoothgrad cannot wrap {base!r}; base must be one of {', '.join(SMOOTHABLE)}")
    S = _check_positive("n_samples", n_samples)
    bs = method_batch(ctx.x.device.type) if batch_size is None else _check_positive("batch_size", batch_size)
    if not (isinstance(noise_level, (int, float)) and math.isfinite(noise_level) and noise_level >= 0):
        raise MethodError(f"noise_level must be a finite fraction >= 0 of the input range, not {noise_level!r}")
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    x = ctx.x.detach()
    N = x.shape[0]
    sigma = noise_level * (x.flatten(1).amax(1) - x.flatten(1).amin(1))  # (N,)
    col = (-1, *(1,) * (x.dim() - 1))  # sigma per row, broadcast over (C, *spatial)
    total = torch.zeros((N, ctx.k, *x.shape[1:]), dtype=x.dtype, device=x.device)
    extras: dict[str, Any] = {"base": base_name, "n_samples": S, "noise_sigma": sigma.cpu(), "seed": seed}
    if base_name == "integrated_gradients":
        errs = []
        for j in range(S):
            xj = x + sigma.view(col) * _noise(seed, j, tuple(x.shape[1:]), x)
            a, ex = _integrated(ctx, xj, baseline, steps, quadrature, bs)
            total += a
            errs.append(ex["completeness_error"])
        extras["completeness_error"] = torch.stack(errs).mean(0)
    else:
        rule = SMOOTHABLE[base_name]
        for n, j in _chunks(N, S, bs):
            draws = {jj: _noise(seed, jj, tuple(x.shape[1:]), x) for jj in j.unique().tolist()}
            eps = torch.stack([draws[jj] for jj in j.tolist()])
            nd = n.to(x.device)
            xb = x[nd] + sigma[nd].view(col) * eps
            with rows(n):  # the noisy copies of images n (their extra inputs: unchanged)
                gp = gradient_pass(ctx.model, xb, _row_targets(ctx, n), rule, select=ctx.select)
            if rule != "backprop":
                require_relus(gp.relu_calls, f"smoothgrad(base={base_name!r})", ctx.model)
            a = gp.grads * xb[:, None] if base_name == "input_x_gradient" else gp.grads
            total.index_add_(0, nd, a)
    return pixel_output(total / S, reduce, base_name, extras)


# ---------------------------------------------------------------------------------------------
def quadrature_rule(name: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``alpha`` in [0, 1] and weights (summing to 1) of the path integral's quadrature."""
    steps = _check_positive("steps", steps)
    if name == "gauss_legendre":
        t, w = np.polynomial.legendre.leggauss(steps)
        return (t + 1) / 2, w / 2
    if name == "trapezoid":
        if steps < 2:
            raise MethodError("the trapezoid rule needs steps >= 2")
        w = np.full(steps, 1.0 / (steps - 1))
        w[[0, -1]] /= 2
        return np.linspace(0.0, 1.0, steps), w
    raise MethodError(f"quadrature must be one of {', '.join(QUADRATURES)}, not {name!r}")


def resolve_baseline(baseline: Any, x: torch.Tensor) -> torch.Tensor:
    """The Integrated Gradients baseline ``(N, C, H, W)`` for ``x`` (see the module docstring)."""
    if baseline is None or (isinstance(baseline, str) and baseline == "zeros"):
        return torch.zeros_like(x)
    if isinstance(baseline, str):
        if baseline == "blur":
            if x.dim() != 4:
                raise MethodError(
                    "baseline='blur' blurs images (N, C, H, W); for volumes and clips give a float (e.g. 0.0, the "
                    "background intensity) or a baseline tensor of the input's shape"
                )
            return gaussian_blur(x, max(x.shape[-2:]) / 20)
        raise MethodError(f"baseline must be None, 'zeros', 'blur', a float or a tensor, not {baseline!r}")
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    if isinstance(baseline, (torch.Tensor, np.ndarray)):
        b = torch.as_tensor(baseline).to(device=x.device, dtype=x.dtype)
        try:
            return torch.broadcast_to(b, x.shape).clone()
        except RuntimeError:
            raise MethodError(
                f"baseline of shape {tuple(b.shape)} does not broadcast to the input {tuple(x.shape)}; "
                "give (C, H, W), (1, C, H, W) or (N, C, H, W)"
            ) from None
    raise MethodError(f"baseline must be None, 'zeros', 'blur', a float or a tensor, not {type(baseline).__name__}")


def _integrated(
    ctx, x: torch.Tensor, baseline: Any, steps: int, quadrature: str, batch_size: int, f_x: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """IG of the batch ``x`` (one row per image of ``ctx``) -> attributions and completeness
    (``f_x``: the target scores of ``x`` when already known)."""
    alphas, weights = quadrature_rule(quadrature, steps)
    xb0 = resolve_baseline(baseline, x)
    if not torch.isfinite(xb0).all():
        raise MethodError("the baseline contains NaN or infinite values")
    alpha = torch.as_tensor(alphas, dtype=x.dtype, device=x.device)
    weight = torch.as_tensor(weights, dtype=x.dtype, device=x.device)
    N = x.shape[0]
    diff = x - xb0
    total = torch.zeros((N, ctx.k, *x.shape[1:]), dtype=x.dtype, device=x.device)
    ones = (1,) * (x.dim() - 1)  # broadcast over (C, *spatial)
    for n, j in _chunks(N, len(alphas), batch_size):
        nd, jd = n.to(x.device), j.to(x.device)
        pts = xb0[nd] + alpha[jd].view(-1, *ones) * diff[nd]
        with rows(n):  # path points of images n: the image is interpolated, its extra inputs are not
            gp = gradient_pass(ctx.model, pts, _row_targets(ctx, n), select=ctx.select)
        total.index_add_(0, nd, gp.grads * weight[jd].view(-1, 1, *ones))
    attr = total * diff[:, None]
    with torch.no_grad():
        f_base = ctx.targets.scores(ctx.select(ctx.model(model_input(xb0)))).detach()
        if f_x is None:
            f_x = ctx.targets.scores(ctx.select(ctx.model(model_input(x)))).detach()
    delta = f_x - f_base
    err = attr.flatten(2).sum(-1) - delta
    rel = err.abs() / delta.abs().clamp_min(1e-12)
    return attr, {
        "completeness_error": err,
        "relative_completeness_error": rel,
        "baseline_scores": f_base,
        "steps": len(alphas),
        "quadrature": quadrature,
    }


@register(
    "integrated_gradients",
    paper="Sundararajan et al., Axiomatic Attribution for Deep Networks, ICML 2017",
    summary="gradients integrated along the straight path from a baseline (completeness)",
    kind="pixel",
    needs=(),
    title="Integrated Gradients",
    aliases=("ig",),
    cost=ig_cost,
    volumes=True,
)
def integrated_gradients(
    ctx: ForwardPass,
    *,
    baseline: Any = None,
    steps: int = 128,
    quadrature: str = "gauss_legendre",
    batch_size: int | None = None,
    reduce: str | None = None,
) -> MethodOutput:
    bs = method_batch(ctx.x.device.type) if batch_size is None else _check_positive("batch_size", batch_size)
    attr, extras = _integrated(ctx, ctx.x.detach(), baseline, steps, quadrature, bs, ctx.scores.detach())
    return pixel_output(attr, reduce, "integrated_gradients", extras)
