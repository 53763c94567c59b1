"""The streaming loop: DataLoader workers decode -> batches -> one ``explain`` per batch -> a writer
thread -> sinks (the result store, loose files, figures, metric accumulators).

    workers: read + decode + resize + normalize  (num_workers processes, prefetching)
       │  Batch (pinned on accelerators)
    main:  x.to(device, non_blocking) ─▶ explain(model, x, methods) ─▶ results to the CPU, once
       │  queue (2 batches at most: memory stays bounded)
    writer thread: boxes, Zarr maps, Parquet chunk, PNGs  (overlaps with the next batch's compute)

Nothing holds the dataset: memory is a few batches whatever the number of images. A file that
cannot be read is reported by name as soon as it fails and skipped; the caller decides the exit code.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import queue
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from camlens._version import versions
from camlens.api.explainer import ExplainRequest, run_request
from camlens.api.explanation import Explanation, Upsampled
from camlens.attribution.registry import get_method
from camlens.base._util import with_options
from camlens.base.defaults import EXPLAIN_BATCH
from camlens.base.errors import (
    CamlensError,
    HeadError,
    InputError,
    StoreBusyError,
    StoreError,
    TargetError,
    WriteError,
)
from camlens.base.fsio import os_error, safe_out_dir
from camlens.base.localization import DEFAULT_THRESHOLD
from camlens.models.card import card_task
from camlens.models.detectors import as_detector, is_detector
from camlens.models.preprocess import IMAGENET, Preprocess
from camlens.models.zoo import card_of, load_model
from camlens.pipeline import dist as _dist
from camlens.pipeline.detections import DetectionSink, detection_canvas, detection_key
from camlens.pipeline.figures import draw_volume_figures
from camlens.pipeline.integrity import StoreLock
from camlens.pipeline.sources import Batch, ImageFiles, as_dataset, collate, collate_ragged, without_store
from camlens.pipeline.store import (
    COLUMNS,
    FIGURES_DIR,
    META_RENDER,
    VOLUME_COLUMNS,
    Results,
    ResultStore,
    StoreMismatchError,
    chunk_entries,
    is_detector_run,
    read_chunk,
)
from camlens.pipeline.volumes import VolumeFiles, VolumeReader, box_world, pad_maps, shape_batches, volume_dataset
from camlens.targets import Classes, Detection, deprecated_flat_list, is_target_object

FIGURES = ("none", "overlay", "all")


@dataclass
class BatchResult:
    """What the writer thread gets: the batch's metadata and its explanations, on the CPU."""

    batch: Batch
    explanations: dict[str, Explanation]
    extra: dict[str, Any] = field(default_factory=dict)


class Sink(Protocol):
    """Receives every :class:`BatchResult` in the writer thread (``write``) and ``close`` at the end
    (a protocol: any object with these two methods is a sink; subclasses inherit ``close``)."""

    def write(self, res: BatchResult) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        return None  # nothing to finish by default


@dataclass
class RunStats:
    computed: int = 0  # images explained by this process in this run
    skipped: int = 0  # images already done (resume)
    failed: list[dict[str, Any]] = field(default_factory=list)  # {"image_id", "source", "error"}
    seconds: float = 0.0
    methods: list[str] = field(default_factory=list)


