"""``camlens show``: draw the overlays of one image of a result store, as ``camlens explain`` does."""

from __future__ import annotations

import click

from camlens.cli.common import check_overwrite


@click.command("show")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--image", "image", required=True, type=click.IntRange(0), help="the image's image_id in the store")
@click.option("--method", default=None, help="one stored method [default: the only one, or a montage of all]")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="PNG to write [default: NAME_METHOD.png]")
@click.option("--shared-scale", is_flag=True, help="one colour scale for the image's classes (per method)")
@click.option("--overwrite", is_flag=True, help="replace an existing --out file")
def show_cmd(store, image, method, out, shared_scale, overwrite):
    """Draw image IMAGE (its image_id) of the result STORE written by `camlens explain DATA --out
    STORE`: one method's overlays with colorbars, or with several methods stored and no --method, a
    montage of methods x classes. The photo is read again from its source path.

    \b
    Examples:
      camlens show store --image 3
      camlens show store --image 3 --method gradcam --shared-scale --out cat3.png
    """
    from pathlib import Path

    from camlens.base.errors import CamlensError
    from camlens.pipeline import open_results
    from camlens.viz import save_figure

    try:
        res = open_results(store)
        exps = res.explanations(image)
        name = (next(iter(exps.values())).sources or ["image"])[0]
        what = method or (next(iter(exps)) if len(exps) == 1 else "montage")
        path = Path(out) if out else Path(f"{name}_{what}.png")
        check_overwrite([path], overwrite)
        fig = res.figure(image, method, shared_scale=shared_scale)
        save_figure(fig, path, overwrite=overwrite)
    except CamlensError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {path}")
