"""``camlens evaluate``: are the maps faithful? Metrics per method, a table, CSV/JSON and plots."""

from __future__ import annotations

import csv
import functools
import glob
import io
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from camlens.base.fsio import atomic_write, atomic_write_json, check_targets, safe_out_dir
from camlens.base.io import IMAGE_EXTENSIONS
from camlens.base.names import output_stems
from camlens.cli.common import check_layer, cli_message, method_option, parse_method_options, resolve_device

#: bundled skimage photos used when DATA is empty
DEFAULT_PHOTOS = ("chelsea", "coffee", "astronaut")

#: where an unfinished run keeps its chunks (removed when the run ends)
PARTIAL_DIR = ".camlens-evaluate-partial"


class _Partial:
    """The chunks of an unfinished run, kept in ``OUT/.camlens-evaluate-partial/`` beside
    ``per_image.csv``: the same command finds them and computes only the chunks that are missing."""

    def __init__(self, outdir: Path, signature: dict[str, Any]) -> None:
        self.outdir, self.dir, self.signature = outdir, outdir / PARTIAL_DIR, signature

    def load(self) -> dict | None:
        """``{chunk: ChunkState}`` of an unfinished run of the same command, or None (none here)."""
        from camlens.metrics.runner import ChunkState

        sig = self.dir / "run.json"
        if sig.is_symlink() or not sig.is_file():
            return None
        try:
            old = json.loads(sig.read_text(encoding="utf-8"))
            states = {
                int(f.stem.split("-")[1]): ChunkState.from_json(json.loads(f.read_text(encoding="utf-8")))
                for f in sorted(self.dir.glob("chunk-*.json"))
            }
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise click.ClickException(
                f"{self.dir} holds an unfinished run that cannot be read ({exc}); pass --overwrite to start again"
            ) from None
        if old != self.signature:
            diff = sorted(k for k in {*old, *self.signature} if old.get(k) != self.signature.get(k))
            raise click.ClickException(
                f"{self.outdir} holds an unfinished evaluate run with other settings ({', '.join(diff)} "
                "differ): run its command again to finish it, pass --overwrite to start again, or choose "
                "another --out"
            )
        return states

    def start(self) -> None:
        safe_out_dir(self.dir)
        atomic_write_json(self.dir / "run.json", self.signature, overwrite=True)

    def save(self, chunk: int, state) -> None:
        atomic_write(self.dir / f"chunk-{chunk:06d}.json", json.dumps(state.to_json()), overwrite=True)

    def remove(self) -> None:
        if self.dir.is_symlink():
            self.dir.unlink()
        elif self.dir.is_dir():
            shutil.rmtree(self.dir)


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


def _boxes_file(path: str) -> dict[str, Any] | None:
    """A boxes file of ``camlens localize --gt`` (CSV, COCO JSON, Pascal VOC XML or folder) as
    ``{image stem: boxes}``; ``None`` for a ``{stem: boxes or mask}`` JSON."""
    from camlens.base.errors import CamlensError
    from camlens.metrics.loceval import read_boxes

    p = Path(path)
    if p.suffix.lower() == ".json" and p.is_file():
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise click.UsageError(f"--gt {path}: cannot read JSON ({exc})") from None
        if not (isinstance(doc, dict) and "annotations" in doc and "images" in doc):  # not COCO
            return None
    try:
        return {g.path.stem: g.boxes().tolist() for g in read_boxes(p)}
    except CamlensError as exc:
        raise click.UsageError(f"--gt {path}: {exc}") from None


def _load_gt(path: str, names: list[str]) -> list:
    """Ground truth aligned with ``names`` (image stems), from the boxes files ``localize --gt``
    reads (CSV, COCO, VOC) or from ``{"image stem": [[x0, y0, x1, y1], ...] or "mask.png"}``."""
    import numpy as np

    from camlens.base.io import load_image

    data = _boxes_file(path)
    if data is None:
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


def _write_csv(path: Path, rows: list[dict], columns: list[str] | None = None, overwrite: bool = False) -> None:
    cols = columns or list(dict.fromkeys(k for r in rows for k in r))
    fh = io.StringIO(newline="")  # built in memory, written atomically
    w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    atomic_write(path, fh.getvalue(), overwrite=overwrite)


