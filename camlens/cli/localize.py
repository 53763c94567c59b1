"""``camlens localize``: heatmap -> bounding boxes (JSON, CSV, drawn images), or ``--eval`` against
ground-truth boxes (CSV, Pascal VOC, COCO) with the localization metrics and an optional calibration."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import click

from .common import (
    EXIT_FAILED,
    batches,
    check_layer,
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
)

CSV_COLUMNS = ["path", "class", "x0", "y0", "x1", "y1", "class_id", "prob", "rank", "method", "threshold"]


@click.command("localize")
@click.argument("images", nargs=-1)
@common_model_options
@click.option(
    "--method", "methods", multiple=True, help="method name, repeatable (`camlens methods`) [default: gradcam]"
)
@click.option(
    "--threshold",
    default=None,
    help="fraction of each map's max in [0, 1) (default 0.3), or a calibrated-threshold JSON file",
)
@click.option("--topk", default=1, show_default=True, type=click.IntRange(1, 100), help="boxes for the top-k classes")
@click.option("--class", "classes", multiple=True, help="box these classes instead (ids or names, repeatable)")
@click.option(
    "--mode",
    type=click.Choice(["largest", "all"]),
    default="largest",
    show_default=True,
    help="the largest connected region's box, or one box per region",
)
@click.option(
    "--min-area",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="ignore regions smaller than this (map pixels)",
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
    default="json,csv,png",
    show_default=True,
    help="comma-separated: json and csv (boxes.json / boxes.csv), png (drawn images)",
)
@click.option("--overwrite", is_flag=True, help="replace existing output files")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1), help="images per batch")
@click.option("--recursive", is_flag=True, help="also take images in sub-folders of FOLDERS")
@click.option(
    "--eval",
    "eval_boxes",
    default=None,
    type=click.Path(),
    help="evaluate against ground-truth boxes: a CSV (path,class,x0,y0,x1,y1), a COCO JSON, a Pascal VOC XML or folder",
)
@click.option(
    "--root",
    default=None,
    type=click.Path(file_okay=False),
    help="with --eval: folder the image paths are relative to (default: the boxes file's)",
)
@click.option(
    "--tolerance",
    default=15.0,
    show_default=True,
    type=click.FloatRange(0),
    help="with --eval: pointing-game tolerance in pixels",
)
@click.option(
    "--sweep-step",
    default=0.01,
    show_default=True,
    type=click.FloatRange(0.001, 0.5),
    help="with --eval: threshold step of the MaxBoxAcc sweep",
)
@click.option(
    "--calibrate",
    default=None,
    type=click.Path(dir_okay=False),
    help="with --eval: save the threshold that maximizes MaxBoxAcc to this JSON file "
    "(use it later as --threshold FILE)",
)
@click.option("-q", "--quiet", is_flag=True, help="print only errors and the final line")
def localize_cmd(
    images,
    model,
    weights,
    checkpoint,
    layer,
    device,
    methods,
    threshold,
    topk,
    classes,
    mode,
    min_area,
    out,
    formats,
    overwrite,
    batch_size,
    recursive,
    eval_boxes,
    root,
    tolerance,
    sweep_step,
    calibrate,
    quiet,
):
    """Boxes around what the model looks at, for IMAGES (files, folders, globs; default: the cat photo).

    The map (Grad-CAM by default) is cut at a fraction of its maximum, the largest 8-connected region
    is kept, and its bounding rectangle (x0, y0, x1, y1; x1/y1 exclusive, in image pixels) is written
    to OUT/boxes.json, OUT/boxes.csv and drawn on OUT/<stem>_<method>_boxes.png.

    With --eval BOXES, the images listed in the ground-truth file are evaluated instead: top-1 and
    GT-known localization accuracy, mean IoU, pointing game, MaxBoxAcc and MaxBoxAccV2, each beside
    a centre baseline; the table is printed and written to OUT/localization_metrics.json.

    \b
    Examples:
      camlens localize                                   # the cat photo
      camlens localize photos/ --threshold 0.4 --format json,csv
      camlens localize --eval val/boxes.csv --calibrate thr.json
      camlens localize test/ --threshold thr.json
    """
    from camlens.errors import CamlensError
    from camlens.localization import DEFAULT_THRESHOLD
    from camlens.methods.registry import get_method

    thr = parse_threshold(threshold)
    thr = DEFAULT_THRESHOLD if thr is None else thr
    try:
        names = list(dict.fromkeys(get_method(m).name for m in (methods or ("gradcam",))))
    except CamlensError as exc:
        raise click.BadParameter(str(exc), param_hint="--method") from None
    if eval_boxes is not None:
        if images:
            raise click.UsageError("give either IMAGES or --eval BOXES (the images come from the boxes file)")
        _evaluate(
            eval_boxes,
            root,
            model,
            weights,
            checkpoint,
            layer,
            device,
            names,
            thr,
            tolerance,
            sweep_step,
            calibrate,
            out,
            overwrite,
            batch_size,
        )
        return
    if calibrate:
        raise click.UsageError("--calibrate needs --eval BOXES")
    fmts = parse_formats(formats, ("json", "csv", "png"))
    inputs = expand_inputs(images, recursive=recursive)
    failed = len(inputs.problems)
    for msg in inputs.problems:
        echo_err(f"error: {msg}")
    if not inputs.sources:
        raise click.ClickException("no images to localize" + (" (see the errors above)" if failed else ""))
    outdir = Path(out)
    plan = []
    if "json" in fmts:
        plan.append(outdir / "boxes.json")
    if "csv" in fmts:
        plan.append(outdir / "boxes.csv")
    if "png" in fmts:
        plan += [outdir / f"{s}_{m}_boxes.png" for s in inputs.names for m in names]
    check_overwrite(plan, overwrite)

    net = load_model_opts(model, weights, checkpoint, device)
    check_layer(net, layer)
    from camlens.models.zoo import card_of

    card = card_of(net)
    targets = parse_classes(classes, card.class_names if card else None) if classes else None
    records, written = [], []
    items = list(zip(inputs.sources, inputs.names, strict=True))
    bar = progress(len(items), "localize")
    try:
        for chunk in batches(items, batch_size):
            imgs, srcs, stems = [], [], []
            for src, stem in chunk:
                try:
                    imgs.append(load_source(src))
                    srcs.append(src)
                    stems.append(stem)
                except CamlensError as exc:
                    failed += 1
                    echo_err(f"error: {exc}", bar)
            if imgs:
                try:
                    recs = _localize_batch(net, imgs, srcs, stems, names, targets, topk, layer, thr, mode, min_area)
                except CamlensError as exc:
                    failed += len(imgs)
                    echo_err(f"error: {', '.join(stems)}: {exc}", bar)
                    recs = []
                for rec, img in recs:
                    records.append(rec)
                    if not quiet:
                        first = rec["boxes"][0] if rec["boxes"] else None
                        if first:
                            echo(
                                f"{rec['name']}: {rec['method']} {first['class_name']} ({first['prob']:.1%}) "
                                f"box {tuple(first['box'])}",
                                bar,
                            )
                    if "png" in fmts:
                        outdir.mkdir(parents=True, exist_ok=True)
                        written.append(_draw(img, rec, outdir / f"{rec['name']}_{rec['method']}_boxes.png"))
            bar.update(len(chunk))
    finally:
        bar.close()
    if records:
        outdir.mkdir(parents=True, exist_ok=True)
    if "json" in fmts and records:
        p = outdir / "boxes.json"
        p.write_text(
            json.dumps(
                {
                    "threshold": thr,
                    "mode": mode,
                    "min_area": min_area,
                    "box_format": "x0,y0,x1,y1 image pixels, x1/y1 exclusive",
                    "images": records,
                },
                indent=2,
            )
            + "\n"
        )
        written.append(p)
    if "csv" in fmts and records:
        p = outdir / "boxes.csv"
        with p.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(CSV_COLUMNS)
            for rec in records:
                for b in rec["boxes"]:
                    w.writerow(
                        [
                            rec["path"],
                            b["class_name"],
                            *b["box"],
                            b["class"],
                            f"{b['prob']:.6f}",
                            b["rank"],
                            rec["method"],
                            thr,
                        ]
                    )
        written.append(p)
    n_ok = len(items) - failed + len(inputs.problems)
    click.echo(
        f"localized {n_ok} of {len(items)} image(s) at threshold {thr:g}; wrote {len(written)} file(s) "
        f"to {out}" + (f"; {failed} input(s) failed" if failed else "")
    )
    if failed:
        sys.exit(EXIT_FAILED)


def _localize_batch(net, imgs, srcs, stems, names, targets, topk, layer, thr, mode, min_area):
    import camlens
    from camlens.localization import image_boxes

    spec = [targets] * len(imgs) if targets is not None else f"top{topk}"
    res = camlens.explain(net, imgs, method=names, targets=spec, layer=layer)
    out = []
    for m, exp in res.items():
        per = image_boxes(exp, thr, mode=mode, min_area=min_area)
        labels = exp.labels()
        for i, img in enumerate(imgs):
            boxes = []
            for j in range(exp.maps.shape[1]):
                rows = per[i][j].reshape(-1, 4)
                for b in rows:
                    if (b < 0).any():
                        continue
                    boxes.append(
                        {
                            "rank": j + 1,
                            "class": int(exp.classes[i, j]),
                            "class_name": labels[i][j],
                            "prob": float(exp.probs[i, j]),
                            "box": [int(v) for v in b],
                        }
                    )
            src = srcs[i]
            out.append(
                (
                    {
                        "name": stems[i],
                        "path": src,
                        "method": m,
                        "layer": exp.layer,
                        "image_size": list(img.shape[:2]),
                        "boxes": boxes,
                    },
                    img,
                )
            )
    return out


def _draw(img, rec, path: Path) -> Path:
    from PIL import Image

    from camlens.localization import draw_boxes

    boxes = [b["box"] for b in rec["boxes"]]
    labels = [f"{b['class_name'].split(',')[0]} {b['prob']:.0%}" for b in rec["boxes"]]
    Image.fromarray(draw_boxes(img, boxes, labels=labels)).save(path)
    return path


def _evaluate(
    boxes_file,
    root,
    model,
    weights,
    checkpoint,
    layer,
    device,
    names,
    thr,
    tolerance,
    sweep_step,
    calibrate,
    out,
    overwrite,
    batch_size,
):
    import numpy as np

    from camlens.errors import CamlensError
    from camlens.loceval import evaluate_model, read_boxes, save_threshold

    outdir = Path(out)
    metrics_path = outdir / "localization_metrics.json"
    plan = [metrics_path] + ([Path(calibrate)] if calibrate else [])
    check_overwrite(plan, overwrite)
    try:
        gt = read_boxes(boxes_file, root=root)
    except CamlensError as exc:
        raise click.ClickException(str(exc)) from None
    net = load_model_opts(model, weights, checkpoint, device)
    check_layer(net, layer)
    failed: list[str] = []

    def on_error(g, exc):
        if str(g.path) not in failed:
            failed.append(str(g.path))
            echo_err(f"error: {exc}")

    sweep = np.round(np.arange(0.0, 1.0, sweep_step), 6)
    reports = {}
    for m in names:
        try:
            rep = evaluate_model(
                net,
                gt,
                method=m,
                layer=layer,
                threshold=thr,
                thresholds=sweep,
                tolerance=tolerance,
                batch_size=batch_size,
                on_error=on_error,
                progress=len(gt) >= 4,
            )
        except CamlensError as exc:
            raise click.ClickException(f"{m}: {exc}") from None
        reports[m] = rep
        click.echo(f"\n{m}\n{rep.table()}")
    outdir.mkdir(parents=True, exist_ok=True)
    payload = {
        "boxes": str(boxes_file),
        "model": getattr(getattr(net, "camlens", None), "name", model),
        "methods": {m: r.to_dict() for m, r in reports.items()},
    }
    metrics_path.write_text(json.dumps(payload, indent=2) + "\n")
    click.echo(f"\nwrote {metrics_path}")
    if calibrate:
        m, rep = next(iter(reports.items()))
        p = save_threshold(
            calibrate,
            rep.best_threshold,
            overwrite=overwrite,
            method=m,
            layer=layer,
            model=payload["model"],
            boxes=str(boxes_file),
            n_images=rep.n,
            maxboxacc=rep.metrics["maxboxacc"],
        )
        click.echo(
            f"calibrated threshold for {m}: {rep.best_threshold:g} (MaxBoxAcc {rep.metrics['maxboxacc']:.1%}) -> {p}"
        )
    if failed:
        click.echo(f"{len(failed)} image(s) could not be read", err=True)
        sys.exit(EXIT_FAILED)
