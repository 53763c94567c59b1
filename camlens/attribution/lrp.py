r"""Layer-wise relevance propagation (LRP) through Zennit: ``lrp`` (pixel map) and ``lrp_layer`` (layer map).

LRP (Bach et al., "On Pixel-Wise Explanations for Non-Linear Classifier Decisions by Layer-Wise
Relevance Propagation", PLoS ONE 2015; Montavon et al., "Layer-Wise Relevance Propagation: An
Overview", 2019) starts from the explained score and redistributes it layer by layer down to the
input. For a linear layer :math:`z_j = \sum_i a_i w_{ij} + b_j` the rules of the composites are

* epsilon: :math:`R_i = \sum_j \frac{a_i w_{ij}}{z_j + \epsilon\,\mathrm{sign}(z_j)} R_j`;
* z+ (``ZPlus``): the same with only the positive contributions :math:`(a_i w_{ij})^+`;
* alpha-beta: :math:`R_i = \sum_j \big(\alpha \frac{(a_i w_{ij})^+}{z_j^+}
  - \beta \frac{(a_i w_{ij})^-}{z_j^-}\big) R_j` (:math:`\alpha - \beta = 1`);
* gamma: the weights :math:`w + \gamma w^+`; flat: :math:`a_i w_{ij} \to 1`;
  z-box (first layer, input bounds :math:`l \le x \le h`):
  :math:`R_i = \sum_j \frac{x_i w_{ij} - l_i w_{ij}^+ - h_i w_{ij}^-}{\sum_i (\cdot)} R_j`.

Composites (Zennit's, by name): ``epsilon_plus`` (z+ on convolutions, epsilon on dense layers; the
default), ``epsilon_plus_flat`` and ``epsilon_alpha2_beta1_flat`` (flat first layer),
``epsilon_alpha2_beta1``, ``epsilon_gamma_box`` (z-box first layer with ``low``/``high``, gamma on
the other convolutions). Every composite passes relevance through activations and batch norms
unchanged and splits it proportionally at average pooling and at the canonizers' sums.

**Convention.** The relevance of target :math:`k` starts as the score :math:`s_k` itself (for a
class, the logit): the backward is seeded with ``grad_outputs = s_k`` at the score. So the input's
relevance sums to :math:`s_k` minus what biases and the stabilizers absorb
(``extras["relevance_sum"]`` ``(N, K)``, ``extras["conservation"]`` = relevance sum / score); on a
network without biases it equals :math:`s_k` up to the stabilizers. A callable or target object's
score is back-propagated through its own function by the plain gradient down to the model's output.

**Canonizers** (``canonizer="auto"``): LRP needs every batch norm merged into the linear layer it
follows and every residual addition done by a module that the rules see.

* any model with batch norms: each batch norm that directly follows a convolution or linear layer
  in module order (:func:`merge_pairs`) is merged into it exactly (:class:`MergedBatchNorm`;
  Zennit's own merge is off by 1/sqrt(1 + eps) per batch norm); torchvision VGG needs
  nothing else;
* torchvision ResNet: the merge and Zennit's ``ResNetBasicBlockCanonizer`` /
  ``ResNetBottleneckCanonizer`` (each block's residual addition done by a ``Sum`` module);
* torchvision DenseNet: the merge, plus the functional ReLU and global average pooling of its
  ``forward`` done by modules (so that pooling splits relevance proportionally); the batch norms
  that follow a concatenation cannot be merged and get the composites' pass rule;
* EfficientNet-Lite0 (``efficientnet_lite_pytorch``, no squeeze-excitation): Zennit has no
  canonizer for it; camlens adds one: the merge (its convolutions hold a padding module, so Zennit's
  ``SequentialMergeBatchNorm`` would merge nothing, and its batch norms' eps = 1e-3
  makes Zennit's merge move the logits by about 1 %), and each MBConv block's skip addition done by a
  Zennit ``Sum`` module (its reused ReLU6 module gets the pass rule at every call).

``canonizer="none"`` applies none. Canonizers change the model's weights and ``forward`` for the
call only: the composite and canonizers are registered in a context and removed when it exits,
also when something raises. The forward under the composite must give the shared pass's scores
(a canonizer that merged a batch norm into a layer that does not feed it would not): otherwise a
:class:`~camlens.base.errors.MethodError` says so. Layer norms and attention (transformers) have
no rule here: use ``attnlrp``. While the call runs the model carries Zennit's hooks: calls on the
same model from other threads must wait (the web app serializes work per model).

**Output.** ``lrp``: ``raw`` is the input relevance ``(N, K, C, H, W)``, ``maps`` its channel sum
(signed; ``reduce=`` as the other pixel methods). ``lrp_layer``: the relevance at the captured
layer (``layer=``, ``capture=``, ``call=`` of :func:`camlens.explain`), summed over channels,
``(N, K, h, w)`` upsampled like a CAM. Cost: one forward of the batch under the composite and one
backward per target class.

Needs the optional extra ``pip install camlens[lrp]`` (Zennit; Anders et al., "Software for
Dataset-wide XAI: From Local Explanations to Global Insights with Zennit, CoRelAy, and ViRelAy",
arXiv 2106.13200, 2021).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from camlens.attribution.gradients import pixel_output
from camlens.attribution.registry import Applies, Cost, MethodOutput, register
from camlens.base.errors import MethodError, NotApplicableError
from camlens.core.capture import capture
from camlens.core.engine import ForwardPass, forward

COMPOSITES = (
    "epsilon_plus",
    "epsilon_plus_flat",
    "epsilon_alpha2_beta1",
    "epsilon_alpha2_beta1_flat",
    "epsilon_gamma_box",
)
CANONIZERS = ("auto", "none", "resnet", "vgg", "densenet", "efficientnet_lite", "merge_batchnorm")
PAPER = "Bach et al., Layer-Wise Relevance Propagation, PLoS ONE 2015; Zennit (Anders et al., arXiv 2106.13200)"
NOT_TRANSFORMERS = Applies(
    lambda t: not t.attention,
    "CNNs (no self-attention)",
    "LRP's composites have no rule for attention or layer norms; use attnlrp for vision transformers",
)


def _zennit() -> Any:
    """The ``zennit`` package (optional extra, imported only when an LRP method runs)."""
    try:
        import zennit.canonizers  # optional extra (pip install camlens[lrp])
        import zennit.composites
        import zennit.layer
        import zennit.torchvision
    except ImportError as exc:
        raise MethodError("lrp needs Zennit: pip install camlens[lrp] (zennit==0.5.1)") from exc
    return zennit


# ------------------------------------------------------------------------------------- canonizers
def _mbconv_forward(self: Any, inputs: torch.Tensor, drop_connect_rate: float | None = None) -> torch.Tensor:
    """An EfficientNet-Lite MBConv block's eval forward with the skip addition done by a module."""
    x = inputs
    args = self._block_args
    if args.expand_ratio != 1:
        x = self._swish(self._bn0(self._expand_conv(inputs)))
    x = self._swish(self._bn1(self._depthwise_conv(x)))
    x = self._bn2(self._project_conv(x))
    if self.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
        x = self.canonizer_sum(torch.stack([inputs, x], dim=-1))
    return x