class _Writer:
    """One background thread feeding the sinks; a bounded queue gives back-pressure, and an
    exception in the thread is raised again in the caller at the next ``put`` or at ``close``."""

    def __init__(self, sinks: Sequence[Sink], depth: int = 2):
        self.sinks = list(sinks)
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="camlens-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain
            try:
                for s in self.sinks:
                    s.write(item)
            except OSError as exc:  # a full disk…: a clean message naming the file, not a traceback
                self.error = exc if isinstance(exc, CamlensError) else os_error(exc, exc.filename or "the output")
            except BaseException as exc:  # re-raised in the main thread
                self.error = exc

    def _check(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def put(self, item: BatchResult) -> None:
        self._check()
        self.q.put(item)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        try:
            self._check()
        finally:
            for s in self.sinks:
                s.close()


def default_workers(n_images: int, batch_size: int, world: int = 1) -> int:
    """Decoding processes when not told: none for a handful of images (starting workers costs more
    than it saves), else up to 4, sharing the CPUs with the other ranks."""
    if n_images <= 2 * batch_size:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cpus // max(1, world) - 1))


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def _to_cpu(exp: Explanation) -> Explanation:
    """The parts a sink needs, moved off the device once. Lazy maps cross as their small ``raw``
    (a layer method's ``(N, K, h, w)``) and are upsampled on the CPU by the writer thread, off the
    compute thread; other maps cross whole and ``raw`` keeps only its shape's rank (``[:, :0]``)."""
    spec = exp._maps_spec()
    maps: torch.Tensor | Upsampled
    if isinstance(spec, Upsampled):
        raw = spec.source.detach().cpu()
        maps = Upsampled(raw, spec.size)
    else:
        raw, maps = exp.raw.detach()[:, :0].cpu(), spec.detach().float().cpu()
    return replace(
        exp,
        maps=cast(torch.Tensor, maps),  # an Upsampled is computed on first access
        raw=raw,
        classes=exp.classes.cpu(),
        scores=exp.scores.detach().float().cpu(),
        probs=exp.probs.detach().float().cpu(),
        logits=None if exp.logits is None else exp.logits.detach().float().cpu(),
        images=None,
        sources=None,
    )


@dataclass(frozen=True)
class StreamOptions:
    """How :func:`stream` goes through a dataset (what it explains is the :class:`ExplainRequest`).

    Attributes:
        batch_size: images per forward. num_workers: DataLoader decoding processes (default: a few
            for more than two batches). optional: methods dropped (with a note) if the model's head
            cannot give them. before / after: called with each batch before its forward / with its
            explanations (e.g. the CLI's top-5 table). progress, desc: the bar. on_error: where the
            notes and unreadable images are said (default: stderr). world: ranks sharing the work.
    """

    batch_size: int = EXPLAIN_BATCH
    num_workers: int | None = None
    optional: tuple[str, ...] = ()
    before: Callable[[Batch, torch.Tensor], None] | None = None
    after: Callable[[Batch, dict[str, Explanation]], None] | None = None
    progress: bool = True
    desc: str = "explain"
    on_error: Callable[[str], None] | None = None
    world: int = 1
    ragged: bool = False  # a detector's batches: images of different sizes, as lists


def stream(
    model: nn.Module,
    dataset: Any,
    ids: Sequence[int],
    sinks: Sequence[Sink],
    request: ExplainRequest,
    loop: StreamOptions | None = None,
) -> RunStats:
    """Explain ``dataset`` items ``ids`` (item dicts from :mod:`camlens.pipeline.sources`) in
    batches, each batch one :func:`~camlens.api.explainer.run_request` of ``request``, and hand the
    results to ``sinks`` in a writer thread.

    ``request.targets``: what :func:`camlens.explain` takes, the same for every batch (``"top2"``, an
    int, :class:`~camlens.targets.Classes`, a callable ``logits -> scores``, a target object), or
    :class:`PerBatch` ``(fn)``: ``fn(batch, x) -> spec`` decides each batch's targets (e.g. one
    class id per image from the labels).
    """
    loop = loop or StreamOptions()
    targets, batch_targets = dataset_targets(request.targets)
    names = list(dict.fromkeys(get_method(m).name for m in request.methods))
    stats = RunStats(methods=list(names))
    if not ids:
        return stats
    device = _model_device(model)
    loader = _loader(dataset, ids, loop, device)
    say = loop.on_error or (lambda msg: print(msg, file=sys.stderr))
    bar = _bar(len(ids), loop)
    writer = _Writer(sinks)
    step = _Step(request, targets, batch_targets, names, loop, say, device)
    t0 = time.perf_counter()
    try:
        for batch in loader:
            for i, src, msg in batch.failed:
                stats.failed.append({"image_id": int(i), "source": src, "error": msg})
                (bar.write(f"error: {msg}", file=sys.stderr) if not bar.disable else say(f"error: {msg}"))
            for part in _size_groups(batch, names) if len(batch) else []:
                writer.put(_explain_part(model, part, step))
                stats.computed += len(part)
            bar.update(len(batch) + len(batch.failed))
            if stats.failed:
                bar.set_postfix(failed=len(stats.failed), refresh=False)
    finally:
        try:
            writer.close()
        finally:
            bar.close()
    stats.seconds = time.perf_counter() - t0
    stats.methods = names
    return stats


@dataclass(frozen=True)
class _Step:
    """What explaining one batch of :func:`stream` needs besides the model and the batch."""

    request: ExplainRequest
    targets: Any
    batch_targets: Callable[[Batch, torch.Tensor], Any] | None
    names: list[str]  # shrinks when an optional method is dropped
    loop: StreamOptions
    say: Callable[[str], None]
    device: torch.device


def _size_groups(batch: Batch, names: Sequence[str]) -> list[Batch]:
    """A detector's batch of images of different sizes, split into batches of one size when a
    method needs that (the pixel methods; the layer methods take the mixed list)."""
    if batch.xs is None or all(get_method(m).kind == "layer" for m in names):
        return [batch]
    groups: dict[tuple[int, ...], list[int]] = {}
    for j, t in enumerate(batch.xs):
        groups.setdefault(tuple(t.shape), []).append(j)
    if len(groups) == 1:
        return [batch]
    return [_subset(batch, rows) for rows in groups.values()]


def _subset(batch: Batch, rows: list[int]) -> Batch:
    pick = lambda v: [v[j] for j in rows]  # noqa: E731
    return replace(
        batch,
        indices=pick(batch.indices),
        sources=pick(batch.sources),
        names=pick(batch.names),
        sizes=pick(batch.sizes),
        labels=pick(batch.labels),
        gts=pick(batch.gts),
        images=None if batch.images is None else pick(batch.images),
        failed=[],
        x=None if batch.x is None else batch.x[rows],
        xs=None if batch.xs is None else pick(batch.xs),
    )


def _explain_part(model: nn.Module, batch: Batch, step: _Step) -> BatchResult:
    """One batch explained -> its :class:`BatchResult` for the sinks (on the CPU); a detector's batch
    where no image has anything to explain gives each image's reason instead of maps."""
    loop = step.loop
    x: Any = batch.inputs(step.device, non_blocking=step.device.type != "cpu")  # a tensor, or a list (detectors)
    if loop.before is not None:
        loop.before(batch, x)
    spec = step.batch_targets(batch, x) if step.batch_targets is not None else step.targets
    try:
        res = _explain_batch(model, x, _batch_request(step.request, spec, batch), step.names, loop.optional, step.say)
    except TargetError as exc:  # no image of the batch has anything to explain: said, per image
        skipped = getattr(exc, "skipped", None)
        if not skipped or len(skipped) < len(batch):
            raise
        return BatchResult(batch, {}, {"skipped": dict(skipped)})
    if loop.after is not None:  # e.g. the CLI's top-5 table, from the explaining forward's logits
        loop.after(batch, res)
    return BatchResult(batch, {m: _to_cpu(e) for m, e in res.items()})


def _batch_request(request: ExplainRequest, spec: Any, batch: Batch) -> ExplainRequest:
    """``request`` for one batch: its targets and, for a dataset with extra inputs, each image's own."""
    if not (batch.forward_args or batch.forward_kwargs):
        return replace(request, targets=spec)
    if (
        request.forward_args
        or request.forward_kwargs
        or any(k in request.options for k in ("forward_args", "forward_kwargs"))
    ):
        raise InputError(
            "the dataset gives the model's extra inputs per item; do not also pass forward_args/forward_kwargs"
        )
    return replace(request, targets=spec, forward_args=batch.forward_args, forward_kwargs=batch.forward_kwargs)


def _loader(dataset: Any, ids: Sequence[int], loop: StreamOptions, device: torch.device) -> DataLoader:
    """Batches of ``loop.batch_size`` in order; of a dataset with ``group_key`` (volumes of several
    shapes), runs of consecutive items with one key (:func:`~camlens.pipeline.volumes.shape_batches`)."""
    workers = default_workers(len(ids), loop.batch_size, loop.world) if loop.num_workers is None else loop.num_workers
    key = getattr(dataset, "group_key", None)
    batching: dict[str, Any] = {"batch_size": loop.batch_size, "shuffle": False}
    if key is not None:
        batching = {"batch_sampler": shape_batches([key(i) for i in ids], loop.batch_size)}
    return DataLoader(
        Subset(dataset, list(ids)),
        **batching,
        num_workers=int(workers),
        collate_fn=collate_ragged if loop.ragged else collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers > 0 else None,
    )


def _bar(total: int, loop: StreamOptions) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=loop.desc,
        unit="img",
        disable=not loop.progress,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
        smoothing=0.1,
    )


