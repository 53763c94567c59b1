"""``camlens.explain``: the one call that turns a model, images and targets into maps.

    model, images ──preprocess──▶ x ──one forward (features captured)──▶ logits ─▶ targets
                                                 │
                 methods (one shared pass) ◀─────┘──▶ Explanation(maps, raw, classes, scores…)

The model is left exactly as it was: hooks removed, every module's train/eval flag restored,
``requires_grad`` untouched, no ``.grad`` written — also when an exception is raised.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .capture import Captured, CaptureSpec, capture, count_calls, needs_full_scan
from .concurrency import model_lock
from .engine import ForwardPass, forward
from .errors import InputError, MethodError
from .explanation import Explanation
from .io import load_images
from .layers import fallback_spec, resolve_layer
from .methods.registry import MethodInfo, get_method
from .models.preprocess import IMAGENET, Preprocess
from .models.zoo import card_of, load_model
from .targets import TargetSpec


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode; restore each module's own flag afterwards (even on error).

    A model already in eval mode everywhere (the usual case) costs one pass over its modules:
    ``model.eval()`` (a recursive ``__setattr__`` per module) only runs when a module is training,
    and only flags that differ afterwards are written back.

    The block holds the model's camlens lock (:func:`camlens.concurrency.model_lock`): camlens
    calls on one model from several threads run one after the other, each seeing only its own
    forward passes, hooks and train/eval flags.
    """
    with model_lock(model):
        flags = [(m, m.training) for m in model.modules()]
        try:
            if any(t for _, t in flags):
                model.eval()
            yield model
        finally:
            for m, t in flags:
                if m.training != t:
                    m.training = t


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def prepare_inputs(
    inputs: Any, model: nn.Module, preprocess: Preprocess | None = None
) -> tuple[torch.Tensor, list[np.ndarray] | None, list[str]]:
    """Inputs -> ``(x, original images or None, source names)`` on the model's device."""
    device = model_device(model)
    if isinstance(inputs, torch.Tensor):
        x = inputs
        if x.dim() != 4:
            fix = " Add a batch dimension: x.unsqueeze(0)." if x.dim() == 3 else ""
            raise InputError(f"expected an image batch of shape (N, C, H, W); got {tuple(x.shape)}.{fix}")
        if not x.is_floating_point():
            raise InputError(
                f"input tensor has dtype {x.dtype}; explanations need a floating-point, preprocessed tensor "
                "(convert with x.float() and normalize, or pass the images themselves)"
            )
        if x.shape[0] == 0 or x.shape[-1] < 1 or x.shape[-2] < 1:
            raise InputError(f"empty input batch of shape {tuple(x.shape)}")
        with torch.inference_mode(False):
            if x.is_inference():
                x = x.clone()
        x = x.to(device=device, dtype=_model_dtype(model))
        return x, None, [f"image{i}" for i in range(x.shape[0])]
    items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    images = load_images(items)
    names = []
    for i, item in enumerate(items):
        names.append(
            Path(item).stem
            if isinstance(item, (str, os.PathLike))
            else Path(getattr(item, "filename", "") or f"image{i}").stem or f"image{i}"
        )
    card = card_of(model)
    pp = preprocess or (card.preprocess if card else IMAGENET)
    x = pp(images, device=device).to(_model_dtype(model))
    return x, images, names


def method_names(method: Any) -> list[str]:
    """``method=`` as a non-empty list of names; anything else is a :class:`MethodError`."""
    if isinstance(method, str):
        return [method]
    if isinstance(method, (list, tuple)) and method and all(isinstance(m, str) for m in method):
        return list(method)
    if isinstance(method, (list, tuple)) and not method:
        raise MethodError("no method given: pass a name such as method='gradcam' or a list of names")
    raise MethodError(
        f"method must be a method name (e.g. method='gradcam') or a list of names, not {method!r}; "
        "camlens.methods() lists them"
    )


def check_materialized(model: nn.Module) -> None:
    """A model whose parameters are on the ``meta`` device has no values to explain."""
    if any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers()):
        raise InputError(
            "the model's parameters are on the 'meta' device (shapes without values, e.g. built under "
            "torch.device('meta') or with init_empty_weights); load real weights first: "
            "model.to_empty(device='cpu') then model.load_state_dict(state), or "
            "model.load_state_dict(state, assign=True)"
        )


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