def _is_mbconv(m: nn.Module) -> bool:
    return type(m).__name__ == "MBConvBlock" and type(m).__module__.startswith("efficientnet_lite")


def _mbconv_attributes(name: str, module: Any) -> dict[str, Any] | None:
    if not _is_mbconv(module):
        return None
    if module.has_se:
        raise NotApplicableError(
            f"{name} has squeeze-excitation (a multiplicative gate) that no LRP rule here covers; "
            "lrp supports EfficientNet-Lite (no squeeze-excitation). Use canonizer='none' at your own risk, or gradcam"
        )
    return {"forward": _mbconv_forward.__get__(module), "canonizer_sum": _zennit().layer.Sum()}


def _densenet_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """torchvision DenseNet's forward with its ReLU and global pooling done by modules."""
    out = self.canonizer_pool(self.canonizer_relu(self.features(x)))
    return self.classifier(torch.flatten(out, 1))


def _densenet_attributes(name: str, module: nn.Module) -> dict[str, Any] | None:
    from torchvision.models import DenseNet  # heavy: imported only when an LRP method runs

    if not isinstance(module, DenseNet):
        return None
    return {
        "forward": _densenet_forward.__get__(module),
        "canonizer_relu": nn.ReLU(),
        "canonizer_pool": nn.AdaptiveAvgPool2d(1),
    }


