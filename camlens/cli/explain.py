"""``camlens explain``: classify images, print their top classes, write overlays, maps and summaries."""

from __future__ import annotations

import sys

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
    method_option,
    parse_classes,
    parse_formats,
    parse_method_options,
    parse_threshold,
    progress,
    table,
)

DEFAULT_METHODS = ("gradcam", "cam")


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
@method_option
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
    method_options,
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
    """
    from camlens.errors import CamlensError
    from camlens.methods.registry import get_method
    from camlens.models.zoo import card_of
    from camlens.viz import output_paths

    fmts = parse_formats(formats, ("png", "npy", "json"))
    thr = parse_threshold(threshold)
    defaulted = not methods
    try:
        names = list(dict.fromkeys(get_method(m).name for m in (methods or DEFAULT_METHODS)))
    except CamlensError as exc:
        raise click.BadParameter(str(exc), param_hint="--method") from None
    options = parse_method_options(method_options, names)

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
    check_layer(net, layer)
    card = card_of(net)
    class_names = card.class_names if card else None
    targets = parse_classes(classes, class_names) if classes else None
    k = len(targets) if targets else topk
    if targets is not None:
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
            bar.update(len(chunk) - len(imgs))  # unreadable ones: done
            if imgs:
                done_before = bar.n
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
                        options,
                    )
                except CamlensError as exc:
                    failed += len(imgs)
                    echo_err(f"error: {', '.join(stems)}: {exc}", bar)
                    bar.update(done_before + len(imgs) - bar.n)  # the batch's images are done, written or not
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
    options=None,
) -> int:
    """Explain one batch with every method (one shared forward); returns the number of files written.
    With the default methods, a head that is not GAP + linear drops CAM (with a note) instead of failing."""
    import camlens
    from camlens.errors import HeadError
    from camlens.viz import save_explanation

    if not quiet:
        for stem, top in zip(stems, camlens.predict(net, imgs, topk=5), strict=True):
            rows = [(r + 1, name.split(",")[0], f"{p:6.1%}", cid) for r, (cid, name, p) in enumerate(top)]
            echo(f"{stem}\n" + table(rows, ("#", "class", "prob", "id"), indent="  "), bar)
    spec = [targets] * len(imgs) if targets is not None else f"top{k}"
    todo = list(names)
    try:
        res = camlens.explain(net, imgs, method=todo, targets=spec, layer=layer, **(options or {}))
    except HeadError as exc:
        if not (defaulted and "cam" in todo):
            raise
        echo_err(f"note: CAM skipped ({exc})", bar)
        names.remove("cam")  # for the next batches too
        todo = list(names)
        res = camlens.explain(net, imgs, method=todo, targets=spec, layer=layer, **(options or {}))
    count = 0
    for exp in res.values():
        exp.sources = list(stems)
    for i in range(len(stems)):  # image by image, so the bar counts images as they are written
        for exp in res.values():
            count += len(
                save_explanation(
                    exp.select(i),
                    out,
                    formats=fmts,
                    overwrite=overwrite,
                    threshold=thr,
                    boxes=boxes,
                    alpha=alpha,
                    cmap=cmap,
                    suffix="class" if targets is not None else "rank",
                )
            )
        bar.update(1)
    return count
