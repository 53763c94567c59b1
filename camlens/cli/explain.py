"""``camlens explain``: classify images, print their top classes, write overlays, maps and summaries."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import click

from camlens.base.defaults import EXPLAIN_BATCH
from camlens.base.progress import Estimate, Reporter, reporting
from camlens.cli.common import (
    EXIT_FAILED,
    check_layer,
    check_overwrite,
    common_model_options,
    echo,
    echo_err,
    method_option,
    parse_classes,
    parse_formats,
    parse_method_options,
    parse_threshold,
    quiet_methods,
    resolve_device,
    table,
)
from camlens.cli.dataset import collect, dataset_options, load_model_seeded, request_fields, request_options
from camlens.cli.volume import nifti_inputs

DEFAULT_METHODS = ("gradcam", "cam")
#: the cost estimate is printed before a method estimated to run this many forwards or seconds
ESTIMATE_MIN_FORWARDS = 100
ESTIMATE_MIN_SECONDS = 5.0
#: more named files than this (e.g. `photos/*.jpg` expanded by the shell) make a dataset run
MAX_NAMED_FILES = 32
TASK_METHODS = ("gradcam",)  # detectors and segmenters: CAM needs a GAP + linear classifier head


def _class_id(value: str, class_names, what: str) -> int:
    if value.lstrip("-").isdigit():
        return int(value)
    low = [c.lower() for c in class_names or []]
    if value.lower() in low:
        return low.index(value.lower())
    raise click.BadParameter(
        f"unknown {what} {value!r} (give a class id or one of the model's names)", param_hint="--target"
    )


#: ``click`` context key of ``--score-threshold`` (an option read by :func:`parse_targets`)
SCORE_THRESHOLD = "camlens.score_threshold"


def _keep_score_threshold(ctx: click.Context, _param: click.Parameter, value: float | None) -> None:
    ctx.meta[SCORE_THRESHOLD] = value


score_threshold_option = click.option(
    "--score-threshold",
    type=click.FloatRange(0, 1),
    default=None,
    expose_value=False,
    callback=_keep_score_threshold,
    help="detectors: explain only the detections scoring at least this (at most --topk per image; an image with "
    "none is said, never drawn as a zero map) [default: the top-k detections, however low their scores]",
)


def parse_targets(values, class_names, task: str | None, topk: int):
    """``--target`` values -> a camlens target object (or ``None`` for a classifier's defaults).

    ``box:x0,y0,x1,y1[:label]`` (repeatable: one map per box, original-image pixels) ->
    :class:`~camlens.targets.Detection`; ``mask:PATH:category`` -> :class:`~camlens.targets.Segmentation`
    over the nonzero pixels of the mask image. Without ``--target`` a detector explains its ``topk``
    most confident detections (those scoring at least ``--score-threshold``) and a segmenter its
    largest predicted class.
    """
    import numpy as np

    from camlens.base.errors import CamlensError
    from camlens.base.io import load_image
    from camlens.targets import Detection, Segmentation

    ctx = click.get_current_context(silent=True)
    threshold = (ctx.meta.get(SCORE_THRESHOLD) if ctx is not None else None) or 0.0
    if not values:
        return Detection(score_threshold=threshold, max_boxes=topk) if task == "detection" else None
    kinds = {v.split(":", 1)[0] for v in values}
    if kinds == {"box"}:
        boxes, labels = [], []
        for v in values:
            parts = v.split(":")
            try:
                box = [float(c) for c in parts[1].split(",")]
            except (IndexError, ValueError):
                box = []
            if len(box) != 4 or len(parts) > 3:
                raise click.BadParameter(f"{v!r}: expected box:x0,y0,x1,y1[:label]", param_hint="--target")
            boxes.append(box)
            labels.append(_class_id(parts[2], class_names, "label") if len(parts) == 3 else -1)
        try:
            return Detection(boxes, labels if any(lb >= 0 for lb in labels) else None)
        except CamlensError as exc:
            raise click.BadParameter(str(exc), param_hint="--target") from None
    if kinds == {"mask"} and len(values) == 1:
        parts = values[0].rsplit(":", 1)
        if len(parts) != 2 or ":" not in parts[0]:
            raise click.BadParameter(f"{values[0]!r}: expected mask:PATH:category", param_hint="--target")
        path = parts[0].split(":", 1)[1]
        try:
            mask = load_image(path).max(axis=2) > 0
        except CamlensError as exc:
            raise click.BadParameter(str(exc), param_hint="--target") from None
        return Segmentation(_class_id(parts[1], class_names, "category"), mask=np.asarray(mask))
    raise click.BadParameter(
        "use box:x0,y0,x1,y1[:label] (repeatable) or one mask:PATH:category", param_hint="--target"
    )


@click.command("explain")
@click.argument("images", nargs=-1)
@common_model_options
@click.option(
    "--method", "methods", multiple=True, help="method name, repeatable (`camlens methods`) [default: gradcam and cam]"
)
@click.option(
    "--topk",
    default=2,
    show_default=True,
    type=click.IntRange(1, 100),
    help="explain the k most probable classes of each image",
)
@click.option(
    "--class", "classes", multiple=True, help="explain these classes instead of the top-k (ids or names, repeatable)"
)
@click.option(
    "--prompt",
    "prompts",
    multiple=True,
    help="image–text models (hf:FOLDER with a CLIP/SigLIP model, openclip:ARCH): explain this text, repeatable; "
    "--class then names the classes of a zero-shot classifier",
)
@click.option(
    "--target",
    "target_specs",
    multiple=True,
    help="detectors: box:x0,y0,x1,y1[:label] (repeatable); segmenters: mask:PATH:category "
    "[default: a detector's top-k detections, a segmenter's largest class]",
)
@click.option(
    "--out",
    default="camlens-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="output folder (created when missing)",
)
@click.option(
    "--format",
    "formats",
    default="auto",
    show_default=True,
    help="comma-separated: png (overlays), npy (maps), json (summary) per image, store (Parquet table + Zarr "
    "maps, resumable); auto = png,npy,json for named files, store for folders, globs and lists",
)
@click.option("--overwrite", is_flag=True, help="replace existing output files (or a store with other arguments)")
@click.option(
    "--threshold",
    default=None,
    help="box threshold (fraction of the map's max, or a calibrated JSON); also draws the boxes",
)
@click.option("--boxes", is_flag=True, help="draw the box at the (default) threshold on the overlays")
@score_threshold_option
@click.option(
    "--batch-size", default=EXPLAIN_BATCH, show_default=True, type=click.IntRange(1), help="images per forward"
)
@dataset_options
@request_options
@click.option("--alpha", default=0.5, show_default=True, type=click.FloatRange(0, 1), help="heatmap opacity")
@click.option("--cmap", default="jet", show_default=True, help="matplotlib colormap (maps of one sign)")
@click.option(
    "--shared-scale",
    is_flag=True,
    help="one colour scale for the classes of an image (per method): a weaker class is drawn weaker; "
    "the range is in the PNG's colorbar and the JSON's color_scales",
)
@click.option("--no-colorbar", is_flag=True, help="PNG overlays without the colorbar under the title")
@click.option(
    "--map-size",
    type=click.Choice(["input", "photo"]),
    default="input",
    show_default=True,
    help=".npy maps at the model's input size, or resized to the photo's own size (the boxes' frame)",
)
@click.option("--recursive", is_flag=True, help="also take images in sub-folders of FOLDERS")
@click.option("-q", "--quiet", is_flag=True, help="no top-5 tables, only errors and the final line")
@method_option
@nifti_inputs  # NIfTI scans: camlens.cli.volume
def explain_cmd(
    images,
    model,
    weights,
    checkpoint,
    layer,
    device,
    methods,
    topk,
    classes,
    target_specs,
    out,
    formats,
    overwrite,
    threshold,
    boxes,
    batch_size,
    workers,
    figures,
    map_dtype,
    alpha,
    cmap,
    shared_scale,
    no_colorbar,
    map_size,
    recursive,
    quiet,
    method_options,
    prompts,
):
    """Explain IMAGES (files, folders, glob patterns, ImageFolder trees, CSV/COCO/VOC/TXT lists;
    default: the bundled cat photo).

    Named files: prints each image's top-5 classes and writes, per image (named after its file
    stem) and method, PNG overlays of the explained classes (e.g. chelsea_gradcam_top1.png), the
    maps (.npy) and a JSON summary.

    Folders, globs and lists, or more than 32 named files (a dataset run): images are decoded in
    --workers processes, explained in batches across files, and written to a result store in OUT:
    results.parquet (one row per image x class x method: source, size, class, score, probability,
    box, method, layer, model) and maps.zarr; camlens.open_results(OUT) reads it back. A rerun with
    the same arguments resumes, computing only the missing images; other arguments are refused
    unless --overwrite. Under `torchrun --nproc-per-node=N -m camlens explain DATA --out OUT` the
    ranks share the images.

    Every PNG has a colorbar in the map's units; maps with both signs are drawn red/blue around zero,
    maps of one sign with the whole colormap (--shared-scale: one scale per image and method).
    --figures montage writes one STEM_montage.png per image: a row per method, a column per class.
    A model with --weights random is said to be so in the table, the titles and the JSON.

    Unreadable images are reported by name and skipped; the exit code is 1 if any input failed.

    NIfTI scans (.nii, .nii.gz; pip install 'camlens[medical]') are explained by a 3-D network as
    (1, C, D, H, W) volumes: per scan, method and class the map as NIfTI in the scan's own space, its
    slice montage (PNG) and a JSON summary with the 3-D boxes (voxels) and peaks (voxels and mm).

    \b
    Examples:
      camlens explain                                  # the cat photo, Grad-CAM and CAM, top-2
      camlens explain photos/ --method gradcam++ --topk 3 --out results
      camlens explain 'data/**/*.jpg' --class "tabby cat" --figures overlay
      camlens explain --method gradcam --method cam --topk 3 --figures montage --shared-scale
      torchrun --nproc-per-node=2 -m camlens explain val/ --out store
      camlens explain --model fasterrcnn_mobilenet_v3_large_320_fpn photo.jpg   # its top detections
      camlens explain --model yolo:best.pt photo.jpg   # an Ultralytics YOLO (pip install camlens[yolo])
      camlens explain --model fcn_resnet50 photo.jpg --target mask:road.png:15
      camlens explain --model openclip:ViT-B-32 --weights clip.pt --prompt "a red bicycle" photo.jpg
      camlens explain scan.nii.gz --model r3d_18 --weights FILE   # NIfTI: maps as NIfTI in the scan's space
    """
    from camlens.pipeline import dist

    ask = _Asked(**{k: v for k, v in locals().items() if k in _Asked.__dataclass_fields__})
    task, names = _requested_methods(ask)
    inputs = collect(images, recursive=recursive)
    # a folder, glob or list, torchrun, or many named files (a shell-expanded glob) is a dataset run
    dataset_run = inputs.dataset or dist.launched() or len(inputs.records) > MAX_NAMED_FILES
    loose, fig, store = _outputs(formats, figures, map_size, dataset_run)
    ctx = dist.setup(dist.local_device(resolve_device(device)))
    failed = len(inputs.problems)
    if ctx.is_main:
        for msg in inputs.problems:
            echo_err(f"error: {msg}")
    if not inputs.records:
        raise click.ClickException("no images to explain" + (" (see the errors above)" if failed else ""))
    suffix = "class" if classes or prompts else "rank"
    plan = _Planned(out, [r.name for r in inputs.records], names, fig, loose, store, suffix, overwrite)
    try:
        net, spec, names = _model_and_targets(ask, task, names, plan)
        work = Work(
            methods=names,
            targets=spec,
            layer=layer,
            batch_size=batch_size,
            workers=workers,
            quiet=quiet or dataset_run,
            progress=not quiet,
            defaulted=not methods,
            options=_method_options(method_options, names, quiet),
        )
        writes = Writes(
            out=out,
            loose=loose,
            figures=fig,
            store=store,
            overwrite=overwrite,
            threshold=parse_threshold(threshold),
            boxes=boxes,
            alpha=alpha,
            cmap=cmap,
            suffix=suffix,
            map_dtype=map_dtype,
            colorbar=not no_colorbar,
            shared_scale=shared_scale,
            map_size=map_size,
        )
        code = _run(net, inputs, work, writes, failed, ctx)
    finally:
        ctx.close()
    if code:
        sys.exit(code)


@dataclass(frozen=True)
class _Asked:
    """The options of ``camlens explain`` that decide the model, its methods and its targets."""

    model: Any
    weights: str | None
    checkpoint: str | None
    device: str | None
    layer: str | None
    methods: tuple[str, ...]
    topk: int
    classes: tuple[str, ...]
    target_specs: tuple[str, ...]
    prompts: tuple[str, ...]


def _requested_methods(ask: _Asked) -> tuple[str | None, list[str]]:
    """The model's task as its name says (before loading it) and the methods asked for (or the
    defaults for that task), by their registered names."""
    from camlens.attribution.registry import get_method
    from camlens.base.errors import CamlensError
    from camlens.models.detectors import YOLO_PREFIX
    from camlens.models.tasks import task_of

    if ask.classes and ask.target_specs:
        raise click.BadParameter("give --class (classifiers) or --target (detectors, segmenters), not both")
    model, checkpoint = ask.model, ask.checkpoint
    task = task_of(model.lower().replace("-", "_")) if model and not checkpoint else None
    if model and not checkpoint and model.lower().startswith(YOLO_PREFIX):
        task = "detection"  # an Ultralytics YOLO detector (camlens.models.detectors.yolo)
    try:
        default = TASK_METHODS if task else DEFAULT_METHODS
        return task, list(dict.fromkeys(get_method(m).name for m in (ask.methods or default)))
    except CamlensError as exc:
        raise click.BadParameter(str(exc), param_hint="--method") from None


def _method_options(values, names: list[str], quiet: bool) -> dict[str, Any]:
    """``--option KEY=VALUE`` typed by the methods (``-q``: their own bars off too)."""
    options = parse_method_options(values, names)
    return quiet_methods(names, options) if quiet else (options or {})


def _model_and_targets(ask: _Asked, task: str | None, names: list[str], plan: _Planned) -> tuple[Any, Any, list[str]]:
    """Load the model, turn --class / --prompt / --target / --topk into a target spec and keep the
    methods that apply, checking the output names before any image is read."""
    from camlens.models.zoo import card_of
    from camlens.pipeline import dist

    classes, prompts = ask.classes, ask.prompts
    if not classes and not prompts:
        plan.check([""] * ask.topk)
    device = dist.local_device(resolve_device(ask.device))
    net = load_model_seeded(ask.model, ask.weights, ask.checkpoint, device)
    net, text = image_text_targets(net, classes, prompts)
    if task == "detection" and getattr(card_of(net), "extra", {}).get("task") == "classification":
        task = None  # a YOLO classification model (yolo:yolov8n-cls.yaml): the classifier path
    if prompts:
        plan.check(list(prompts))
    check_layer(net, ask.layer)  # before any image is read
    task = detector_task(net, task)  # a detector loaded from hf:FOLDER says so by its card
    card = card_of(net)
    class_names = card.class_names if card else None
    targets: Any = parse_classes(classes, class_names) if classes else None
    k = len(targets) if targets else ask.topk
    if targets is not None:
        plan.check([class_names[c] if class_names and c < len(class_names) else str(c) for c in targets])
    spec = text or (targets if targets is not None else f"top{k}")
    if task or ask.target_specs:  # a detector or segmenter: a target object (camlens.targets)
        spec = parse_targets(ask.target_specs, class_names, task, ask.topk) or spec
    return net, spec, _applicable(net, spec, names, not ask.methods)  # before any image is read


@dataclass
class _Planned:
    """The loose outputs of a run, checked before any work, so that nothing is half-written when one
    already exists (with --class or --prompt the file names carry the labels, known once the model is
    loaded)."""

    out: str
    stems: list[str]
    methods: list[str]
    figures: str
    loose: list[str]
    store: bool
    suffix: str
    overwrite: bool

    def check(self, labels: list[str]) -> None:
        from camlens.viz import output_paths

        if self.figures == "montage" and not self.store:
            check_overwrite(montage_paths(self.out, self.stems), self.overwrite)
        if not self.loose:
            return
        per_image = [labels[:1] if self.figures == "overlay" else labels] * len(self.stems)
        paths = [
            p
            for m in self.methods
            for per in output_paths(self.out, self.stems, m, per_image, self.loose, self.suffix)
            for ps in per.values()
            for p in ps
        ]
        check_overwrite(paths, self.overwrite)


def detector_task(net, task: str | None) -> str | None:
    """The task once the model is loaded (a DETR from ``hf:FOLDER`` is a detector by its card); a
    detector's own threshold is set to 0, so that its top-k boxes are reported however low their
    scores (printed; ``--score-threshold`` selects among them)."""
    from camlens.models.tasks import keep_all_detections
    from camlens.models.zoo import card_of

    card = card_of(net)
    task = task or (card.extra.get("task") if card is not None else None)
    if task == "classification":
        return None  # a classifier by its card (a YOLO classification model): the classifier path
    if task == "detection":
        keep_all_detections(net)
    return task


def image_text_targets(net, classes, prompts):
    """``(model, target or None)`` for ``--prompt`` / ``--class``: prompts -> a
    :class:`~camlens.targets.Text` target (an image–text model only); ``--class`` on an image–text
    model -> a zero-shot classifier over those names (the names are then its classes)."""
    from camlens.models.imagetext import ImageText, ZeroShotClassifier, zero_shot
    from camlens.targets import Text

    bare = isinstance(net, ImageText) and not isinstance(net, ZeroShotClassifier)
    if prompts and not isinstance(net, ImageText):
        raise click.BadParameter(
            "--prompt needs an image–text model with a text tower (--model hf:FOLDER holding a CLIP or SigLIP "
            "model, or openclip:ARCH); for a classifier use --class",
            param_hint="--prompt",
        )
    if prompts and classes:
        raise click.BadParameter("give --prompt (texts) or --class (zero-shot class names), not both")
    if prompts:
        return net, Text(list(prompts))
    if bare and classes:
        return zero_shot(net, list(classes)), None
    if bare:
        raise click.BadParameter("an image–text model needs --prompt TEXT or --class NAME (zero-shot), repeatable")
    return net, None


def _applicable(net, spec, names: list[str], defaulted: bool) -> list[str]:
    """``names`` less the methods that cannot run on ``net``: refused with the reason and the methods
    that can (the default methods lose CAM quietly where it does not apply)."""
    from camlens.api.explainer import check_applicable
    from camlens.attribution.registry import get_method
    from camlens.attribution.traits import model_traits
    from camlens.base.errors import CamlensError

    traits = model_traits(net, spec)
    infos = [get_method(m) for m in names]
    if defaulted:
        return [i.name for i in infos if i.applies(traits)] or names
    try:
        check_applicable(infos, traits)
    except CamlensError as exc:
        raise click.BadParameter(str(exc), param_hint="--method") from None
    return names


class CliEstimates(Reporter):
    """Prints, once per method, the cost estimate of a slow method before it runs (a
    :class:`camlens.base.progress.Reporter`): ``scorecam: ≈1,517 masked forwards, ~3 min here;
    --option max_channels=64 for ~8 s``."""

    def __init__(self, images: int) -> None:
        self.images = images
        self.told: set[str] = set()

    def wants(self, method: str) -> bool:
        return method not in self.told

    def estimate(self, est: Estimate) -> None:
        from tqdm import tqdm

        self.told.add(est.method)
        if est.forwards < ESTIMATE_MIN_FORWARDS and est.seconds < ESTIMATE_MIN_SECONDS:
            return
        more = " (for the first batch)" if self.images > 1 else ""
        tqdm.write(f"estimate{more}: {est.text()}", file=sys.stderr)

    def advance(self, method: str, done: int, total: int) -> None:
        pass  # the methods' own bars show their progress


@dataclass(frozen=True)
class Work:
    """What ``camlens explain`` computes: methods, targets, layer, batching, what it prints."""

    methods: list[str]
    targets: Any
    layer: Any
    batch_size: int
    workers: int | None
    quiet: bool  # no per-image top-5 table
    progress: bool  # the progress bars (-q: none)
    defaulted: bool  # the default methods: CAM is optional (skipped where the model has no CAM head)
    options: dict[str, Any] = field(default_factory=dict)  # --option KEY=VALUE, typed by the methods


@dataclass(frozen=True)
class Writes:
    """What ``camlens explain`` writes, and where."""

    out: Any
    loose: list[str]  # per-image files: "png", "npy", "json"
    figures: str  # none | overlay | all
    store: bool  # the result store (Parquet table + Zarr maps)
    overwrite: bool
    threshold: float | None
    boxes: bool
    alpha: float
    cmap: str
    suffix: str
    map_dtype: str
    colorbar: bool = True
    shared_scale: bool = False
    map_size: str = "input"  # .npy maps at the model's input size or the photo's

    def look(self) -> dict[str, Any]:
        """The PNGs' options for :func:`camlens.viz.save_explanation`."""
        return dict(alpha=self.alpha, cmap=self.cmap, colorbar=self.colorbar, shared_scale=self.shared_scale)