def _probe(model: nn.Module, x: torch.Tensor, spec: CaptureSpec) -> Captured:
    """What a plain forward of ``x`` (one image: a cheap probe) captures at ``spec``."""
    with torch.no_grad(), capture(model, spec, cut=True, need_grad=False) as cap:
        forward(model, x)
    return cap


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
    check_materialized(model)
    names = method_names(method)
    if capture not in ("output", "input"):
        resolve_layer(model, None, capture)  # raises the error that names the valid choices
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

    with torch.inference_mode(False), eval_mode(model):  # works under the caller's inference_mode too
        if spec is not None and spec.call < -1:
            total = count_calls(model, spec, x[:1])
            if total + spec.call < 0:
                raise InputError(f"{spec.name} runs {total} times per forward; call={spec.call} does not exist")
            spec = CaptureSpec(spec.module, spec.name, spec.capture, total + spec.call)
        if spec is not None and spec.capture == "pool" and spec.call == -1:
            spec = replace(spec, lazy_pool=True)  # hook pooling modules; see camlens.capture
        # one method asks for at most one layer and one input gradient: the last backward may free the graph
        backwards = ("layer_grads" in needs) + ("input_grads" in needs) if len(infos) == 1 else None

        def forward_pass(spec: CaptureSpec | None) -> ForwardPass:
            return ForwardPass(model, x, spec, targets, classes, needs=needs, backwards=backwards)

        ctx = forward_pass(spec)
        last_spatial = ctx.last_spatial
        if spec is not None and needs_full_scan(model, spec, ctx.features):
            spec = replace(spec, lazy_pool=False)  # no pooling module ran: watch every call
            if len(x) == 1:
                ctx = forward_pass(spec)
                last_spatial = ctx.last_spatial
            else:  # probe one image before re-running the batch
                probe = _probe(model, x[:1], spec)
                last_spatial = probe.last_spatial
                if probe.value is not None:
                    ctx = forward_pass(spec)
        if spec is not None and ctx.features is None:
            if spec.capture == "pool":  # no global pooling: fall back to the last spatial module,
                # which the pass (or probe) that watched every call has seen
                spec = fallback_spec(last_spatial)
                ctx = forward_pass(spec)
            else:
                raise InputError(
                    f"{spec.describe()} was never called in the forward pass"
                    + (f" (it ran {ctx.calls} times)" if ctx.calls else "")
                    + "; choose another layer (`camlens layers MODEL`)"
                )
        if ctx.features is not None and ctx.features.dim() != 4:
            raise InputError(
                f"the {spec.describe()} has shape {tuple(ctx.features.shape)}, not (N, C, h, w); "
                "layer methods need a convolutional feature map: choose another layer"
            )
        layer_name = None
        if spec is not None:
            layer_name = (
                spec.describe()
                if spec.capture != "pool"
                else f"input of global pooling ({ctx.pool_module or 'functional call'})"
            )
        with torch.no_grad():
            probs = ctx.logits.detach().float().softmax(dim=1)
            if ctx.targets.fn is None:
                probs = probs.gather(1, ctx.targets.classes.to(probs.device))
            else:
                probs = torch.full(ctx.scores.shape, float("nan"), device=probs.device)
        ranks = None
        if ctx.targets.fn is None:
            with torch.no_grad():  # 1 + the number of classes whose logit is higher than the target's
                lg = ctx.logits.detach()
                tl = lg.gather(1, ctx.targets.classes.to(lg.device))
                ranks = (1 + (lg[:, None, :] > tl[:, :, None]).sum(-1)).cpu()
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
                ranks=ranks,
                inputs=x.detach() if images is None else None,
                preprocess=preprocess or (card.preprocess if card else (IMAGENET if images is not None else None)),
            )
        del ctx
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
    check_materialized(model)
    x, _, _ = prepare_inputs(inputs, model, preprocess)
    card = card_of(model)
    names = list(class_names) if class_names is not None else (card.class_names if card else None)
    with eval_mode(model), torch.inference_mode():
        p = forward(model, x).float().softmax(dim=1)
    v, i = p.topk(min(topk, p.shape[1]), dim=1)
    return [
        [(int(c), names[c] if names else str(int(c)), float(q)) for q, c in zip(vr, ir)]
        for vr, ir in zip(v.tolist(), i.tolist())
    ]


__all__ = ["eval_mode", "explain", "predict", "prepare_inputs"]
_ = Image  # PIL images are accepted inputs (see camlens.io)
