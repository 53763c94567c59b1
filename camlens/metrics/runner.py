"""Run several metrics for several methods over many images, a chunk at a time (bounded memory).

:func:`evaluate` is what ``camlens evaluate`` calls. Images are loaded ``chunk_size`` at a time,
explained once per method, scored by every requested metric, and only scalars (and running sums
of the curves) are kept, so a folder of any size runs in constant memory.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from camlens.api.explainer import explain
from camlens.attribution.registry import get_method
from camlens.base._util import numbered, renamed, with_options
from camlens.base.errors import InputError, MethodError
from camlens.base.io import load_image
from camlens.core.inputs import prepare_inputs
from camlens.metrics._common import baseline_maps, check_batch_size, explain_maps, resolve_classes
from camlens.metrics.confidence import confidence_pair
from camlens.metrics.perturbation import deletion_curve, insertion_curve
from camlens.metrics.pointing import energy_pointing_game, pointing_game
from camlens.metrics.road import DEFAULT_PERCENTAGES, road_curves
from camlens.metrics.sanity import METRICS as SANITY_METRICS
from camlens.metrics.sanity import SanityResult, plot_sanity, randomization_layers, sanity_randomization
from camlens.metrics.similarity import class_sensitivity
from camlens.models.zoo import card_of

#: metric name -> (columns it writes, True if higher is better for each column)
METRIC_COLUMNS: dict[str, dict[str, bool]] = {
    "deletion": {"deletion": False},
    "insertion": {"insertion": True},
    "average_drop": {"average_drop": False},
    "increase_in_confidence": {"increase_in_confidence": True},
    "road": {"road_morf": False, "road_lerf": True},
    "pointing_game": {"pointing_game": True},
    "energy_pointing_game": {"energy_pointing_game": True},
    "class_sensitivity": {"class_sensitivity": False},
    "sanity": {},
}
ALIASES = {
    "increase": "increase_in_confidence",
    "drop": "average_drop",
    "pointing": "pointing_game",
    "energy_pointing": "energy_pointing_game",
    "sanity_randomization": "sanity",
    "randomization": "sanity",
}
DEFAULT_METRICS = ("deletion", "insertion", "average_drop", "increase_in_confidence", "sanity")
#: metrics that get a random-map baseline row; the pointing games get the centre baseline
RANDOM_BASELINE = ("deletion", "insertion", "average_drop", "increase_in_confidence", "road")
CENTRE_BASELINE = ("pointing_game", "energy_pointing_game")


def resolve_metrics(names: Sequence[str] | str) -> list[str]:
    """Metric names (comma-separated strings allowed, ``"all"``) -> canonical names, in order."""
    items = [names] if isinstance(names, str) else list(names)
    out: list[str] = []
    for item in items:
        for raw in str(item).split(","):
            key = raw.strip().lower().replace("-", "_")
            if not key:
                continue
            if key == "all":
                cands = list(METRIC_COLUMNS)
            else:
                key = ALIASES.get(key, key)
                if key not in METRIC_COLUMNS:
                    import difflib

                    close = difflib.get_close_matches(key, list(METRIC_COLUMNS), n=3)
                    hint = f" Did you mean {', '.join(close)}?" if close else ""
                    raise InputError(
                        f"unknown metric {raw.strip()!r}.{hint} Choose from: {', '.join(METRIC_COLUMNS)}, or all"
                    )
                cands = [key]
            out += [c for c in cands if c not in out]
    if not out:
        raise InputError("no metric given")
    return out


@dataclass
class EvaluationReport:
    """What :func:`evaluate` measured.

    Attributes:
        rows: one dict per (image, method): ``image``, ``method``, ``target``, ``target_name`` and
            one column per metric value (see :data:`METRIC_COLUMNS`).
        curves: ``{(method, "deletion"|"insertion"): (fractions, mean curve)}``.
        road: ``{method: (percentages, mean MoRF, mean LeRF)}``.
        sanity: the merged :class:`SanityResult` over all images (``None`` if not requested).
        settings: the options used.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    curves: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    road: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    sanity: SanityResult | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.rows))

    @property
    def columns(self) -> list[str]:
        cols: list[str] = []
        for r in self.rows:
            cols += [k for k in r if k not in ("image", "method", "target", "target_name") and k not in cols]
        return cols

    def summary(self) -> list[dict[str, Any]]:
        """Per (method, metric column): ``mean``, ``std``, ``n`` over the images that have a value."""
        out = []
        for m in self.methods:
            for c in self.columns:
                v = np.array([r[c] for r in self.rows if r["method"] == m and r.get(c) is not None], float)
                if v.size == 0:
                    continue
                higher = next((cols[c] for cols in METRIC_COLUMNS.values() if c in cols), True)
                out.append(
                    {
                        "method": m,
                        "metric": c,
                        "mean": float(v.mean()),
                        "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
                        "n": int(v.size),
                        "better": "higher" if higher else "lower",
                    }
                )
        return out

    def table(self) -> str:
        """The summary as a fixed-width text table (methods x metric means, arrows: better way)."""
        cols = self.columns
        summ = {(s["method"], s["metric"]): s for s in self.summary()}
        heads = []
        for c in cols:
            higher = next((cl[c] for cl in METRIC_COLUMNS.values() if c in cl), True)
            heads.append(f"{c} {'↑' if higher else '↓'}")
        w0 = max([len("method"), *(len(m) for m in self.methods)])
        widths = [max(len(h), 9) for h in heads]
        lines = ["  ".join([f"{'method':<{w0}}", *(f"{h:>{w}}" for h, w in zip(heads, widths, strict=True))])]
        for m in self.methods:
            cells = []
            for c, w in zip(cols, widths, strict=True):
                s = summ.get((m, c))
                cells.append(f"{'-':>{w}}" if s is None else f"{s['mean']:>{w}.3f}")
            lines.append("  ".join([f"{m:<{w0}}", *cells]))
        if self.sanity is not None:
            last = self.sanity.steps[-1]
            lines.append("")
            lines.append(
                f"sanity check ({self.sanity.mode} randomization), rank correlation of |maps| "
                "with the original (lower = the map depends on the weights):"
            )
            picks = list(
                dict.fromkeys(
                    [
                        self.sanity.steps[min(1, len(self.sanity.steps) - 1)],
                        self.sanity.steps[min(3, len(self.sanity.steps) - 1)],
                        last,
                    ]
                )
            )
            lines.append("  ".join([f"{'method':<{w0}}", *(f"{p:>12}" for p in picks)]))
            for m in self.sanity.methods:
                vals = [float(self.sanity.at(p, m).mean()) for p in picks]
                lines.append("  ".join([f"{m:<{w0}}", *(f"{v:>12.3f}" for v in vals)]))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"settings": self.settings, "summary": self.summary(), "per_image": self.rows}
        d["curves"] = {
            f"{m}/{k}": {"fractions": f.tolist(), "mean": c.tolist()} for (m, k), (f, c) in self.curves.items()
        }
        d["road"] = {
            m: {"percentages": p.tolist(), "morf": a.tolist(), "lerf": b.tolist()} for m, (p, a, b) in self.road.items()
        }
        if self.sanity is not None:
            d["sanity"] = self.sanity.table()
        return d


