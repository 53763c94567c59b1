"""Resolve the ``layer=`` argument: a dotted module name, a module, or ``None`` (automatic).

Automatic choice: the features that *enter the final global pooling* of the network, found
during the forward pass itself (see :mod:`camlens.core.capture`), whether that pooling is a module
or a functional call (CNNs, Swin, ConvNeXt, MaxViT). Transformers without global pooling (ViT,
DeiT: the head reads the class token) get the output of the norm that runs before the last
attention module — the last block's ``ln_1`` / ``norm1`` / ``layernorm_before``: the patch
tokens there still reach the class token through that attention, so their gradients are
non-zero and class-specific, whereas at the last block's output they are exactly zero (only the
class token feeds the head). Other networks without global pooling (e.g. torchvision's VGG,
which flattens a 7x7 map into an MLP) fall back to the output of the last module that produces
a spatial ``(N, C, h, w)`` map with ``h, w > 1``.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from camlens.base._util import eval_mode
from camlens.base.errors import InputError, LayerNotFoundError, LayoutError
from camlens.core.capture import CaptureSpec, capture, is_attention, is_norm
from camlens.core.layout import LayoutRequest, grid_fits

AUTO_NAME = "auto"


def module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; a misspelt name raises an error listing the closest names."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    names = module_names(model)
    close = difflib.get_close_matches(name, names, n=6, cutoff=0.4)
    if not close:
        close = [n for n in names if name.split(".")[-1] in n][:6]
    if close:
        hint = f" Closest names: {', '.join(close)}."
    else:  # nothing alike (e.g. ResNet's 'layer4' on EfficientNet): the blocks nearest the output
        top = [n for n in names if n.count(".") <= 1 and next(iter(modules[n].children()), None) is not None]
        hint = f" Blocks near the output: {', '.join((top or names)[-5:])}; or leave the layer out (automatic)."
    raise LayerNotFoundError(
        f"the model has no layer named {name!r}.{hint} "
        "List them with `camlens layers MODEL` or camlens.core.layers.candidate_layers(model)."
    )


def module_name(model: nn.Module, module: nn.Module) -> str:
    for n, m in model.named_modules():
        if m is module:
            return n or "<model>"
    raise LayerNotFoundError(
        f"the given {type(module).__name__} module is not part of this model; pass one of its submodules "
        "or a dotted name"
    )


def check_capture(capture: str) -> None:
    """Refuse a ``capture`` other than ``"output"`` / ``"input"``, naming the valid choices."""
    if capture not in ("output", "input"):
        close = difflib.get_close_matches(str(capture), ["output", "input"], n=1, cutoff=0.4)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(
            f"capture must be 'output' or 'input' (the layer's output or its input), not {capture!r}{hint}"
        )


def resolve_layer(
    model: nn.Module,
    layer: str | nn.Module | None,
    capture: str = "output",
    call: int = -1,
) -> CaptureSpec:
    """Turn ``layer``/``capture``/``call`` into a :class:`CaptureSpec`."""
    check_capture(capture)
    if layer is None or layer == AUTO_NAME:
        return CaptureSpec(None, AUTO_NAME, "pool", call)
    if isinstance(layer, nn.Module):
        return CaptureSpec(layer, module_name(model, layer), capture, call)
    if isinstance(layer, str):
        return CaptureSpec(find_module(model, layer), layer, capture, call)
    raise InputError(
        f"layer must be a dotted module name (e.g. 'layer4'), one of the model's modules or None (automatic), "
        f"not {type(layer).__name__}"
    )


def candidate_layers(model: nn.Module, x: torch.Tensor | None = None, size=(224, 224)) -> list[dict]:
    """Modules whose output is a spatial map ``(N, C, h, w)``, a channels-last map ``(N, h, w, C)``
    or a token sequence ``(N, T, D)`` with a patch grid (norms and attention blocks only), in
    execution order, with shapes and the
    ``layout`` the layer methods will see (:mod:`camlens.core.layout`: ``"tokens: 1 prefix + 14x14"``,
    ``"channels-last"``, or ``""`` for a plain map).

    Runs one inference forward on ``x`` (default: a zero image of ``size``).
    """
    if x is None:
        p = next(model.parameters(), None)
        x = torch.zeros(1, 3, *size, device=p.device if p is not None else "cpu")
    rows: list[dict] = []
    handles = []
    request = LayoutRequest((int(x.shape[-2]), int(x.shape[-1])), model)

    def hook(name):
        def fn(m, a, o):
            if not isinstance(o, torch.Tensor) or o.dim() not in (3, 4):
                return
            try:
                lay = request.layout(tuple(o.shape))
            except LayoutError:  # a sequence that is not a patch grid
                return
            if lay.kind == "tokens":  # transformers: the norms and the blocks, not every linear inside
                if not (is_norm(m) or any(is_attention(c) for c in m.children())):
                    return
                h, w = lay.grid or (0, 0)
                desc = f"tokens: {lay.prefix} prefix + {h}x{w}"
            elif lay.kind == "nhwc":
                desc = "channels-last"
            elif o.dim() == 4 and grid_fits(o.shape[2], o.shape[3], *(request.input_hw or (0, 0))):
                desc = ""
            else:  # (N, heads, T, d) inside attention and other non-maps
                return
            rows.append({"name": name, "type": type(m).__name__, "shape": tuple(o.shape[1:]), "layout": desc})

        return fn

    for name, m in model.named_modules():
        if name:
            handles.append(m.register_forward_hook(hook(name)))
    try:
        with eval_mode(model), torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    seen, out = set(), []
    for r in rows:  # keep the last call of reused modules, in order of first appearance
        if r["name"] not in seen:
            seen.add(r["name"])
            out.append(r)
    return out


def fallback_layer(model: nn.Module, x: torch.Tensor) -> CaptureSpec:
    """For networks without global pooling: the last module (execution order) with a spatial
    output ``h, w > 1`` that is not a fixed-size adaptive pooling adapter
    (:func:`camlens.core.capture.is_spatial_fallback`), seen by one inference forward of the first image
    under the capture that watches for global pooling (:func:`camlens.explain` gets it from the
    pass it runs anyway)."""
    with torch.inference_mode(), capture(model, CaptureSpec(None, AUTO_NAME, "pool")) as cap:
        model(x[:1])
    return fallback_spec(cap.last_spatial)


def fallback_spec(last: tuple[str, nn.Module] | None) -> CaptureSpec:
    """The capture of the fallback layer ``(name, module)`` found during a forward pass."""
    if last is None:
        raise LayerNotFoundError(
            "could not choose a layer automatically: no module produces a spatial (N, C, h, w) map; "
            "pass layer= explicitly"
        )
    return CaptureSpec(last[1], last[0], "output", -1)
