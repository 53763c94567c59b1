"""The input size and channels a vision transformer takes, and how camlens meets them.

A convolutional network takes any size its pooling allows; a vision transformer's learned
position embeddings are made for one grid of patches. Three families, three answers:

* **Hugging Face** ViT-style models (``config.image_size``, a ``forward`` that accepts
  ``interpolate_pos_encoding``: ViT, DeiT, BEiT, Swin, CLIP vision…): an input of another size is
  run with ``interpolate_pos_encoding=True`` (the model interpolates its position embeddings), so
  any resolution is explained; ``extras["input_size"]`` says so. Added by a forward pre-hook that
  lives for the call only.
* **timm** ViTs built with ``dynamic_img_size=True``: any size (a multiple of the patch size
  unless ``dynamic_img_pad=True``); built without it, only their ``img_size``.
* **torchvision** ``VisionTransformer``: only its ``image_size``.

Where the model cannot take the input, :func:`fit_input` raises an :class:`InputError` naming the
size it needs and how to get it (resize, or rebuild with the flag), before the model's own
``ValueError`` / ``AssertionError``; a channel count other than the patch embedding's is refused
the same way. Other models are left to their forward (and :func:`camlens.core.engine.forward`'s
diagnosis).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from camlens.base.errors import InputError


@dataclass(frozen=True)
class SizeRule:
    """What a transformer takes: ``size`` ``(H, W)`` it was built for, ``channels``, ``patch``
    ``(ph, pw)``, ``mode`` (``"fixed"``, ``"interpolate"``: Hugging Face's flag, ``"dynamic"``:
    timm's dynamic size) and ``family`` (for messages), ``pad`` (timm ``dynamic_img_pad``)."""

    size: tuple[int, int] | None
    channels: int | None
    patch: tuple[int, int] | None
    mode: str
    family: str
    pad: bool = False


def _pair(v: Any) -> tuple[int, int] | None:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return (int(v[0]), int(v[1]))
    return None


def _from_module(model: nn.Module, prefix: str) -> bool:
    return any(c.__module__.startswith(prefix) for c in type(model).__mro__)


def _has_position_embeddings(model: nn.Module) -> bool:
    """Whether a Hugging Face model holds absolute position embeddings (ViT's ``position_embeddings``,
    CLIP's ``position_embedding``); ConvNeXt or ResNet configs name an image size they do not need."""
    names = ("position_embeddings", "position_embedding")
    return any(isinstance(getattr(m, a, None), (torch.Tensor, nn.Module)) for m in model.modules() for a in names)


def size_rule(model: nn.Module) -> SizeRule | None:
    """The :class:`SizeRule` of a Hugging Face, timm or torchvision vision transformer (``None``
    for any other model)."""
    cfg = getattr(model, "config", None)
    if (
        _from_module(model, "transformers.")
        and cfg is not None
        and _pair(getattr(cfg, "image_size", None))
        and _has_position_embeddings(model)
    ):
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        mode = "interpolate" if "interpolate_pos_encoding" in params else "fixed"
        ch = getattr(cfg, "num_channels", None)
        return SizeRule(
            _pair(cfg.image_size),
            ch if isinstance(ch, int) else None,
            _pair(getattr(cfg, "patch_size", None)),
            mode,
            "Hugging Face",
        )
    pe = getattr(model, "patch_embed", None)
    if _from_module(model, "timm.") and isinstance(pe, nn.Module) and hasattr(pe, "strict_img_size"):
        proj = getattr(pe, "proj", None)
        ch = getattr(proj, "in_channels", None)
        dynamic = bool(getattr(model, "dynamic_img_size", False)) or not pe.strict_img_size
        return SizeRule(
            _pair(getattr(pe, "img_size", None)),
            ch,
            _pair(getattr(pe, "patch_size", None)),
            "dynamic" if dynamic else "fixed",
            "timm",
            bool(getattr(pe, "dynamic_img_pad", False)),
        )
    if _from_module(model, "torchvision.models.vision_transformer") and isinstance(
        getattr(model, "image_size", None), int
    ):
        conv = getattr(model, "conv_proj", None)
        ps = getattr(model, "patch_size", None)
        return SizeRule(_pair(model.image_size), getattr(conv, "in_channels", None), _pair(ps), "fixed", "torchvision")
    return None


def _how(rule: SizeRule) -> str:
    h, w = rule.size or (0, 0)
    resize = (
        f"resize the tensor to {h}x{w} (torch.nn.functional.interpolate(x, size=({h}, {w}), mode='bilinear')), "
        "or pass the images themselves (paths, PIL images, arrays): the model's preprocessing resizes them"
    )
    if rule.family == "timm":
        return resize + "; or build the model with timm.create_model(name, dynamic_img_size=True) to take any size"
    if rule.family == "torchvision":
        return (
            resize + f"; or build it with image_size=<your size> (a multiple of {rule.patch[0] if rule.patch else 16})"
        )
    return resize + "; this model's forward has no interpolate_pos_encoding"


def check_input(rule: SizeRule, shape: tuple[int, ...]) -> str | None:
    """``None`` when a ``(N, C, H, W)`` input fits ``rule`` as is, ``"interpolate"`` when it needs
    Hugging Face's ``interpolate_pos_encoding``; else an :class:`InputError` naming the fix."""
    c, hw = int(shape[1]), (int(shape[-2]), int(shape[-1]))
    if rule.channels is not None and c != rule.channels:
        fix = (
            " Convert grayscale with x.expand(-1, 3, -1, -1) (or x.repeat(1, 3, 1, 1)); drop an alpha channel with "
            "x[:, :3]; or pass the images themselves, which camlens converts to RGB"
            if rule.channels == 3
            else ""
        )
        raise InputError(
            f"this {rule.family} vision transformer takes {rule.channels}-channel images but the input has {c} "
            f"channel(s) (shape {tuple(shape)}).{fix}"
        )
    if rule.size is None or hw == rule.size:
        return None
    if rule.mode == "interpolate":
        return "interpolate"
    if rule.mode == "dynamic":
        if rule.patch and not rule.pad and (hw[0] % rule.patch[0] or hw[1] % rule.patch[1]):
            ph, pw = rule.patch
            raise InputError(
                f"this timm vision transformer takes sizes that are multiples of its {ph}x{pw} patches; the input is "
                f"{hw[0]}x{hw[1]}: resize it to {max(ph, hw[0] // ph * ph)}x{max(pw, hw[1] // pw * pw)}, or build "
                "the model with dynamic_img_pad=True"
            )
        return None
    raise InputError(
        f"this {rule.family} vision transformer takes {rule.size[0]}x{rule.size[1]} images only (its position "
        f"embeddings are made for that grid); the input is {hw[0]}x{hw[1]}: {_how(rule)}"
    )


def _interpolating_hook(size: tuple[int, int]):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        x = args[0] if args else kwargs.get("pixel_values")
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) != 4 or tuple(shape[-2:]) == size or "interpolate_pos_encoding" in kwargs:
            return None
        return args, {**kwargs, "interpolate_pos_encoding": True}

    return hook


