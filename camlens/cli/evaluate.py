"""``camlens evaluate``: are the maps faithful? Metrics per method, a table, CSV/JSON and plots."""

from __future__ import annotations

import csv
import glob
import json
import os
from pathlib import Path

import click

from .common import check_layer, method_option, parse_method_options, resolve_device

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: bundled skimage photos used when DATA is empty
DEFAULT_PHOTOS = ("chelsea", "coffee", "astronaut")


def expand_data(items: tuple[str, ...]) -> list[str]:
    """Folders (their image files, sorted), glob patterns and files -> image paths."""
    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise click.UsageError(f"folder {item} has no image files ({', '.join(IMAGE_EXTENSIONS)})")
            out += found
        elif any(ch in item for ch in "*?["):
            found = sorted(
                f
                for f in glob.glob(item, recursive=True)
                if Path(f).is_file() and Path(f).suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                raise click.UsageError(f"no image file matches {item!r}")
            out += found
        elif p.is_file():
            out.append(str(p))
        else:
            raise click.UsageError(f"{item}: no such file, folder or glob pattern")
    return list(dict.fromkeys(out))  # an image listed twice is evaluated once


def _image_names(paths: list[str]) -> list[str]:
    """File stems, or the paths with separators replaced where two stems collide."""
    stems = [Path(f).stem for f in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [str(Path(f).with_suffix("")).replace("/", "_").replace("\\", "_") for f in paths]


def _load_gt(path: str, names: list[str]) -> list:
    """``{"image stem": [[x0, y0, x1, y1], ...] or "mask.png"}`` -> a list aligned with ``names``."""
    import numpy as np

    from camlens.io import load_image

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise click.UsageError(f"--gt {path}: cannot read JSON ({exc})") from None
    if not isinstance(data, dict):
        raise click.UsageError(f'--gt {path}: expected {{"image name": [[x0, y0, x1, y1], ...]}}')
    base = Path(path).parent
    out = []
    for n in names:
        v = data.get(n)
        if isinstance(v, str):  # a mask image next to the JSON file
            mask = load_image(base / v)
            v = (mask.max(axis=2) > 127).astype(np.uint8)
        out.append(v)
    if all(v is None for v in out):
        raise click.UsageError(f"--gt {path}: none of the images ({', '.join(names[:5])}...) has ground truth")
    return out


def _write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> None:
    cols = columns or list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})


