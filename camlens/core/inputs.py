"""Inputs to explanations: a preprocessed tensor, or images (paths, PIL images, arrays) that are read
and preprocessed with the model's own preprocessing (resize without cropping, normalise)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from camlens.base._util import model_device, model_dtype, numbered
from camlens.base.errors import InputError
from camlens.base.io import decode_images
from camlens.models.preprocess import IMAGENET, Preprocess
from camlens.models.zoo import card_of


def prepare_inputs(
    inputs: Any, model: nn.Module, preprocess: Preprocess | None = None
) -> tuple[torch.Tensor, list[np.ndarray] | None, list[str]]:
    """Inputs -> ``(x, original images or None, source names)`` on the model's device."""
    x, images, names, _ = prepare_batch(inputs, model, preprocess)
    if isinstance(x, list):
        raise InputError(
            f"these images differ in size ({sorted({tuple(t.shape[-2:]) for t in x})}) and this needs one "
            "batch tensor: resize them, or pass them one at a time"
        )
    return x, images, names


def check_not_meta(inputs: Any) -> None:
    """An input tensor on the ``meta`` device has a shape but no values: nothing to explain."""
    ts = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    if any(isinstance(t, torch.Tensor) and t.is_meta for t in ts):
        raise InputError(
            "the input tensor is on the 'meta' device (a shape without values): there are no pixels to explain; "
            "create it on a real device, e.g. torch.empty_like(x, device='cpu') filled with the image, or pass "
            "the images themselves"
        )


def prepare_batch(
    inputs: Any, model: nn.Module, preprocess: Preprocess | None = None, *, exact: bool = True
) -> tuple[torch.Tensor | list[torch.Tensor], list[np.ndarray] | None, list[str], list[tuple[int, int]] | None]:
    """As :func:`prepare_inputs`, but images of different sizes given to a detector (whose
    preprocessing keeps each image's size, ``resize="none"``), or a list of ``(C, H, W)`` tensors
    of different sizes, come back as a list of ``(C, H, W)`` tensors (its list-of-images input).

    ``exact=False``: image files larger than the preprocessing needs are decoded reduced
    (:func:`camlens.base.io.decode_image`); the fourth value gives each photo's own ``(H, W)``
    (``None`` for tensor inputs), which the images then no longer have."""
    device = model_device(model)
    check_not_meta(inputs)
    if isinstance(inputs, torch.Tensor):
        x = inputs
        if x.dim() not in (4, 5):  # images (N, C, H, W); volumes and clips (N, C, D, H, W)
            fix = " Add a batch dimension: x.unsqueeze(0)." if x.dim() == 3 else ""
            raise InputError(
                f"expected an image batch of shape (N, C, H, W) or a volume / clip batch (N, C, D, H, W); "
                f"got {tuple(x.shape)}.{fix}"
            )
        if not x.is_floating_point():
            raise InputError(
                f"input tensor has dtype {x.dtype}; explanations need a floating-point, preprocessed tensor "
                "(convert with x.float() and normalize, or pass the images themselves)"
            )
        if x.shape[0] == 0 or min(x.shape[2:]) < 1:
            raise InputError(f"empty input batch of shape {tuple(x.shape)}")
        with torch.inference_mode(False):
            if x.is_inference():
                x = x.clone()
        x = x.to(device=device, dtype=model_dtype(model))
        return x, None, numbered("image", x.shape[0]), None
    if (
        isinstance(inputs, (list, tuple))
        and inputs
        and all(isinstance(t, torch.Tensor) and t.dim() == 3 and t.is_floating_point() for t in inputs)
    ):  # a detector's list of (C, H, W) images, as torchvision detectors take them
        ts = [t.detach().to(device=device, dtype=model_dtype(model)) for t in inputs]
        xs = torch.stack(ts) if len({tuple(t.shape) for t in ts}) == 1 else ts
        return xs, None, numbered("image", len(ts)), None
    items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    card = card_of(model)
    pp = preprocess or (card.preprocess if card else IMAGENET)
    decoded = decode_images(items, None if exact else pp.min_decode_size)
    images, sizes = [d.rgb for d in decoded], [d.size for d in decoded]
    names = []
    for item, default in zip(items, numbered("image", len(items)), strict=True):
        names.append(
            Path(item).stem
            if isinstance(item, (str, os.PathLike))
            else Path(getattr(item, "filename", "") or default).stem or default
        )
    if pp.resize == "none" and len({im.shape[:2] for im in images}) > 1:  # a detector's images of different sizes
        return [pp([im], device=device)[0].to(model_dtype(model)) for im in images], images, names, sizes
    x = pp(images, device=device).to(model_dtype(model))
    return x, images, names, sizes
