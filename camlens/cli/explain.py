"""``camlens explain``: classify images, print the top classes, write overlays (minimal version)."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("explain")
@click.argument("images", nargs=-1)
@click.option("--model", default="efficientnet_lite0", show_default=True, help="zoo name")
@click.option("--weights", default=None, help="weights file, 'random', or a torchvision weights name")
@click.option("--layer", default=None, help="dotted layer name (default: features entering global pooling)")
@click.option("--method", "methods", multiple=True, default=("gradcam", "cam"), show_default=True)
@click.option("--topk", default=2, show_default=True, help="explain the top-k classes")
@click.option("--out", default="camlens-out", show_default=True, type=click.Path())
@click.option("--overwrite", is_flag=True, help="replace existing output files")
def explain_cmd(images, model, weights, layer, methods, topk, out, overwrite):
    """Explain IMAGES (default: the bundled cat photo) and write overlays to --out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import camlens
    from camlens.explanation import minmax
    from camlens.io import sample_image

    net = camlens.load_model(model, weights)
    sources = list(images) or [sample_image("chelsea")]
    names = [Path(s).stem for s in images] or ["chelsea"]
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    for src, name in zip(sources, names):
        for cid, cname, p in camlens.predict(net, src, topk=5)[0]:
            click.echo(f"{name}: {p:7.2%}  {cname} ({cid})")
        res = camlens.explain(net, src, method=list(methods), targets=f"top{topk}", layer=layer)
        for meth, e in res.items():
            img = e.images[0]
            for k in range(e.maps.shape[1]):
                path = outdir / f"{name}_{meth}_top{k + 1}.png"
                if path.exists() and not overwrite:
                    click.echo(f"{path} exists; pass --overwrite to replace it", err=True)
                    sys.exit(1)
                import torch.nn.functional as F

                m = F.interpolate(e.maps[:, k:k + 1], size=img.shape[:2], mode="bilinear")[0, 0]
                fig, ax = plt.subplots(figsize=(5, 5))
                ax.imshow(img)
                ax.imshow(minmax(m).cpu().numpy(), cmap="jet", alpha=0.5)
                ax.set_title(f"{meth} top-{k + 1}: {e.labels()[0][k]} ({float(e.probs[0, k]):.1%})")
                ax.axis("off")
                fig.savefig(path, bbox_inches="tight", dpi=100)
                plt.close(fig)
                click.echo(f"wrote {path}")