def _explain_batch(
    model: nn.Module,
    x: torch.Tensor,
    request: ExplainRequest,
    names: list[str],
    optional: Sequence[str],
    say: Callable[[str], None],
) -> dict[str, Explanation]:
    """One batch's explanations; an optional method the model's head cannot give is dropped from
    ``names`` (for the rest of the run) with a note, and the batch is explained again without it."""
    while True:
        try:
            return run_request(model, x, replace(request, methods=tuple(names)))
        except HeadError as exc:
            drop = [m for m in names if m in optional]
            if not drop or len(names) == 1:
                raise
            for m in drop:
                names.remove(m)
            say(f"note: {', '.join(drop)} skipped ({exc})")


# ----------------------------------------------------------------------------------------------
# Sinks
# ----------------------------------------------------------------------------------------------
def image_boxes(exp: Explanation, sizes: Sequence[tuple[int, ...]], threshold: float) -> np.ndarray:
    """``(N, K, 4)`` boxes at ``threshold`` in each image's own pixel frame (``-1`` = none)."""
    from camlens.base.localization import map_boxes, scale_boxes

    b = map_boxes(exp, threshold)
    size = tuple(exp.shape[-2:])
    return np.stack([scale_boxes(bi, size, s) for bi, s in zip(b, sizes, strict=True)]).astype(np.int64)


def volume_boxes(exp: Explanation, batch: Batch, threshold: float) -> np.ndarray:
    """``(N, K, 6)`` boxes ``(x0, y0, z0, x1, y1, z1)`` at ``threshold`` in voxels of the maps; a
    clip's ``x, y`` scaled to the video's own pixels (its frames were resized for the model)."""
    from camlens.base.localization import map_boxes, scale_boxes

    b = map_boxes(exp, threshold, spatial_dims=3).astype(np.int64)
    frame = tuple(exp.shape[-2:])
    for i, (size, meta) in enumerate(zip(batch.sizes, batch.meta or [None] * len(batch), strict=True)):
        if meta is not None and meta.get("timestamps") is not None and tuple(size[1:]) != frame:
            xy = scale_boxes(b[i][:, [0, 1, 3, 4]], frame, size[1:])
            b[i][:, [0, 1, 3, 4]] = xy
            b[i][(xy < 0).any(-1)] = -1
    return b


def _volume_rows(res: BatchResult, threshold: float) -> dict[str, list]:
    """The table rows (:data:`~camlens.pipeline.store.VOLUME_COLUMNS`) of a batch of volumes or clips."""
    b = res.batch
    rows: dict[str, list] = {c: [] for c in VOLUME_COLUMNS}
    metas = b.meta or [None] * len(b)
    for m, exp in res.explanations.items():
        boxes = volume_boxes(exp, b, threshold)
        labels = exp.labels()
        classes, scores, probs = exp.classes.tolist(), exp.scores.tolist(), exp.probs.tolist()
        for i in range(len(b)):
            meta = metas[i] or {}
            for k in range(exp.shape[1]):
                box = [int(v) for v in boxes[i, k]]
                values: tuple[Any, ...] = (b.indices[i], b.sources[i], b.names[i], b.labels[i], *b.sizes[i])
                values += (m, exp.layer)
                values += (exp.model_name, k + 1, int(classes[i][k]), labels[i][k], float(scores[i][k]))
                values += (float(probs[i][k]), *box, *box_world(meta.get("affine"), box))
                values += (meta.get("spacing"), meta.get("affine"), meta.get("timestamps"))
                for c, v in zip(VOLUME_COLUMNS, values, strict=True):
                    rows[c].append(v)
    return rows


