"""``device=`` strings -> :class:`torch.device`, with an error that lists the devices that exist."""

from __future__ import annotations

import torch

from camlens.base.errors import InputError


def available_devices() -> list[str]:
    """The devices this machine offers: ``cpu``, ``cuda:0``…, ``mps``."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def parse_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> ``cuda`` when available, else ``cpu``; otherwise the device named,
    checked to exist here (:class:`~camlens.base.errors.InputError` listing the devices that do)."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    have = available_devices()
    listing = f"devices on this machine: {', '.join(have)} (or 'auto')"
    try:
        dev = torch.device(device.strip() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"unknown device {device!r}; {listing}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r}: CUDA is not available here (no GPU or no CUDA build); {listing}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA device(s); {listing}")
        return dev
    if dev.type == "mps":
        if "mps" not in have:
            raise InputError(f"device {device!r}: Apple MPS is not available here; {listing}")
        return dev
    if dev.type == "meta":
        raise InputError(f"device 'meta' holds no values and cannot run a model; {listing}")
    return dev  # other accelerator back-ends (xpu, privateuseone…): torch reports their errors


__all__ = ["available_devices", "parse_device"]
