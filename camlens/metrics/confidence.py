r"""Average drop and increase in confidence (Chattopadhyay et al., "Grad-CAM++: Generalized
Gradient-based Visual Explanations for Deep Convolutional Networks", WACV 2018, section 5.2).

The image is masked by its explanation map, :math:`\tilde x = s + m \odot (x - s)` with :math:`m`
the map min-max normalized to [0, 1] per image by :func:`camlens.base.ops.minmax`, the function behind
the overlays (a map constant up to rounding becomes zeros: nothing is kept)
and :math:`s` the substrate (default ``"zero"``, 0 in the model's input space). With
:math:`Y_c` the softmax probability of the target class on the image and :math:`O_c` on the
masked image, the per-image values are

.. math:: \mathrm{drop}_i = 100\,\frac{\max(0,\; Y_c^i - O_c^i)}{Y_c^i}, \qquad
          \mathrm{increase}_i = 100\,[\,Y_c^i < O_c^i\,]

and their means over images are the paper's *Average Drop %* (lower is better) and
*% Increase in Confidence* (higher is better).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from camlens.api.explainer import ExplainRequest
from camlens.base.errors import InputError
from camlens.base.ops import minmax
from camlens.metrics._common import MapsLike, Substrate, class_probs, make_substrate, prepare, scored_batches


def confidence_pair(
    model: nn.Module,
    inputs: Any,
    maps: MapsLike,
    targets: Any = None,
    *,
    substrate: Substrate = "zero",
    batch_size: int | None = None,
    seed: int = 0,
    preprocess=None,
    explain_options: dict[str, Any] | ExplainRequest | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Y, O)``: target-class probabilities on the images and on the map-masked images, ``(N,)`` each."""
    if model is None:
        raise InputError("average drop / increase in confidence need the model")
    prep = prepare(
        model,
        inputs,
        maps,
        targets,
        preprocess=preprocess,
        batch_size=batch_size,
        seed=seed,
        explain_options=explain_options,
    )
    x, classes = prep.x, prep.classes
    m = minmax(prep.maps)[:, None].to(x.dtype)
    y = class_probs(model, x, classes, batch_size)

    sub = make_substrate(x, substrate)

    def make(chunk):
        idx = torch.tensor([i for i, _ in chunk], device=x.device)
        return sub[idx] + m[idx] * (x[idx] - sub[idx])

    o = scored_batches(model, [(i, None) for i in range(prep.n)], make, classes, batch_size)
    return y, o


def average_drop(model: nn.Module, inputs: Any, maps: MapsLike, targets: Any = None, **options: Any) -> torch.Tensor:
    r"""Per-image drop in confidence, :math:`100\max(0, Y_c - O_c)/Y_c`, ``(N,)`` in [0, 100];
    the mean is the paper's Average Drop % (lower is better). Options: :func:`confidence_pair`."""
    y, o = confidence_pair(model, inputs, maps, targets, **options)
    return 100.0 * (y - o).clamp_min(0) / y.clamp_min(1e-12)


def increase_in_confidence(
    model: nn.Module, inputs: Any, maps: MapsLike, targets: Any = None, **options: Any
) -> torch.Tensor:
    r"""Per-image increase indicator, :math:`100\,[Y_c < O_c]`, ``(N,)`` with values 0 or 100; the
    mean is the paper's % Increase in Confidence (higher is better). Options: :func:`confidence_pair`."""
    y, o = confidence_pair(model, inputs, maps, targets, **options)
    return 100.0 * (o > y).float()