class StoreSink(Sink):
    """Rows and maps of every batch into a :class:`~camlens.pipeline.store.ResultStore`
    (``map_shape``: a volume run's stored ``(D, H, W)``, smaller volumes padded with NaN)."""

    def __init__(
        self, store: ResultStore, n_images: int, threshold: float, rank: int = 0, map_shape: tuple | None = None
    ):
        self.store, self.n, self.threshold, self.rank = store, n_images, threshold, rank
        self.map_shape = map_shape

    def _write_volumes(self, res: BatchResult) -> None:
        rows = _volume_rows(res, self.threshold)
        maps = {}
        for m, exp in res.explanations.items():
            arr = exp.maps.numpy()
            maps[m] = pad_maps(arr, self.map_shape) if self.map_shape is not None else arr
        render = {m: {"signed": exp.signed} for m, exp in res.explanations.items()}
        self.store.write(self.n, res.batch.indices, rows, maps, self.rank, render)

    def write(self, res: BatchResult) -> None:
        if any(exp.spatial_dims == 3 for exp in res.explanations.values()):
            self._write_volumes(res)
            return
        b = res.batch
        rows: dict[str, list] = {c: [] for c in COLUMNS}
        maps = {}
        for m, exp in res.explanations.items():
            boxes = image_boxes(exp, b.sizes, self.threshold)
            labels = exp.labels()
            classes, scores, probs = exp.classes.tolist(), exp.scores.tolist(), exp.probs.tolist()
            for i in range(len(b)):
                for k in range(exp.shape[1]):
                    rows["image_id"].append(b.indices[i])
                    rows["source"].append(b.sources[i])
                    rows["name"].append(b.names[i])
                    rows["label"].append(b.labels[i])
                    rows["height"].append(b.sizes[i][0])
                    rows["width"].append(b.sizes[i][1])
                    rows["method"].append(m)
                    rows["layer"].append(exp.layer)
                    rows["model"].append(exp.model_name)
                    rows["rank"].append(k + 1)
                    rows["class_id"].append(int(classes[i][k]))
                    rows["class_name"].append(labels[i][k])
                    rows["score"].append(float(scores[i][k]))
                    rows["prob"].append(float(probs[i][k]))
                    for j, c in enumerate(("x0", "y0", "x1", "y1")):
                        rows[c].append(int(boxes[i, k, j]))
            maps[m] = exp.maps.numpy()
        render = {m: {"signed": exp.signed} for m, exp in res.explanations.items()}
        self.store.write(self.n, b.indices, rows, maps, self.rank, render)


class FilesSink(Sink):
    """The loose per-image files of ``camlens explain`` (PNG overlays, ``.npy`` maps, JSON summaries)
    through :func:`camlens.viz.save_explanation`, with today's names."""

    def __init__(
        self, directory: str | os.PathLike, formats: Sequence[str], *, top: int | None = None, **save_kwargs: Any
    ):
        self.directory, self.formats, self.top, self.kw = directory, list(formats), top, save_kwargs
        self.written = 0
        self.skipped: list[str] = []  # "NAME: nothing to explain: why" of the images given no file

    def write(self, res: BatchResult) -> None:
        from camlens.viz import save_explanation

        b = res.batch
        skipped = dict(res.extra.get("skipped", {}))
        for e in res.explanations.values():
            skipped.update(e.extras.get("skipped_reasons") or {})
        self.skipped += [f"{b.names[i]}: nothing to explain: {why}" for i, why in sorted(skipped.items())]
        mixed = b.xs is not None and len({tuple(t.shape) for t in b.xs}) > 1
        if skipped or mixed:  # no file of a zero map; a detector's mixed sizes: image by image
            for i in range(len(b)):
                if i not in skipped:
                    self.write(_one_image(res, i))
            return
        pngs = [f for f in self.formats if f == "png"]
        data = [f for f in self.formats if f != "png"]
        for exp in res.explanations.values():
            e = exp.replace(images=b.images, sources=list(b.names))
            if b.images is not None and any(tuple(im.shape[:2]) != tuple(s) for im, s in zip(b.images, b.sizes)):
                e.extras = {**e.extras, "image_sizes": list(b.sizes)}  # decoded reduced: the photos' own frame
            if data:  # maps and summaries keep every target
                self.written += len(save_explanation(e, Path(self.directory), formats=data, **self.kw))
            if pngs:
                if self.top is not None:  # --figures overlay: the top target's overlay only
                    t = self.top
                    e = e.first_targets(t)
                self.written += len(save_explanation(e, Path(self.directory), formats=pngs, **self.kw))


def _one_image(res: BatchResult, i: int) -> BatchResult:
    """Image ``i`` of a batch alone (one with nothing to explain is left out by the caller); a
    detector's maps cropped from the batch's padded frame to the image's own ``(H, W)``."""
    b = _subset(res.batch, [i])
    exps = {}
    for m, e in res.explanations.items():
        one = e.select([i])
        extras = {k: v for k, v in one.extras.items() if k not in ("skipped", "skipped_reasons")}
        if b.xs is not None:  # a detector's maps: cropped from the batch's padded frame
            h, w = b.sizes[0]
            one = replace(one, maps=one.maps[..., :h, :w])
            extras["image_sizes"] = [(h, w)]
        exps[m] = replace(one, extras=extras)
    return BatchResult(b, exps)