def montage_paths(out, stems) -> list:
    """``OUT/STEM_montage.png`` per image (``--figures montage``)."""
    from pathlib import Path

    return [Path(out) / f"{s}_montage.png" for s in stems]


def _figure_sinks(writes: Writes) -> list:
    """Sinks for the figures: a dataset run's go to ``OUT/figures`` (with the store), a montage is one
    PNG per image; per-class overlays of named files are part of the loose files."""
    from pathlib import Path

    from camlens.pipeline.run import FilesSink
    from camlens.pipeline.store import FIGURES_DIR

    where = Path(writes.out) / FIGURES_DIR if writes.store else Path(writes.out)
    if writes.figures == "montage":
        return [MontageSink(where, overwrite=writes.overwrite or writes.store, look=writes.look())]
    if writes.store and writes.figures != "none":
        top = 1 if writes.figures == "overlay" else None
        return [FilesSink(where, ["png"], top=top, overwrite=True, threshold=writes.threshold, **writes.look())]
    return []


class MontageSink:
    """``--figures montage``: one ``STEM_montage.png`` per image (:func:`camlens.viz.montage`)."""

    def __init__(self, directory, *, overwrite: bool, look: dict[str, Any]):
        self.directory, self.overwrite, self.look = directory, overwrite, look
        self.written = 0

    def write(self, res) -> None:
        from camlens.viz import montage, save_figure

        exps = {
            m: e.replace(images=res.batch.images, sources=list(res.batch.names)) for m, e in res.explanations.items()
        }
        for i, stem in enumerate(res.batch.names):
            fig = montage(
                exps, i, alpha=self.look["alpha"], cmap=self.look["cmap"], shared_scale=self.look["shared_scale"]
            )
            self.directory.mkdir(parents=True, exist_ok=True)
            save_figure(fig, self.directory / f"{stem}_montage.png", overwrite=self.overwrite)
            self.written += 1

    def close(self) -> None:
        pass


