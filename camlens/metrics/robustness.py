r"""Robustness of a map to small input changes: max-sensitivity (Yeh, Hsieh, Suggala, Inouye &
Ravikumar, "On the (In)fidelity and Sensitivity of Explanations", NeurIPS 2019).

.. math:: \mathrm{SENS}_{\max}(\Phi, f, x, r) = \max_{\lVert y - x \rVert_\infty \le r}
          \frac{\lVert \Phi(f, y) - \Phi(f, x) \rVert_F}{\lVert \Phi(f, x) \rVert_F}

estimated by Monte Carlo as in the paper: ``n_samples`` points :math:`y = x + \epsilon`,
:math:`\epsilon \sim U[-r, r]` i.i.d. per input value (in the model's input space), and the
largest change. The change is *relative* to the map's norm (Quantus' default), so that methods
whose maps differ in scale are comparable; lower is better (0: the map does not move). The target
class stays the one of the clean image. A zero map whose perturbed maps are zero too scores 0.

Noise is drawn on the CPU from ``seed``: ``g = torch.Generator().manual_seed(seed)`` then
``(torch.rand((n_samples, *x.shape), generator=g) * 2 - 1) * radius``, the same on every device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from camlens.api.explainer import ExplainRequest
from camlens.base.errors import InputError
from camlens.metrics._common import check_batch_size, explain_maps, prepare


def max_sensitivity(
    model: nn.Module,
    inputs: Any,
    method: str,
    targets: Any = None,
    *,
    radius: float = 0.05,
    n_samples: int = 10,
    seed: int = 0,
    batch_size: int = 16,
    preprocess=None,
    explain_options: dict[str, Any] | ExplainRequest | None = None,
) -> torch.Tensor:
    """Max-sensitivity of ``method``'s maps per image, ``(N,)``; lower is better.

    Args:
        model: the classifier (left untouched).
        inputs: a preprocessed ``(N, C, H, W)`` tensor or images.
        method: a registered method name (its maps are recomputed on every noisy input).
        targets: class per image (default: the clean image's top-1), fixed for the noisy inputs.
        radius: half-width :math:`r` of the uniform noise, in the model's input space.
        n_samples: Monte-Carlo draws per image.
        seed: seed of the noise (see the module docstring).
        explain_options: keyword options of :func:`camlens.explain` (``layer=``, method options).
    """
    if not isinstance(method, str):
        raise InputError("max_sensitivity needs a registered method name (its maps are recomputed on noisy inputs)")
    if not (isinstance(n_samples, int) and n_samples >= 1):
        raise InputError(f"n_samples must be a positive integer, not {n_samples!r}")
    if not radius > 0:
        raise InputError(f"radius must be > 0 (the noise half-width in input space), not {radius!r}")
    batch_size = check_batch_size(batch_size)
    prep = prepare(model, inputs, None, targets, preprocess=preprocess, batch_size=batch_size, seed=seed)
    x, classes = prep.x, prep.classes
    base = explain_maps(model, x, method, classes, batch_size, explain_options).double().flatten(1)
    g = torch.Generator().manual_seed(int(seed))
    noise = (torch.rand((n_samples, *x.shape), generator=g, dtype=torch.float32) * 2 - 1) * float(radius)
    norm = base.norm(dim=1)
    worst = torch.zeros(x.shape[0], dtype=torch.float64)
    for s in range(n_samples):
        y = x + noise[s].to(device=x.device, dtype=x.dtype)
        new = explain_maps(model, y, method, classes, batch_size, explain_options).double().flatten(1)
        diff = (new - base).norm(dim=1).cpu()
        rel = torch.where(norm.cpu() > 0, diff / norm.cpu().clamp_min(1e-300), torch.where(diff > 0, torch.inf, 0.0))
        worst = torch.maximum(worst, rel)
    return worst.float()
