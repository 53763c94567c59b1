"""``camlens explain``: classify images, print their top classes, write overlays, maps and summaries."""

from __future__ import annotations

import sys

import click

from .common import (
    EXIT_FAILED,
    batches,
    check_overwrite,
    common_model_options,
    echo,
    echo_err,
    expand_inputs,
    load_model_opts,
    load_source,
    parse_classes,
    parse_formats,
    parse_threshold,
    progress,
    table,
)

DEFAULT_METHODS = ("gradcam", "cam")
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


def parse_targets(values, class_names, task: str | None, topk: int):
    """``--target`` values -> a camlens target object (or ``None`` for a classifier's defaults).

    ``box:x0,y0,x1,y1[:label]`` (repeatable: one map per box, original-image pixels) ->
    :class:`~camlens.targets.Detection`; ``mask:PATH:category`` -> :class:`~camlens.targets.Segmentation`
    over the nonzero pixels of the mask image. Without ``--target`` a detector explains its ``topk``
    most confident detections and a segmenter its largest predicted class.
    """
    import numpy as np

    from camlens.errors import CamlensError
    from camlens.io import load_image
    from camlens.targets import Detection, Segmentation

    if not values:
        return Detection(score_threshold=0.0, max_boxes=topk) if task == "detection" else None
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
    default="png,npy,json",
    show_default=True,
    help="comma-separated: png (overlays), npy (maps), json (summary)",
)
@click.option("--overwrite", is_flag=True, help="replace existing output files")
@click.option(
    "--threshold",
    default=None,
    help="box threshold (fraction of the map's max, or a calibrated JSON); also draws the boxes",
)
@click.option("--boxes", is_flag=True, help="draw the box at the (default) threshold on the overlays")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1), help="images per batch")
@click.option("--alpha", default=0.5, show_default=True, type=click.FloatRange(0, 1), help="heatmap opacity")
@click.option("--cmap", default="jet", show_default=True, help="matplotlib colormap")
@click.option("--recursive", is_flag=True, help="also take images in sub-folders of FOLDERS")
@click.option("-q", "--quiet", is_flag=True, help="no top-5 tables, only errors and the final line")
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
    alpha,
    cmap,
    recursive,
    quiet,
):
    """Explain IMAGES (files, folders or glob patterns; default: the bundled cat photo).

    Prints each image's top-5 classes and writes, per image (named after its file stem) and method,
    PNG overlays of the explained classes (e.g. chelsea_gradcam_top1.png), the maps (.npy) and a JSON
    summary. Unreadable images are reported and skipped; the exit code is 1 if any input failed.

    \b
    Examples:
      camlens explain                                  # the cat photo, Grad-CAM and CAM, top-2
      camlens explain photos/ --method gradcam++ --topk 3 --out results
      camlens explain 'data/**/*.jpg' --class "tabby cat" --format png
      camlens explain --model fasterrcnn_mobilenet_v3_large_320_fpn photo.jpg   # its top detections
      camlens explain --model fcn_resnet50 photo.jpg --target mask:road.png:15
    """
    from camlens.errors import CamlensError
    from camlens.methods.registry import get_method
    from camlens.models.zoo import card_of
    from camlens.viz import output_paths

    fmts = parse_formats(formats, ("png", "npy", "json"))
    thr = parse_threshold(threshold)
    defaulted = not methods
    if classes and target_specs:
        raise click.BadParameter("give --class (classifiers) or --target (detectors, segmenters), not both")
    from camlens.models.tasks import keep_all_detections, task_of

    task = task_of(model.lower().replace("-", "_")) if model and not checkpoint else None
    try:
        default = TASK_METHODS if task else DEFAULT_METHODS
        names = list(dict.fromkeys(get_method(m).name for m in (methods or default)))
    except CamlensError as exc:
        raise click.BadParameter(str(exc), param_hint="--method") from None

    inputs = expand_inputs(images, recursive=recursive)
    failed = len(inputs.problems)
    for msg in inputs.problems:
        echo_err(f"error: {msg}")
    if not inputs.sources:
        raise click.ClickException("no images to explain" + (" (see the errors above)" if failed else ""))

    # every output is checked before any work, so nothing is half-written when one already exists
    # (with --class the file names carry class names, known once the model is loaded)
    def check(labels: list[str]) -> None:
        suffix = "class" if classes else "rank"
        plan = [
            p
            for m in names
            for per in output_paths(out, inputs.names, m, [labels] * len(inputs.names), fmts, suffix)
            for ps in per.values()
            for p in ps
        ]
        check_overwrite(plan, overwrite)

    if not classes:
        check([""] * topk)
    net = load_model_opts(model, weights, checkpoint, device)
    if task == "detection":
        keep_all_detections(net)  # the top-k boxes, however low their scores (printed below)
    card = card_of(net)
    class_names = card.class_names if card else None
    task_target = parse_targets(target_specs, class_names, task, topk) if (task or target_specs) else None
    targets = parse_classes(classes, class_names) if classes else task_target
    k = len(targets) if isinstance(targets, list) else topk
    if isinstance(targets, list):
        check([class_names[c] if class_names and c < len(class_names) else str(c) for c in targets])

    written = 0
    items = list(zip(inputs.sources, inputs.names, strict=True))
    bar = progress(len(items), "explain")
    try:
        for chunk in batches(items, batch_size):
            imgs, stems = [], []
            for src, stem in chunk:
                try:
                    imgs.append(load_source(src))
                    stems.append(stem)
                except CamlensError as exc:
                    failed += 1
                    echo_err(f"error: {exc}", bar)
            if imgs:
                try:
                    written += _explain_batch(
                        net,
                        imgs,
                        stems,
                        names,
                        targets,
                        k,
                        layer,
                        out,
                        fmts,
                        overwrite,
                        thr,
                        boxes,
                        alpha,
                        cmap,
                        quiet,
                        defaulted,
                        bar,
                    )
                except CamlensError as exc:
                    failed += len(imgs)
                    echo_err(f"error: {', '.join(stems)}: {exc}", bar)
            bar.update(len(chunk))
    finally:
        bar.close()
    n_ok = len(items) - failed + len(inputs.problems)
    click.echo(
        f"explained {n_ok} of {len(items)} image(s) with {', '.join(names)}; wrote {written} file(s) "
        f"to {out}" + (f"; {failed} input(s) failed" if failed else "")
    )
    if failed:
        sys.exit(EXIT_FAILED)


