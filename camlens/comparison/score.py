"""Per-image values of the localization, truth and robustness metrics, each from the public function
of :mod:`camlens.metrics` / :mod:`camlens.metrics.loceval` (the comparison adds no second implementation)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from camlens.comparison.config import CompareConfig
from camlens.metrics import (
    earth_movers_distance,
    energy_pointing_game,
    mask_iou,
    max_sensitivity,
    pointing_game,
    top_k_precision,
)
from camlens.metrics._common import Scored
from camlens.metrics.loceval import evaluate_maps

if TYPE_CHECKING:  # typing only
    from camlens.comparison.run import Sample

Values = dict[str, np.ndarray]  # metric -> per-image values


def boxacc_curves(maps: torch.Tensor, boxes: list[np.ndarray]) -> np.ndarray:
    """Per image, BoxAccV2 over the threshold sweep x IoU (0.3, 0.5, 0.7), ``(N, T, 3)`` of 0/1:
    :func:`camlens.metrics.loceval.evaluate_maps` on that image alone. MaxBoxAccV2 of any set of images is
    ``curves[set].mean(0).max(0).mean()`` — the same number as ``evaluate_maps`` on the set."""
    return np.stack([evaluate_maps(maps[i : i + 1], [boxes[i]]).curve for i in range(maps.shape[0])])


def localization_values(maps: torch.Tensor, sample: Sample, x: torch.Tensor, seed: int) -> Values:
    """Pointing game, energy pointing game, mask IoU (per image) and the BoxAccV2 curves (``maxboxacc_v2``
    rows hold ``(N, T, 3)``; the table reduces them per bootstrap resample)."""
    assert sample.masks is not None and sample.boxes is not None
    g, m = sample.masks, maps
    return {
        "pointing_game": pointing_game(None, x.cpu(), m, gt=g, seed=seed).numpy().astype(np.float64),
        "energy_pointing_game": energy_pointing_game(None, x.cpu(), m, gt=g).numpy().astype(np.float64),
        "mask_iou": mask_iou(m, g).numpy().astype(np.float64),
        "maxboxacc_v2": boxacc_curves(m, sample.boxes).astype(np.float64),
    }


def truth_values(maps: torch.Tensor, masks: torch.Tensor, seed: int) -> Values:
    """Top-k precision and earth mover's distance against the true importance masks."""
    return {
        "top_k_precision": top_k_precision(maps, masks, seed=seed).numpy().astype(np.float64),
        "emd": earth_movers_distance(maps, masks).numpy().astype(np.float64),
    }


def robustness_values(
    model: nn.Module, name: str, x: torch.Tensor, classes: Scored, cfg: CompareConfig, seed: int
) -> Values:
    """Max-sensitivity on the first ``cfg.sensitivity_images`` images."""
    k = min(cfg.sensitivity_images, x.shape[0])
    if k < 1 or cfg.sensitivity_samples < 1:
        return {}
    v = max_sensitivity(
        model,
        x[:k],
        name,
        classes[:k],
        radius=cfg.sensitivity_radius,
        n_samples=cfg.sensitivity_samples,
        seed=seed,
        batch_size=cfg.batch_size,
        explain_options=cfg.method_options(name),
    )
    return {"max_sensitivity": v.numpy().astype(np.float64)}
