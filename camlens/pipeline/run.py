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

import contextlib
import hashlib
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..errors import CamlensError, HeadError, InputError
from ..explanation import Explanation, Upsampled
from ..models.preprocess import IMAGENET, Preprocess
from ..models.zoo import card_of, load_model
from ..targets import is_target_object
from . import dist as _dist
from .sources import Batch, as_dataset, collate
from .store import COLUMNS, Results, ResultStore

FIGURES = ("none", "overlay", "all")


@dataclass
class BatchResult:
    """What the writer thread gets: the batch's metadata and its explanations, on the CPU."""

    batch: Batch
    explanations: dict[str, Explanation]
    extra: dict[str, Any] = field(default_factory=dict)


class Sink:
    """Receives every :class:`BatchResult` in the writer thread (``write``) and ``close`` at the end."""

    def write(self, res: BatchResult) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


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


def stream(
    model: nn.Module,
    dataset: Any,
    ids: Sequence[int],
    sinks: Sequence[Sink],
    *,
    methods: Sequence[str],
    targets: Any = None,
    layer: Any = None,
    capture: str = "output",
    batch_size: int = 16,
    num_workers: int | None = None,
    optional: Sequence[str] = (),
    before: Callable[[Batch, torch.Tensor], None] | None = None,
    after: Callable[[Batch, dict[str, Explanation]], None] | None = None,
    progress: bool = True,
    desc: str = "explain",
    class_names: Sequence[str] | None = None,
    on_error: Callable[[str], None] | None = None,
    world: int = 1,
    method_options: dict[str, Any] | None = None,
    **options: Any,
) -> RunStats:
    """Explain ``dataset`` items ``ids`` (item dicts from :mod:`camlens.pipeline.sources`) in
    batches and hand the results to ``sinks`` in a writer thread.

    ``targets``: anything :func:`camlens.explain` takes for every image of a batch (``"top2"``, an
    int, a list of class ids meant for every image) or a callable ``(batch, x) -> spec`` whose spec
    is passed on as is (e.g. one class id per image).
    ``optional``: methods dropped (with a note) if the model's head cannot give them.
    """
    options = {**options, **(method_options or {})}  # method options, also those named like ours
    from ..explainer import explain

    stats = RunStats(methods=list(methods))
    names = list(methods)
    if not ids:
        return stats
    device = _model_device(model)
    accel = device.type != "cpu"
    workers = default_workers(len(ids), batch_size, world) if num_workers is None else int(num_workers)
    loader = DataLoader(
        Subset(dataset, list(ids)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=accel and device.type == "cuda",
        prefetch_factor=2 if workers > 0 else None,
    )
    say = on_error or (lambda msg: print(msg, file=sys.stderr))
    from tqdm import tqdm

    bar = tqdm(
        total=len(ids),
        desc=desc,
        unit="img",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
        smoothing=0.1,
    )
    writer = _Writer(sinks)
    t0 = time.perf_counter()
    try:
        for batch in loader:
            for i, src, msg in batch.failed:
                stats.failed.append({"image_id": int(i), "source": src, "error": msg})
                (bar.write(f"error: {msg}", file=sys.stderr) if not bar.disable else say(f"error: {msg}"))
            if len(batch):
                assert batch.x is not None
                x = batch.x.to(device, non_blocking=accel)
                if before is not None:
                    before(batch, x)
                if callable(targets) and not is_target_object(targets):
                    spec = targets(batch, x)  # per-image targets decided by the caller
                elif isinstance(targets, (list, tuple)) and targets and not isinstance(targets[0], (list, tuple)):
                    spec = [list(targets)] * len(batch)  # the same classes for every image
                else:
                    spec = targets
                while True:
                    try:
                        res = explain(
                            model,
                            x,
                            method=list(names),
                            targets=spec,
                            layer=layer,
                            capture=capture,
                            class_names=class_names,
                            **options,
                        )
                        break
                    except HeadError as exc:
                        drop = [m for m in names if m in optional]
                        if not drop or len(names) == 1:
                            raise
                        for m in drop:
                            names.remove(m)
                        say(f"note: {', '.join(drop)} skipped ({exc})")
                assert isinstance(res, dict)
                if after is not None:  # e.g. the CLI's top-5 table, from the explaining forward's logits
                    after(batch, res)
                writer.put(BatchResult(batch, {m: _to_cpu(e) for m, e in res.items()}))
                stats.computed += len(batch)
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


# ----------------------------------------------------------------------------------------------
# Sinks
# ----------------------------------------------------------------------------------------------
def image_boxes(exp: Explanation, sizes: Sequence[tuple[int, int]], threshold: float) -> np.ndarray:
    """``(N, K, 4)`` boxes at ``threshold`` in each image's own pixel frame (``-1`` = none)."""
    from ..localization import map_boxes, scale_boxes

    b = map_boxes(exp, threshold)
    size = tuple(exp.shape[-2:])
    return np.stack([scale_boxes(bi, size, s) for bi, s in zip(b, sizes, strict=True)]).astype(np.int64)


class StoreSink(Sink):
    """Rows and maps of every batch into a :class:`~camlens.pipeline.store.ResultStore`."""

    def __init__(self, store: ResultStore, n_images: int, threshold: float, rank: int = 0):
        self.store, self.n, self.threshold, self.rank = store, n_images, threshold, rank

    def write(self, res: BatchResult) -> None:
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
        self.store.write(self.n, b.indices, rows, maps, self.rank)


class FilesSink(Sink):
    """The loose per-image files of ``camlens explain`` (PNG overlays, ``.npy`` maps, JSON summaries)
    through :func:`camlens.viz.save_explanation`, with today's names."""

    def __init__(
        self, directory: str | os.PathLike, formats: Sequence[str], *, top: int | None = None, **save_kwargs: Any
    ):
        self.directory, self.formats, self.top, self.kw = directory, list(formats), top, save_kwargs
        self.written = 0

    def write(self, res: BatchResult) -> None:
        from ..viz import save_explanation

        b = res.batch
        pngs = [f for f in self.formats if f == "png"]
        data = [f for f in self.formats if f != "png"]
        for exp in res.explanations.values():
            e = exp.replace(images=b.images, sources=list(b.names))
            if data:  # maps and summaries keep every target
                self.written += len(save_explanation(e, Path(self.directory), formats=data, **self.kw))
            if pngs:
                if self.top is not None:  # --figures overlay: the top target's overlay only
                    t = self.top
                    e = e.first_targets(t)
                self.written += len(save_explanation(e, Path(self.directory), formats=pngs, **self.kw))


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


def sources_digest(dataset: Any) -> str:
    h = hashlib.sha256()
    describe = getattr(dataset, "describe", None)
    for i in range(len(dataset)):
        r = describe(i) if describe else None
        h.update(f"{r.source if r else i}|{r.label if r else ''}\n".encode())
    return h.hexdigest()


def versions() -> dict[str, str]:
    import camlens

    out = {
        "camlens": camlens.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }
    for mod in ("pyarrow", "zarr"):
        with contextlib.suppress(ImportError):  # the store needs both; the record works without
            out[mod] = __import__(mod).__version__
    return out


def _targets_key(targets: Any) -> Any:
    if targets is None or isinstance(targets, (int, str)):
        return targets
    if isinstance(targets, (list, tuple)):
        return [t if isinstance(t, (int, str)) else repr(t) for t in targets]
    return f"callable:{getattr(targets, '__qualname__', type(targets).__name__)}"


def run_signature(
    model: nn.Module,
    dataset: Any,
    *,
    methods,
    targets,
    layer,
    capture,
    threshold,
    map_dtype,
    preprocess: Preprocess | None,
    options: dict[str, Any],
) -> dict[str, Any]:
    """The arguments that decide a store's content: a rerun with the same signature resumes."""
    card = card_of(model)
    sig = {
        "n_images": len(dataset),
        "sources_sha256": sources_digest(dataset),
        "methods": list(methods),
        "targets": _targets_key(targets),
        "layer": layer if layer is None or isinstance(layer, str) else repr(layer),
        "capture": capture,
        "model": card.name if card else type(model).__name__,
        "model_sha256": model_checksum(model),
        "threshold": threshold,
        "map_dtype": map_dtype,
        "preprocess": preprocess.to_dict() if preprocess is not None else None,
        "options": {k: repr(v) for k, v in sorted(options.items())},
    }
    return json.loads(json.dumps(sig, default=str))  # as it reads back from run.json (tuples -> lists)


def run_store(
    model: nn.Module,
    ds: Any,
    out: str | os.PathLike,
    *,
    methods: Sequence[str],
    targets: Any,
    layer: Any,
    capture: str,
    batch_size: int,
    num_workers: int | None,
    threshold: float,
    map_dtype: str,
    figures: str,
    overwrite: bool,
    preprocess: Preprocess | None,
    progress: bool,
    ctx: _dist.DistContext,
    class_names: Sequence[str] | None = None,
    optional: Sequence[str] = (),
    extra_sinks: Sequence[Sink] = (),
    before: Callable[[Batch, torch.Tensor], None] | None = None,
    after: Callable[[Batch, dict[str, Explanation]], None] | None = None,
    on_error: Callable[[str], None] | None = None,
    argv: Sequence[str] | None = None,
    method_options: dict[str, Any] | None = None,
    **options: Any,
) -> tuple[Results, RunStats]:
    """Run (or resume) a store-writing run on every rank; see :func:`explain_dataset`."""
    options = {**options, **(method_options or {})}
    if figures not in FIGURES:
        raise InputError(f"figures must be one of {', '.join(FIGURES)}, not {figures!r}")
    sig = run_signature(
        model,
        ds,
        methods=methods,
        targets=targets,
        layer=layer,
        capture=capture,
        threshold=threshold,
        map_dtype=map_dtype,
        preprocess=preprocess if preprocess is not None else getattr(ds, "preprocess", None),
        options=options,
    )
    info = {
        "versions": versions(),
        "world_size": ctx.world,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "batch_size": batch_size,
        "argv": list(argv) if argv is not None else None,
    }
    sigs = ctx.gather(sig)
    if any(s != sigs[0] for s in sigs):
        bad = sorted({k for s in sigs for k in s if s.get(k) != sigs[0].get(k)})
        raise InputError(
            f"the {ctx.world} ranks disagree about the run ({', '.join(bad)} differ): every rank must load the same "
            "model and see the same dataset"
        )
    store = ResultStore(out, sig, info, map_dtype=map_dtype)
    status: Any = None
    if ctx.is_main:
        try:
            store.prepare(overwrite)
            status = ("ok", sorted(store.done()))
        except CamlensError as exc:
            status = ("error", str(exc))
    status = ctx.broadcast(status)  # also the barrier: nobody writes before rank 0 read what is done
    if status[0] == "error":
        from .store import StoreMismatchError

        raise StoreMismatchError(status[1])
    done = set(status[1])
    todo = [i for i in range(len(ds)) if i not in done]
    mine = _dist.shard(todo, ctx.rank, ctx.world)
    sinks: list[Sink] = [StoreSink(store, len(ds), threshold, ctx.rank)]
    if figures != "none":
        from .store import FIGURES_DIR

        sinks.append(
            FilesSink(
                store.root / FIGURES_DIR,
                ["png"],
                top=1 if figures == "overlay" else None,
                overwrite=True,
                threshold=threshold,
            )
        )
    sinks += list(extra_sinks)
    desc = "explain" if ctx.world == 1 else f"explain [rank {ctx.rank}/{ctx.world}]"
    stats = stream(
        model,
        ds,
        mine,
        sinks,
        methods=methods,
        targets=targets,
        layer=layer,
        capture=capture,
        batch_size=batch_size,
        num_workers=num_workers,
        optional=optional,
        before=before,
        after=after,
        progress=progress and ctx.is_main,
        desc=desc,
        class_names=class_names,
        on_error=on_error,
        world=ctx.world,
        method_options=options,
    )
    stats.skipped = len(done)
    parts = ctx.gather((stats.failed, stats.seconds, stats.computed))
    failed = sorted((f for part, _, _ in parts for f in part), key=lambda f: f["image_id"])
    if ctx.is_main:
        timing = {"seconds": max(t for _, t, _ in parts), "computed": sum(c for _, _, c in parts), "ranks": ctx.world}
        store.finalize(len(ds), failed, complete=True, timing=timing)
    ctx.barrier()
    stats.failed = failed
    return Results(out), stats


def explain_dataset(
    model: nn.Module | str,
    dataset: Any,
    method: str | Sequence[str] = "gradcam",
    out: str | os.PathLike = "camlens-store",
    *,
    targets: Any = None,
    layer: Any = None,
    capture: str = "output",
    batch_size: int = 16,
    num_workers: int | None = None,
    threshold: float | None = None,
    map_dtype: str = "float32",
    figures: str = "none",
    overwrite: bool = False,
    preprocess: Preprocess | None = None,
    progress: bool = True,
    class_names: Sequence[str] | None = None,
    method_options: dict[str, Any] | None = None,
    **options: Any,
) -> Results:
    """Explain a whole dataset, streaming, into a resumable result store (Parquet table + Zarr maps).

    Args:
        model: an ``nn.Module`` classifier (on the device to use) or a zoo name.
        dataset: a folder (an ImageFolder tree gives labels), a glob, a list file (``.csv`` with a
            ``path`` column, COCO ``.json``, VOC ``.xml``, ``.txt``), a list of paths, or any
            ``torch.utils.data.Dataset`` whose items are images or ``(image, label, …)``.
        method: one method name or several (one shared forward per batch).
        out: the store folder; a rerun with the same arguments resumes (only missing images are
            computed), other arguments are refused unless ``overwrite=True``.
        targets: ``None`` (top-1), ``"topK"``, a class id, or a list of class ids for every image.
        batch_size: images per forward, across files. ``num_workers``: DataLoader decoding
            processes (default: a few for more than two batches, none for fewer).
        threshold: box threshold for the table's ``x0, y0, x1, y1`` (default 0.3 of the max).
        map_dtype: ``"float32"`` or ``"float16"`` maps in Zarr.
        figures: ``"none"``, ``"overlay"`` (the top-1 overlay per image and method) or ``"all"``
            (every target), written to ``out/figures`` with the names ``camlens explain`` uses.
        method_options: the methods' options (as ``**options``), also those named like this
            function's own arguments — ``method_options={"batch_size": 32, "progress": False}``
            sets Score-CAM's masked images per forward and its bar, not the pipeline's.

    Under ``torchrun`` each rank takes a disjoint contiguous block of the images that are not done
    yet, writes its own chunks, and rank 0 merges the index. Returns :func:`open_results`'s
    :class:`~camlens.pipeline.store.Results` (with ``.stats``: computed / skipped / failed).
    """
    from ..localization import DEFAULT_THRESHOLD

    if isinstance(model, str):
        model = load_model(model)
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be an nn.Module or a zoo name, not {type(model).__name__}")
    names = [method] if isinstance(method, str) else list(method)
    from ..methods.registry import get_method

    names = list(dict.fromkeys(get_method(m).name for m in names))
    card = card_of(model)
    pp = preprocess or (card.preprocess if card else IMAGENET)
    ds, _ = as_dataset(dataset, pp, keep_images=figures != "none")
    ctx = _dist.setup(_model_device(model))
    try:
        res, stats = run_store(
            model,
            ds,
            out,
            methods=names,
            targets=targets if targets is not None else "top1",
            layer=layer,
            capture=capture,
            batch_size=batch_size,
            num_workers=num_workers,
            threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
            map_dtype=map_dtype,
            figures=figures,
            overwrite=overwrite,
            preprocess=preprocess,
            progress=progress,
            ctx=ctx,
            class_names=class_names,
            method_options={**options, **(method_options or {})},
        )
    finally:
        ctx.close()
    res.stats = stats  # type: ignore[attr-defined]
    return res


__all__ = ["BatchResult", "FilesSink", "RunStats", "Sink", "StoreSink", "explain_dataset", "run_store", "stream"]
