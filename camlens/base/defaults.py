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
#: ... for the methods (RISE, occlusion, LIME, KernelSHAP, IG and SmoothGrad, several with a backward):
#: 8 on the CPU, where 4 is 2-7 % slower (ResNet-50, 4 photos: IG 8.5 vs 7.9 s, RISE 14.8 vs 14.4 s) and
#: 32 is 30-70 % slower (IG on Lite0 3.5 vs 2.1 s)
CPU_METHOD_BATCH = 8


def forward_batch(device_type: str) -> int:
    """The default number of perturbed copies per forward of a metric on a device of type
    ``device_type`` (``"cpu"``, ``"cuda"``…): :data:`CPU_FORWARD_BATCH` on the CPU, else
    :data:`ACCEL_FORWARD_BATCH`."""
    return CPU_FORWARD_BATCH if device_type == "cpu" else ACCEL_FORWARD_BATCH


def method_batch(device_type: str) -> int:
    """The default number of masked, noisy or path copies per forward of a method:
    :data:`CPU_METHOD_BATCH` on the CPU, else :data:`ACCEL_FORWARD_BATCH`."""
    return CPU_METHOD_BATCH if device_type == "cpu" else ACCEL_FORWARD_BATCH
