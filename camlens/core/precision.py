"""Mixed precision for the forward passes of one :func:`camlens.explain` call.

``precision="bf16"`` or ``"fp16"`` runs every call of the model inside the block under
``torch.autocast(device, dtype)`` (convolutions and matrix products in the low precision, the ops
autocast keeps in float32 in float32), and nothing else: the captured features are handed to the
methods in float32 (:func:`camlens.core.capture.capture` casts them at the capture, so that the
gradients at the layer are float32 too), the model's floating outputs come back as float32, and
the methods' map arithmetic and the backward's reductions run outside autocast, in float32.

Devices: CPU takes ``bf16`` (``fp16`` autocast on CPU is slow where it exists, and refused);
CUDA takes ``fp16`` and, on GPUs that support it (Ampere and later), ``bf16``; MPS takes ``fp16``.
The tolerance against ``fp32`` (Pearson correlation and largest difference of min-max normalised
maps) is measured per model family and held by ``tests/core/test_precision.py``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from camlens.base.errors import InputError

#: the precisions ``explain(..., precision=)`` takes
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: what each device type runs under autocast here
_SUPPORTED = {"cpu": ("bf16",), "cuda": ("bf16", "fp16"), "mps": ("fp16",)}
#: the dtypes a capture casts to float32 under autocast
LOW_PRECISION = (torch.bfloat16, torch.float16)


def check_precision(precision: Any) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else an :class:`InputError` naming them."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, not {precision!r}")
    return precision


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (``None`` for ``fp32``); a precision the
    device cannot run is an :class:`InputError` saying which it can."""
    if check_precision(precision) == "fp32":
        return None
    ok = _SUPPORTED.get(device.type, ())
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        ok = ("fp16",)
    if precision not in ok:
        can = f"use precision={ok[0]!r} or 'fp32'" if ok else "use precision='fp32'"
        raise InputError(
            f"precision={precision!r} is not supported for a model on {device.type} (autocast there runs "
            f"{', '.join(ok) or 'no reduced precision'}): {can}, or move the model to a device that supports it"
        )
    return _DTYPES[precision]


def _as_float(output: Any) -> Any:
    """A low-precision tensor output as float32 (also inside a plain tuple, list or dict)."""
    if isinstance(output, torch.Tensor):
        return output.float() if output.dtype in LOW_PRECISION else output
    if type(output) in (tuple, list):
        return type(output)(_as_float(o) for o in output)
    if type(output) is dict:
        return {k: _as_float(v) for k, v in output.items()}
    return output


@contextlib.contextmanager
def autocast_forwards(model: nn.Module, precision: str, device: torch.device) -> Iterator[torch.dtype | None]:
    """While active, every forward of ``model`` *in this thread* runs under ``torch.autocast`` at
    ``precision`` and hands back float32 outputs; code between the forwards (methods, backward
    reductions) runs without autocast. Yields the autocast dtype (``None``: ``fp32``, nothing done).
    The hooks are removed and the autocast state restored on exit, also when a forward raised."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        yield None
        return
    owner = threading.get_ident()  # the hooks see every thread's forwards of this model: act on ours
    active: list[torch.autocast] = []

    def pre(module: nn.Module, args: Any) -> None:
        if threading.get_ident() == owner:
            ac = torch.autocast(device.type, dtype=dtype)
            ac.__enter__()
            active.append(ac)

    def post(module: nn.Module, args: Any, output: Any) -> Any:
        if threading.get_ident() != owner or not active:
            return None
        active.pop().__exit__(None, None, None)
        return _as_float(output)

    handles = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
    try:
        yield dtype
    finally:
        for h in handles:
            h.remove()
        while active:  # a forward that raised never reached its post hook
            active.pop().__exit__(None, None, None)


def features_in_float32(t: torch.Tensor) -> torch.Tensor:
    """Captured features as the methods get them: float32 when a forward under autocast made them
    in low precision (the maps' arithmetic and the gradients at the layer stay in float32)."""
    if t.dtype in LOW_PRECISION and torch.is_autocast_enabled(t.device.type):
        return t.float()
    return t


__all__ = ["PRECISIONS", "autocast_dtype", "autocast_forwards", "check_precision", "features_in_float32"]