def _outputs(formats: str, figures: str, map_size: str, dataset_run: bool) -> tuple[list[str], str, bool]:
    """``(loose file formats, figures, whether a result store is written)`` from --format,
    --figures and --map-size: a dataset run writes a store, named files loose files."""
    if formats == "auto":
        fmts = ["store"] if dataset_run else ["npy", "json"]
        fig = figures if figures != "auto" else ("none" if dataset_run else "all")
    else:
        fmts = parse_formats(formats, ("png", "npy", "json", "store"))
        fig = figures if figures != "auto" else ("all" if "png" in fmts else "none")
        fmts = [f for f in fmts if f != "png"]
    store = "store" in fmts
    if map_size == "photo" and store:
        raise click.BadParameter(
            "the result store keeps every map at the model's input size (one array for all images); "
            "use --format npy,json for maps at each photo's size",
            param_hint="--map-size",
        )
    loose = [f for f in fmts if f in ("npy", "json")]
    if fig not in ("none", "montage") and not store:
        loose.append("png")
    return loose, fig, store


def _print_top(batch, res) -> None:
    """The top-5 table of each image, from the explaining forward's own logits (no second forward)."""
    first = next(iter(res.values()))
    if first.logits is None:  # a target object (detector, segmenter): the explained targets
        for i, stem in enumerate(batch.names):
            boxes = first.extras.get("boxes")
            rows = [
                (str(k + 1), first.labels()[i][k], f"{float(first.scores[i, k]):.3g}")
                + ((",".join(f"{v:.0f}" for v in boxes[i][k]),) if boxes is not None else ())
                for k in range(first.scores.shape[1])
                if boxes is None or boxes[i][k][0] == boxes[i][k][0]
            ]
            head = ("#", "label", "score", "box") if boxes is not None else ("#", "label", "score")
            echo(f"{stem}\n" + (table(rows, head, indent="  ") if rows else "  nothing to explain"), None)
        return
    from camlens.api.explanation import RANDOM_WEIGHTS

    note = f" ({RANDOM_WEIGHTS}: these classes and probabilities mean nothing)" if first.random_weights else ""
    for stem, top in zip(batch.names, first.top(5), strict=True):
        rows = [(r + 1, name.split(",")[0], f"{p:6.1%}", cid) for r, (cid, name, p) in enumerate(top)]
        echo(f"{stem}{note}\n" + table(rows, ("#", "class", "prob", "id"), indent="  "), None)


