"""``camlens.compare``: run every method that applies to a model on a sample of the user's images and
score each with the existing :mod:`camlens.metrics` functions (no second implementation), against a
random-map baseline; a bootstrap 95 % interval over images for every number.

Steps (one function each): sample the images -> every method's maps (timed, memory measured) ->
faithfulness (deletion, insertion, ROAD) -> sanity (cascading randomization) -> localization and
truth (with ground truth) -> robustness and complexity -> table -> ranking and verdicts -> outputs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from camlens.api.explainer import explain
from camlens.api.explanation import Explanation
from camlens.attribution.registry import get_method
from camlens.attribution.registry import methods as registered
from camlens.attribution.traits import model_traits
from camlens.base.errors import CamlensError, InputError, StoreError, WriteError
from camlens.base.io import IMAGE_EXTENSIONS
from camlens.comparison.config import CompareConfig, CompareResult
from camlens.comparison.measure import Progress
from camlens.comparison.report import write_outputs
from camlens.comparison.resume import CompareStore, MapsPlan, MemoryStore, tensor_digest
from camlens.comparison.score import localization_values, robustness_values, truth_values
from camlens.comparison.shared import SharedForwards
from camlens.comparison.table import build_table, rank_and_verdicts
from camlens.core.inputs import prepare_inputs
from camlens.metrics import (
    SanityResult,
    baseline_maps,
    deletion,
    insertion,
    randomization_layers,
    road_curves,
    sanity_randomization,
    sparseness,
)
from camlens.metrics._common import Scored, TargetScores, class_probs, explain_targets, resolve_classes
from camlens.models.zoo import card_of, load_model
from camlens.pipeline.run import model_checksum
from camlens.pipeline.store import StoreMismatchError
from camlens.targets import Detection, Segmentation


@dataclass
class Sample:
    """The sampled images: ``x`` ``(N, C, H, W)`` preprocessed, ``names``, ``masks`` ``(N, H, W)`` bool
    ground truth at the input size (or ``None``), ``boxes`` per image ``(M, 4)`` in input pixels (or ``None``)."""

    x: torch.Tensor
    names: list[str]
    masks: torch.Tensor | None
    boxes: list[np.ndarray] | None


def _image_files(data: Any) -> list[Path]:
    items = [data] if isinstance(data, (str, Path)) else list(data)
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            out.append(p)
        else:
            raise InputError(f"{item}: no such image file or folder; pass image paths, a folder or a tensor")
    if not out:
        raise InputError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {data}")
    return out


def _gt_at_input(gt: Any, sizes: list[tuple[int, int]], size: tuple[int, int]) -> tuple[torch.Tensor, list]:
    """Masks ``(N, h, w)`` or per-image boxes in each image's pixels -> (masks, boxes) at the input size."""
    h, w = size
    if isinstance(gt, (np.ndarray, torch.Tensor)) and np.ndim(gt) == 3:
        m = torch.as_tensor(np.asarray(gt) != 0, dtype=torch.float32)[:, None]
        masks = F.interpolate(m, size=size, mode="nearest")[:, 0] > 0.5
        boxes = []
        for mk in masks:
            ys, xs = torch.nonzero(mk, as_tuple=True)
            if len(ys) == 0:
                raise InputError("an image has an empty ground-truth mask; drop it from the comparison")
            boxes.append(np.array([[int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]], float))
        return masks, boxes
    boxes = []
    for b, (ih, iw) in zip(list(gt), sizes, strict=True):
        a = np.asarray(b, dtype=np.float64).reshape(-1, 4)
        boxes.append(a * np.array([w / iw, h / ih, w / iw, h / ih]))
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for k, bs in enumerate(boxes):
        for x0, y0, x1, y1 in bs:
            masks[k, int(np.floor(y0)) : int(np.ceil(y1)), int(np.floor(x0)) : int(np.ceil(x1))] = True
    return masks, boxes