@contextlib.contextmanager
def fit_input(model: nn.Module, shape: tuple[int, ...] | None) -> Iterator[str | None]:
    """Within the block, ``model`` takes inputs of ``shape`` ``(N, C, H, W)``: yields ``None`` (as
    is) or a description of what was done (Hugging Face's ``interpolate_pos_encoding``, by a
    forward pre-hook removed on exit, also on error); raises :class:`InputError` when the model
    cannot take that input. ``shape=None`` (a list of images of different sizes): no check."""
    rule = size_rule(model) if shape is not None and len(shape) == 4 else None
    verdict = check_input(rule, shape) if rule is not None and shape is not None else None
    if verdict is None or rule is None or rule.size is None:
        yield None
        return
    handle = model.register_forward_pre_hook(_interpolating_hook(rule.size), with_kwargs=True)
    try:
        yield (
            f"interpolate_pos_encoding=True: the model was built for {rule.size[0]}x{rule.size[1]} images, "
            f"its position embeddings are interpolated to {shape[-2]}x{shape[-1]}"  # type: ignore[index]
        )
    finally:
        handle.remove()


def diagnose_size_error(model: nn.Module, shape: tuple[int, ...]) -> InputError | None:
    """After the model failed on an input of ``shape``: the :class:`InputError` of the first
    vision transformer inside it (a wrapped one too) that cannot take that input, or ``None``."""
    if len(shape) != 4:
        return None
    for m in model.modules():
        rule = size_rule(m)
        if rule is None:
            continue
        try:
            verdict = check_input(rule, shape)
        except InputError as err:
            return err
        if verdict == "interpolate":
            return InputError(
                f"a Hugging Face vision transformer inside this model was built for {rule.size[0]}x{rule.size[1]} "  # type: ignore[index]
                f"images and the input is {shape[-2]}x{shape[-1]}: call it with interpolate_pos_encoding=True in your "
                f"wrapper's forward (camlens does so for the model itself), or {_how(rule)}"
            )
    return None


__all__ = ["SizeRule", "check_input", "diagnose_size_error", "fit_input", "size_rule"]