# ----------------------------------------------------------------------------------------------
# The Python API
# ----------------------------------------------------------------------------------------------
def model_checksum(model: nn.Module) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes and bytes, in key order)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def sources_digest(dataset: Any, *, legacy: bool = False) -> str:
    """SHA-256 of the images' sources and labels. Files count by their absolute path, so that a
    relative and an absolute path to the same data are the same run (``legacy``: the sources as
    given, the digest of camlens 0.2 stores)."""
    h = hashlib.sha256()
    describe = getattr(dataset, "describe", None)
    files = isinstance(dataset, (ImageFiles, VolumeFiles)) and not legacy
    for i in range(len(dataset)):
        r = describe(i) if describe else None
        src = r.source if r else i
        if files and isinstance(src, str) and not src.startswith("skimage:"):
            src = os.path.abspath(src)
        h.update(f"{src}|{r.label if r else ''}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class PerBatch:
    """Targets decided per batch of a dataset run: ``fn(batch, x)`` returns what
    :func:`camlens.explain` takes for that batch (e.g. one class id per image from its labels).
    ``explain_dataset(..., targets=PerBatch(fn))``."""

    fn: Callable[[Batch, torch.Tensor], Any]


def dataset_targets(targets: Any) -> tuple[Any, Callable[[Batch, torch.Tensor], Any] | None]:
    """``(targets for explain, per-batch function or None)`` for a dataset run. The 0.2 spellings
    are read as before, with a DeprecationWarning: a flat list of classes -> :class:`Classes` (the
    same for every image); a two-argument callable ``(batch, x)`` -> :class:`PerBatch`."""
    if isinstance(targets, PerBatch):
        return None, targets.fn
    if isinstance(targets, (list, tuple)) and targets and not isinstance(targets[0], (list, tuple)):
        return deprecated_flat_list(targets, where="explain_dataset"), None
    if callable(targets) and not is_target_object(targets):
        try:
            n_params = len(inspect.signature(targets).parameters)
        except (TypeError, ValueError):  # a builtin: taken as logits -> scores
            n_params = 1
        if n_params == 2:
            warnings.warn(
                "a (batch, x) callable as targets= of a dataset run: pass targets=camlens.pipeline.PerBatch(fn); "
                "targets= takes what camlens.explain takes (a callable there maps logits to scores). "
                "This reading stops in camlens 0.4.",
                DeprecationWarning,
                stacklevel=3,
            )
            return None, targets
    return targets, None


def _targets_key(targets: Any) -> Any:
    if isinstance(targets, Classes):  # the same store as the 0.2 spelling, a flat list
        targets = list(targets.ids)
    if isinstance(targets, PerBatch):
        targets = targets.fn
    if targets is None or isinstance(targets, (int, str)):
        return targets
    if isinstance(targets, (list, tuple)):
        return [t if isinstance(t, (int, str)) else repr(t) for t in targets]
    return f"callable:{getattr(targets, '__qualname__', type(targets).__name__)}"


def _signed_options(request: ExplainRequest) -> dict[str, Any]:
    """The options that decide the maps, with the request fields that do when not the default
    (``precision``, ``exact_decode``: kept among the options so that earlier stores still match)."""
    opts = dict(request.options)
    if request.precision != "fp32":
        opts["precision"] = request.precision
    if request.exact_decode:
        opts["exact_decode"] = True
    return opts


def run_signature(model: nn.Module, dataset: Any, request: ExplainRequest, store: StoreOptions) -> dict[str, Any]:
    """The arguments that decide a store's content: a rerun with the same signature resumes."""
    card = card_of(model)
    preprocess = request.preprocess if request.preprocess is not None else getattr(dataset, "preprocess", None)
    layer = request.layer
    sig = {
        "n_images": len(dataset),
        "sources_sha256": sources_digest(dataset),
        "methods": list(request.methods),
        "targets": _targets_key(request.targets),
        "layer": layer if layer is None or isinstance(layer, str) else repr(layer),
        "capture": request.capture,
        "model": card.name if card else type(model).__name__,
        "model_sha256": model_checksum(model),
        "threshold": store.threshold,
        "map_dtype": store.map_dtype,
        "preprocess": preprocess.to_dict() if preprocess is not None else None,
        "options": {k: repr(v) for k, v in sorted(_signed_options(request).items())},
    }
    if getattr(dataset, "extra_inputs", False):  # only then: older stores keep resuming
        sig["extra_inputs"] = True
    reader = getattr(dataset, "reader", None)
    if isinstance(reader, VolumeReader):  # volumes and clips: how the files became inputs
        sig["volumes"] = reader.to_dict()
    if isinstance(request.targets, Detection):  # a detector's store: its own table and maps' frame
        sig["detections"] = detection_key(request.targets)
        sig["canvas"] = detection_canvas(dataset)
    return json.loads(json.dumps(sig, default=str))  # as it reads back from run.json (tuples -> lists)


def _stored_explanation(rows: Any, maps: np.ndarray, method: str, ranked: bool) -> Explanation:
    """An :class:`Explanation` of a batch rebuilt from its stored rows (sorted by image, then rank)
    and maps ``(N, K, H, W)``: what a sink needs to draw the figures, without the model."""
    n, k = maps.shape[:2]
    grid = lambda col, dt: torch.tensor(rows[col].to_numpy().reshape(n, k), dtype=dt)  # noqa: E731
    classes = grid("class_id", torch.int64)
    names = [str(c) for c in range(int(classes.max()) + 1 if classes.numel() else 0)]
    for c, name in zip(rows["class_id"], rows["class_name"], strict=True):
        if c >= 0:
            names[int(c)] = str(name)
    pixel = get_method(method).kind == "pixel"
    return Explanation(
        maps=torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32)),
        raw=torch.empty((n, 0, 0, 0, 0) if pixel else (n, 0, 0, 0)),
        classes=classes,
        scores=grid("score", torch.float32),
        probs=grid("prob", torch.float32),
        method=method,
        layer=str(rows["layer"].iloc[0]) if len(rows) else None,
        class_names=names,
        model_name=str(rows["model"].iloc[0]) if len(rows) else None,
        ranks=grid("rank", torch.int64) if ranked else None,
    )