def load_sample(model: nn.Module, data: Any, n: int, seed: int, gt: Any = None) -> Sample:
    """Draw ``n`` images of ``data`` (a tensor, image paths, a folder, or a camlens dataset with
    ``.paths`` and ``.masks`` / ``.boxes``) with ``seed``; ground truth follows the images."""
    if gt is None and hasattr(data, "paths"):
        gt = getattr(data, "masks", None)
        gt = gt if gt is not None else getattr(data, "boxes", None)
    if isinstance(data, torch.Tensor):
        total = int(data.shape[0])
    else:
        files = list(data.paths) if hasattr(data, "paths") else _image_files(data)
        total = len(files)
    pick = np.arange(total)
    if total > n:
        pick = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    if isinstance(data, torch.Tensor):
        x, names, sizes = data[torch.as_tensor(pick)], [f"image{i}" for i in pick], None
        x, _, _ = prepare_inputs(x, model)
    else:
        chosen = [files[i] for i in pick]
        x, images, _ = prepare_inputs([str(f) for f in chosen], model)
        names = [Path(f).stem for f in chosen]
        sizes = [tuple(im.shape[:2]) for im in images] if images else None
    x = x.detach()
    size = (int(x.shape[-2]), int(x.shape[-1]))
    if gt is None:
        return Sample(x, names, None, None)
    g = [gt[i] for i in pick] if not isinstance(gt, (np.ndarray, torch.Tensor)) else gt[torch.as_tensor(pick)]
    masks, boxes = _gt_at_input(g, sizes or [size] * len(pick), size)
    return Sample(x, names, masks, boxes)


def resolve_methods(model: nn.Module, methods: str | Sequence[str]) -> list[str]:
    """``"all"`` -> every registered method (those that do not apply are dropped later, with a flag)."""
    items = [methods] if isinstance(methods, str) else list(methods)
    names: list[str] = []
    for item in items:
        for raw in str(item).split(","):
            key = raw.strip()
            if not key:
                continue
            cands = list(registered()) if key.lower() == "all" else [get_method(key).name]
            names += [c for c in cands if c not in names]
    if not names:
        raise InputError("no method given; pass methods='all' or names such as 'gradcam,saliency'")
    return names


def not_applicable(model: nn.Module, names: list[str], targets: Any = None) -> dict[str, str]:
    """``{method: reason}`` for the methods whose ``applies_to`` refuses this model (before any work)."""
    traits = model_traits(model, targets)
    out = {}
    for name in names:
        info = get_method(name)
        if not info.applies(traits):
            hint = info.applies_to.hint_for(traits)
            out[name] = f"does not apply to this model: it explains {info.applies_to.text}"
            out[name] += f"; {hint}" if hint else ""
    return out


def compute_maps(
    model: nn.Module,
    sample: Sample,
    classes: Scored,
    names: list[str],
    cfg: CompareConfig,
    bar: Progress,
    store: CompareStore | MemoryStore,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[float, float]], dict[str, str]]:
    """Each method's ``(N, H, W)`` maps for ``classes`` (batch by batch through the store), its cost
    ``(ms per image, peak MiB)``, and ``{method: reason}`` for the methods that fail on this model
    (a named camlens error) or give non-finite maps."""
    x = sample.x
    maps: dict[str, torch.Tensor] = {}
    cost: dict[str, tuple[float, float]] = {}
    flags: dict[str, str] = {}
    n = int(x.shape[0])
    batches = [slice(i, min(i + cfg.batch_size, n)) for i in range(0, n, cfg.batch_size)]
    size = (int(x.shape[-2]), int(x.shape[-1]))
    for name in names:
        bar.stage(name, "maps")
        opts = cfg.method_options(name)

        def run_batch(sl: slice, name: str = name, opts: dict = opts) -> Explanation:
            return explain(model, x[sl], method=name, targets=explain_targets(classes, sl), **opts)

        try:
            got = store.maps(MapsPlan(name, n, batches, sample.names, size, x.device), run_batch)
        except CamlensError as exc:
            if isinstance(exc, (StoreMismatchError, StoreError, WriteError)):
                raise
            flags[name] = f"does not apply to this model: {str(exc).splitlines()[0]}"
            bar.skip(name)
            continue
        if not torch.isfinite(got.maps).all():
            flags[name] = "gave non-finite maps on this model"
            bar.skip(name)
            continue
        maps[name] = got.maps
        cost[name] = (1000 * sum(got.seconds) / n, max(got.peaks))
    return maps, cost, flags