def _write_rows_so_far(path: Path, rows: list[dict]) -> None:
    """``per_image.csv`` rewritten after each chunk (temporary file + rename, never half-written):
    an interrupted run keeps every image it finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    _write_csv(tmp, rows)
    os.replace(tmp, path)


@click.command("evaluate")
@click.argument("data", nargs=-1)
@click.option("--model", default="efficientnet_lite0", show_default=True, help="zoo name")
@click.option("--weights", default=None, help="weights file, 'random', or a torchvision weights name")
@click.option("--checkpoint", default=None, type=click.Path(), help="a camlens fine-tuning checkpoint")
@click.option("--layer", default=None, help="dotted layer name for layer methods (default: automatic)")
@click.option(
    "--method",
    "methods",
    multiple=True,
    default=("gradcam",),
    show_default=True,
    help="explanation method (repeatable)",
)
@click.option(
    "--metrics",
    "metrics",
    multiple=True,
    default=("deletion,insertion,average_drop,increase_in_confidence,sanity",),
    show_default=True,
    help="comma-separated (repeatable): deletion, insertion, average_drop, increase_in_confidence, "
    "road, pointing_game, energy_pointing_game, class_sensitivity, sanity, or all",
)
@click.option("--steps", default=20, show_default=True, help="deletion/insertion steps")
@click.option(
    "--percentages", default="10,20,30,40,50,60,70,80,90", show_default=True, help="ROAD: % of pixels removed"
)
@click.option(
    "--gt",
    "gt_file",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help='pointing games: JSON {"image stem": [[x0, y0, x1, y1], ...] or "mask.png"} in image pixels',
)
@click.option("--tolerance", default=15.0, show_default=True, help="pointing game tolerance (input pixels)")
@click.option(
    "--sanity-layers", default=None, type=int, help="sanity check: randomize only the top N layers (default: all)"
)
@click.option(
    "--baseline/--no-baseline",
    default=True,
    show_default=True,
    help="add a random-map baseline (centre baseline for the pointing games)",
)
@click.option("--size", default=None, type=int, help="resize inputs to SIZE x SIZE (default: the model's)")
@click.option("--batch-size", default=32, show_default=True, help="images per forward pass")
@click.option("--chunk", "chunk_size", default=8, show_default=True, help="images loaded at a time")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default=None, help="cpu, cuda, cuda:1… (default: cuda if available)")
@click.option("--out", default="camlens-eval", show_default=True, type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="replace existing output files in --out")
@click.option("--no-plots", is_flag=True, help="write tables only")
@click.option("--quiet", is_flag=True, help="no progress bar")
@method_option
def evaluate_cmd(
    data,
    model,
    weights,
    checkpoint,
    layer,
    methods,
    metrics,
    steps,
    percentages,
    gt_file,
    tolerance,
    sanity_layers,
    baseline,
    size,
    batch_size,
    chunk_size,
    seed,
    device,
    out,
    overwrite,
    no_plots,
    quiet,
    method_options,
):
    """Score explanation METHODs on DATA (image files, folders or globs; default: three bundled
    photos) with faithfulness METRICS; print a table and write per_image.csv, summary.csv,
    summary.json, sanity.csv and plots to --out.

    Scores are softmax probabilities of each image's top-1 class. Lower is better for deletion,
    average_drop, road_morf and class_sensitivity; higher for the others.
    """
    import dataclasses

    import camlens
    from camlens.errors import CamlensError
    from camlens.metrics import runner

    options = parse_method_options(method_options, methods) if method_options else {}
    try:
        wanted = runner.resolve_metrics(metrics)
        pct = [float(p) / 100 for p in percentages.split(",") if p.strip()]
    except (CamlensError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    if data:
        paths = expand_data(data)
        images, names = paths, _image_names(paths)
    else:
        from camlens.io import sample_image

        images, names = [sample_image(n) for n in DEFAULT_PHOTOS], list(DEFAULT_PHOTOS)
    gt = _load_gt(gt_file, names) if gt_file else None
    explicit = {k.strip().lower() for m in metrics for k in m.split(",")}
    if gt is None and "all" in explicit:  # "all" means all that apply: the pointing games need --gt
        wanted = [w for w in wanted if w not in runner.CENTRE_BASELINE or w in explicit]
    outdir = Path(out)
    planned = [outdir / f for f in ("per_image.csv", "summary.csv", "summary.json")]
    if "sanity" in wanted:
        planned.append(outdir / "sanity.csv")
    if not no_plots:
        if "deletion" in wanted or "insertion" in wanted:
            planned += [outdir / f"curves_{m}.png" for m in methods]
        if "road" in wanted:
            planned.append(outdir / "road.png")
        if "sanity" in wanted:
            planned.append(outdir / "sanity.png")
    existing = [str(p) for p in planned if p.exists()]
    if existing and not overwrite:
        raise click.ClickException(
            f"{len(existing)} output file(s) already exist in {outdir} ({', '.join(existing[:3])}"
            f"{'…' if len(existing) > 3 else ''}); pass --overwrite to replace them or choose another --out"
        )
    device = resolve_device(device)
    try:
        net = camlens.load_model(model, weights, checkpoint=checkpoint, device=device)
        check_layer(net, layer)
        card = getattr(net, "camlens", None)
        pp = None
        if size is not None:
            if size < 8:
                raise click.UsageError("--size must be at least 8 pixels")
            pp = dataclasses.replace(card.preprocess, size=(size, size)) if card else None
        report = runner.evaluate(
            net,
            images,
            methods,
            wanted,
            names=names,
            gt=gt,
            steps=steps,
            percentages=pct,
            tolerance=tolerance,
            baseline=baseline,
            batch_size=batch_size,
            chunk_size=chunk_size,
            seed=seed,
            preprocess=pp,
            explain_options={**({"layer": layer} if layer else {}), **options} or None,
            sanity_layers=sanity_layers,
            progress=not quiet,
            on_rows=lambda rows: _write_rows_so_far(outdir / "per_image.csv", rows),
        )
    except CamlensError as exc:
        raise click.ClickException(str(exc)) from None
    outdir.mkdir(parents=True, exist_ok=True)
    click.echo(report.table())
    written = []
    cols = ["image", "method", "target", "target_name", *report.columns]
    _write_csv(outdir / "per_image.csv", report.rows, cols)
    _write_csv(outdir / "summary.csv", report.summary(), ["method", "metric", "mean", "std", "n", "better"])
    report.settings.update(
        {"data": list(data) or [f"skimage:{n}" for n in DEFAULT_PHOTOS], "device": device, "layer": layer, "size": size}
    )
    (outdir / "summary.json").write_text(json.dumps(report.to_dict(), indent=2))
    written += ["per_image.csv", "summary.csv", "summary.json"]
    if report.sanity is not None:
        _write_csv(outdir / "sanity.csv", report.sanity.table())
        written.append("sanity.csv")
    if not no_plots:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figs = []
        if report.curves:
            figs += [(f"curves_{m}.png", runner.curves_figure(report, m)) for m in methods]
        if report.road:
            figs.append(("road.png", runner.road_figure(report)))
        if report.sanity is not None:
            figs.append(("sanity.png", runner.sanity_figure(report.sanity)))
        for name, fig in figs:
            fig.savefig(outdir / name, dpi=100, bbox_inches="tight")
            plt.close(fig)
            written.append(name)
    click.echo(f"\nwrote {', '.join(written)} to {outdir}")