def _summary(
    n: int, stats, res, writes: Writes, computed: int, written: int | None, n_bad: int, *, random: bool = False
) -> str:
    """The one closing line of ``camlens explain``."""
    from camlens.api.explanation import RANDOM_WEIGHTS

    ok = n - len(stats.failed)
    line = f"explained {ok} of {n} image(s) with {', '.join(stats.methods)}"
    if random:
        line += f" ({RANDOM_WEIGHTS})"
    if res is not None:
        line += (
            f" ({computed} now, {stats.skipped} already in the store); store {writes.out} "
            f"({len(res.table)} rows: results.parquet, maps.zarr)"
        )
        if written is not None:
            line += f"; wrote {written} file(s)"
    else:
        line += f"; wrote {written or 0} file(s) to {writes.out}"
    return line + (f"; {n_bad} input(s) failed" if n_bad else "")


def _explain_all(net, ds, writes: Writes, work: Work, ctx, sinks, request, loop):
    """Run the pipeline: into the store (the loose files as extra sinks), or into the loose files."""
    import sys as _sys
    from dataclasses import replace

    from camlens.base.localization import DEFAULT_THRESHOLD
    from camlens.pipeline import dist
    from camlens.pipeline.run import StoreOptions, run_store, stream

    if writes.store:
        store = StoreOptions(
            threshold=DEFAULT_THRESHOLD if writes.threshold is None else writes.threshold,
            map_dtype=writes.map_dtype,
            figures="none",  # drawn by the figure sinks, with the PNG options of this command
            overwrite=writes.overwrite,
        )
        loop = replace(loop, progress=work.progress)
        res, stats = run_store(
            net, ds, writes.out, request, loop=loop, store_options=store, ctx=ctx, extra_sinks=sinks, argv=_sys.argv[1:]
        )
    else:
        ids = dist.shard(list(range(len(ds))), ctx.rank, ctx.world)
        loop = replace(loop, progress=work.progress and ctx.is_main and len(ds) >= 4, world=ctx.world)
        stats = stream(net, ds, ids, sinks, request, loop)
        stats.failed = [f for part in ctx.gather(stats.failed) for f in part]
        res = None
    return res, stats