def sobel_maps(x: torch.Tensor) -> torch.Tensor:
    """The edge-detector baseline: the Sobel gradient magnitude of the input, summed over channels, ``(N, H, W)``."""
    k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kx = k.expand(x.shape[1], 1, 3, 3)
    ky = k.t().expand(x.shape[1], 1, 3, 3)
    xp = F.pad(x.detach().float().cpu(), (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(xp, kx, groups=x.shape[1])
    gy = F.conv2d(xp, ky, groups=x.shape[1])
    return (gx.pow(2) + gy.pow(2)).sqrt().sum(1)


def faithfulness_values(
    model: nn.Module,
    x: torch.Tensor,
    classes: Scored,
    maps: torch.Tensor,
    run: tuple[CompareConfig, int, SharedForwards | None],
) -> dict[str, np.ndarray]:
    """Deletion and insertion AUC and sparseness per image, ROAD MoRF/LeRF on the first
    ``cfg.road_images``, from the :mod:`camlens.metrics` functions. ``shared``: the model with the
    memo of the forwards every method's deletion and insertion share (their ends)."""
    cfg, seed, shared = run
    common: dict[str, Any] = {"batch_size": cfg.forward_batch, "seed": seed}
    ends = shared if shared is not None else model
    out = {
        "deletion": deletion(ends, x, maps, classes, steps=cfg.steps, **common),
        "insertion": insertion(ends, x, maps, classes, steps=cfg.steps, **common),
    }
    k = min(cfg.road_images, x.shape[0])
    if k >= 1:
        road = road_curves(model, x[:k], maps[:k], classes[:k], percentages=cfg.road_percentages, **common)
        out["road_morf"], out["road_lerf"] = road.score("morf"), road.score("lerf")
    out["sparseness"] = sparseness(maps)
    return {k: v.numpy().astype(np.float64) for k, v in out.items()}


def sanity_stage(
    model: nn.Module,
    x: torch.Tensor,
    classes: Scored,
    name: str,
    layers: list[str],
    cfg: CompareConfig,
    seed: int,
) -> dict[str, np.ndarray]:
    """One method's cascading randomization on ``x``: ``randomization_similarity`` per image (the
    Spearman rank correlation of ``|map|`` with the original, averaged over the randomized steps:
    one late step alone can bounce back, Grad-CAM on EfficientNet-Lite0 after its head conv is
    redrawn), the curves ``curve.<metric>`` ``(S+1, N)`` and the ``steps``."""
    r = sanity_randomization(
        model,
        x,
        name,
        classes,
        layers=layers,
        seed=seed,
        batch_size=cfg.batch_size,
        explain_options=cfg.method_options(name),
    )
    out = {"randomization_similarity": r.values["spearman_abs"][name][1:].mean(0).numpy().astype(np.float64)}
    out.update({f"curve.{metric}": v[name].numpy() for metric, v in r.values.items()})
    out["steps"] = np.array(r.steps, dtype=str)
    return out


def merge_sanity(stages: dict[str, dict[str, np.ndarray]], classes: Scored) -> SanityResult | None:
    """The curves of every method in one :class:`SanityResult` (for the report's figure)."""
    if not stages:
        return None
    names = list(stages)
    metrics = [k.split(".", 1)[1] for k in stages[names[0]] if k.startswith("curve.")]
    values = {m: {n: torch.from_numpy(np.asarray(stages[n][f"curve.{m}"])) for n in names} for m in metrics}
    steps = [str(s) for s in stages[names[0]]["steps"].tolist()]
    ids = classes if isinstance(classes, torch.Tensor) else torch.full((len(classes),), -1)  # -1: a target object
    return SanityResult(names, steps, "cascading", values, ids)


def _progress(n_methods: int, cfg: CompareConfig, has_gt: bool) -> Progress:
    per_method = 4 + int(has_gt)  # maps, faithfulness, sanity, robustness (+ localization)
    baselines = (1 + int(cfg.truth)) * (1 + int(has_gt))
    return Progress(n_methods * per_method + baselines, cfg.progress, per_method)


def default_target(model: nn.Module) -> Any:
    """The target of a model without one given: by its task (zoo card): the top detection, the
    largest predicted region, or (``None``) a classifier's top-1 class."""
    task = model_traits(model).task
    if task == "detection":
        return Detection(score_threshold=0.0, max_boxes=1)
    if task == "segmentation":
        return Segmentation(None)
    return None


def compare_signature(model: nn.Module, sample: Sample, classes: Scored, cfg: CompareConfig, seed: int) -> dict:
    """What decides the numbers of a comparison (a rerun with the same signature continues): the
    sampled inputs, their ground truth and targets, the model's weights, the settings and the seed.
    The method list is not in it (each method keeps its own maps and stages)."""
    settings = {
        k: v
        for k, v in vars(cfg).items()
        if k not in ("progress", "overwrite", "overlay_images", "bootstrap", "forward_batch")
    }
    card = card_of(model)
    return {
        "sample_sha256": tensor_digest(sample.x, sample.names),
        "truth_sha256": tensor_digest(sample.masks if sample.masks is not None else "none", sample.boxes or "none"),
        "targets_sha256": tensor_digest(*classes.describe())
        if isinstance(classes, TargetScores)
        else tensor_digest(classes),
        "n_images": int(sample.x.shape[0]),
        "model": card.name if card else type(model).__name__,
        "model_sha256": model_checksum(model),
        "settings": {k: repr(dict(v)) if isinstance(v, Mapping) else repr(v) for k, v in settings.items()},
        "seed": seed,
    }


def measure(
    model: nn.Module,
    sample: Sample,
    classes: Scored,
    maps: dict[str, torch.Tensor],
    live: list[str],
    run: tuple[CompareConfig, int, Progress, CompareStore | MemoryStore],
) -> tuple[dict[tuple[str, str], np.ndarray], SanityResult | None]:
    """Every metric of every map (methods and baselines), stage by stage through the store:
    faithfulness and sparseness, localization and truth (with ground truth), sanity, robustness."""
    cfg, seed, bar, store = run
    x, masks = sample.x, sample.masks
    values: dict[tuple[str, str], np.ndarray] = {}

    def put(name: str, got: dict[str, np.ndarray]) -> None:
        values.update({(name, k): v for k, v in got.items() if not (k.startswith("curve.") or k == "steps")})

    shared = SharedForwards(model)
    for name, m in maps.items():
        bar.stage(name, "faithfulness")
        faith = partial(faithfulness_values, model, x, classes, m, (cfg, seed, shared))
        put(name, store.stage(name, "faithfulness", faith))
        if shared.misses:  # the first method computed: the rows every method shares are kept
            shared.freeze()
        if sample.masks is not None:
            bar.stage(name, "localization")
            put(name, store.stage(name, "localization", partial(localization_values, m, sample, x, seed)))
            if cfg.truth and masks is not None:
                put(name, store.stage(name, "truth", partial(truth_values, m, masks, seed)))
    k = min(cfg.sanity_images, x.shape[0])
    sanity: dict[str, dict[str, np.ndarray]] = {}
    layers: list[str] | None = None
    for name in live:
        bar.stage(name, "sanity")
        if k < 1 or cfg.sanity_layers < 1:
            continue

        def sanity_of(name: str = name) -> dict[str, np.ndarray]:
            nonlocal layers
            layers = layers if layers is not None else randomization_layers(model, x[:k])[: cfg.sanity_layers]
            return sanity_stage(model, x[:k], classes[:k], name, layers, cfg, seed)

        sanity[name] = store.stage(name, "sanity", sanity_of)
        put(name, sanity[name])
    for name in live:
        bar.stage(name, "robustness")
        put(name, store.stage(name, "robustness", partial(robustness_values, model, name, x, classes, cfg, seed)))
    return values, merge_sanity(sanity, classes[:k])


def compare(
    model: nn.Module | str,
    data: Any,
    methods: str | Sequence[str] = "all",
    seed: int = 0,
    *,
    gt: Any = None,
    targets: Any = None,
    out: str | Path | None = None,
    config: CompareConfig | None = None,
) -> CompareResult:
    """Which map should I trust? Rank every method that applies to ``model`` on ``data``.

    Args:
        model: a classifier, a detector, a segmenter, an image–text model, or a zoo name.
        data: a preprocessed ``(N, C, H, W)`` tensor, image paths, a folder, or a camlens dataset
            (``camlens.data.synthetic`` / ``tetromino``: its boxes / masks are the ground truth).
        methods: ``"all"`` or method names (a list or comma-separated).
        seed: seed of the image sample, the random baselines, tie-breaks, noise and the bootstrap.
        gt: ground truth per image: ``(N, H, W)`` masks or per-image ``(M, 4)`` boxes in each image's
            pixels (with a tensor ``data``: at its size); adds the localization metrics.
        targets: what each image's maps explain and the metrics score: ``None`` — a classifier's
            top-1 class (scored by its softmax probability), a detector's own top detection
            (``Detection(score_threshold=0, max_boxes=1)``: its matched class score x IoU), a
            segmenter's largest predicted class region (``Segmentation(None)``: its summed logits);
            or a target object such as ``camlens.targets.Text("a red circle")`` for an image–text
            model (the image–text logit). Target objects are bound on the clean images, and the
            perturbed, noisy and randomized copies are scored against the same references.
        out: folder for ``table.parquet``, ``table.csv`` and ``report.html`` (``None``: nothing
            written). It keeps the maps (a result store per method) and every finished stage, so an
            interrupted comparison continues where it stopped when called again with the same
            arguments (:mod:`camlens.comparison.resume`); other settings are refused unless
            ``config.overwrite``.
        config: a :class:`CompareConfig` (budgets, steps, images…).

    Returns:
        A :class:`CompareResult` (``.table``, ``.flags``, ``.report_path``, ``.summary()``, ``.reused``).
    """
    cfg = config or CompareConfig()
    t_start = time.perf_counter()
    model = load_model(model) if isinstance(model, str) else model
    names = resolve_methods(model, methods)
    sample = load_sample(model, data, cfg.images, seed, gt)
    if cfg.truth and sample.masks is None:
        raise InputError(
            "truth=True needs the true importance masks: pass gt= masks or a camlens.data.tetromino dataset"
        )
    x = sample.x
    spec = targets if targets is not None else default_target(model)
    classes = resolve_classes(model, x, spec, cfg.batch_size)
    flags = not_applicable(model, names, spec)
    names = [n for n in names if n not in flags]
    store: CompareStore | MemoryStore = MemoryStore()
    if out is not None:
        sig = compare_signature(model, sample, classes, cfg, seed)
        store = CompareStore(out, sig, overwrite=cfg.overwrite, note=lambda msg: print(msg, file=sys.stderr))
    bar = _progress(len(names), cfg, sample.masks is not None)
    with store:
        try:
            maps, cost, failed = compute_maps(model, sample, classes, names, cfg, bar, store)
            flags.update(failed)
            live = list(maps)
            size = (int(x.shape[-2]), int(x.shape[-1]))
            maps["random"] = baseline_maps("random", x.shape[0], size, torch.device("cpu"), seed).cpu()
            if cfg.truth:
                maps["sobel"] = sobel_maps(x)
            values, sanity_curves = measure(model, sample, classes, maps, live, (cfg, seed, bar, store))
            if isinstance(classes, TargetScores):  # the metrics' own score of the unperturbed images
                values["model", "clean_score"] = class_probs(model, x, classes, cfg.batch_size).numpy().astype(float)
            for name in live:
                values[name, "ms_per_image"] = np.array([cost[name][0]])
                values[name, "peak_memory_mib"] = np.array([cost[name][1]])
        finally:
            bar.close()
        result = _result(values, flags, maps, live, sample, classes, sanity_curves, cfg, seed)
        result.elapsed_s = time.perf_counter() - t_start
        result.reused = store.reuse.words(int(x.shape[0]))
        if isinstance(store, CompareStore):
            store.record_reuse()
            result.report_path = write_outputs(result, Path(store.root), card_of(model), replace=True)
    return result


def _result(
    values: dict[tuple[str, str], np.ndarray],
    flags: dict[str, str],
    maps: dict[str, torch.Tensor],
    live: list[str],
    sample: Sample,
    classes: Scored,
    sanity_curves: SanityResult | None,
    cfg: CompareConfig,
    seed: int,
) -> CompareResult:
    """The table, the sanity flags, the ranking and the verdicts."""
    clean = None
    if isinstance(classes, TargetScores):  # not probabilities: the gain's best is the clean score
        clean = values.pop(("model", "clean_score"))
    table = build_table(values, cfg.bootstrap, seed, clean)
    steps = len(sanity_curves.steps) - 1 if sanity_curves else 0
    for name in live:
        v = values.get((name, "randomization_similarity"))
        if v is not None and float(v.mean()) > cfg.sanity_threshold:
            flags[name] = (
                f"its maps barely change when the top {steps} layers are randomized (mean rank correlation "
                f"{float(v.mean()):.2f} > {cfg.sanity_threshold}): insensitive to the model's weights"
            )
    ranking, verdicts = rank_and_verdicts(table, live, flags, cfg)
    return CompareResult(
        table=table,
        flags=flags,
        report_path=None,
        ranking=ranking,
        verdicts=verdicts,
        values=values,
        maps=maps,
        x=sample.x.detach().cpu(),
        classes=classes,
        names=sample.names,
        sanity=sanity_curves,
        seed=seed,
        config=cfg,
    )
