"""``camlens.explain``: the one call that turns a model, images and targets into maps.

    model, images ──preprocess──▶ x ──one forward (features captured)──▶ logits ─▶ targets
                                                 │
                 methods (one shared pass) ◀─────┘──▶ Explanation(maps, raw, classes, scores…)

The model is left exactly as it was: hooks removed, every module's train/eval flag restored,
``requires_grad`` untouched, no ``.grad`` written — also when an exception is raised.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, overload

import torch
import torch.nn.functional as F
from torch import nn

from ._util import eval_mode
from .capture import CaptureSpec
from .engine import ForwardPass
from .errors import InputError, MethodError
from .explanation import Explanation
from .inputs import prepare_inputs
from .layers import resolve_layer
from .methods.registry import MethodInfo, get_method
from .models.preprocess import Preprocess
from .models.zoo import card_of, load_model
from .resolve import run_resolved
from .targets import TargetSpec


def _split_options(infos: list[MethodInfo], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    per: dict[str, dict[str, Any]] = {}
    used: set[str] = set()
    for info in infos:
        params = inspect.signature(info.fn).parameters
        accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
        mine = {k: v for k, v in options.items() if k in params or accepts_any}
        used |= set(mine)
        per[info.name] = mine
    unknown = set(options) - used
    if unknown:
        valid = sorted({k for info in infos for k in info.options()})
        raise MethodError(
            f"unknown option(s) {', '.join(sorted(unknown))} for {', '.join(i.name for i in infos)}; "
            f"valid options: {', '.join(valid) or 'none'}"
        )
    return per


@overload
def explain(
    model: nn.Module | str,
    inputs: Any,
    method: str = "gradcam",
    targets: TargetSpec = None,
    layer: str | nn.Module | None = None,
    capture: str = "output",
    *,
    call: int = -1,
    preprocess: Preprocess | None = None,
    class_names: Sequence[str] | None = None,
    **options: Any,
) -> Explanation: ...


@overload
def explain(
    model: nn.Module | str,
    inputs: Any,
    method: Sequence[str],
    targets: TargetSpec = None,
    layer: str | nn.Module | None = None,
    capture: str = "output",
    *,
    call: int = -1,
    preprocess: Preprocess | None = None,
    class_names: Sequence[str] | None = None,
    **options: Any,
) -> dict[str, Explanation]: ...


def explain(
    model: nn.Module | str,
    inputs: Any,
    method: str | Sequence[str] = "gradcam",
    targets: TargetSpec = None,
    layer: str | nn.Module | None = None,
    capture: str = "output",
    *,
    call: int = -1,
    preprocess: Preprocess | None = None,
    class_names: Sequence[str] | None = None,
    **options: Any,
) -> Explanation | dict[str, Explanation]:
    """Explain a classifier's decision for a batch of images.

    Args:
        model: an ``nn.Module`` classifier returning ``(N, num_classes)`` logits, a zoo name
            (``"efficientnet_lite0"``), or a model from :func:`camlens.load_model`.
        inputs: a preprocessed ``(N, C, H, W)`` tensor, or an image path / PIL image / HxWx3 array
            / list of them (then the model's preprocessing is applied: resize without cropping).
        method: a registered method name (see :func:`camlens.methods`) or a list of names, computed
            from one shared forward pass and returned as ``{name: Explanation}``.
        targets: ``None`` (top-1), an int, N ints, an ``(N, K)`` table, ``"topK"``, class names,
            or a callable ``logits -> (N,)`` scores. See :mod:`camlens.targets`.
        layer: dotted module name, module, or ``None``: the features entering the final global
            pooling (a module or a functional call), else the last spatial module output.
        capture: ``"output"`` or ``"input"`` of ``layer``.
        call: which call of a module that runs several times per forward (default: the last).
        preprocess: override the preprocessing applied to image inputs.
        class_names: class names for a plain ``nn.Module`` (zoo models carry theirs).
        **options: method options, e.g. ``max_channels=``, ``batch_size=``, ``grad_norm="rms"``,
            ``steps=``, ``n_samples=``.

    Returns:
        An :class:`Explanation`, or a dict of them when ``method`` is a list.
    """
    if isinstance(model, str):
        model = load_model(model)
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be an nn.Module or a zoo name, not {type(model).__name__}")
    names = [method] if isinstance(method, str) else list(method)
    if not names:
        raise MethodError("no method given")
    infos = [get_method(m) for m in names]
    per_options = _split_options(infos, options)
    needs = frozenset().union(*(i.needs for i in infos))
    card = card_of(model)
    classes = list(class_names) if class_names is not None else (card.class_names if card else None)

    with torch.inference_mode(False):
        x, images, sources = prepare_inputs(inputs, model, preprocess)
    spec: CaptureSpec | None = None
    if "features" in needs or "layer_grads" in needs:
        if layer is None and card is not None and card.layer is not None:
            spec = resolve_layer(model, card.layer, card.capture, call)
        else:
            spec = resolve_layer(model, layer, capture, call)

    # one method asks for at most one layer and one input gradient: the last backward may free the graph
    backwards = ("layer_grads" in needs) + ("input_grads" in needs) if len(infos) == 1 else None

    def forward_pass(spec: CaptureSpec | None) -> ForwardPass:
        return ForwardPass(model, x, spec, targets, classes, needs=needs, backwards=backwards)

    with torch.inference_mode(False), eval_mode(model):  # works under the caller's inference_mode too
        resolved = run_resolved(model, x, spec, forward_pass)
        ctx, layer_name = resolved.ctx, resolved.layer_name
        with torch.no_grad():
            probs = ctx.logits.detach().float().softmax(dim=1)
            if ctx.targets.fn is None:
                probs = probs.gather(1, ctx.targets.classes.to(probs.device))
            else:
                probs = torch.full(ctx.scores.shape, float("nan"), device=probs.device)
        results: dict[str, Explanation] = {}
        for info in infos:
            out = info.fn(ctx, **per_options[info.name])
            raw = out.raw.detach()
            maps = out.maps
            if maps is None:
                maps = F.interpolate(raw.float(), size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
            results[info.name] = Explanation(
                maps=maps.detach().float(),
                raw=raw,
                classes=ctx.targets.classes.clone(),
                scores=ctx.scores.detach().clone(),
                probs=probs,
                method=info.name,
                layer=layer_name if info.kind == "layer" or "features" in info.needs else None,
                class_names=classes,
                images=images,
                sources=sources,
                model_name=card.name if card else type(model).__name__,
                extras=dict(out.extras),
            )
        del ctx, resolved  # free the graph before returning
    if isinstance(method, str):
        return results[infos[0].name]
    return {n: results[i.name] for n, i in zip(names, infos)}


def predict(
    model: nn.Module | str,
    inputs: Any,
    topk: int = 5,
    *,
    preprocess: Preprocess | None = None,
    class_names: Sequence[str] | None = None,
) -> list[list[tuple[int, str, float]]]:
    """Top-k classes per image as ``[(class_id, name, probability), …]`` (one inference forward)."""
    if isinstance(model, str):
        model = load_model(model)
    x, _, _ = prepare_inputs(inputs, model, preprocess)
    card = card_of(model)
    names = list(class_names) if class_names is not None else (card.class_names if card else None)
    with eval_mode(model), torch.inference_mode():
        p = model(x).float().softmax(dim=1)
    v, i = p.topk(min(topk, p.shape[1]), dim=1)
    return [
        [(int(c), names[c] if names else str(int(c)), float(q)) for q, c in zip(vr, ir)]
        for vr, ir in zip(v.tolist(), i.tolist())
    ]


__all__ = ["explain", "predict"]