def _chunk_groups(root: Path, ids: Sequence[int]) -> list[tuple[list[int], dict[str, Any]]]:
    """``ids`` grouped by the table chunk holding them, with the chunk's rendering record."""
    want, out = set(ids), []
    for f in chunk_entries(root)[0]:
        table, _, _ = read_chunk(f)
        mine = sorted(want.intersection(table.column("image_id").to_pylist()))
        if mine:
            meta = (_pq_meta(f) or {}).get(META_RENDER)
            out.append((mine, json.loads(meta) if meta else {}))
    return out


def _pq_meta(path: Path) -> dict[bytes, bytes] | None:
    import pyarrow.parquet as pq  # the store's dependency, already imported by the store

    return pq.read_schema(path).metadata


def redraw_figures(store: ResultStore, ds: Any, ids: Sequence[int], sink: FilesSink, batch_size: int) -> int:
    """Draw the figures missing for images already in the store from their stored maps and rows
    (the model is not run); returns how many images got figures."""
    from camlens.viz import output_paths

    res = Results(store.root)
    table = res.table
    ranked = str(store.signature.get("targets", "")).startswith("top")
    wanted, missing = set(ids), set()
    for (i, m), r in table.groupby(["image_id", "method"], sort=False):  # one pass over the table
        if i not in wanted or i in missing:
            continue
        name = ds.describe(i).name if hasattr(ds, "describe") else str(i)
        labels = [str(c) for c in r.class_name][: 1 if sink.top else None]
        plan = output_paths(Path(sink.directory), [name], str(m), [labels], ["png"], "rank" if ranked else "class")
        if not all(p.exists() for p in plan[0]["png"]):
            missing.add(int(i))
    need = sorted(missing)
    for ids_, render in _chunk_groups(store.root, need):  # as drawn first: a chunk's batch at a time
        for lo in range(0, len(ids_), batch_size):
            batch = collate([ds[i] for i in ids_[lo : lo + batch_size]])
            if not len(batch):
                continue
            exps = {}
            for m in store.signature.get("methods", []):
                rows = table[(table.method == m) & table.image_id.isin(batch.indices)]
                if len(rows) and len(rows) % len(batch) == 0:
                    exp = _stored_explanation(rows, res.maps(m)[batch.indices], m, ranked)
                    exp.extras["signed"] = bool(render.get(m, {}).get("signed", False))
                    exps[m] = exp
            sink.write(BatchResult(batch, exps))
    return len(need)


def _open_store(store: ResultStore, lock: StoreLock, overwrite: bool, ctx: _dist.DistContext) -> set[int]:
    """Rank 0 takes the store's lock, checks (or wipes) the store and says what is done; every rank
    gets the answer (the broadcast is also the barrier: nobody writes before rank 0 checked)."""
    status: Any = None
    error: CamlensError | None = None
    if ctx.is_main:
        try:
            safe_out_dir(store.root)
            lock.acquire()
            store.prepare(overwrite)
            status = ("ok", sorted(store.check().done))
        except CamlensError as exc:
            error, status = exc, ("error", type(exc).__name__, str(exc))
    status = ctx.broadcast(status)
    if error is not None:
        raise error
    if status[0] == "error":
        kinds = {e.__name__: e for e in (StoreMismatchError, StoreBusyError, StoreError, WriteError)}
        raise kinds.get(status[1], CamlensError)(status[2])
    return set(status[1])


@dataclass(frozen=True)
class StoreOptions:
    """What a store-writing run keeps besides the maps: ``threshold`` of the table's boxes,
    ``map_dtype`` of the Zarr maps, ``figures`` drawn into ``out/figures`` (``none``, ``overlay``,
    ``all``), and whether to ``overwrite`` a store of another run."""

    threshold: float = DEFAULT_THRESHOLD
    map_dtype: str = "float32"
    figures: str = "none"
    overwrite: bool = False


def _compute(
    model: nn.Module,
    store: ResultStore,
    ds: Any,
    done: set[int],
    ctx: _dist.DistContext,
    job: _StoreJob,
) -> RunStats:
    """This rank's share of the images not done, into the store (and figures); then the figures
    missing for images already in the store, drawn from their stored maps (rank 0)."""
    todo = [i for i in range(len(ds)) if i not in done]
    mine = _dist.shard(todo, ctx.rank, ctx.world)
    opts = job.store
    detector = is_detector_run(store.signature)
    all_sinks: list[Sink] = [
        DetectionSink(store, len(ds), opts.threshold, list(job.request.methods), ctx.rank)
        if detector
        else StoreSink(store, len(ds), opts.threshold, ctx.rank, getattr(ds, "map_shape", None))
    ]
    fig = None
    if opts.figures != "none" and not is_volume_dataset(ds):  # volumes: drawn from the store at the end
        fig = FilesSink(store.root / FIGURES_DIR, ["png"], top=1 if opts.figures == "overlay" else None,
                        overwrite=True, threshold=opts.threshold)  # fmt: skip
        all_sinks.append(fig)
    all_sinks += list(job.extra_sinks)
    desc = "explain" if ctx.world == 1 else f"explain [rank {ctx.rank}/{ctx.world}]"
    loop = replace(job.loop, desc=desc, progress=job.loop.progress and ctx.is_main, world=ctx.world, ragged=detector)
    stats = stream(model, ds, mine, all_sinks, job.request, loop)
    stats.skipped = len(done)
    if fig is not None and ctx.is_main and done:
        n = redraw_figures(store, ds, sorted(done), fig, job.loop.batch_size)
        if n:
            _say(job.loop)(f"note: drew the figures of {n} image(s) already in the store from their stored maps")
    return stats