def merge_sanity(parts: list[SanityResult]) -> SanityResult:
    """Concatenate the images of several :class:`SanityResult` with the same steps and methods."""
    first = parts[0]
    values = {
        metric: {m: torch.cat([p.values[metric][m] for p in parts], dim=1) for m in first.methods}
        for metric in SANITY_METRICS
    }
    return SanityResult(first.methods, first.steps, first.mode, values, torch.cat([p.classes for p in parts]))


def _boxes_to_input(boxes: Any, shape: tuple[int, int], size: tuple[int, int], resize: str) -> np.ndarray:
    """Boxes in original-image pixels -> input pixels (``stretch`` or ``center_crop`` preprocessing)."""
    b = np.atleast_2d(np.asarray(boxes, dtype=np.float64))
    if b.shape[-1] != 4:
        raise InputError(f"boxes must be [x0, y0, x1, y1] lists; got shape {b.shape}")
    (H, W), (h, w) = shape, size
    if resize == "center_crop":
        s = max(h / H, w / W)
        nh, nw = max(h, round(H * s)), max(w, round(W * s))
        top, left = (nh - h) // 2, (nw - w) // 2
        return b * [nw / W, nh / H, nw / W, nh / H] - [left, top, left, top]
    return b * [w / W, h / H, w / W, h / H]


