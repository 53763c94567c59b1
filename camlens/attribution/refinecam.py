r"""RefineCAM — Domeniconi, Stramiglio, Lombardi & Salti, "How to Evaluate and Refine your CAM",
ICPR 2026 (arXiv 2605.14641).

A CAM at an early layer is sharp but noisy, one at the last layer coarse but clean; RefineCAM keeps
what they agree on. With :math:`M^l_c` the base CAM (Grad-CAM++ by default) at each layer
:math:`l \in \mathcal L`, :math:`\mathcal N` the min-max rescaling to [0, 1] per image and class and
:math:`U` bilinear upsampling to the finest of those layers' resolutions,

.. math:: R_c = \prod_{l \in \mathcal L} U\big(\mathcal N(M^l_c)\big)

(the authors' ``MultiplierMix``; pytorch-grad-cam 1.5.7's ``RefineCAM`` is their contribution and
TorchCAM 0.5's follows the same paper). The maps are at the finest layer's resolution and upsampled
to the input like every layer map. pytorch-grad-cam upsamples each factor to the *input* size before
multiplying and rescales the product again (its rescaling loop before the product assigns to a loop
variable and has no effect; its base CAMs are already rescaled); camlens multiplies at the finest
layer's resolution, as TorchCAM does (``resolution="layer"``), or at the input's, as
pytorch-grad-cam does (``resolution="input"``; r 0.9985 between the two on ResNet-18 at 64 px).
TorchCAM's ``GradCAMpp`` is not the paper's Grad-CAM++ (its ``alpha[mask].div_`` divides a copy,
so its weights are :math:`\sum G^2\,\mathrm{ReLU}(G)`): camlens equals TorchCAM's RefineCAM with
``base="layercam"`` (``base_method=LayerCAM``) and pytorch-grad-cam's with the default base and
``resolution="input"``.

Options: ``layers`` — the layers whose maps are multiplied (names, or one comma-separated string;
default: the explained layer and, before it, the last output computed at each of the grids
2, 4, … :math:`2^{\text{stages}-1}` times finer, i.e. the stage outputs: ``layer2, layer3, layer4``
on a ResNet with ``stages=3``, found by one inference forward of the first image; a grid no module
outputs exactly, e.g. after an odd-sized input, is left out); ``base`` — ``"gradcam++"``
(default, both peers), ``"gradcam"`` or ``"layercam"``; ``resolution`` — where the factors are
multiplied (``"layer"``: the finest layer's grid; ``"input"``: the input's pixels).

**Cost.** One forward of the batch capturing every layer (the graph kept below them) and one batched
backward over the targets per layer, plus the probe forward of one image when ``layers`` is not given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from camlens.attribution.gradcam import _gradcam_pp_weights
from camlens.attribution.registry import Cost, MethodOutput, register
from camlens.base.errors import MethodError
from camlens.core import extra
from camlens.core.capture import CaptureSpec, capture
from camlens.core.engine import ForwardPass, class_grads, forward
from camlens.core.layers import resolve_layer

BASES = ("gradcam++", "gradcam", "layercam")
RESOLUTIONS = ("layer", "input")
EPS = 1e-8


def base_map(base: str, G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """The base CAM ``(N, Kc, h, w)`` from gradients ``G`` ``(N, Kc, C, h, w)`` and features ``A``."""
    if base == "layercam":
        return torch.einsum("nkchw,nchw->nkhw", G.relu(), A).relu()
    w = _gradcam_pp_weights(G, A) if base == "gradcam++" else G.mean(dim=(3, 4))
    return torch.einsum("nkc,nchw->nkhw", w, A).relu()


def stage_outputs(model: nn.Module, x: torch.Tensor, below: tuple[int, int], n: int) -> list[CaptureSpec]:
    """The ``n`` stage outputs finer than ``below`` (``h, w``), closest first in depth: for each grid
    ``2^k`` times finer (``k = 1..n``, exactly: padded maps and other sizes are not stages), the
    module called once whose ``(N, C, h, w)`` output at that grid was the last one computed — the
    deepest features at that resolution (one inference forward of ``x``): ResNet's ``layer3`` (the
    container finishes after its blocks), EfficientNet-Lite0's ``_blocks.11._bn0`` (the expanded
    features just before the stride-2 depthwise convolution; its ReLU6 is one module called many
    times, so it is not a candidate).
    Returned in execution order."""
    seen: list[tuple[str, nn.Module, tuple[int, int]]] = []
    calls: dict[str, int] = {}
    handles = []

    def make(name: str):
        def hook(m, args, out):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                seen.append((name, m, (int(out.shape[2]), int(out.shape[3]))))

        return hook

    try:
        for name, m in model.named_modules():
            if name:
                handles.append(m.register_forward_hook(make(name)))
        with torch.inference_mode():
            forward(model, x)
    finally:
        for h in handles:
            h.remove()
    grids = {(below[0] * 2**k, below[1] * 2**k): k for k in range(1, n + 1)}
    last: dict[int, tuple[str, nn.Module]] = {}
    for name, m, hw in seen:  # in the order the modules finished: the last one wins
        if calls[name] == 1 and hw in grids:
            last[grids[hw]] = (name, m)
    return [CaptureSpec(m, name, "output", -1) for _, (name, m) in sorted(last.items(), reverse=True)]


def _specs(ctx: ForwardPass, layers: str | Sequence | None, stages: int) -> list[CaptureSpec]:
    if layers is None:
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 2:
            raise MethodError(f"stages must be an integer >= 2, not {stages!r}")
        h, w = ctx.layer_features.shape[-2:]
        with extra.rows([0]):  # the probe forward is of the first image (its extra inputs follow it)
            found = stage_outputs(ctx.model, ctx.x[:1].detach(), (int(h), int(w)), stages - 1)
        return [*found, ctx.layer_spec]
    names = [s.strip() for s in layers.split(",") if s.strip()] if isinstance(layers, str) else list(layers)
    return [resolve_layer(ctx.model, name) for name in names]


def refinecam_cost(ctx: ForwardPass, *, layers=None, **_) -> Cost:
    n = len(ctx.x)
    return Cost(n + (1 if layers is None else 0), "forwards", backwards=n)


@register(
    "refinecam",
    paper="Domeniconi et al., How to Evaluate and Refine your CAM, ICPR 2026 (arXiv 2605.14641)",
    summary="product of the min-max-rescaled base CAMs (Grad-CAM++) of several layers, at the finest resolution",
    needs=("features",),
    title="RefineCAM",
    aliases=("refine-cam",),
    cost=refinecam_cost,
)
def refinecam(
    ctx: ForwardPass,
    *,
    layers: str | Sequence | None = None,
    stages: int = 3,
    base: str = "gradcam++",
    resolution: str = "layer",
) -> MethodOutput:
    """See the module docstring."""
    if base not in BASES:
        raise MethodError(f"base must be one of {', '.join(BASES)}, not {base!r}")
    if resolution not in RESOLUTIONS:
        raise MethodError(f"resolution must be one of {', '.join(RESOLUTIONS)}, not {resolution!r}")
    if isinstance(ctx.x, list):
        raise MethodError("refinecam runs one batch of same-size images; these differ in size: explain them one by one")
    specs = _specs(ctx, layers, stages)
    if len(specs) < 2:
        raise MethodError(
            "refinecam multiplies the CAMs of at least two layers of different resolutions, and found "
            f"{len(specs)} ({', '.join(s.name for s in specs)}); pass layers='name1,name2,...' (`camlens layers MODEL`)"
        )
    x = ctx.x.detach().requires_grad_(True)  # the graph reaches every captured layer, frozen weights or not
    with contextlib.ExitStack() as stack:
        caps = [
            stack.enter_context(capture(ctx.model, s, cut=False, need_grad=True, layout=ctx.layout_request))
            for s in specs
        ]
        stack.enter_context(torch.enable_grad())
        scores = ctx.targets.scores(ctx.select(forward(ctx.model, x)))
    maps = []
    for s, cap in zip(specs, caps):
        A = cap.value
        if A is None or A.dim() != 4:
            raise MethodError(f"refinecam needs an (N, C, h, w) map at the {s.describe()}; choose other layers")
        m = torch.cat([base_map(base, G, A.detach()) for _, G in class_grads(scores, A)], dim=1)
        lo, hi = m.amin(dim=(2, 3), keepdim=True), m.amax(dim=(2, 3), keepdim=True)
        maps.append((m - lo) / (hi - lo + EPS))
    size = max((m.shape[-2:] for m in maps), key=lambda hw: hw[0] * hw[1]) if resolution == "layer" else x.shape[-2:]
    raw = torch.ones_like(maps[0][:, :, :1, :1]).expand(*maps[0].shape[:2], *size)
    for m in maps:
        raw = raw * (m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False))
    extras = {"layers": ", ".join(s.name for s in specs), "base": base, "resolution": f"{size[0]}x{size[1]}"}
    raw = raw.detach().contiguous()
    return MethodOutput(raw, maps=raw if resolution == "input" else None, extras=extras)