@dataclass(frozen=True)
class _StoreJob:
    request: ExplainRequest
    loop: StreamOptions
    store: StoreOptions
    extra_sinks: tuple[Sink, ...] = ()


def is_volume_dataset(ds: Any) -> bool:
    """Whether ``ds`` gives volumes or clips: files read by a :class:`VolumeReader`, or a user
    dataset whose first item is a ``(C, D, H, W)`` tensor."""
    if isinstance(getattr(ds, "reader", None), VolumeReader):
        return True
    if not len(ds):
        return False
    x = ds[0].get("x")
    return isinstance(x, torch.Tensor) and x.dim() == 4


def _say(loop: StreamOptions) -> Callable[[str], None]:
    return loop.on_error or (lambda msg: print(msg, file=sys.stderr))


def run_store(
    model: nn.Module,
    ds: Any,
    out: str | os.PathLike,
    request: ExplainRequest,
    *,
    loop: StreamOptions | None = None,
    store_options: StoreOptions | None = None,
    ctx: _dist.DistContext,
    extra_sinks: Sequence[Sink] = (),
    argv: Sequence[str] | None = None,
) -> tuple[Results, RunStats]:
    """Run (or resume) a store-writing run of ``request`` on every rank; see :func:`explain_dataset`."""
    job = _StoreJob(request, loop or StreamOptions(), store_options or StoreOptions(), tuple(extra_sinks))
    opts = job.store
    if opts.figures not in FIGURES:
        raise InputError(f"figures must be one of {', '.join(FIGURES)}, not {opts.figures!r}")
    if opts.figures != "none" and isinstance(request.targets, Detection):
        raise InputError(
            "a detector's store keeps no figures yet: leave figures='none' (no --figures) and draw a stored image "
            "with camlens.open_results(OUT).map(row), or explain named files for their panels"
        )
    sig = run_signature(model, ds, request, opts)
    info = {
        "versions": versions(),
        "world_size": ctx.world,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "batch_size": job.loop.batch_size,
        "argv": list(argv) if argv is not None else None,
    }
    sigs = ctx.gather(sig)
    if any(s != sigs[0] for s in sigs):
        bad = sorted({k for s in sigs for k in s if s.get(k) != sigs[0].get(k)})
        raise InputError(
            f"the {ctx.world} ranks disagree about the run ({', '.join(bad)} differ): every rank must load the same "
            "model and see the same dataset"
        )
    store = ResultStore(out, sig, info, map_dtype=opts.map_dtype, note=_say(job.loop))
    store.equivalent = [{**sig, "sources_sha256": sources_digest(ds, legacy=True)}]
    store.sources = lambda: [ds.describe(i).source for i in range(len(ds))] if hasattr(ds, "describe") else []
    lock = StoreLock(Path(out))
    try:
        done = _open_store(store, lock, opts.overwrite, ctx)
        stats = _compute(model, store, ds, done, ctx, job)
        parts = ctx.gather((stats.failed, stats.seconds, stats.computed))
        failed = sorted((f for part, _, _ in parts for f in part), key=lambda f: f["image_id"])
        if ctx.is_main:
            secs, n = max(t for _, t, _ in parts), sum(c for _, _, c in parts)
            store.finalize(len(ds), failed, complete=True, timing={"seconds": secs, "computed": n, "ranks": ctx.world})
            if opts.figures != "none" and is_volume_dataset(ds):
                top = 1 if opts.figures == "overlay" else None
                draw_volume_figures(Results(out), Path(out) / FIGURES_DIR, top)
        ctx.barrier()
    finally:
        lock.release()
    stats.failed = failed
    return Results(out), stats


@dataclass(frozen=True)
class DatasetConfig:
    """The settings of :func:`explain_dataset` besides what to explain (also accepted as keywords
    there); see :func:`explain_dataset` for each."""

    batch_size: int = EXPLAIN_BATCH
    num_workers: int | None = None
    threshold: float | None = None
    map_dtype: str = "float32"
    figures: str = "none"
    overwrite: bool = False
    preprocess: Preprocess | None = None
    progress: bool = True
    class_names: Sequence[str] | None = None
    extra_inputs: bool = False
    volume_reader: VolumeReader | None = None


_DATASET_FIELDS = frozenset(f.name for f in fields(DatasetConfig))


