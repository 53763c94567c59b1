r"""Deletion and insertion curves (Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for
Explanation of Black-box Models", BMVC 2018).

Pixels are ranked by the map (most important first, ties broken at random from ``seed``, see
:mod:`camlens.metrics._common`). At step :math:`k = 0..S` the :math:`n_k = \mathrm{round}(kHW/S)`
top-ranked pixels are

* **deletion**: replaced by the substrate (default ``"zero"``: 0 in the model's input space, the
  mean colour for mean/std-normalized inputs), starting from the image;
* **insertion**: copied from the image into the substrate (default ``"blur"``: the image blurred
  by an 11-tap Gaussian of :math:`\sigma = 5`), starting from the blurred image;

and the softmax probability :math:`p_c` of the target class is recorded. The score is the area
under the curve :math:`p_c(f)` over the fraction :math:`f = k/S \in [0, 1]` of pixels, by the
trapezoid rule, normalized by the length of the fraction axis so that it lies in [0, 1]:

.. math:: \mathrm{AUC} = \frac{1}{f_S - f_0}\sum_{k=1}^{S} (f_k - f_{k-1})\,\frac{p_{k-1} + p_k}{2}.

A faithful map gives a *low* deletion AUC (the probability falls as soon as the important pixels
go) and a *high* insertion AUC. All channels of a pixel are removed or inserted together.

**Volumes and clips** ``(N, C, D, H, W)`` with maps ``(N, D, H, W)``: the same curves over voxels
(:math:`n_k = \mathrm{round}(kDHW/S)`, one ranking of all voxels of the volume, ties broken as for
pixels); the ``"blur"`` substrate is the 3-D Gaussian blur of
:func:`camlens.metrics.gaussian_blur` (the 11-tap :math:`\sigma = 5` kernel along depth too),
``"mean"`` each volume's per-channel mean, ``"zero"`` 0 as for images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from camlens.api.explainer import ExplainRequest
from camlens.base.errors import InputError
from camlens.metrics._common import (
    MapsLike,
    Substrate,
    make_substrate,
    pixel_rank,
    prepare,
    removed_counts,
    scored_batches,
)


def auc(y: torch.Tensor | np.ndarray | list, x: torch.Tensor | np.ndarray | list | None = None) -> torch.Tensor:
    r"""Normalized trapezoid area under ``y`` over its last axis:
    :math:`\frac{1}{x_S - x_0}\sum_k (x_k - x_{k-1})(y_{k-1} + y_k)/2`; ``x`` defaults to evenly
    spaced points (then the area is :math:`(\sum_k y_k - (y_0 + y_S)/2)/S`). A single point gives
    that point's value."""
    y = torch.as_tensor(y, dtype=torch.float64)
    if y.shape[-1] == 1:
        return y[..., 0]
    if x is None:
        x = torch.linspace(0.0, 1.0, y.shape[-1], dtype=torch.float64)
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.shape[-1] != y.shape[-1]:
        raise InputError(f"auc: {x.shape[-1]} x values for {y.shape[-1]} y values")
    span = x[..., -1] - x[..., 0]
    if torch.any(span == 0):
        raise InputError("auc: the x values span an empty interval")
    return torch.trapezoid(y, x, dim=-1) / span


