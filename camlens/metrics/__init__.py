"""Are the maps faithful? Quantitative evaluation of explanation maps.

Per-image metrics share one contract, ``metric(model, inputs, maps, targets, **options) -> (N,)``:

=========================== ======================================= ================ ==========
metric                      paper                                   value            better
=========================== ======================================= ================ ==========
``deletion``                Petsiuk et al., RISE, BMVC 2018         AUC in [0, 1]    lower
``insertion``               Petsiuk et al., RISE, BMVC 2018         AUC in [0, 1]    higher
``average_drop``            Chattopadhyay et al., Grad-CAM++ 2018   % in [0, 100]    lower
``increase_in_confidence``  Chattopadhyay et al., Grad-CAM++ 2018   0 or 100         higher
``road`` (``order=morf``)   Rong et al., ROAD, ICML 2022            mean probability lower
``road`` (``order=lerf``)   Rong et al., ROAD, ICML 2022            mean probability higher
``pointing_game``           Zhang et al., Excitation Backprop 2016  1 hit / 0 miss   higher
``energy_pointing_game``    Wang et al., Score-CAM 2020             share in [0, 1]  higher
``class_sensitivity``       (two classes, same image)               similarity       lower
``max_sensitivity``        Yeh et al., NeurIPS 2019                relative change  lower
=========================== ======================================= ================ ==========

``sanity_randomization(model, inputs, method=..., targets=...)`` (Adebayo et al., NeurIPS 2018)
returns a per-step table instead. ``sparseness(maps)`` (Gini index, Chalasani et al. 2020) needs
only the maps; ``top_k_precision``, ``earth_movers_distance`` and ``mask_iou`` compare maps with a
known importance mask (XAI-TRIS, Clark et al. 2024). ``maps`` may be an ``(N, H, W)`` tensor, an Explanation, a
registered method name (computed with :func:`camlens.explain`), ``"random"`` (the random-map
baseline) or ``"centre"``. Scores are softmax probabilities of the target class. See
:mod:`camlens.metrics._common` for the shared conventions (ties, substrates, memory).
"""

from camlens.metrics._common import baseline_maps, gaussian_blur, make_substrate, pixel_order, pixel_rank
from camlens.metrics.complexity import sparseness
from camlens.metrics.confidence import average_drop, confidence_pair, increase_in_confidence
from camlens.metrics.groundtruth import earth_movers_distance, mask_iou, top_k_precision
from camlens.metrics.perturbation import Curve, auc, deletion, deletion_curve, insertion, insertion_curve
from camlens.metrics.pointing import centre_baseline, energy_pointing_game, gt_masks, pointing_game
from camlens.metrics.road import RoadResult, noisy_linear_imputation, road, road_curves
from camlens.metrics.robustness import max_sensitivity
from camlens.metrics.sanity import SanityResult, plot_sanity, randomization_layers, sanity_randomization
from camlens.metrics.similarity import class_sensitivity, pearson, similarity, spearman, ssim

__all__ = [
    "Curve",
    "RoadResult",
    "SanityResult",
    "auc",
    "average_drop",
    "baseline_maps",
    "centre_baseline",
    "class_sensitivity",
    "confidence_pair",
    "deletion",
    "deletion_curve",
    "earth_movers_distance",
    "energy_pointing_game",
    "gaussian_blur",
    "gt_masks",
    "increase_in_confidence",
    "insertion",
    "insertion_curve",
    "make_substrate",
    "mask_iou",
    "max_sensitivity",
    "noisy_linear_imputation",
    "pearson",
    "pixel_order",
    "pixel_rank",
    "plot_sanity",
    "pointing_game",
    "randomization_layers",
    "road",
    "road_curves",
    "sanity_randomization",
    "similarity",
    "sparseness",
    "spearman",
    "ssim",
    "top_k_precision",
]
