"""``camlens compare``: which map should I trust? Rank every method on your model and images."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click

from camlens.cli.common import common_model_options, load_model_opts


def _data(items: tuple[str, ...], truth: bool) -> Any:
    """DATA -> what :func:`camlens.compare` takes; a dataset folder written by ``camlens.data.tetromino``
    (``boxes.csv`` + ``masks.npy``) brings its true masks."""
    import csv

    import numpy as np

    if len(items) == 1 and (Path(items[0]) / "masks.npy").is_file() and (Path(items[0]) / "boxes.csv").is_file():
        root = Path(items[0])
        with open(root / "boxes.csv", newline="") as fh:
            paths = [root / row["path"] for row in csv.DictReader(fh)]
        return SimpleNamespace(paths=paths, masks=np.load(root / "masks.npy", allow_pickle=False))
    if truth:
        raise click.UsageError("--truth needs a dataset folder with masks.npy (camlens.data.tetromino writes one)")
    return list(items)


def _gt_data(path: str, root: str | None) -> Any:
    """``--gt BOXES`` (the boxes files of ``localize --gt``: CSV, COCO JSON, VOC XML or folder) ->
    the images it lists with their boxes, for the localization scores."""
    from camlens.base.errors import CamlensError
    from camlens.metrics.loceval import read_boxes

    try:
        gt = read_boxes(path, root=root)
    except CamlensError as exc:
        raise click.UsageError(f"--gt {path}: {exc}") from None
    return SimpleNamespace(paths=[g.path for g in gt], boxes=[g.boxes() for g in gt])


def _config(images: int, steps: int | None, truth: bool, layer: str | None, flags: tuple[bool, bool, bool]):
    from camlens.comparison import CompareConfig

    overwrite, quiet, no_budgets = flags
    options = {"*": {"layer": layer}} if layer else {}
    cfg = CompareConfig(images=images, truth=truth, options=options, overwrite=overwrite, progress=not quiet)
    cfg = replace(cfg, steps=steps) if steps is not None else cfg
    return replace(cfg, budgets={}) if no_budgets else cfg


def _targets(net: Any, prompt: str | None) -> Any:
    """``--prompt TEXT`` -> a :class:`~camlens.targets.Text` target (an image–text model only)."""
    if prompt is None:
        return None
    from camlens.models.imagetext import ImageText
    from camlens.targets import Text

    if not isinstance(net, ImageText):
        raise click.BadParameter(
            "--prompt needs an image–text model with a text tower (--model hf:FOLDER holding a CLIP or SigLIP "
            "model, or openclip:ARCH)",
            param_hint="--prompt",
        )
    return Text(prompt)


@click.command("compare")
@click.argument("data", nargs=-1)
@common_model_options
@click.option("--methods", default="all", show_default=True, help="comma-separated method names, or all")
@click.option("--images", default=32, show_default=True, help="images sampled from DATA")
@click.option("--steps", default=None, type=int, help="deletion/insertion steps  [default: 4]")
@click.option("--truth", is_flag=True, help="score against the true masks of a tetromino dataset folder")
@click.option(
    "--gt",
    "gt_file",
    default=None,
    type=click.Path(exists=True),
    help="ground-truth boxes as for `localize --gt` (CSV path,class,x0,y0,x1,y1, COCO JSON, VOC XML or folder): "
    "the images come from it and the maps are scored for localization (pointing game, box IoU)",
)
@click.option("--root", default=None, type=click.Path(file_okay=False), help="with --gt: folder of the image paths")
@click.option(
    "--prompt",
    default=None,
    help="image–text models (hf:FOLDER with CLIP/SigLIP, openclip:ARCH): the text whose image–text logit the maps "
    "explain and the metrics score",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default="camlens-compare", show_default=True, type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="replace the outputs of an earlier run in --out")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option(
    "--no-budgets", is_flag=True, help="run the slow methods with their own (much slower) defaults, not the budgets"
)
def compare_cmd(
    data,
    model,
    weights,
    checkpoint,
    layer,
    device,
    methods,
    images,
    steps,
    truth,
    gt_file,
    root,
    prompt,
    seed,
    out,
    overwrite,
    quiet,
    no_budgets,
):
    """Rank every method that applies to the model on a sample of DATA (images, folders or a tetromino
    dataset folder) or of the images of --gt BOXES (then also scored for localization): faithfulness
    against a random map, the randomization sanity check, robustness, sparseness and cost, with
    bootstrap intervals. Writes table.parquet, table.csv and report.html.

    \b
    Model kinds: classifiers (the top-1 class, its softmax probability), detectors (their own top
    detection per image, its class score x IoU), segmenters (the largest predicted class region,
    its summed logits), image–text models with --prompt (the image–text logit).

    \b
    Budgets, sized so that the whole comparison of 32 photos with every method that applies to
    EfficientNet-Lite0 takes under 10 minutes on 2 CPU cores: deletion and insertion in 4 steps
    on every sampled image, ROAD on the first 6, max-sensitivity on the first 4 (3 noisy draws),
    the sanity check on the first 2; and the slow methods with fewer samples than their own
    defaults (LIME and KernelSHAP: ~1 s per photo instead of ~14 s; --no-budgets lifts these):
      rise n_masks=64, scorecam max_channels=16, smoothgrad n_samples=4,
      integrated_gradients steps=8, occlusion window=56 stride=56,
      lime n_samples=64, kernelshap n_samples=64

    \b
    Resumable: --out keeps every method's maps (a result store per method) and every finished
    metric stage; the same command again continues an interrupted run (other settings are refused
    unless --overwrite)."""
    from camlens.base.errors import CamlensError
    from camlens.comparison import compare

    if bool(data) == bool(gt_file):
        raise click.UsageError("give DATA (images, folders or a tetromino dataset folder) or --gt BOXES, not both")
    samples = _gt_data(gt_file, root) if gt_file else _data(data, truth)
    net = load_model_opts(model, weights, checkpoint, device)
    cfg = _config(images, steps, truth, layer, (overwrite, quiet, no_budgets))
    try:
        res = compare(net, samples, methods, seed, targets=_targets(net, prompt), out=out, config=cfg)
    except CamlensError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(res.summary())
    if res.reused:
        click.echo(f"\ncontinued an earlier run; reused: {res.reused}")
    click.echo(f"\nwrote table.parquet, table.csv and report.html to {out} ({res.elapsed_s:.0f} s)")