def _run(net, inputs, work: Work, writes: Writes, failed: int, ctx) -> int:
    """Stream the records through the pipeline into the store and/or the loose files."""
    from camlens.base.errors import CamlensError
    from camlens.models.preprocess import IMAGENET
    from camlens.models.zoo import card_of
    from camlens.pipeline.run import FilesSink
    from camlens.pipeline.sources import ImageFiles, without_store
    from camlens.targets import Detection

    card = card_of(net)
    pp = card.preprocess if card else IMAGENET
    keep = bool(writes.loose) or writes.figures != "none"
    fields = request_fields()  # --precision, --exact-decode: to explain() (and a store's signature)
    ds: Any = ImageFiles(inputs.records, pp, keep_images=keep, exact_decode=bool(fields.get("exact_decode")))
    if writes.store:  # --out inside the data folder: the store's own figures are not inputs
        ds = without_store(ds, writes.out)
    sinks = []
    files = None
    if writes.loose:
        files = FilesSink(
            writes.out,
            writes.loose,
            top=1 if writes.figures == "overlay" else None,
            overwrite=writes.overwrite,
            threshold=writes.threshold,
            boxes=writes.boxes,
            suffix=writes.suffix,
            map_size=writes.map_size,
            **writes.look(),
        )
        sinks.append(files)
    figure_sinks = _figure_sinks(writes)
    sinks += figure_sinks

    from camlens.api.explainer import ExplainRequest
    from camlens.pipeline.run import StreamOptions

    request = ExplainRequest(
        methods=tuple(work.methods),
        targets=work.targets,
        layer=work.layer,
        options=dict(work.options or {}),  # --option KEY=VALUE, typed by the methods' signatures
        **fields,  # --precision, --exact-decode
    )
    loop = StreamOptions(
        batch_size=work.batch_size,
        num_workers=work.workers,
        optional=("cam",) if work.defaulted else (),
        after=None if work.quiet else _print_top,
        on_error=lambda msg: echo_err(msg),
        ragged=isinstance(work.targets, Detection),  # a detector takes images of different sizes in one batch
    )
    estimates = reporting(CliEstimates(len(ds)) if work.progress and ctx.is_main else None)
    try:
        with estimates:
            res, stats = _explain_all(net, ds, writes, work, ctx, sinks, request, loop)
    except CamlensError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        if ctx.is_main:
            echo_err(_interrupted_note(writes.out, writes.store))
        raise SystemExit(130) from None
    for msg in files.skipped if files and ctx.is_main else []:  # a detector's image with no detection
        echo_err(f"error: {msg}")
    n_bad = failed + len(stats.failed) + (len(files.skipped) if files else 0)
    computed = int(ctx.sum_ints([stats.computed])[0])
    written = int(ctx.sum_ints([(files.written if files else 0) + sum(s.written for s in figure_sinks)])[0])
    if ctx.is_main:
        random = card is not None and card.extra.get("weights") == "random"
        wrote = written if files or figure_sinks else None
        click.echo(_summary(len(ds), stats, res, writes, computed, wrote, n_bad, random=random))
    return EXIT_FAILED if n_bad else 0


def _interrupted_note(out, store: bool) -> str:
    """What Ctrl-C kept, and how to go on (said instead of a bare ``Aborted!``)."""
    if store:
        return (
            f"\ninterrupted: the images finished so far are kept in the store {out} (each written chunk "
            "is a record that its images are done); run the same command again to resume: only the "
            "missing images are computed, and the store ends as an uninterrupted run's"
        )
    return (
        f"\ninterrupted: the files written so far are kept in {out}; run the same command with "
        "--overwrite to redo them all (without it, the existing files are refused)"
    )