def _explain_batch(
    net, imgs, stems, names, targets, k, layer, out, fmts, overwrite, thr, boxes, alpha, cmap, quiet, defaulted, bar
) -> int:
    """Explain one batch with every method (one shared forward); returns the number of files written.
    With the default methods, a head that is not GAP + linear drops CAM (with a note) instead of failing."""
    import camlens
    from camlens.errors import HeadError
    from camlens.targets import is_target_object
    from camlens.viz import save_explanation

    obj = is_target_object(targets)
    if not quiet and not obj:
        for stem, top in zip(stems, camlens.predict(net, imgs, topk=5), strict=True):
            rows = [(r + 1, name.split(",")[0], f"{p:6.1%}", cid) for r, (cid, name, p) in enumerate(top)]
            echo(f"{stem}\n" + table(rows, ("#", "class", "prob", "id"), indent="  "), bar)
    spec = targets if obj else [targets] * len(imgs) if targets is not None else f"top{k}"
    todo = list(names)
    try:
        res = camlens.explain(net, imgs, method=todo, targets=spec, layer=layer)
    except HeadError as exc:
        if not (defaulted and "cam" in todo):
            raise
        echo_err(f"note: CAM skipped ({exc})", bar)
        names.remove("cam")  # for the next batches too
        todo = list(names)
        res = camlens.explain(net, imgs, method=todo, targets=spec, layer=layer)
    first = next(iter(res.values()))
    if not quiet and "boxes" in first.extras:  # a detector: the boxes explained
        for i, stem in enumerate(stems):
            box_rows = [
                (str(k + 1), first.labels()[i][k], f"{float(first.scores[i, k]):.3g}", ",".join(f"{v:.0f}" for v in b))
                for k, b in enumerate(first.extras["boxes"][i])
                if b[0] == b[0]
            ]
            echo(
                f"{stem}\n"
                + (table(box_rows, ("#", "label", "score", "box"), indent="  ") if box_rows else "  no box"),
                bar,
            )
    count = 0
    for exp in res.values():
        exp.sources = list(stems)
        count += len(
            save_explanation(
                exp,
                out,
                formats=fmts,
                overwrite=overwrite,
                threshold=thr,
                boxes=boxes,
                alpha=alpha,
                cmap=cmap,
                suffix="class" if targets is not None and not obj else "rank",
            )
        )
    return count