def _check_batchnorms(model: nn.Module) -> None:
    """Merging needs running statistics; refuse before touching anything."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None:
            raise MethodError(
                f"{name} is a batch norm without running statistics (it normalizes with the batch's own), which "
                "no canonizer can merge; pass canonizer='none'"
            )


class MergedBatchNorm:
    """A batch norm merged into the convolution or linear layer it follows, for one call:

    .. math:: W' = W \\odot s,\\quad b' = (b - \\mu)\\, s + \\beta,\\quad s = \\gamma / \\sqrt{\\sigma^2 + \\varepsilon}

    and the batch norm's ``forward`` replaced by the identity. Zennit's ``MergeBatchNorm`` instead
    resets the statistics to :math:`\\mu = 0, \\sigma^2 = 1`, which leaves a factor
    :math:`1/\\sqrt{1 + \\varepsilon}` per batch norm: with EfficientNet-Lite0's
    :math:`\\varepsilon = 10^{-3}` and 49 batch norms the logits move by about 1 %. :meth:`remove`
    puts the original weight tensors back (bit-identical) and removes the identity forward."""

    def __init__(self, linear: Any, bn: Any) -> None:
        self.linear, self.bn = linear, bn
        self.weight = linear.weight.data
        self.bias = None if linear.bias is None else linear.bias.data
        with torch.no_grad():
            assert bn.running_mean is not None and bn.running_var is not None
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight
            b = torch.zeros_like(bn.running_mean) if self.bias is None else self.bias
            new_b = (b - bn.running_mean) * scale + (0 if bn.bias is None else bn.bias)
            new_w = self.weight * scale.view(-1, *([1] * (self.weight.dim() - 1))).to(self.weight.dtype)
        linear.weight.data = new_w
        if self.bias is None:
            linear.bias = nn.Parameter(new_b.to(self.weight.dtype), requires_grad=False)
        else:
            linear.bias.data = new_b.to(self.bias.dtype)
        self.had_forward = "forward" in bn.__dict__
        self.old_forward = bn.__dict__.get("forward")
        bn.forward = _identity

    def remove(self) -> None:
        self.linear.weight.data = self.weight
        if self.bias is None:
            self.linear.bias = None
        else:
            self.linear.bias.data = self.bias
        if self.had_forward:
            self.bn.forward = self.old_forward
        else:
            del self.bn.forward


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class MergeBatchNorms:
    """A Zennit canonizer (``apply(model) -> handles``) merging each batch norm of :func:`merge_pairs`."""

    def apply(self, root: nn.Module) -> list[MergedBatchNorm]:
        lookup = dict(root.named_modules())
        done: list[MergedBatchNorm] = []
        try:
            for (linear,), bn in merge_pairs(root):
                done.append(MergedBatchNorm(lookup[linear], lookup[bn]))
        except BaseException:
            for d in reversed(done):
                d.remove()
            raise
        return done


def _is_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))


def _out_features(m: nn.Module) -> int | None:
    """The output channels of a convolution or linear layer (``None`` for any other module)."""
    w = getattr(m, "weight", None)
    return int(w.shape[0]) if _is_linear(m) and isinstance(w, torch.Tensor) else None


def merge_pairs(model: nn.Module) -> list[tuple[list[str], str]]:
    """``[([linear name], batch norm name)]``: each batch norm that directly follows a convolution or
    linear layer in module order. A convolution's own children (EfficientNet-Lite's padding module)
    do not count as the next module, unlike Zennit's ``SequentialMergeBatchNorm``, which then
    merges nothing on EfficientNet-Lite0."""
    pairs: list[tuple[list[str], str]] = []
    last: tuple[str, nn.Module] | None = None
    inside: str | None = None
    for name, m in model.named_modules():
        if inside is not None and name.startswith(inside + "."):
            continue
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            last, inside = (name, m), name
            if isinstance(m, nn.modules.conv._ConvTransposeNd):
                last = None  # its weight holds the output channels second: not merged
            continue
        if next(iter(m.children()), None) is not None:
            continue  # a container: its leaves come next
        if _is_batchnorm(m) and last is not None and _out_features(last[1]) == m.num_features:
            pairs.append(([last[0]], name))
        last = (name, m)
    return pairs


def _detect(model: nn.Module) -> str:
    from torchvision.models import VGG, DenseNet  # heavy: imported only when an LRP method runs
    from torchvision.models.resnet import BasicBlock, Bottleneck

    mods = list(model.modules())
    if any(isinstance(m, (BasicBlock, Bottleneck)) for m in mods):
        return "resnet"
    if any(isinstance(m, DenseNet) for m in mods):
        return "densenet"
    if any(_is_mbconv(m) for m in mods):
        return "efficientnet_lite"
    if any(isinstance(m, VGG) for m in mods):
        return "vgg"
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mods):
        return "merge_batchnorm"
    return "none"


def canonizers_for(model: nn.Module, which: str = "auto") -> tuple[list[Any], str]:
    """Zennit canonizers for ``model`` (see the module docstring) and the name of the choice."""
    if which not in CANONIZERS:
        raise MethodError(f"canonizer must be one of {', '.join(CANONIZERS)}, not {which!r}")
    name = _detect(model) if which == "auto" else which
    z = _zennit()
    if name == "none":
        return [], name
    _check_batchnorms(model)
    merge = MergeBatchNorms()
    if name == "resnet":  # Zennit's block canonizers (a Sum module), with the exact merge
        blocks = [z.torchvision.ResNetBasicBlockCanonizer(), z.torchvision.ResNetBottleneckCanonizer()]
        return [merge, *blocks], name
    if name == "densenet":
        return [merge, z.canonizers.AttributeCanonizer(_densenet_attributes)], name
    if name == "efficientnet_lite":
        for n, m in model.named_modules():  # refuse squeeze-excitation before any canonizer is applied
            if _is_mbconv(m):
                _mbconv_attributes(n, m)
        return [merge, z.canonizers.AttributeCanonizer(_mbconv_attributes)], name
    return [merge], name  # vgg, merge_batchnorm


# ------------------------------------------------------------------------------------- composites
def _bounds(x: torch.Tensor, value: Any, lowest: bool) -> torch.Tensor:
    """z-box bounds shaped like ``x``: a given float or tensor, or each image's per-channel min/max."""
    if value is None:
        flat = x.detach().flatten(2)
        v = flat.amin(2) if lowest else flat.amax(2)
        return v[:, :, None, None].expand_as(x).clone()
    return torch.as_tensor(value, dtype=x.dtype, device=x.device).expand_as(x).clone()


