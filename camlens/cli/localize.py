"""``camlens localize``: heatmap -> bounding boxes (JSON, CSV, drawn images), or ``--gt`` against
ground-truth boxes (CSV, Pascal VOC, COCO) with the localization metrics and an optional calibration.

``--gt`` is the ground-truth flag of every command (``evaluate``, ``compare``); ``--eval``, its 0.2
name here, still works with a note until 0.4."""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from camlens.base.defaults import EXPLAIN_BATCH
from camlens.base.fsio import atomic_write, safe_out_dir
from camlens.cli.common import (
    EXIT_FAILED,
    cap_workers,
    check_layer,
    check_overwrite,
    common_model_options,
    echo,
    echo_err,
    parse_classes,
    parse_formats,
    parse_threshold,
    resolve_device,
)
from camlens.cli.dataset import collect, load_model_seeded

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
@click.option(
    "--batch-size", default=EXPLAIN_BATCH, show_default=True, type=click.IntRange(1), help="images per forward"
)
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(0),
    callback=cap_workers,
    help="DataLoader processes decoding images [default: up to 4 for more than two batches]",
)
@click.option("--recursive", is_flag=True, help="also take images in sub-folders of FOLDERS")
@click.option(
    "--gt",
    "gt_file",
    default=None,
    type=click.Path(),
    help="evaluate against ground-truth boxes: a CSV (path,class,x0,y0,x1,y1), a COCO JSON, a Pascal VOC XML or folder",
)
@click.option("--eval", "eval_boxes", default=None, type=click.Path(), hidden=True, help="0.2 name of --gt")
@click.option(
    "--root",
    default=None,
    type=click.Path(file_okay=False),
    help="with --gt: folder the image paths are relative to (default: the boxes file's)",
)
@click.option(
    "--tolerance",
    default=15.0,
    show_default=True,
    type=click.FloatRange(0),
    help="with --gt: pointing-game tolerance in pixels",
)
@click.option(
    "--sweep-step",
    default=0.01,
    show_default=True,
    type=click.FloatRange(0.001, 0.5),
    help="with --gt: threshold step of the MaxBoxAcc sweep",
)
@click.option(
    "--calibrate",
    default=None,
    type=click.Path(dir_okay=False),
    help="with --gt: save the threshold that maximizes MaxBoxAcc to this JSON file (use it later as --threshold FILE)",
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
    workers,
    recursive,
    gt_file,
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

    With --gt BOXES, the images listed in the ground-truth file are evaluated instead: top-1 and
    GT-known localization accuracy, mean IoU, pointing game, MaxBoxAcc and MaxBoxAccV2, each beside
    a centre baseline; the table is printed and written to OUT/localization_metrics.json.

    \b
    Examples:
      camlens localize                                   # the cat photo
      camlens localize photos/ --threshold 0.4 --format json,csv
      camlens localize --gt val/boxes.csv --calibrate thr.json
      camlens localize test/ --threshold thr.json
    """
    from camlens.attribution.registry import get_method
    from camlens.base.errors import CamlensError
    from camlens.base.localization import DEFAULT_THRESHOLD

    thr = parse_threshold(threshold)
    thr = DEFAULT_THRESHOLD if thr is None else thr
    try:
        names = list(dict.fromkeys(get_method(m).name for m in (methods or ("gradcam",))))
    except CamlensError as exc:
        raise click.BadParameter(str(exc), param_hint="--method") from None
    if eval_boxes is not None:
        echo_err("note: --eval is now --gt (the ground-truth flag of every command); --eval goes in 0.4")
        gt_file = gt_file or eval_boxes
    run = _Run(model, weights, checkpoint, layer, device, tuple(names), thr, batch_size, workers, out, overwrite)
    if gt_file is not None:
        if images:
            raise click.UsageError("give either IMAGES or --gt BOXES (the images come from the boxes file)")
        _evaluate(gt_file, run, _GtOptions(root, tolerance, sweep_step, calibrate))
        return
    if calibrate:
        raise click.UsageError("--calibrate needs --gt BOXES")
    fmts = parse_formats(formats, ("json", "csv", "png"))
    from camlens.pipeline import dist

    inputs = collect(images, recursive=recursive)
    failed = len(inputs.problems)
    for msg in inputs.problems:
        echo_err(f"error: {msg}")
    if not inputs.records:
        raise click.ClickException("no images to localize" + (" (see the errors above)" if failed else ""))
    outdir = Path(out)
    plan = []
    if "json" in fmts:
        plan.append(outdir / "boxes.json")
    if "csv" in fmts:
        plan.append(outdir / "boxes.csv")
    if "png" in fmts:
        plan += [outdir / f"{r.name}_{m}_boxes.png" for r in inputs.records for m in names]
    check_overwrite(plan, overwrite)

    ctx = dist.setup(dist.local_device(resolve_device(device)))
    try:
        net = load_model_seeded(model, weights, checkpoint, dist.local_device(resolve_device(device)))
        check_layer(net, layer)  # before any image is read
        from camlens.models.zoo import card_of

        card = card_of(net)
        targets = parse_classes(classes, card.class_names if card else None) if classes else None
        sink = _LocalizeSink(thr, mode, min_area, outdir if "png" in fmts else None, quiet)
        target_rule = targets if targets is not None else f"top{topk}"
        records, n_failed, n = _localize_stream(net, inputs, run, target_rule, sink, quiet, ctx)
    finally:
        ctx.close()
    if not ctx.is_main:
        if failed + n_failed:
            sys.exit(EXIT_FAILED)
        return
    failed += n_failed
    written = [outdir / f"{r['name']}_{r['method']}_boxes.png" for r in records] if "png" in fmts else []
    if records:
        safe_out_dir(outdir)
    # outputs were checked before any work (check_overwrite): written atomically, a link replaced, never followed
    if "json" in fmts and records:
        written.append(_write_json(outdir / "boxes.json", records, thr, mode, min_area))
    if "csv" in fmts and records:
        written.append(_write_csv(outdir / "boxes.csv", records, thr))
    n_ok = n - n_failed
    click.echo(
        f"localized {n_ok} of {n} image(s) at threshold {thr:g}; wrote {len(written)} file(s) "
        f"to {out}" + (f"; {failed} input(s) failed" if failed else "")
    )
    if failed:
        sys.exit(EXIT_FAILED)


@dataclass(frozen=True)
class _Run:
    """The settings both paths of ``camlens localize`` (boxes and ``--gt``) share."""

    model: str
    weights: str | None
    checkpoint: str | None
    layer: str | None
    device: str | None
    names: tuple[str, ...]  # method names, registry spelling
    thr: float
    batch_size: int
    workers: int | None
    out: str
    overwrite: bool


@dataclass(frozen=True)
class _GtOptions:
    """``--gt``'s own settings."""

    root: str | None
    tolerance: float
    sweep_step: float
    calibrate: str | None


def _write_json(p: Path, records: list[dict], thr, mode: str, min_area: int) -> Path:
    doc = {
        "threshold": thr,
        "mode": mode,
        "min_area": min_area,
        "box_format": "x0,y0,x1,y1 image pixels, x1/y1 exclusive",
        "images": records,
    }
    atomic_write(p, json.dumps(doc, indent=2) + "\n", overwrite=True)
    return p


def _write_csv(p: Path, records: list[dict], thr) -> Path:
    fh = io.StringIO(newline="")  # the table is built in memory, then written atomically
    w = csv.writer(fh)
    w.writerow(CSV_COLUMNS)
    for rec in records:
        for b in rec["boxes"]:
            row = [
                rec["path"],
                b["class_name"],
                *b["box"],
                b["class"],
                f"{b['prob']:.6f}",
                b["rank"],
                rec["method"],
                thr,
            ]
            w.writerow(row)
    atomic_write(p, fh.getvalue(), overwrite=True)
    return p


class _LocalizeSink:
    """Box records per image and method (writer thread); drawn PNGs when asked."""

    def __init__(self, thr, mode, min_area, outdir: Path | None, quiet: bool):
        self.thr, self.mode, self.min_area, self.outdir, self.quiet = thr, mode, min_area, outdir, quiet
        self.records: list[tuple[int, dict]] = []

    def write(self, res) -> None:
        from camlens.base.localization import map_boxes, scale_boxes

        b = res.batch
        for m, exp in res.explanations.items():
            raw = map_boxes(exp, self.thr, mode=self.mode, min_area=self.min_area)
            size = tuple(exp.shape[-2:])
            labels = exp.labels()
            for i in range(len(b)):
                per = scale_boxes(raw[i], size, b.sizes[i])
                boxes = []
                for j in range(exp.shape[1]):
                    for box in per[j].reshape(-1, 4):
                        if (box < 0).any():
                            continue
                        boxes.append(
                            {
                                "rank": j + 1,
                                "class": int(exp.classes[i, j]),
                                "class_name": labels[i][j],
                                "prob": float(exp.probs[i, j]),
                                "box": [int(v) for v in box],
                            }
                        )
                rec = {
                    "name": b.names[i],
                    "path": b.sources[i],
                    "method": m,
                    "layer": exp.layer,
                    "image_size": list(b.sizes[i]),
                    "boxes": boxes,
                }
                self.records.append((b.indices[i], rec))
                if not self.quiet and boxes:
                    first = boxes[0]
                    echo(f"{rec['name']}: {m} {first['class_name']} ({first['prob']:.1%}) box {tuple(first['box'])}")
                if self.outdir is not None and b.images is not None:
                    safe_out_dir(self.outdir)
                    _draw(b.images[i], rec, self.outdir / f"{rec['name']}_{m}_boxes.png")

    def close(self) -> None:
        pass


def _localize_stream(net, inputs, run: _Run, targets, sink: _LocalizeSink, quiet: bool, ctx):
    """Records (image order, then method order) gathered on rank 0, failures, number of images."""
    from camlens.api.explainer import ExplainRequest
    from camlens.base.errors import CamlensError
    from camlens.models.preprocess import IMAGENET
    from camlens.models.zoo import card_of
    from camlens.pipeline import dist
    from camlens.pipeline.run import StreamOptions, stream
    from camlens.pipeline.sources import ImageFiles

    card = card_of(net)
    ds = ImageFiles(inputs.records, card.preprocess if card else IMAGENET, keep_images=sink.outdir is not None)
    names = list(run.names)
    ids = dist.shard(list(range(len(ds))), ctx.rank, ctx.world)
    request = ExplainRequest(methods=tuple(names), targets=targets, layer=run.layer)
    loop = StreamOptions(
        batch_size=run.batch_size,
        num_workers=run.workers,
        progress=not quiet and ctx.is_main and len(ds) >= 4,
        desc="localize",
        on_error=echo_err,
        world=ctx.world,
    )
    try:
        stats = stream(net, ds, ids, [sink], request, loop)
    except CamlensError as exc:
        raise click.ClickException(str(exc)) from None
    order = {m: k for k, m in enumerate(names)}
    recs = sorted((r for part in ctx.gather(sink.records) for r in part), key=lambda r: (r[0], order[r[1]["method"]]))
    n_failed = int(ctx.sum_ints([len(stats.failed)])[0])
    return [r for _, r in recs], n_failed, len(ds)


def _draw(img, rec, path: Path) -> Path:
    from PIL import Image

    from camlens.base.localization import draw_boxes, scale_boxes

    # the boxes are in the photo's pixels; the image drawn on may be a scaled decode of it
    raw = [b["box"] for b in rec["boxes"]]
    boxes = [list(v) for v in scale_boxes(raw, rec["image_size"], img.shape[:2])] if raw else []
    labels = [f"{b['class_name'].split(',')[0]} {b['prob']:.0%}" for b in rec["boxes"]]
    im = Image.fromarray(draw_boxes(img, boxes, labels=labels))
    atomic_write(path, lambda f: im.save(f, format="PNG"), overwrite=True)  # checked before any work
    return path


def _evaluate(boxes_file, run: _Run, opts: _GtOptions) -> None:
    """``--gt``: stream the ground-truth images once for all methods; the metrics come from
    per-rank accumulators reduced exactly (:mod:`camlens.pipeline.locmetrics`)."""
    from camlens.base.errors import CamlensError
    from camlens.metrics.loceval import read_boxes
    from camlens.pipeline import dist

    outdir = Path(run.out)
    metrics_path = outdir / "localization_metrics.json"
    check_overwrite([metrics_path] + ([Path(opts.calibrate)] if opts.calibrate else []), run.overwrite)
    try:
        gt = read_boxes(boxes_file, root=opts.root)
    except CamlensError as exc:
        raise click.ClickException(str(exc)) from None
    ctx = dist.setup(dist.local_device(resolve_device(run.device)))
    try:
        net = load_model_seeded(run.model, run.weights, run.checkpoint, dist.local_device(resolve_device(run.device)))
        check_layer(net, run.layer)  # before any image is read
        accs, n_failed = _gt_stream(net, gt, run, opts, ctx)
    finally:
        ctx.close()
    if not ctx.is_main:
        if n_failed:
            sys.exit(EXIT_FAILED)
        return
    reports = {m: a.report() for m, a in accs.items()}
    for m, rep in reports.items():
        click.echo(f"\n{m}\n{rep.table()}")
    safe_out_dir(outdir)
    model_name = getattr(getattr(net, "camlens", None), "name", run.model)
    payload = {"boxes": str(boxes_file), "model": model_name, "methods": {m: r.to_dict() for m, r in reports.items()}}
    atomic_write(metrics_path, json.dumps(payload, indent=2) + "\n", overwrite=True)  # checked before any work
    click.echo(f"\nwrote {metrics_path}")
    if opts.calibrate:
        _save_calibration(opts.calibrate, reports, run, model_name, boxes_file)
    if n_failed:
        click.echo(f"{n_failed} image(s) could not be read", err=True)
        sys.exit(EXIT_FAILED)


def _gt_stream(net, gt, run: _Run, opts: _GtOptions, ctx):
    """Explain every ground-truth image (its class, or its top-1 when the model does not know the
    class) and feed one localization accumulator per method; reduced over ranks."""
    import numpy as np
    import torch

    from camlens.api.explainer import ExplainRequest
    from camlens.base.errors import CamlensError
    from camlens.metrics.loceval import _class_id
    from camlens.models.preprocess import IMAGENET
    from camlens.models.zoo import card_of
    from camlens.pipeline import dist
    from camlens.pipeline.locmetrics import LocalizationAccumulator
    from camlens.pipeline.run import PerBatch, StreamOptions, stream
    from camlens.pipeline.sources import ImageFiles, records_for

    names = list(run.names)
    card = card_of(net)
    class_names = card.class_names if card else None
    ds = ImageFiles(
        records_for([(str(g.path), g.main_class) for g in gt], list(range(len(gt)))),
        card.preprocess if card else IMAGENET,
    )
    sweep = np.round(np.arange(0.0, 1.0, opts.sweep_step), 6)
    accs = {m: LocalizationAccumulator(run.thr, sweep, opts.tolerance, name=m) for m in names}
    correct: dict[int, float] = {}

    def targets(batch, x):
        cids = [_class_id(gt[i].main_class, class_names) for i in batch.indices]
        if all(c is not None for c in cids):  # top-1 correctness from the explaining forward's logits
            return cids
        with torch.no_grad():  # an unknown class name: its image's top-1 class is explained
            top1 = net(x).argmax(1).tolist()
        for i, cid, t1 in zip(batch.indices, cids, top1, strict=True):
            correct[i] = float("nan") if cid is None else float(cid == t1)
        return [c if c is not None else t1 for c, t1 in zip(cids, top1, strict=True)]

    class _Sink:
        def write(self, res):
            b = res.batch
            for m, exp in res.explanations.items():
                for j, i in enumerate(b.indices):
                    g = gt[i]
                    cid = _class_id(g.main_class, class_names)
                    ok = correct.pop(i, None) if m == names[-1] else correct.get(i)
                    if ok is None and cid is not None and exp.logits is not None:
                        ok = float(int(exp.logits[j].argmax()) == cid)
                    gt_boxes = g.boxes(g.main_class if cid is not None else None)
                    accs[m].add(exp.map(j, 0).numpy(), gt_boxes, b.sizes[j], ok)

        def close(self):
            pass

    ids = dist.shard(list(range(len(ds))), ctx.rank, ctx.world)
    per_batch: Any = PerBatch(targets)  # a dataset run's per-batch rule, read by stream()
    request = ExplainRequest(methods=tuple(names), targets=per_batch, layer=run.layer)
    loop = StreamOptions(
        batch_size=run.batch_size,
        num_workers=run.workers,
        progress=ctx.is_main and len(ds) >= 4,
        desc="evaluate",
        on_error=echo_err,
        world=ctx.world,
    )
    try:
        stats = stream(net, ds, ids, [_Sink()], request, loop)
    except CamlensError as exc:
        raise click.ClickException(str(exc)) from None
    for a in accs.values():
        a.reduce(ctx)
    n_failed = int(ctx.sum_ints([len(stats.failed)])[0])
    if accs[names[0]].mine.n == 0:
        raise click.ClickException("none of the ground-truth images could be read")
    return accs, n_failed


def _save_calibration(path, reports: dict, run: _Run, model_name, boxes_file) -> None:
    """``--calibrate``: the first method's MaxBoxAcc-best threshold, reusable as ``--threshold FILE``."""
    from camlens.metrics.loceval import save_threshold

    m, rep = next(iter(reports.items()))
    p = save_threshold(
        path,
        rep.best_threshold,
        overwrite=run.overwrite,
        method=m,
        layer=run.layer,
        model=model_name,
        boxes=str(boxes_file),
        n_images=rep.n,
        maxboxacc=rep.metrics["maxboxacc"],
    )
    click.echo(
        f"calibrated threshold for {m}: {rep.best_threshold:g} (MaxBoxAcc {rep.metrics['maxboxacc']:.1%}) -> {p}"
    )