def _gt_to_input(gt: Any, shape: tuple[int, int], size: tuple[int, int], resize: str) -> Any:
    """One image's ground truth (boxes or a mask array at image resolution) at input resolution."""
    arr = np.asarray(gt) if not isinstance(gt, torch.Tensor) else gt.cpu().numpy()
    if arr.ndim == 2 and arr.shape == tuple(shape) and arr.shape[-1] != 4:
        t = torch.from_numpy((arr != 0).astype(np.float32))[None, None]
        if resize == "center_crop":
            raise InputError("mask ground truth with center_crop preprocessing is not supported; use boxes")
        return (F.interpolate(t, size=size, mode="nearest")[0, 0] > 0.5).numpy()
    return _boxes_to_input(arr, shape, size, resize)


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of :func:`evaluate` (also accepted as keywords there).

    Attributes:
        steps: deletion/insertion steps. percentages: ROAD fractions. tolerance: pointing-game
            tolerance in pixels. baseline: add the ``random`` map baseline (``centre`` for the pointing
            games). batch_size: images per forward pass. chunk_size: images loaded at once.
        seed: tie-break, random-baseline and randomization seed. preprocess: override the model's
            preprocessing. explain_options: keyword arguments for :func:`camlens.explain`.
        sanity_layers: an int ``k`` (randomize the top ``k`` units) or unit names. progress: a bar.
    """

    steps: int = 20
    percentages: Sequence[float] = DEFAULT_PERCENTAGES
    tolerance: float = 15
    baseline: bool = True
    batch_size: int = 32
    chunk_size: int = 8
    seed: int = 0
    preprocess: Any = None
    explain_options: dict[str, Any] | None = None
    sanity_layers: int | Sequence[str] | None = None
    progress: bool = False

    @classmethod
    def of(cls, config: EvaluateConfig | None, options: dict[str, Any]) -> EvaluateConfig:
        """``config`` (or the defaults) with ``options`` overriding its fields; unknown keys raise."""
        cfg = with_options(cls, config, options, "evaluate")
        return replace(cfg, batch_size=check_batch_size(cfg.batch_size), chunk_size=check_batch_size(cfg.chunk_size))


@dataclass
class Resume:
    """What :func:`evaluate` resumes from and where it keeps each chunk: ``done`` ``{chunk index:
    ChunkState}`` (skipped, their states used) and ``save(chunk index, ChunkState)`` (called after
    each chunk is computed; ``camlens evaluate`` writes it to ``OUT/.camlens-evaluate-partial/``)."""

    done: dict[int, ChunkState] = field(default_factory=dict)
    save: Callable[[int, ChunkState], None] | None = None


def evaluate(
    model: nn.Module,
    inputs: Sequence[Any] | None = None,
    methods: Sequence[str] = ("gradcam",),
    metrics: Sequence[str] | str = DEFAULT_METRICS,
    *,
    names: Sequence[str] | None = None,
    gt: Sequence[Any] | None = None,
    config: EvaluateConfig | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
    on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
    index_offset: int = 0,
    resume: Resume | None = None,
    **options: Any,
) -> EvaluationReport:
    """Evaluate ``methods`` on ``images`` with ``metrics``; see :class:`EvaluationReport`.

    Settings (``steps``, ``percentages``, ``tolerance``, ``baseline``, ``batch_size``, ``chunk_size``,
    ``seed``, ``preprocess``, ``explain_options``, ``sanity_layers``, ``progress``) are the fields of
    :class:`EvaluateConfig`: pass ``config=`` or any of them as keywords (keywords override ``config``).

    Args:
        model: the classifier (left untouched).
        inputs: paths, PIL images or RGB arrays (loaded ``chunk_size`` at a time); the name
            :func:`camlens.explain` uses (``images=`` is its 0.2 spelling: a ``DeprecationWarning``).
        methods: registered method names.
        metrics: names from :data:`METRIC_COLUMNS` (or ``"all"``).
        names: a name per image (default: file stems, else ``image<i>``).
        gt: per-image ground truth for the pointing games, in *original image* pixels: boxes
            ``[[x0, y0, x1, y1], ...]`` or an ``(H, W)`` mask; ``None`` entries skip that image.
        steps: deletion/insertion steps; percentages: ROAD fractions; tolerance: pointing game.
        baseline: add the ``random`` map baseline (``centre`` for the pointing games).
        batch_size: images per forward pass; chunk_size: images loaded at once.
        seed: tie-break, random-baseline and randomization seed.
        on_rows: called after each chunk with every per-image row finished so far (in report
            order), so a caller can write results as they come and an interrupted run keeps them.
        progress: a bar counting (image, method, metric) units, updated after each metric of each
            chunk and showing which one runs (Score-CAM shows its own bar of masked forwards).
        explain_options: keyword arguments for :func:`camlens.explain` (``layer=``…).
        sanity_layers: an int ``k`` (randomize only the top ``k`` units) or unit names.
        progress: show a tqdm progress bar.
        index_offset: position of ``images[0]`` in the whole dataset (a ``torchrun`` rank's shard),
            so the random baseline of each image is the one a single process draws.
        resume: a :class:`Resume`: its ``done`` ``{chunk index: ChunkState}`` chunks are skipped and
            their states used (the same images, settings and ``chunk_size``: the report ends bit for
            bit as an uninterrupted run's), and its ``save(chunk index, ChunkState)`` is called after
            each chunk is computed, so a caller can keep it.
    """
    images = renamed(options, "images", "inputs", inputs, "camlens.metrics.evaluate")
    if images is None:
        raise InputError("camlens.metrics.evaluate needs the images: evaluate(model, inputs, methods, metrics)")
    cfg = EvaluateConfig.of(config, options)
    wanted = resolve_metrics(metrics)
    methods, images, names = _checked_inputs(methods, images, names, gt, wanted)
    card = card_of(model)
    class_names = card.class_names if card else None
    pp = cfg.preprocess or (card.preprocess if card else None)
    report = EvaluationReport(settings=_settings(cfg, methods, wanted, len(images), card, model))
    plan = _Plan(model, names, gt, cfg, wanted, methods, class_names, pp, index_offset)
    n_chunks = math.ceil(len(images) / cfg.chunk_size)
    done = dict(resume.done) if resume is not None else {}
    on_state = resume.save if resume is not None else None
    total = _Totals({m: k for k, m in enumerate(plan.map_methods)})
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(images) * plan.units_per_image, desc="evaluate (image x method x metric)", unit="step")
    try:
        for ci in range(n_chunks):
            sl = slice(ci * cfg.chunk_size, min(len(images), (ci + 1) * cfg.chunk_size))
            state = done.get(ci)
            if state is None:
                state = plan.chunk(images, list(range(sl.start, sl.stop)), bar)
                if on_state is not None:
                    on_state(ci, state)
            elif bar is not None:  # kept from an interrupted run: counted, not recomputed
                bar.update((sl.stop - sl.start) * plan.units_per_image)
            total.add(state)
            if on_chunk is not None:
                on_chunk(ci + 1, n_chunks)
            if on_rows is not None:
                on_rows(total.ordered())
    finally:
        if bar is not None:
            bar.close()
    total.fill(report)
    return report


def _checked_inputs(
    methods: Sequence[str], images: Sequence[Any], names: Sequence[str] | None, gt: Any, wanted: list[str]
) -> tuple[list[str], list[Any], list[str]]:
    """Methods (registered, each once), images (at least one), a name per image and ground truth
    where the pointing games need it — or an error naming what is missing."""
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise MethodError("no method given")
    for m in methods:
        get_method(m)
    images = list(images)
    if not images:
        raise InputError("no images to evaluate")
    if names is None:
        names = [
            Path(s).stem if isinstance(s, (str, os.PathLike)) else d
            for s, d in zip(images, numbered("image", len(images)), strict=True)
        ]
    names = list(names)
    if len(names) != len(images):
        raise InputError(f"{len(names)} names for {len(images)} images")
    pointing = [m for m in wanted if m in CENTRE_BASELINE]
    if pointing and gt is None:
        raise InputError(
            f"{', '.join(pointing)} need ground truth: pass gt= (boxes or masks per image; "
            "on the command line --gt FILE.json)"
        )
    if gt is not None and len(gt) != len(images):
        raise InputError(f"{len(gt)} ground-truth entries for {len(images)} images")
    return methods, images, names


def _settings(cfg: EvaluateConfig, methods: list[str], wanted: list[str], n: int, card: Any, model: Any) -> dict:
    return {
        "methods": methods,
        "metrics": wanted,
        "steps": cfg.steps,
        "percentages": list(cfg.percentages),
        "tolerance": cfg.tolerance,
        "baseline": cfg.baseline,
        "seed": cfg.seed,
        "images": n,
        "model": card.name if card else type(model).__name__,
        "probability": "softmax probability of the target class (top-1 of the clean image)",
    }


@dataclass
class _Totals:
    """The chunks' states added in chunk order: rows, curve and ROAD sums, sanity parts."""

    order: dict[str, int]
    rows: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)
    curves: dict[tuple[str, str], list] = field(default_factory=dict)
    road: dict[str, list] = field(default_factory=dict)
    sanity: list[SanityResult] = field(default_factory=list)

    def add(self, state: ChunkState) -> None:
        self.rows.update(state.rows)
        for key, (f, v, n) in state.curves.items():
            s = self.curves.setdefault(key, [f, 0.0, 0])
            s[1], s[2] = s[1] + v, s[2] + n
        for meth, (p, a, b, n) in state.road.items():
            r = self.road.setdefault(meth, [p, 0.0, 0.0, 0])
            r[1], r[2], r[3] = r[1] + a, r[2] + b, r[3] + n
        if state.sanity is not None:
            self.sanity.append(state.sanity)

    def ordered(self) -> list[dict[str, Any]]:
        """The rows so far, by method then image (the report's order)."""
        return [self.rows[k] for k in sorted(self.rows, key=lambda k: (self.order[k[1]], k[0]))]

    def fill(self, report: EvaluationReport) -> None:
        report.rows = self.ordered()
        report.curves = {k: (f, s / n) for k, (f, s, n) in self.curves.items()}
        report.road = {m: (p, a / n, b / n) for m, (p, a, b, n) in self.road.items()}
        if self.sanity:
            report.sanity = merge_sanity(self.sanity)


@dataclass
class ChunkState:
    """What one chunk of :func:`evaluate` contributes: its rows and its part of the running sums.

    The report is the chunks' states added in chunk order, so a run resumed from saved states (the
    CLI keeps them beside ``per_image.csv``) ends bit for bit where an uninterrupted run ends.

    Attributes:
        rows: ``{(image index, method): row}``.
        curves: ``{(method, metric): (fractions, sum of the probability curves, images)}``.
        road: ``{method: (percentages, MoRF sum, LeRF sum, images)}``.
        sanity: the chunk's :class:`SanityResult` (``None`` when not asked).
    """

    rows: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)
    curves: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, int]] = field(default_factory=dict)
    road: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int]] = field(default_factory=dict)
    sanity: SanityResult | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (floats written exactly: ``json`` writes the shortest repr)."""
        san = None
        if self.sanity is not None:
            r = self.sanity
            san = {
                "methods": r.methods,
                "steps": r.steps,
                "mode": r.mode,
                "values": {k: {m: _enc(t) for m, t in d.items()} for k, d in r.values.items()},
                "classes": _enc(r.classes),
            }
        return {
            "rows": [[i, m, row] for (i, m), row in self.rows.items()],
            "curves": [[m, w, _enc(f), _enc(v), n] for (m, w), (f, v, n) in self.curves.items()],
            "road": [[m, _enc(p), _enc(a), _enc(b), n] for m, (p, a, b, n) in self.road.items()],
            "sanity": san,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ChunkState:
        """The inverse of :meth:`to_json`."""
        san = d.get("sanity")
        sanity = None
        if san is not None:
            values = {k: {m: _dec(t) for m, t in v.items()} for k, v in san["values"].items()}
            sanity = SanityResult(san["methods"], san["steps"], san["mode"], values, _dec(san["classes"]))
        return cls(
            rows={(int(i), str(m)): row for i, m, row in d["rows"]},
            curves={(m, w): (_dec(f), _dec(v), int(n)) for m, w, f, v, n in d["curves"]},
            road={m: (_dec(p), _dec(a), _dec(b), int(n)) for m, p, a, b, n in d["road"]},
            sanity=sanity,
        )


def _enc(a: Any) -> dict[str, Any]:
    is_torch = isinstance(a, torch.Tensor)
    arr = a.detach().cpu().numpy() if is_torch else np.asarray(a)
    return {"torch": is_torch, "dtype": str(arr.dtype), "shape": list(arr.shape), "data": arr.ravel().tolist()}


def _dec(d: dict[str, Any]) -> Any:
    arr = np.asarray(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"])
    return torch.from_numpy(arr) if d["torch"] else arr


class _Plan:
    """The work of one :func:`evaluate` call, chunk by chunk."""

    def __init__(self, model, names, gt, cfg, wanted, methods, class_names, pp, index_offset) -> None:
        self.model, self.names, self.gt, self.cfg, self.pp = model, names, gt, cfg, pp
        self.wanted, self.methods, self.class_names, self.index_offset = wanted, methods, class_names, index_offset
        self.explain_opts = dict(cfg.explain_options or {})
        self.per_map = [m for m in wanted if m not in ("sanity", "class_sensitivity")]
        pointing = [m for m in wanted if m in CENTRE_BASELINE]
        self.map_methods = (
            methods
            + (["random"] if cfg.baseline and any(m in RANDOM_BASELINE for m in wanted) else [])
            + (["centre"] if cfg.baseline and pointing else [])
        )
        # bar units per image: one per (method, metric) and one for the sanity check
        self.units_per_image = len(methods) * (len(self.per_map) + ("class_sensitivity" in wanted)) + (
            "sanity" in wanted
        )

    def chunk(self, images: Sequence[Any], idx: list[int], bar: Any) -> ChunkState:
        """Score the images ``idx``; ``bar`` advances by ``len(idx)`` per unit of work done."""
        cfg, model, st = self.cfg, self.model, ChunkState()
        arrs = [load_image(images[i]) for i in idx]
        x, _, _ = prepare_inputs(arrs, model, self.pp)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        classes = resolve_classes(model, x, None, cfg.batch_size)
        gts = None
        if self.gt is not None:
            resize = getattr(self.pp, "resize", "stretch")
            gts = [
                None if self.gt[i] is None else _gt_to_input(self.gt[i], a.shape[:2], size, resize)
                for i, a in zip(idx, arrs, strict=True)
            ]
        for meth in self.map_methods:
            self._method(st, meth, x, size, classes, idx, gts, bar)
        if "class_sensitivity" in self.wanted:
            for meth in self.methods:
                _say(bar, f"{meth}: class_sensitivity")
                v = class_sensitivity(
                    model,
                    x,
                    meth,
                    classes,
                    batch_size=cfg.batch_size,
                    explain_options=_options_for(meth, self.explain_opts),
                )
                for j, i in enumerate(idx):
                    st.rows[(i, meth)]["class_sensitivity"] = float(v[j])
                if bar is not None:
                    bar.update(len(idx))
        if "sanity" in self.wanted:
            st.sanity = self._sanity(x, classes, len(idx), bar)
        return st

    def _method(self, st: ChunkState, meth: str, x, size, classes, idx: list[int], gts, bar: Any) -> None:
        cfg, model = self.cfg, self.model
        is_base = meth in ("random", "centre")
        mine = [
            w
            for w in self.per_map
            if (not is_base)
            or (meth == "random" and w in RANDOM_BASELINE)
            or (meth == "centre" and w in CENTRE_BASELINE)
        ]
        if is_base and not mine:
            return
        names, class_names = self.names, self.class_names
        for j, i in enumerate(idx):
            c = int(classes[j])
            st.rows[(i, meth)] = {
                "image": names[i],
                "method": meth,
                "target": c,
                "target_name": class_names[c] if class_names and c < len(class_names) else str(c),
            }
        if not mine:
            return
        if is_base:
            # one draw per image, seeded by its index: independent of the chunking
            maps = torch.cat(
                [baseline_maps(meth, 1, size, x.device, cfg.seed + 7919 * (self.index_offset + i)) for i in idx]
            )
        else:
            _say(bar, f"{meth}: maps")
            maps = explain_maps(model, x, meth, classes, cfg.batch_size, _options_for(meth, self.explain_opts))
        for w in mine:
            if not is_base:
                _say(bar, f"{meth}: {w}")
            vals = self._metric(st, meth, w, mine, x, maps, classes, idx, gts)
            for col, v in vals.items():
                for j, i in enumerate(idx):
                    val = float(v[j])
                    st.rows[(i, meth)][col] = None if math.isnan(val) else val
            if bar is not None and not is_base:
                bar.update(len(idx))

    def _metric(self, st: ChunkState, meth: str, w: str, mine, x, maps, classes, idx, gts) -> dict[str, torch.Tensor]:
        cfg, model = self.cfg, self.model
        common: dict[str, Any] = {"batch_size": cfg.batch_size, "seed": cfg.seed}
        vals: dict[str, torch.Tensor] = {}
        if w in ("deletion", "insertion"):
            curve_fn = deletion_curve if w == "deletion" else insertion_curve
            cur = curve_fn(model, x, maps, classes, steps=cfg.steps, **common)
            vals[w] = cur.auc
            st.curves[(meth, w)] = (cur.fractions.numpy(), cur.probs.sum(0).numpy(), int(cur.probs.shape[0]))
        elif w in ("average_drop", "increase_in_confidence"):
            if w == "increase_in_confidence" and "average_drop" in mine:
                return vals  # computed with average_drop (one masked forward for both)
            y, o = confidence_pair(model, x, maps, classes, **common)
            if "average_drop" in mine:
                vals["average_drop"] = 100.0 * (y - o).clamp_min(0) / y.clamp_min(1e-12)
            if "increase_in_confidence" in mine:
                vals["increase_in_confidence"] = 100.0 * (o > y).float()
        elif w == "road":
            r = road_curves(model, x, maps, classes, percentages=cfg.percentages, **common)
            vals["road_morf"], vals["road_lerf"] = r.score("morf"), r.score("lerf")
            st.road[meth] = (r.percentages.numpy(), r.morf.sum(0).numpy(), r.lerf.sum(0).numpy(), int(r.morf.shape[0]))
        elif w in CENTRE_BASELINE:
            assert gts is not None  # the pointing games were checked to have gt
            keep = [j for j in range(len(idx)) if gts[j] is not None]
            if keep:
                point_fn = pointing_game if w == "pointing_game" else energy_pointing_game
                kw: dict[str, Any] = {"tolerance": cfg.tolerance} if w == "pointing_game" else {}
                hits = point_fn(None, x[keep], maps[keep], gt=[gts[j] for j in keep], seed=cfg.seed, **kw)
                full = torch.full((len(idx),), float("nan"))
                full[keep] = hits
                vals[w] = full
        return vals

    def _sanity(self, x, classes, n: int, bar: Any) -> SanityResult:
        lay = self.cfg.sanity_layers
        if isinstance(lay, int):
            lay = randomization_layers(self.model, x)[:lay]
        _say(bar, "sanity")

        start = float(bar.n) if bar is not None else 0.0

        def advance(fraction: float) -> None:  # to a target, never past the total (float sums drift)
            if bar is not None:
                target = min(float(bar.total), start + n * fraction)
                d = target - bar.n
                if d > 0:
                    bar.update(d if bar.n + d <= bar.total else math.nextafter(d, 0.0))

        result = sanity_randomization(
            self.model,
            x,
            method=self.methods,
            targets=classes,
            layers=None if lay is None else list(lay),
            seed=self.cfg.seed,
            batch_size=self.cfg.batch_size,
            explain_options=self.explain_opts,  # one explain of every method: options split per method
            progress=lambda k, total: advance(k / total),  # the bar moves with each randomized layer
        )
        advance(1.0)  # no layer to randomize, or rounding: the unit is done
        return result


def _say(bar: Any, what: str) -> None:
    if bar is not None:
        bar.set_postfix_str(what, refresh=True)


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------
def _options_for(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The explain options one method takes (``layer``… always; method options only where the
    method's signature has them), so ``max_channels`` for Score-CAM does not break Grad-CAM."""
    own = get_method(method).options()
    general = set(inspect.signature(explain).parameters)
    return {k: v for k, v in options.items() if k in general or k in own}