def make_composite(
    name: str,
    canonizers: list[Any],
    x: torch.Tensor,
    *,
    epsilon: float,
    gamma: float,
    low: Any,
    high: Any,
) -> Any:
    """The Zennit composite called ``name`` with ``canonizers`` (z-box bounds for the input ``x``)."""
    if name not in COMPOSITES:
        raise MethodError(f"composite must be one of {', '.join(COMPOSITES)}, not {name!r}")
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise MethodError(f"epsilon must be a positive number, not {epsilon!r}")
    cls = _zennit().composites.COMPOSITES[name]
    kw: dict[str, Any] = {"epsilon": epsilon, "canonizers": canonizers}
    if name == "epsilon_gamma_box":
        return cls(low=_bounds(x, low, True), high=_bounds(x, high, False), gamma=gamma, **kw)
    return cls(**kw)


def _refuse_unsupported(model: nn.Module) -> None:
    bad = sorted({type(m).__name__ for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.MultiheadAttention))})
    if bad:
        raise NotApplicableError(
            f"lrp's composites have no rule for {', '.join(bad)} (transformers, ConvNeXt): the relevance would be "
            "meaningless. Use attnlrp for vision transformers, or a gradient method such as gradcam"
        )


@contextlib.contextmanager
def lrp_forward(ctx: ForwardPass, options: dict[str, Any], at_layer: bool) -> Iterator[dict[str, Any]]:
    """One forward of ``ctx.x`` under the composite: yields ``scores`` ``(N, K)`` and ``wrt`` (the
    input leaf, or the captured layer features with ``at_layer``), with the composite registered."""
    model = ctx.model
    _refuse_unsupported(model)
    cans, chosen = canonizers_for(model, options["canonizer"])
    x = ctx.x.detach()
    composite = make_composite(
        options["composite"],
        cans,
        x,
        epsilon=options["epsilon"],
        gamma=options["gamma"],
        low=options["low"],
        high=options["high"],
    )
    leaf = x if at_layer else x.clone().requires_grad_(True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        cap = None
        if at_layer:  # hooked before the composite's own hooks: the gradient there is the relevance
            cap = stack.enter_context(capture(model, ctx.layer_spec, cut=False, layout=ctx.layout_request))
        stack.callback(composite.remove)  # also undoes what a register that raised half-way applied
        composite.register(model)
        out = forward(model, leaf)
        scores = ctx.targets.scores(ctx.select(out))
        _check_same_scores(scores, ctx.scores, chosen)
        wrt = leaf if cap is None else cap.value
        if wrt is None or not wrt.requires_grad:
            raise MethodError(f"the {ctx.layer_spec.describe()} is not on the path to the scores; choose another layer")
        yield {"scores": scores, "wrt": wrt, "canonizer": chosen}


def _check_same_scores(scores: torch.Tensor, expected: torch.Tensor, chosen: str) -> None:
    ref = expected.detach()
    tol = 1e-3 * float(ref.abs().max().clamp_min(1e-6)) + (1e-3 if ref.dtype != torch.float64 else 1e-9)
    diff = float((scores.detach() - ref).abs().max()) if scores.shape == ref.shape else math.inf
    if diff > tol:
        raise MethodError(
            f"under the LRP canonizers ({chosen}) the model's scores changed by {diff:.3g}: a batch norm was merged "
            "into a layer that does not feed it (the module order differs from the forward). Pass canonizer='none'"
        )


def relevance(scores: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor:
    """``(N, K, *wrt.shape[1:])``: the relevance at ``wrt`` of each score, the backward seeded with
    the score itself (one backward per class: Zennit's hooks are not vmap-compatible)."""
    K = scores.shape[1]
    out = []
    for k in range(K):
        s = scores[:, k]
        (g,) = torch.autograd.grad(s, wrt, grad_outputs=s.detach(), retain_graph=k < K - 1, allow_unused=True)
        out.append(torch.zeros_like(wrt) if g is None else g)
    return torch.stack(out, dim=1).detach()


def _extras(R: torch.Tensor, scores: torch.Tensor, options: dict[str, Any], canonizer: str) -> dict[str, Any]:
    total = R.flatten(2).sum(-1)
    s = scores.detach()
    return {
        "composite": options["composite"],
        "canonizer": canonizer,
        "epsilon": options["epsilon"],
        "relevance_sum": total,
        "conservation": total / torch.where(s == 0, torch.ones_like(s), s),
        "convention": "relevance of target k starts as its score s_k (the logit for a class)",
        "signed": True,
    }


def lrp_cost(ctx: ForwardPass, **_: Any) -> Cost:
    """One forward of the batch under the composite, one backward per class."""
    return Cost(len(ctx.x), "forwards", backwards=len(ctx.x) * ctx.k)


@register(
    "lrp",
    paper=PAPER,
    summary="layer-wise relevance propagation of the score to the pixels (Zennit composites)",
    kind="pixel",
    needs=(),
    title="LRP",
    applies_to=NOT_TRANSFORMERS,
    cost=lrp_cost,
)
def lrp(
    ctx: ForwardPass,
    *,
    composite: str = "epsilon_plus",
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    low: Any = None,
    high: Any = None,
    canonizer: str = "auto",
    reduce: str = "sum",
) -> MethodOutput:
    opts = dict(composite=composite, epsilon=epsilon, gamma=gamma, low=low, high=high, canonizer=canonizer)
    with lrp_forward(ctx, opts, at_layer=False) as run:
        R = relevance(run["scores"], run["wrt"])
    return pixel_output(R, reduce, "lrp", _extras(R, run["scores"], opts, run["canonizer"]))


@register(
    "lrp_layer",
    paper=PAPER,
    summary="layer-wise relevance propagation of the score to a layer, summed over channels",
    kind="layer",
    needs=("features",),
    title="LRP (layer)",
    applies_to=NOT_TRANSFORMERS,
    cost=lrp_cost,
)
def lrp_layer(
    ctx: ForwardPass,
    *,
    composite: str = "epsilon_plus",
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    low: Any = None,
    high: Any = None,
    canonizer: str = "auto",
) -> MethodOutput:
    opts = dict(composite=composite, epsilon=epsilon, gamma=gamma, low=low, high=high, canonizer=canonizer)
    with lrp_forward(ctx, opts, at_layer=True) as run:
        R = relevance(run["scores"], run["wrt"])
    if R.dim() != 5:
        raise MethodError(f"lrp_layer needs (N, C, h, w) features at the layer, got {tuple(R.shape[2:])} per class")
    return MethodOutput(R.sum(2), extras=_extras(R, run["scores"], opts, run["canonizer"]))
