"""Defaults shared across the API, the CLI and the web app (one number, one place; no torch import)."""

from __future__ import annotations

#: images explained per forward: the one default of ``camlens explain`` / ``localize`` / ``compare``,
#: :func:`camlens.explain_dataset` and :func:`camlens.metrics.evaluate_model` (the metrics'
#: ``batch_size`` is another quantity: perturbed copies per forward, default 32)
EXPLAIN_BATCH = 16

#: perturbed, noisy or interpolated copies of an image per forward, by device: small batches keep a CNN's
#: activations in the CPU's cache (2 cores, deletion's forwards per image: EfficientNet-Lite0 13-16 ms
#: at 4, 13-19 at 8, 23-25 at 16, 41-43 at 32; ResNet-50 66 / 69 / 87 / 143 ms), large ones fill an
#: accelerator
CPU_FORWARD_BATCH = 4
ACCEL_FORWARD_BATCH = 64


def forward_batch(device_type: str) -> int:
    """The default number of perturbed copies per forward on a device of type ``device_type``
    (``"cpu"``, ``"cuda"``…): :data:`CPU_FORWARD_BATCH` on the CPU, else :data:`ACCEL_FORWARD_BATCH`."""
    return CPU_FORWARD_BATCH if device_type == "cpu" else ACCEL_FORWARD_BATCH
