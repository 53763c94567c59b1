r"""FullGrad — Srinivas & Fleuret, "Full-Gradient Representation for Neural Network Visualization",
NeurIPS 2019 (arXiv 1905.00780).

**The full-gradient decomposition.** For a network :math:`f` built from affine layers with biases
:math:`b_l` and piecewise-linear activations (ReLU, max-pooling; BatchNorm in eval mode is affine),

.. math:: f(x) = \nabla_x f(x)^\top x + \sum_l \nabla_{b_l} f(x)^\top b_l

where the bias-gradient of a layer whose output is :math:`z_l = W_l * a + b_l` (the bias broadcast over
the spatial positions) is, position by position, :math:`f^b_l(x) = \nabla_{z_l} f(x) \odot b_l`. A
BatchNorm layer in eval mode computes :math:`\gamma\,(a - \mu)/\sqrt{\sigma^2 + \epsilon} + \beta`:
its effective bias is :math:`\beta - \gamma\mu/\sqrt{\sigma^2 + \epsilon}`. ``extras`` report the two
parts (``input_part``, ``bias_part``, ``(N, K)``) and ``completeness_error``
:math:`= \text{input\_part} + \text{bias\_part} - f(x)`: zero (to rounding) for such networks,
not for others (a smooth activation such as SiLU, LayerNorm/GroupNorm, attention; a saturated ReLU6
outputs the constant 6, a bias no layer declares: EfficientNet-Lite0 on the cat photo, logit 10.5,
input part 0.98, bias part 10.2, error 0.66).

**The saliency map** (the paper's eq. 5):

.. math:: S_f(x) = \psi\big(\nabla_x f(x) \odot x\big) + \sum_{l} \sum_{c} \psi\big(f^b_l(x)_c\big)

with :math:`\psi` = absolute value, min-max rescaling to [0, 1], bilinear upsampling to the input
size; the sum runs over the layers whose bias-gradient is spatial (convolutions, BatchNorm; a linear
layer's bias enters the decomposition but not the map). ``scale=`` says over what the min-max of
:math:`\psi` runs, per image and target:

* ``"layer"`` (default): over the whole ``(C, h, w)`` bias-gradient of a layer and the whole
  ``(C, H, W)`` input-gradient, as the authors' code (idiap/fullgrad-saliency) does;
* ``"channel"``: over each channel separately (the :math:`\sum_c \psi(\cdot_c)` of eq. 5 read
  literally), as pytorch-grad-cam's ``FullGrad`` does; camlens then equals it (r > 0.999).

Layers: every ``nn.Conv*d``, ``nn.ConvTranspose*d`` and ``nn.Linear`` with a bias, and every
``nn.BatchNorm*d`` with running statistics (one with batch statistics has no fixed bias and is left
out, named in ``extras["skipped_layers"]``); a module called several times contributes each call.

**Cost.** One forward of the batch with forward hooks on those layers (each records its output and
hands the next layer a copy, so that an in-place ReLU does not overwrite it) and, per target, one
backward to the input and every recorded output at once; hooks removed in ``finally``. Gradients
reach only those tensors, never parameters' ``.grad``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from camlens.attribution.registry import Cost, MethodOutput, register
from camlens.base.errors import MethodError
from camlens.core.engine import ForwardPass, forward

SCALES = ("layer", "channel")
EPS = 1e-7  # the min-max's epsilon: a constant map becomes 0, never NaN


@dataclass
class BiasCall:
    """One call of a layer with a bias: its ``output`` (in the graph), the ``bias`` ``(C,)`` (detached,
    effective for BatchNorm) and the ``axis`` of the output it is added along."""

    name: str
    output: torch.Tensor
    bias: torch.Tensor
    axis: int

    def bias_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """:math:`\\nabla_{z} f \\odot b`, the bias broadcast along :attr:`axis`."""
        shape = [1] * grad.dim()
        shape[self.axis] = -1
        return grad * self.bias.to(grad.dtype).view(shape)

    @property
    def spatial(self) -> bool:
        """Whether its bias-gradient is a map ``(N, C, *spatial)`` (not a linear layer's vector)."""
        return self.axis == 1 and self.output.dim() >= 3


def effective_bias(m: nn.Module) -> tuple[torch.Tensor, int] | None:
    """``(bias, axis)`` of a layer that adds a fixed bias, or ``None`` (see the module docstring)."""
    if isinstance(m, nn.modules.conv._ConvNd) and m.bias is not None:
        return m.bias.detach(), 1
    if isinstance(m, nn.Linear) and m.bias is not None:
        return m.bias.detach(), -1
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and fixed_statistics(m):
        assert m.running_mean is not None and m.running_var is not None
        scale = (m.running_var.detach() + m.eps).rsqrt()
        if m.weight is not None:
            scale = scale * m.weight.detach()
        shift = m.bias.detach() if m.bias is not None else torch.zeros_like(scale)
        return shift - m.running_mean.detach() * scale, 1
    return None


def fixed_statistics(m: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether a BatchNorm layer normalises with its running statistics (an affine map)."""
    return m.running_mean is not None and m.running_var is not None and not m.training


@contextlib.contextmanager
def record_biases(model: nn.Module) -> Iterator[tuple[list[BiasCall], list[str]]]:
    """While active, each call of a layer with a bias (in this thread) appends a :class:`BiasCall`;
    yields ``(calls, skipped)`` with ``skipped`` the BatchNorm layers without fixed statistics."""
    calls: list[BiasCall] = []
    skipped: list[str] = []
    owner = threading.get_ident()
    handles = []

    def make(name: str, bias: torch.Tensor, axis: int):
        def hook(mod, args, output):
            if threading.get_ident() != owner or not isinstance(output, torch.Tensor):
                return None
            if output.dim() < 2 or output.shape[axis] != bias.numel():
                return None
            calls.append(BiasCall(name, output, bias, axis))
            return output.clone()  # what the next layer may overwrite in place is a copy

        return hook

    try:
        for name, m in model.named_modules():
            found = effective_bias(m)
            if found is not None:
                handles.append(m.register_forward_hook(make(name, *found)))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                skipped.append(name)
        yield calls, skipped
    finally:
        for h in handles:
            h.remove()


def min_max(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``t`` rescaled to [0, 1] over ``dims`` (a constant becomes 0)."""
    lo = t.amin(dim=dims, keepdim=True)
    hi = t.amax(dim=dims, keepdim=True)
    return (t - lo) / (hi - lo + EPS)


def psi(t: torch.Tensor, scale: str, size: tuple[int, ...]) -> torch.Tensor:
    """``(N, C, *s)`` -> ``(N, *size)``: :math:`\\sum_c \\psi(t)_c` (absolute value, min-max per image
    over the layer or per channel, bilinear upsampling; the channel sum commutes with the upsampling)."""
    spatial = tuple(range(2, t.dim()))
    m = min_max(t.abs(), (1, *spatial) if scale == "layer" else spatial).sum(1, keepdim=True)
    if tuple(m.shape[2:]) != tuple(size):
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
        m = F.interpolate(m, size=size, mode=mode, align_corners=False)
    return m[:, 0]


def fullgrad_cost(ctx: ForwardPass, **_) -> Cost:
    n = len(ctx.x)
    return Cost(n, "forwards", backwards=n)


@register(
    "fullgrad",
    paper="Srinivas & Fleuret, Full-Gradient Representation for Neural Network Visualization, NeurIPS 2019",
    summary="|input-gradient x input| plus |bias-gradient x bias| of every conv/BatchNorm layer, rescaled and summed",
    kind="pixel",
    needs=(),
    title="FullGrad",
    aliases=("full-grad",),
    cost=fullgrad_cost,
)
def fullgrad(ctx: ForwardPass, *, scale: str = "layer") -> MethodOutput:
    """``scale``: ``"layer"`` (the authors' code) or ``"channel"`` (pytorch-grad-cam), see the module docstring."""
    if scale not in SCALES:
        raise MethodError(f"scale must be one of {', '.join(SCALES)}, not {scale!r}")
    if isinstance(ctx.x, list):
        raise MethodError("fullgrad runs one batch of same-size images; these differ in size: explain them one by one")
    x = ctx.x.detach().requires_grad_(True)
    with record_biases(ctx.model) as (calls, skipped), torch.enable_grad():
        scores = ctx.targets.scores(ctx.select(forward(ctx.model, x)))
    maps_of = [c for c in calls if c.spatial and c.output.dim() == x.dim()]
    if not maps_of:
        raise MethodError(
            "fullgrad sums the bias-gradients of convolution and BatchNorm layers, and this model has none with a "
            "bias (or none ran); use input_x_gradient (the input part of FullGrad alone) or integrated_gradients"
        )
    N, K = scores.shape
    size = tuple(x.shape[2:])
    maps = x.new_zeros((N, K, *size))
    parts = x.new_zeros((2, N, K))
    wrt = [x, *(c.output for c in calls)]
    for k in range(K):
        grads = torch.autograd.grad(scores[:, k].sum(), wrt, retain_graph=k < K - 1, allow_unused=True)
        gx = grads[0] if grads[0] is not None else torch.zeros_like(x)
        ig = gx * x.detach()
        parts[0, :, k] = ig.flatten(1).sum(1)
        maps[:, k] = psi(ig, scale, size)
        for c, g in zip(calls, grads[1:]):
            if g is None:
                continue
            bg = c.bias_gradient(g)
            parts[1, :, k] += bg.flatten(1).sum(1)
            if c.spatial and c.output.dim() == x.dim():
                maps[:, k] += psi(bg, scale, size)
    extras = {
        "scale": scale,
        "bias_layers": len(maps_of),
        "input_part": parts[0],
        "bias_part": parts[1],
        "completeness_error": parts[0] + parts[1] - scores.detach(),
        "forwards": N,
    }
    if skipped:
        extras["skipped_layers"] = ", ".join(skipped)
    return MethodOutput(maps, maps=maps, extras=extras)
