"""Small helpers shared across camlens: a self-restoring eval mode, the model's device and dtype,
and the separable Gaussian blur (Integrated Gradients' blur baseline, the RISE insertion substrate).

Image file suffixes live beside the image reader (:data:`camlens.base.io.IMAGE_EXTENSIONS`), so that the
command line can use them without importing torch.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import fields, replace
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from camlens.base.concurrency import model_lock
from camlens.base.errors import InputError

C = TypeVar("C")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode; restore each module's own flag afterwards (even on error).

    A model already in eval mode everywhere (the usual case) costs one pass over its modules:
    ``model.eval()`` (a recursive ``__setattr__`` per module) only runs when a module is training,
    and only flags that differ afterwards are written back.

    The block holds the model's camlens lock (:func:`camlens.base.concurrency.model_lock`): camlens
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
    """The device of the model's first parameter (or buffer); CPU for a model without tensors."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if none)."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def gaussian_kernel1d(
    kernel_size: int, sigma: float, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    r"""The normalised 1-D Gaussian :math:`k(t) \propto \exp(-t^2 / 2\sigma^2)`, ``t`` centred on the taps."""
    t = torch.arange(kernel_size, device=device, dtype=dtype) - (kernel_size - 1) / 2
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(
    x: torch.Tensor, sigma: float, *, kernel_size: int | None = None, mode: str = "replicate"
) -> torch.Tensor:
    r"""Separable Gaussian blur of each channel of ``(N, C, H, W)``.

    The kernel is :math:`k(t) \propto \exp(-t^2 / 2\sigma^2)` for :math:`t = -r \dots r`, normalised
    to sum 1, applied along the width then the height. ``kernel_size`` (odd) defaults to
    :math:`2\lceil 3\sigma\rceil + 1`; ``mode`` is the padding (``"replicate"`` or ``"reflect"``;
    reflect falls back to replicate on images smaller than the radius).
    """
    if kernel_size is None:
        kernel_size = 2 * max(1, math.ceil(3 * sigma)) + 1
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, not {kernel_size}")
    r = kernel_size // 2
    k = gaussian_kernel1d(kernel_size, sigma, x.device, x.dtype)
    c = x.shape[1]
    if mode == "reflect" and min(x.shape[-2:]) <= r:
        mode = "replicate"
    y = F.pad(x, (r, r, 0, 0), mode=mode)
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
    y = F.pad(y, (0, 0, r, r), mode=mode)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)


def numbered(prefix: str, n: int) -> list[str]:
    """``prefix0`` … ``prefix{n-1}``, zero-padded to one width so that the names sort in order
    (``image00`` … ``image11`` for 12 images; ``image0`` … ``image9`` for up to 10)."""
    width = len(str(max(n - 1, 0)))
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def rank_tags(k: int) -> list[str]:
    """``top1`` … ``top{k}`` zero-padded to one width (``top01`` … ``top20``), so files sort by rank."""
    width = len(str(k))
    return [f"top{j:0{width}d}" for j in range(1, k + 1)]


def with_options(cls: type[C], config: C | None, options: dict[str, Any], what: str) -> C:
    """``config`` (default ``cls()``) with ``options`` overriding its fields: the one rule of the
    settings objects (``FinetuneConfig``, ``EvaluateConfig``, ``SaveOptions``). An unknown key is an
    :class:`~camlens.base.errors.InputError` naming the valid ones."""
    valid = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise InputError(f"unknown {what} option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return replace(config if config is not None else cls(), **options)  # type: ignore[type-var]


def renamed(options: dict[str, Any], old: str, new: str, value: Any, where: str) -> Any:
    """The value of a keyword renamed in 0.3: ``value`` (given under its new name ``new``), or the one
    given under its 0.2 name ``old`` (popped from ``options``, with a ``DeprecationWarning`` naming
    the new one). Both given: an :class:`~camlens.base.errors.InputError`."""
    if old not in options:
        return value
    if value is not None:
        raise InputError(f"{where}: give {new}= only ({old}= is its old name)")
    warnings.warn(f"{where}({old}=) is now {new}= (one name across camlens)", DeprecationWarning, stacklevel=3)
    return options.pop(old)
