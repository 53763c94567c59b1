"""Which features one explanation reads: the requested layer resolved against a real forward pass.

:func:`camlens.core.layers.resolve_layer` turns ``layer=`` / ``capture=`` / ``call=`` into a
:class:`~camlens.core.capture.CaptureSpec` from the model's structure alone. Some answers need a forward
pass; :func:`run_resolved` runs it (through the caller's ``forward_pass`` factory, usually a
:class:`~camlens.core.engine.ForwardPass`) and handles, in this order:

1. ``call < -1`` (counted from the end): one probe forward of the first image counts the calls;
2. the automatic layer (``capture="pool"``, last call) is captured *lazily*: pooling modules are
   hooked and the function mode only starts after one ran (see :mod:`camlens.core.capture`);
3. no pooling module ran: run again watching every function call (a batch of one image directly,
   a larger batch only after a probe of its first image found a functional global pooling);
4. no global pooling at all: a transformer (ViT, DeiT: the head reads the class token) falls back to
   the norm that ran before the last attention module; other networks (VGG) to the last spatial
   module. The pass that watched every call has seen both — no extra probe;
5. a layer never called, or features that are not ``(N, C, h, w)`` (``(N, C, d, h, w)`` for a volume
   input): a clear :class:`InputError`.

Every pass runs inside the caller's eval-mode context; nothing here touches the model otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Generic, Protocol, TypeVar

import torch
from torch import nn

from camlens.base.errors import InputError
from camlens.core.capture import Captured, CaptureSpec, capture, count_calls, needs_full_scan
from camlens.core.engine import forward
from camlens.core.extra import rows
from camlens.core.layers import fallback_spec


class CapturingPass(Protocol):
    """What :func:`run_resolved` reads from a forward pass (a :class:`~camlens.core.engine.ForwardPass`)."""

    features: torch.Tensor | None
    calls: int
    pool_module: str | None
    last_spatial: tuple[str, nn.Module] | None
    token_norm: tuple[str, nn.Module] | None


P = TypeVar("P", bound=CapturingPass)


@dataclass
class Resolved(Generic[P]):
    """The pass that captured the features, the spec it used and the layer's description
    (``None`` when no layer was asked for)."""

    ctx: P
    spec: CaptureSpec | None
    layer_name: str | None


def _probe(model: nn.Module, x: torch.Tensor, spec: CaptureSpec) -> Captured:
    """What a plain forward of ``x`` (one image: a cheap probe) captures at ``spec``."""
    with torch.no_grad(), capture(model, spec, cut=True, need_grad=False) as cap:
        forward(model, x)  # a copy of x, never the caller's tensor
    return cap


def run_resolved(
    model: nn.Module,
    x: torch.Tensor,
    spec: CaptureSpec | None,
    forward_pass: Callable[[CaptureSpec | None], P],
) -> Resolved[P]:
    """Run ``forward_pass(spec)`` until the features at ``spec`` are captured (see the module doc)."""
    if spec is not None and spec.call < -1:
        with rows([0]):  # a probe of the first image (its extra inputs, if any)
            total = count_calls(model, spec, x[:1])
        if total + spec.call < 0:
            raise InputError(f"{spec.name} runs {total} times per forward; call={spec.call} does not exist")
        spec = CaptureSpec(spec.module, spec.name, spec.capture, total + spec.call)
    if spec is not None and spec.capture == "pool" and spec.call == -1:
        spec = replace(spec, lazy_pool=True)  # hook pooling modules; see camlens.core.capture

    ctx = forward_pass(spec)
    last_spatial = ctx.token_norm or ctx.last_spatial  # a transformer's norm before the last attention first
    if spec is not None and needs_full_scan(model, spec, ctx.features):
        spec = replace(spec, lazy_pool=False)  # no pooling module ran: watch every call
        if len(x) == 1:
            ctx = forward_pass(spec)
            last_spatial = ctx.token_norm or ctx.last_spatial
        else:  # probe one image before re-running the batch
            with rows([0]):
                probe = _probe(model, x[:1], spec)
            last_spatial = probe.token_norm or probe.last_spatial
            if probe.value is not None:
                ctx = forward_pass(spec)
    if spec is not None and ctx.features is None:
        if spec.capture != "pool":
            raise InputError(
                f"{spec.describe()} was never called in the forward pass"
                + (f" (it ran {ctx.calls} times)" if ctx.calls else "")
                + "; choose another layer (`camlens layers MODEL`)"
            )
        # no global pooling: the norm before the last attention (transformers) or the last spatial
        # module, seen by the pass (or probe) that watched every call
        spec = fallback_spec(last_spatial)
        ctx = forward_pass(spec)
    want = x.dim() if isinstance(x, torch.Tensor) else 4  # (N, C, h, w), or (N, C, d, h, w) for a volume
    if spec is not None and ctx.features is not None and ctx.features.dim() != want:
        axes = "(N, C, h, w)" if want == 4 else "(N, C, d, h, w) like the input's (N, C, D, H, W)"
        raise InputError(
            f"the {spec.describe()} has shape {tuple(ctx.features.shape)}, not {axes}; "
            "layer methods need a convolutional feature map (token and channels-last layouts are adapted; "
            "see reshape=): choose another layer"
        )
    layer_name = None
    if spec is not None:
        layer_name = (
            spec.describe()
            if spec.capture != "pool"
            else f"input of global pooling ({ctx.pool_module or 'functional call'})"
        )
    return Resolved(ctx, spec, layer_name)