def curves_figure(report: EvaluationReport, method: str):
    """Deletion and insertion mean curves of ``method`` (and of the random baseline, dashed)."""
    import matplotlib.pyplot as plt

    kinds = [k for k in ("deletion", "insertion") if (method, k) in report.curves]
    fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(5 * max(1, len(kinds)), 4), squeeze=False)
    summ = {(s["method"], s["metric"]): s["mean"] for s in report.summary()}
    for ax, kind in zip(axes[0], kinds, strict=False):
        for m, style in ((method, "-"), ("random", "--")):
            if (m, kind) not in report.curves:
                continue
            f, c = report.curves[(m, kind)]
            ax.plot(f, c, style, label=f"{m} (AUC {summ.get((m, kind), float('nan')):.3f})")
        ax.set_xlabel(f"fraction of pixels {'removed' if kind == 'deletion' else 'inserted'}")
        ax.set_ylabel("probability of the target class")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{kind} ({'lower' if kind == 'deletion' else 'higher'} AUC is better)")
        ax.legend(fontsize=8)
    fig.suptitle(f"{method}: mean over {report.settings.get('images', '?')} images")
    fig.tight_layout()
    return fig


def road_figure(report: EvaluationReport):
    """ROAD MoRF (solid) and LeRF (dashed) mean curves, one colour per method."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, (p, a, b) in report.road.items():
        (line,) = ax.plot(p * 100, a, "-o", ms=3, label=f"{m} MoRF")
        ax.plot(p * 100, b, "--o", ms=3, color=line.get_color(), label=f"{m} LeRF")
    ax.set_xlabel("% of pixels removed (noisy linear imputation)")
    ax.set_ylabel("probability of the target class")
    ax.set_ylim(0, 1.02)
    ax.set_title("ROAD: MoRF low and LeRF high is better")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def sanity_figure(result: SanityResult):
    """Rank correlation of |maps| and SSIM against the randomization steps, all methods."""
    import matplotlib.pyplot as plt

    width = max(7, 0.35 * len(result.steps) + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * width, 4.5))
    plot_sanity(result, "spearman_abs", axes[0])
    plot_sanity(result, "ssim", axes[1])
    fig.tight_layout()
    return fig
