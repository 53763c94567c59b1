r"""Pixel attributions under modified ReLU backward rules, and their products with a class map.

All of them reuse the shared forward pass: it runs under :func:`camlens.core.rules.relu_rules`, so
the same graph gives the true gradient, Deconvnet and Guided Backprop (one backward each).

* ``deconvnet`` — Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV
  2014: back-propagate with every ReLU's backward replaced by :math:`g\,[g > 0]`.
* ``guided_backprop`` — Springenberg et al., "Striving for Simplicity: The All Convolutional
  Net", ICLRW 2015: every ReLU back-propagates :math:`g\,[x > 0]\,[g > 0]`.
* ``guided_gradcam`` — Selvaraju et al., "Grad-CAM", ICCV 2017:
  :math:`A = \mathrm{GB} \odot \mathrm{up}(M_{\text{Grad-CAM}})`, guided backprop times the
  Grad-CAM map (ReLU, true gradients at the layer) bilinearly upsampled to the input size
  (``align_corners=False``, as :func:`camlens.explain` upsamples Grad-CAM), broadcast over
  channels. Exact product, no normalization; ``extras["cam"]`` holds the upsampled map. With
  the default ``reduce="absmax"`` and a CAM :math:`\ge 0`, ``maps`` also factorises:
  :math:`\max_c |A_c| = \mathrm{up}(M)\,\max_c |\mathrm{GB}_c|`.
* ``gradient_x_cam`` — the notebooks' saliency × CAM display:
  :math:`A_c = \partial f/\partial x_c \cdot \hat M`, with :math:`\hat M` the upsampled Grad-CAM
  min-max normalized to [0, 1] per map. As in the notebooks the class map is the *signed* one
  (``cam_relu=False``; ``True`` applies the ReLU first). ``extras["rgb"]`` ``(N, K, H, W, C)``
  reproduces the notebooks' picture exactly (without its uint8 rounding): the gradient min-max
  normalized over all channels, times :math:`\hat M`, then min-max normalized per channel.

ReLU-rule methods on a model whose forward ran no ReLU (e.g. a SiLU/GELU network) raise
:class:`~camlens.base.errors.MethodError`: the result would silently equal the plain gradient.
``maps`` reduces channels with ``reduce=`` (default ``"absmax"``, :math:`\max_c |A_c|`; see
:mod:`camlens.attribution.gradients`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from camlens.attribution.gradcam import gradcam
from camlens.attribution.gradients import pixel_output, require_relus
from camlens.attribution.registry import MethodOutput, Need, register
from camlens.base.ops import minmax
from camlens.core.engine import ForwardPass

_RULE_NEEDS: tuple[Need, ...] = ("input_grads", "rules")


def _ruled_grads(ctx: ForwardPass, rule: str, method: str) -> torch.Tensor:
    g = ctx.input_grads(rule)
    assert ctx.switch is not None  # methods with "rules" in their needs always have the switch
    require_relus(ctx.switch.relu_calls, method, ctx.model)
    return g


def _upsampled_cam(ctx: ForwardPass, relu: bool) -> torch.Tensor:
    cam = gradcam(ctx, relu=relu).raw  # (N, K, h, w) or (N, K, d, h, w), gradients by the ordinary backprop rule
    mode = "bilinear" if cam.dim() == 4 else "trilinear"  # a volume's map, as explain() upsamples it
    return F.interpolate(cam, size=tuple(ctx.x.shape[2:]), mode=mode, align_corners=False)


@register(
    "deconvnet",
    paper="Zeiler & Fergus, Visualizing and Understanding Convolutional Networks, ECCV 2014",
    summary="gradient with every ReLU passing only positive gradient (g*[g>0])",
    kind="pixel",
    needs=_RULE_NEEDS,
    title="Deconvnet",
    volumes=True,
)
def deconvnet(ctx: ForwardPass, *, reduce: str | None = None) -> MethodOutput:
    return pixel_output(_ruled_grads(ctx, "deconvnet", "deconvnet"), reduce, "deconvnet")


@register(
    "guided_backprop",
    paper="Springenberg et al., Striving for Simplicity, ICLR Workshops 2015",
    summary="gradient with every ReLU passing positive gradient at positive input (g*[x>0]*[g>0])",
    kind="pixel",
    needs=_RULE_NEEDS,
    title="Guided Backprop",
    aliases=("guided", "guided-backprop"),
    volumes=True,
)
def guided_backprop(ctx: ForwardPass, *, reduce: str | None = None) -> MethodOutput:
    return pixel_output(_ruled_grads(ctx, "guided", "guided_backprop"), reduce, "guided_backprop")


@register(
    "guided_gradcam",
    paper="Selvaraju et al., Grad-CAM, ICCV 2017",
    summary="guided backprop times the upsampled Grad-CAM map",
    kind="pixel",
    needs=("features", "layer_grads:mean", *_RULE_NEEDS),
    title="Guided Grad-CAM",
    aliases=("guided-gradcam",),
    volumes=True,
)
def guided_gradcam(ctx: ForwardPass, *, reduce: str | None = None) -> MethodOutput:
    gb = _ruled_grads(ctx, "guided", "guided_gradcam")
    cam = _upsampled_cam(ctx, relu=True)
    return pixel_output(gb * cam[:, :, None], reduce, "guided_gradcam", {"cam": cam.detach()})


@register(
    "gradient_x_cam",
    paper="the notebooks: input gradient per channel x normalized Grad-CAM",
    summary="input gradient per channel times the [0, 1]-normalized class map",
    kind="pixel",
    needs=("features", "layer_grads:mean", "input_grads"),
    title="Gradient x CAM",
)
def gradient_x_cam(ctx: ForwardPass, *, cam_relu: bool = False, reduce: str | None = None) -> MethodOutput:
    g = ctx.input_grads("backprop")
    cam01 = minmax(_upsampled_cam(ctx, relu=cam_relu), dims=(2, 3))[:, :, None]  # (N, K, 1, H, W)
    rgb = minmax(minmax(g, dims=(2, 3, 4)) * cam01, dims=(3, 4))
    return pixel_output(
        g * cam01, reduce, "gradient_x_cam", {"cam": cam01[:, :, 0].detach(), "rgb": rgb.permute(0, 1, 3, 4, 2).float()}
    )
