"""What :func:`camlens.compare` is asked (:class:`CompareConfig`), what it returns (:class:`CompareResult`)
and the definitions of the metrics it reports (:data:`METRICS`, cited in the table and the report)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd
import torch

from camlens.attribution.registry import get_method
from camlens.base.defaults import EXPLAIN_BATCH
from camlens.metrics import SanityResult
from camlens.metrics._common import Scored

#: sample budgets of the slow methods (their own defaults cost seconds per image on 2 CPU cores; with
#: these the whole default comparison of 32 photos on EfficientNet-Lite0 fits in 10 minutes there)
DEFAULT_BUDGETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "rise": {"n_masks": 64},  # 8000 by default
        "scorecam": {"max_channels": 16},
        "smoothgrad": {"n_samples": 4},
        "integrated_gradients": {"steps": 8},
        "occlusion": {"window": 56, "stride": 56},
        "lime": {"n_samples": 64},  # 1000 by default: 13.8 s per photo on Lite0 (2 cores)
        "kernelshap": {"n_samples": 64},  # 1000 by default: 15.6 s per photo
    }
)


@dataclass(frozen=True)
class CompareConfig:
    """Settings of :func:`camlens.compare` (defaults sized for 32 photos on 2 CPU cores).

    Attributes:
        images: images sampled from the data (all if fewer).
        steps: deletion / insertion steps (``steps + 1`` forwards per image and map).
        road_percentages: fractions removed by ROAD MoRF and LeRF.
        road_images: images scored by ROAD (the first of the sample): its noisy linear imputation
            solves a sparse system per image, fraction and order (~0.5 s per image and map on 2 cores).
        sanity_images, sanity_layers: images and top units randomized by the cascading check.
        sanity_threshold: a method whose maps keep a Spearman rank correlation (of ``|map|``) with
            the original above this, on average over the steps of the cascade, is flagged.
        sensitivity_images, sensitivity_samples, sensitivity_radius: max-sensitivity's images,
            Monte-Carlo draws and noise half-width (model input space).
        bootstrap: bootstrap resamples of the images for the 95 % intervals.
        budgets: method options that bound the slow methods (``{method: {option: value}}``).
        options: further explain options per method (``{method: {option: value}}``; key ``"*"``: all).
        truth: score the maps against the true importance masks (top-k precision, EMD) and add the
            Sobel edge-detector baseline (needs masks: ``gt=`` or a tetromino dataset).
        batch_size: images per explain call.
        forward_batch: perturbed images per forward of the faithfulness metrics (``None``: 4 on the
            CPU, whose cache small batches fit, 64 on an accelerator). It decides the speed, not the
            numbers, so a resumed comparison may change it.
        overlay_images: images shown in the report's method x image grid.
        progress: show a progress bar with the ETA of the whole run.
        overwrite: replace the outputs of an earlier run in ``out``.
    """

    images: int = 32
    steps: int = 4
    road_percentages: tuple[float, ...] = (0.25, 0.5, 0.75)
    road_images: int = 6
    sanity_images: int = 2
    sanity_layers: int = 3
    sanity_threshold: float = 0.8
    sensitivity_images: int = 4
    sensitivity_samples: int = 3
    sensitivity_radius: float = 0.05
    bootstrap: int = 1000
    budgets: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: DEFAULT_BUDGETS)
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    truth: bool = False
    batch_size: int = EXPLAIN_BATCH
    forward_batch: int | None = None
    overlay_images: int = 6
    progress: bool = True
    overwrite: bool = False

    def method_options(self, method: str) -> dict[str, Any]:
        """The explain options used for ``method``: its budget, then ``options["*"]`` (every method,
        e.g. ``layer``), then ``options[method]``; a method with a progress bar of its own runs
        without it (the comparison's bar covers the whole run)."""
        quiet = {"progress": False} if "progress" in get_method(method).options() else {}
        return {**quiet, **self.budgets.get(method, {}), **self.options.get("*", {}), **self.options.get(method, {})}


@dataclass(frozen=True)
class MetricInfo:
    """A reported metric: ``family``, ``better`` (``"higher"``/``"lower"``), ``title``, ``paper``, ``formula``."""

    family: str
    better: str
    title: str
    paper: str
    formula: str


METRICS: dict[str, MetricInfo] = {
    "deletion": MetricInfo(
        "faithfulness",
        "lower",
        "deletion AUC",
        "Petsiuk et al., RISE, BMVC 2018",
        "AUC of p_c(x with the top-f pixels set to 0) over f in [0, 1]",
    ),
    "insertion": MetricInfo(
        "faithfulness",
        "higher",
        "insertion AUC",
        "Petsiuk et al., RISE, BMVC 2018",
        "AUC of p_c(blurred x with the top-f pixels restored) over f in [0, 1]",
    ),
    "road_morf": MetricInfo(
        "faithfulness",
        "lower",
        "ROAD MoRF",
        "Rong et al., ROAD, ICML 2022",
        "mean p_c after imputing the most relevant p % of pixels (noisy linear imputation)",
    ),
    "road_lerf": MetricInfo(
        "faithfulness",
        "higher",
        "ROAD LeRF",
        "Rong et al., ROAD, ICML 2022",
        "mean p_c after imputing the least relevant p % of pixels",
    ),
    "faithfulness_gain": MetricInfo(
        "faithfulness",
        "higher",
        "faithfulness gain over a random map",
        "(camlens)",
        "mean over the four metrics above of (m - r) / (best - r), r the random map, best 0 or 1",
    ),
    "randomization_similarity": MetricInfo(
        "sanity",
        "lower",
        "similarity after randomizing the top layers",
        "Adebayo et al., NeurIPS 2018",
        "Spearman rank correlation of |map| with the original, mean over the cascade over the top units",
    ),
    "pointing_game": MetricInfo(
        "localization", "higher", "pointing game", "Zhang et al., ECCV 2016", "1 if argmax(map) hits the object"
    ),
    "energy_pointing_game": MetricInfo(
        "localization",
        "higher",
        "energy pointing game",
        "Wang et al., Score-CAM 2020",
        "sum of max(m, 0) inside the object / sum over the image",
    ),
    "maxboxacc_v2": MetricInfo(
        "localization",
        "higher",
        "MaxBoxAccV2",
        "Choe et al., CVPR 2020",
        "1/3 sum over delta in {.3,.5,.7} of max over tau of BoxAcc(tau, delta)",
    ),
    "mask_iou": MetricInfo(
        "localization", "higher", "mask IoU", "(camlens.localize threshold)", "IoU(m > 0.3 max m, true mask)"
    ),
    "top_k_precision": MetricInfo(
        "truth",
        "higher",
        "top-k precision",
        "Clark et al., XAI-TRIS, ML 2024",
        "share of the |true mask| top-ranked pixels inside the true mask",
    ),
    "emd": MetricInfo(
        "truth",
        "lower",
        "earth mover's distance",
        "Clark et al., XAI-TRIS, ML 2024",
        "optimal transport cost from |map| to the true mask / image diagonal",
    ),
    "max_sensitivity": MetricInfo(
        "robustness",
        "lower",
        "max-sensitivity",
        "Yeh et al., NeurIPS 2019",
        "max over y in the r-ball of ||map(y) - map(x)|| / ||map(x)||",
    ),
    "sparseness": MetricInfo(
        "complexity",
        "higher",
        "sparseness (Gini)",
        "Chalasani et al., ICML 2020",
        "1 - 2 sum_k a_(k)/||a||_1 (n - k + 1/2)/n, a sorted |map|",
    ),
    "ms_per_image": MetricInfo("cost", "lower", "ms per image", "(this machine)", "wall time of the maps / images"),
    "peak_memory_mib": MetricInfo(
        "cost", "lower", "peak memory (MiB)", "(this machine)", "peak resident (CPU) or allocated (GPU) memory added"
    ),
}
#: baseline maps reported beside the methods
BASELINES = ("random", "sobel")
#: the metrics whose normalized gain over the random map make the faithfulness score
FAITHFULNESS = ("deletion", "insertion", "road_morf", "road_lerf")


@dataclass
class CompareResult:
    """What :func:`camlens.compare` found.

    Attributes:
        table: one row per method x metric: ``method``, ``metric``, ``mean``, ``low``, ``high``
            (bootstrap 95 % interval over images), ``better``, ``n``; baselines are methods named
            ``random`` (and ``sobel`` with ``truth``).
        flags: ``{method: reason}`` (sanity-check failures, methods that do not apply).
        report_path: the HTML report (``None`` without ``out``).
        ranking: methods, best first; verdicts: ``{method: plain-language verdict}``.
        values: ``{(method, metric): per-image values}``; maps: ``{method: (N, H, W) CPU maps}``.
        x, classes, names: the sampled inputs, their explained classes and image names.
        sanity: the cascading randomization curves (all methods), ``None`` if not run.
        reused: what this call found done in ``out`` and did not compute again, in words (empty
            when nothing was: a fresh or an in-memory comparison).
    """

    table: pd.DataFrame
    flags: dict[str, str]
    report_path: Path | None
    ranking: list[str]
    verdicts: dict[str, str]
    values: dict[tuple[str, str], np.ndarray]
    maps: dict[str, torch.Tensor]
    x: torch.Tensor
    classes: Scored
    names: list[str]
    sanity: SanityResult | None
    seed: int
    config: CompareConfig
    elapsed_s: float = 0.0
    reused: str = ""

    def row(self, method: str, metric: str) -> pd.Series | None:
        """The table row of ``method`` x ``metric`` (``None`` if not measured)."""
        t = self.table
        hit = t[(t["method"] == method) & (t["metric"] == metric)]
        return None if hit.empty else hit.iloc[0]

    def summary(self) -> str:
        """The ranked summary printed by ``camlens compare``: one line per method, best first."""
        cols: tuple[str, ...] = (
            "faithfulness_gain",
            "randomization_similarity",
            "max_sensitivity",
            "sparseness",
            "ms_per_image",
        )
        if self.config.truth:
            cols = (*cols[:1], "top_k_precision", *cols[1:])
        names = [*self.ranking, *self.baselines]
        grid = [[_cell(self.row(m, c)) for c in cols] for m in names]
        widths = [max([len(c), *(len(row[j]) for row in grid)]) + 2 for j, c in enumerate(cols)]
        head = f"{'#':>2}  {'method':<22}" + "".join(f"{c:>{w}}" for c, w in zip(cols, widths, strict=True))
        lines = [head, "-" * len(head)]
        for k, (m, cells) in enumerate(zip(names, grid, strict=True), 1):
            rank = str(k) if m in self.ranking else "-"
            lines.append(f"{rank:>2}  {m:<22}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
        lines.append("")
        lines += [f"{m}: {self.verdicts[m]}" for m in self.ranking]
        lines += [f"{m}: flagged: {why}" for m, why in self.flags.items() if m not in self.ranking]
        return "\n".join(lines)

    @property
    def baselines(self) -> list[str]:
        """The baseline maps reported beside the methods (``random``, ``sobel``)."""
        return [b for b in BASELINES if b in set(self.table["method"])]

    def __str__(self) -> str:
        return self.summary()


def has_interval(r: Any) -> bool:
    """Whether a table row has a 95 % interval worth printing (not one measurement, such as a cost)."""
    return int(r["n"]) > 1 and r["low"] != r["high"]


def _cell(r: Any) -> str:
    """A summary cell: the mean and its 95 % interval (the mean alone without one)."""
    if r is None:
        return "-"
    return f"{r['mean']:.3g} [{r['low']:.2g}, {r['high']:.2g}]" if has_interval(r) else f"{r['mean']:.3g}"
