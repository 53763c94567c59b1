r"""Complexity of a map: its sparseness, the Gini index of the absolute attributions (Chalasani,
Chen, Chowdhury, Wu & Jha, "Concise Explanations of Neural Networks using Adversarial Training",
ICML 2020; the index as defined by Hurley & Rickard, "Comparing Measures of Sparsity", IEEE
Trans. Inf. Theory 2009).

With :math:`a_{(1)} \le \dots \le a_{(n)}` the sorted absolute values of one map's :math:`n` pixels,

.. math:: G = 1 - 2 \sum_{k=1}^{n} \frac{a_{(k)}}{\lVert a \rVert_1}\,\frac{n - k + \tfrac12}{n}.

:math:`G = 0` for a constant map (every pixel equally important) and :math:`G = 1 - 1/n` for a
one-hot map (all the attribution on one pixel); higher means sparser, a map a person reads at once.
An all-zero map has no attribution to spread and counts as constant (0), never NaN.
"""

from __future__ import annotations

import numpy as np
import torch

from camlens.base.errors import InputError


def sparseness(maps: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Gini index of each map's absolute values, ``(N,)`` in :math:`[0, 1 - 1/n]`; higher is sparser.

    ``maps``: ``(N, H, W)`` (or ``(N, n)``) tensor or array; see the module docstring.
    """
    m = torch.as_tensor(maps).detach()
    if m.dim() < 2:
        raise InputError(f"maps must be (N, H, W), one map per image; got shape {tuple(m.shape)}")
    a = m.flatten(1).double().abs().cpu()
    if not torch.isfinite(a).all():
        raise InputError("maps contain NaN or infinite values; clean them first (torch.nan_to_num)")
    n = a.shape[1]
    srt = a.sort(dim=1).values
    total = srt.sum(dim=1, keepdim=True)
    k = torch.arange(1, n + 1, dtype=torch.float64)
    weights = (n - k + 0.5) / n
    g = 1 - 2 * (srt / total.clamp_min(1e-300) * weights).sum(dim=1)
    return torch.where(total[:, 0] > 0, g, torch.zeros_like(g)).float()