@dataclass
class Curve:
    """Deletion or insertion curves of ``N`` images.

    Attributes:
        kind: ``"deletion"`` or ``"insertion"``.
        fractions: ``(S+1,)`` fraction of pixels removed (deletion) or inserted (insertion).
        probs: ``(N, S+1)`` softmax probability of the target class at each step.
        auc: ``(N,)`` normalized area under each curve (:func:`auc`).
        classes: ``(N,)`` target classes.
    """

    kind: str
    fractions: torch.Tensor
    probs: torch.Tensor
    auc: torch.Tensor
    classes: torch.Tensor

    def mean(self) -> torch.Tensor:
        """The mean curve over images, ``(S+1,)``."""
        return self.probs.mean(dim=0)

    def plot(self, ax=None, label: str | None = None, **kwargs):
        """Plot the mean curve (and the per-image spread) on ``ax``; returns the axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 4))
        f = self.fractions.numpy()
        m = self.mean().numpy()
        lab = f"{label or self.kind} (AUC {float(self.auc.mean()):.3f})"
        (line,) = ax.plot(f, m, label=lab, **kwargs)
        if self.probs.shape[0] > 1:
            lo, hi = self.probs.quantile(0.25, dim=0).numpy(), self.probs.quantile(0.75, dim=0).numpy()
            ax.fill_between(f, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xlabel(f"fraction of pixels {'removed' if self.kind == 'deletion' else 'inserted'}")
        ax.set_ylabel("probability of the target class")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(self.kind)
        ax.legend(fontsize=8)
        return ax


def _check_steps(steps: int) -> int:
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise InputError(f"steps must be a positive integer, not {steps!r}")
    return int(steps)


def _curve(
    kind: str, model, inputs, maps, targets, *, steps, substrate, batch_size, seed, preprocess, explain_options
) -> Curve:
    if model is None:
        raise InputError(f"{kind} needs the model to score the perturbed images")
    steps = _check_steps(steps)
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
    n, size = x.shape[0], prep.size  # (H, W), or (D, H, W) for volumes and clips
    fractions = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    counts = removed_counts(prep.maps[0].numel(), fractions).to(x.device)
    rank = pixel_rank(prep.maps, seed).view(n, 1, *size)
    items = [(i, k) for i in range(n) for k in range(steps + 1)]
    sub = make_substrate(x, substrate)  # (N, C, H, W), like x

    def make(chunk: list[tuple[int, Any]]) -> torch.Tensor:
        idx = torch.tensor([i for i, _ in chunk], device=x.device)
        ks = counts[torch.tensor([k for _, k in chunk], device=x.device)]
        changed = rank[idx] < ks.view(-1, *(1,) * (x.dim() - 1))  # (B, 1, H, W): the top-n_k pixels
        s = sub[idx]
        if kind == "deletion":
            return torch.where(changed, s, x[idx])
        return torch.where(changed, x[idx], s)

    probs = scored_batches(model, items, make, classes, batch_size).view(n, steps + 1)
    return Curve(kind, fractions.float(), probs, auc(probs, fractions).float(), classes)


def deletion_curve(
    model: nn.Module,
    inputs: Any,
    maps: MapsLike,
    targets: Any = None,
    *,
    steps: int = 50,
    substrate: Substrate = "zero",
    batch_size: int | None = None,
    seed: int = 0,
    preprocess=None,
    explain_options: dict[str, Any] | ExplainRequest | None = None,
) -> Curve:
    """Deletion curves (RISE): remove the most important pixels first, ``steps`` steps.

    Args:
        model: the classifier (left untouched: eval mode inside, flags restored).
        inputs: a preprocessed ``(N, C, H, W)`` tensor, or images (paths, arrays…); volumes or
            clips ``(N, C, D, H, W)``.
        maps: ``(N, H, W)`` maps (``(N, D, H, W)`` for volumes), an Explanation, a method name or ``"random"``.
        targets: class per image (default: top-1 of the clean image).
        steps: number of removal steps ``S`` (``S + 1`` points, ``S + 1`` forwards per image).
        substrate: what removed pixels become (see :func:`camlens.metrics.make_substrate`).
        batch_size: perturbed images per forward pass (default: 4 on the CPU, 64 on an accelerator).
        seed: seed of the random tie-break (and of the ``"random"`` baseline).
        preprocess: preprocessing for image inputs (default: the model's).
        explain_options: keyword arguments for :func:`camlens.explain` when ``maps`` is a method name.
    """
    return _curve(
        "deletion",
        model,
        inputs,
        maps,
        targets,
        steps=steps,
        substrate=substrate,
        batch_size=batch_size,
        seed=seed,
        preprocess=preprocess,
        explain_options=explain_options,
    )


def insertion_curve(
    model: nn.Module,
    inputs: Any,
    maps: MapsLike,
    targets: Any = None,
    *,
    steps: int = 50,
    substrate: Substrate = "blur",
    batch_size: int | None = None,
    seed: int = 0,
    preprocess=None,
    explain_options: dict[str, Any] | ExplainRequest | None = None,
) -> Curve:
    """Insertion curves (RISE): start from the blurred image and insert the most important pixels
    first. Arguments as :func:`deletion_curve`."""
    return _curve(
        "insertion",
        model,
        inputs,
        maps,
        targets,
        steps=steps,
        substrate=substrate,
        batch_size=batch_size,
        seed=seed,
        preprocess=preprocess,
        explain_options=explain_options,
    )


def deletion(model: nn.Module, inputs: Any, maps: MapsLike, targets: Any = None, **options: Any) -> torch.Tensor:
    """Deletion AUC per image, ``(N,)`` in [0, 1]; lower is better. Options: :func:`deletion_curve`."""
    return deletion_curve(model, inputs, maps, targets, **options).auc


def insertion(model: nn.Module, inputs: Any, maps: MapsLike, targets: Any = None, **options: Any) -> torch.Tensor:
    """Insertion AUC per image, ``(N,)`` in [0, 1]; higher is better. Options: :func:`insertion_curve`."""
    return insertion_curve(model, inputs, maps, targets, **options).auc