def explain_dataset(
    model: nn.Module | str,
    dataset: Any,
    method: str | Sequence[str] = "gradcam",
    out: str | os.PathLike = "camlens-store",
    *,
    targets: Any = None,
    layer: Any = None,
    capture: str = "output",
    config: DatasetConfig | None = None,
    explain_options: dict[str, Any] | None = None,
    **options: Any,
) -> Results:
    """Explain a whole dataset, streaming, into a resumable result store (Parquet table + Zarr maps).

    Settings (``batch_size``, ``num_workers``, ``threshold``, ``map_dtype``, ``figures``,
    ``overwrite``, ``preprocess``, ``progress``, ``class_names``, ``extra_inputs``,
    ``volume_reader``) are the fields of
    :class:`DatasetConfig`: pass ``config=`` or any of them as keywords; every other keyword is a
    method option (as in :func:`camlens.explain`).

    Args:
        model: an ``nn.Module`` classifier (on the device to use) or a zoo name.
        dataset: a folder (an ImageFolder tree gives labels), a glob, a list file (``.csv`` with a
            ``path`` column, COCO ``.json``, VOC ``.xml``, ``.txt``), a list of paths, or any
            ``torch.utils.data.Dataset`` whose items are images or ``(image, label, …)``; with
            ``extra_inputs=True``, ``(image, extra)`` or ``(image, extra, label)``: ``extra`` (a
            tensor, a tuple of tensors or a dict of them, the same shapes for every item) is stacked
            per batch and passed to every forward as ``forward_args`` (tensor / tuple) or
            ``forward_kwargs`` (dict), so each image is explained with its own extra inputs.
            **Volumes and clips**: a folder of NIfTI scans (``.nii``, ``.nii.gz``), of DICOM series
            folders or of video files (or a list of them), read as
            ``volume_reader`` (:class:`~camlens.pipeline.volumes.VolumeReader`: CT window, a clip's
            frames, stride and size) says; or a ``Dataset`` of ``(C, D, H, W)`` tensors (one shape).
            The store then holds ``(N, K, D, H, W)`` maps and 3-D boxes, each scan's affine and
            spacing, each clip's timestamps (see :mod:`camlens.pipeline.store`).
        method: one method name or several (one shared forward per batch).
        out: the store folder; a rerun with the same arguments resumes (only missing images are
            computed), other arguments are refused unless ``overwrite=True`` (batch size, workers,
            figures and progress are not "other arguments"). A rerun verifies every file it reuses
            against its recorded size and SHA-256 and computes again the images of damaged ones;
            a run into a store another run is writing raises :class:`~camlens.base.errors.StoreBusyError`.
        targets: what :func:`camlens.explain` takes, for every image: ``None`` (top-1), ``"topK"``, a
            class id, :class:`~camlens.targets.Classes` ``(3, 5)`` (the same classes for every image), a
            callable ``logits -> scores``; or :class:`PerBatch` ``(fn)`` with ``fn(batch, x) -> spec``.
        batch_size: images per forward, across files. ``num_workers``: DataLoader decoding
            processes (default: a few for more than two batches, none for fewer).
        threshold: box threshold for the table's ``x0, y0, x1, y1`` (default 0.3 of the max).
        map_dtype: ``"float32"`` or ``"float16"`` maps in Zarr.
        figures: ``"none"``, ``"overlay"`` (the top-1 overlay per image and method) or ``"all"``
            (every target), written to ``out/figures`` with the names ``camlens explain`` uses.
        explain_options: keyword arguments of :func:`camlens.explain` for every batch (method
            options, ``precision=``…), also those named like a setting — ``explain_options={"batch_size":
            32, "progress": False}`` sets Score-CAM's masked images per forward and its bar, not the
            pipeline's. The same name as in :mod:`camlens.metrics` (``method_options=`` is its 0.2
            spelling: a ``DeprecationWarning``).

    Under ``torchrun`` each rank takes a disjoint contiguous block of the images that are not done
    yet, writes its own chunks, and rank 0 merges the index. Returns :func:`open_results`'s
    :class:`~camlens.pipeline.store.Results` (with ``.stats``: computed / skipped / failed).
    """
    if "method_options" in options:  # the 0.2 spelling
        warnings.warn(
            "explain_dataset(method_options=) is now explain_options= (the name camlens.metrics uses)",
            DeprecationWarning,
            stacklevel=2,
        )
        explain_options = {**options.pop("method_options"), **(explain_options or {})}
    settings = {k: options.pop(k) for k in list(options) if k in _DATASET_FIELDS}
    cfg = with_options(DatasetConfig, config, settings, "explain_dataset")
    if isinstance(model, str):
        model = load_model(model)
    if is_detector(model):  # a DETR-family or Ultralytics YOLO object: its adapter
        model = as_detector(model)
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be an nn.Module or a zoo name, not {type(model).__name__}")
    names = [method] if isinstance(method, str) else list(method)
    request = ExplainRequest(
        methods=tuple(dict.fromkeys(get_method(m).name for m in names)),
        targets=targets if targets is not None else (Detection() if card_task(model) == "detection" else "top1"),
        layer=layer,
        capture=capture,
        preprocess=cfg.preprocess,
        class_names=None if cfg.class_names is None else tuple(cfg.class_names),
        options={**options, **(explain_options or {})},
    ).with_inputs({**options, **(explain_options or {})})  # precision=, exact_decode=: fields of the request
    card = card_of(model)
    pp = cfg.preprocess or (card.preprocess if card else IMAGENET)
    keep = cfg.figures != "none"
    ds: Any = volume_dataset(dataset, cfg.volume_reader or VolumeReader(), model, out)
    if ds is None:
        ds, _ = as_dataset(dataset, pp, keep, exact_decode=request.exact_decode, extra_inputs=cfg.extra_inputs)
        ds = without_store(ds, out)
    loop = StreamOptions(batch_size=cfg.batch_size, num_workers=cfg.num_workers, progress=cfg.progress)
    threshold = DEFAULT_THRESHOLD if cfg.threshold is None else cfg.threshold
    store_options = StoreOptions(threshold, cfg.map_dtype, cfg.figures, cfg.overwrite)
    ctx = _dist.setup(_model_device(model))
    try:
        res, stats = run_store(model, ds, out, request, loop=loop, store_options=store_options, ctx=ctx)
    finally:
        ctx.close()
    res.stats = stats  # type: ignore[attr-defined]
    return res


__all__ = [
    "BatchResult",
    "DatasetConfig",
    "FilesSink",
    "PerBatch",
    "RunStats",
    "Sink",
    "StoreOptions",
    "StoreSink",
    "StreamOptions",
    "explain_dataset",
    "run_store",
    "stream",
]