def _readable(paths: list[str], names: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Drop the images that cannot be read (named on stderr, like explain and localize do)."""
    from camlens.base.errors import ImageLoadError
    from camlens.base.io import load_image

    keep, kept_names, bad = [], [], []
    for p, n in zip(paths, names, strict=True):
        try:
            load_image(p)  # decoded once more by the runner; negligible next to the metrics' forwards
        except ImageLoadError as exc:
            click.echo(f"error: {exc}", err=True)
            bad.append(p)
            continue
        keep.append(p)
        kept_names.append(n)
    return keep, kept_names, bad


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
    type=click.Path(exists=True),
    help="pointing games: ground-truth boxes as for `localize --gt` (CSV path,class,x0,y0,x1,y1, COCO JSON, "
    'VOC XML or folder) or a JSON {"image stem": [[x0, y0, x1, y1], ...] or "mask.png"}, in image pixels',
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
    from camlens.metrics import runner

    wanted, pct = _parse_metrics(metrics, percentages)
    images, names, failed = _images(data)
    gt = _load_gt(gt_file, names) if gt_file else None
    explicit = {k.strip().lower() for m in metrics for k in m.split(",")}
    if gt is None and "all" in explicit:  # "all" means all that apply: the pointing games need --gt
        wanted = [w for w in wanted if w not in runner.CENTRE_BASELINE or w in explicit]
    outdir = Path(out)
    store = _Partial(outdir, _resume_signature(images, names, wanted, pct))
    states = _resume_or_check(store, _planned_files(outdir, wanted, methods, no_plots), overwrite, quiet, chunk_size)
    config = runner.EvaluateConfig(
        steps=steps,
        percentages=pct,
        tolerance=tolerance,
        baseline=baseline,
        batch_size=batch_size,
        chunk_size=chunk_size,
        seed=seed,
        explain_options={**({"layer": layer} if layer else {}), **_options(method_options, methods)} or None,
        sanity_layers=sanity_layers,
        progress=not quiet,
    )
    job = _Job(model, weights, checkpoint, layer, size, methods, wanted, outdir, store, states, config)
    report, ctx, partial, device = _score(job, images, names, gt, device)
    if not ctx.is_main:
        return
    overwrite = overwrite or states is not None  # the files of the interrupted run are this run's
    click.echo(report.table())
    report.settings.update(
        {"data": list(data) or [f"skimage:{n}" for n in DEFAULT_PHOTOS], "device": device, "layer": layer, "size": size}
    )
    if failed:
        report.settings["skipped"] = failed
    written = _write_tables(outdir, report, overwrite, bool(partial))
    if not no_plots:
        written += _write_plots(outdir, report, methods, overwrite)
    if not ctx.active:
        store.remove()  # the run is complete: nothing left to resume
    click.echo(f"\nwrote {', '.join(written)} to {outdir}")
    if failed:
        click.echo(f"skipped {len(failed)} unreadable image(s): {', '.join(failed[:5])}", err=True)
        sys.exit(1)


@dataclass(frozen=True)
class _Job:
    """What ``camlens evaluate`` scores, once its arguments are parsed."""

    model: str
    weights: str | None
    checkpoint: str | None
    layer: str | None
    size: int | None
    methods: tuple[str, ...]
    wanted: list[str]
    outdir: Path
    store: _Partial
    states: dict | None  # chunks kept by an interrupted run (None: a fresh run)
    config: Any  # runner.EvaluateConfig


def _parse_metrics(metrics: tuple[str, ...], percentages: str) -> tuple[list[str], list[float]]:
    from camlens.base.errors import CamlensError
    from camlens.metrics import runner

    try:
        return runner.resolve_metrics(metrics), [float(p) / 100 for p in percentages.split(",") if p.strip()]
    except (CamlensError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None


def _images(data: tuple[str, ...]) -> tuple[list[Any], list[str], list[str]]:
    """DATA's readable images with their names and the unreadable ones (default: the bundled photos)."""
    if not data:
        from camlens.base.io import sample_image

        return [sample_image(n) for n in DEFAULT_PHOTOS], list(DEFAULT_PHOTOS), []
    paths = expand_data(data)
    images, names, failed = _readable(paths, output_stems(paths))
    if not images:
        raise click.ClickException("no readable image to evaluate (see the errors above)")
    return images, names, failed


def _options(method_options: tuple[str, ...], methods: tuple[str, ...]) -> dict[str, Any]:
    return parse_method_options(method_options, methods) if method_options else {}


def _resume_or_check(store: _Partial, planned: list[Path], overwrite: bool, quiet: bool, chunk_size: int):
    """The chunks of an interrupted run to resume (``None``: a fresh run), after checking that the
    outputs are free (files and links, even dangling ones, are in the way without --overwrite)."""
    from camlens.base.errors import CamlensError

    if overwrite:
        store.remove()
    states = None if overwrite else store.load()  # an interrupted run of this command: resume it
    try:
        check_targets(planned, overwrite or states is not None)
    except CamlensError as exc:
        raise click.ClickException(f"{exc}; or choose another --out") from None
    if states is not None and not quiet:
        click.echo(f"resuming: {len(states)} chunk(s) of {chunk_size} image(s) kept in {store.outdir}", err=True)
    return states


def _score(job: _Job, images: list, names: list[str], gt: list | None, device):
    """The report (merged over torchrun ranks), the rank context, the rows written so far and the
    device; an interrupted run says what it kept and exits 130."""
    from dataclasses import replace

    from camlens.base.errors import CamlensError
    from camlens.metrics import runner
    from camlens.pipeline import dist

    device = dist.local_device(resolve_device(device))
    ctx = dist.setup(device)  # under torchrun: each rank scores a contiguous block of the images
    lo, hi = len(images) * ctx.rank // ctx.world, len(images) * (ctx.rank + 1) // ctx.world
    if ctx.active:
        images, names = images[lo:hi], names[lo:hi]
        gt = gt[lo:hi] if gt is not None else None
    partial: list[list[dict]] = []
    outdir, store = job.outdir, job.store

    def write_so_far(rows: list[dict]) -> None:
        """per_image.csv rewritten (atomically) after each chunk: an interrupted run keeps its rows."""
        safe_out_dir(outdir)
        _write_csv(outdir / "per_image.csv", rows, None, overwrite=True)  # checked free (or --overwrite) above
        partial.append(rows)

    try:
        net = _load_net(job.model, job.weights, job.checkpoint, device)
        check_layer(net, job.layer)
        config = replace(
            job.config, preprocess=_preprocess_at(net, job.size), progress=job.config.progress and ctx.is_main
        )
        if not ctx.active:
            store.start()
        report = runner.EvaluationReport()
        if images:
            report = runner.evaluate(
                net,
                images,
                job.methods,
                job.wanted,
                names=names,
                gt=gt,
                config=config,
                on_rows=None if ctx.active else write_so_far,
                index_offset=lo,
                resume=None if ctx.active else runner.Resume(job.states or {}, store.save),
            )
        if ctx.active:
            report = _merge_reports(ctx, report)
    except CamlensError as exc:
        raise click.ClickException(cli_message(exc)) from None
    except KeyboardInterrupt:
        if ctx.is_main:
            kept = len({r["image"] for r in partial[-1]}) if partial else 0
            click.echo(_interrupted(kept, len(images), outdir), err=True)
        raise SystemExit(130) from None
    finally:
        ctx.close()
    return report, ctx, partial, device


def _write_tables(outdir: Path, report, overwrite: bool, had_partial: bool) -> list[str]:
    """per_image.csv, summary.csv, summary.json and sanity.csv (checked free before any work)."""
    safe_out_dir(outdir)
    cols = ["image", "method", "target", "target_name", *report.columns]
    _write_csv(outdir / "per_image.csv", report.rows, cols, overwrite or had_partial)
    _write_csv(outdir / "summary.csv", report.summary(), ["method", "metric", "mean", "std", "n", "better"], overwrite)
    atomic_write(outdir / "summary.json", json.dumps(report.to_dict(), indent=2), overwrite=overwrite)
    written = ["per_image.csv", "summary.csv", "summary.json"]
    if report.sanity is not None:
        _write_csv(outdir / "sanity.csv", report.sanity.table(), None, overwrite)
        written.append("sanity.csv")
    return written


def _write_plots(outdir: Path, report, methods: tuple[str, ...], overwrite: bool) -> list[str]:
    """The deletion/insertion curves per method, ROAD and the sanity curves as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from camlens.metrics import runner

    figs = []
    if report.curves:
        figs += [(f"curves_{m}.png", runner.curves_figure(report, m)) for m in methods]
    if report.road:
        figs.append(("road.png", runner.road_figure(report)))
    if report.sanity is not None:
        figs.append(("sanity.png", runner.sanity_figure(report.sanity)))
    written = []
    for name, fig in figs:
        atomic_write(
            outdir / name, functools.partial(fig.savefig, format="png", dpi=100, bbox_inches="tight"), overwrite
        )
        plt.close(fig)
        written.append(name)
    return written


def _merge_reports(ctx, report):
    """Every rank's report -> the dataset's, on every rank (``all_gather_object``).

    Per-image rows are concatenated in rank order, which is image order (contiguous shards), then
    ordered by method like :func:`~camlens.metrics.runner.evaluate` does, so the
    summary means (deletion / insertion AUC, average drop, pointing games…) are computed from the
    very rows a single process has: the same figures, bit for bit. Mean curves are recombined as
    ``Σ n_r · mean_r / Σ n_r`` (equal to float rounding); sanity results are concatenated.
    """
    import numpy as np

    from camlens.metrics import runner

    def count(rows, m):
        return sum(1 for r in rows if r["method"] == m)

    mine = {
        "rows": report.rows,
        "curves": {k: (f, c, count(report.rows, k[0])) for k, (f, c) in report.curves.items()},
        "road": {m: (p, a, b, count(report.rows, m)) for m, (p, a, b) in report.road.items()},
        "sanity": report.sanity,
        "settings": report.settings,
    }
    parts = ctx.gather(mine)
    out = runner.EvaluationReport()
    rows = [r for p in parts for r in p["rows"]]  # rank order = image order
    order = {m: k for k, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    out.rows = sorted(rows, key=lambda r: order[r["method"]])  # stable: (method, image), as one process
    for key in dict.fromkeys(k for p in parts for k in p["curves"]):
        got = [p["curves"][key] for p in parts if key in p["curves"]]
        n = sum(g[2] for g in got)
        out.curves[key] = (got[0][0], sum(np.asarray(g[1]) * g[2] for g in got) / max(n, 1))
    for m in dict.fromkeys(k for p in parts for k in p["road"]):
        got = [p["road"][m] for p in parts if m in p["road"]]
        n = sum(g[3] for g in got)
        out.road[m] = (got[0][0], sum(g[1] * g[3] for g in got) / max(n, 1), sum(g[2] * g[3] for g in got) / max(n, 1))
    sanity = [p["sanity"] for p in parts if p["sanity"] is not None]
    out.sanity = runner.merge_sanity(sanity) if sanity else None
    out.settings = dict(next((p["settings"] for p in parts if p["settings"]), {}))
    out.settings["images"] = sum(p["settings"].get("images", 0) for p in parts)
    out.settings["ranks"] = ctx.world
    return out


#: the ``camlens evaluate`` options whose values decide its results (a resumed run must match them)
RESULT_OPTIONS = (
    "model", "weights", "checkpoint", "layer", "methods", "steps", "gt_file", "tolerance",
    "sanity_layers", "baseline", "size", "batch_size", "chunk_size", "seed", "method_options",
)  # fmt: skip


def _resume_signature(images, names, wanted, pct) -> dict:
    """What an interrupted run must share with this one to be resumed: the images and every option
    that decides the results (read from the click context, so no option is forgotten)."""
    params = click.get_current_context().params
    sig = {k: list(v) if isinstance(v, tuple) else v for k, v in params.items() if k in RESULT_OPTIONS}
    sig["images"] = [str(Path(p).resolve()) if isinstance(p, str) else n for p, n in zip(images, names, strict=True)]
    sig.update(metrics=wanted, percentages=pct)
    return sig


def _planned_files(outdir: Path, wanted, methods, no_plots: bool) -> list[Path]:
    """Every file ``camlens evaluate`` will write (checked free before any work)."""
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
    return planned


def _load_net(model, weights, checkpoint, device):
    """The model to evaluate; random weights are the same on every rank and in every run."""
    import torch

    import camlens

    if weights != "random":
        return camlens.load_model(model, weights, checkpoint=checkpoint, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return camlens.load_model(model, weights, checkpoint=checkpoint, device=device)


def _preprocess_at(net, size: int | None):
    """The model's preprocessing at ``--size`` (None: the model's own)."""
    import dataclasses

    if size is None:
        return None
    if size < 8:
        raise click.UsageError("--size must be at least 8 pixels")
    card = getattr(net, "camlens", None)
    return dataclasses.replace(card.preprocess, size=(size, size)) if card else None


def _interrupted(kept: int, n: int, outdir: Path) -> str:
    return (
        f"\ninterrupted: {kept} of {n} image(s) done, kept in {outdir} (per_image.csv so far and the chunks "
        f"in {PARTIAL_DIR}/); run the same command again to resume (only the rest is computed), or add "
        "--overwrite to start again"
    )
