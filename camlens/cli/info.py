"""``camlens models``, ``camlens methods`` and ``camlens layers MODEL``: what is available."""

from __future__ import annotations

import click

from camlens.cli.common import load_model_opts, table


def _weights_status(name: str) -> str:
    if name == "efficientnet_lite0":
        return "ImageNet, bundled"
    if name == "vgg16_cam":
        return "weights=FILE (notebooks' VGG16-CAM)"
    try:
        from camlens.models.zoo import _torchvision_weights_file

        path, _ = _torchvision_weights_file(name, None)
        return f"ImageNet, cached ({path.name})" if path.exists() else "random or weights=FILE"
    except Exception:  # no pretrained weights known, or not on disk
        return "random or weights=FILE"


#: the detector families ``--model`` takes, one line each (``camlens models``)
DETECTOR_FAMILIES = [
    ("yolo:PATH", "Ultralytics YOLO v8/v11: a .pt checkpoint, or yolo:yolov8n.yaml for random weights "
                  "(pip install camlens[yolo])"),
    ("hf:FOLDER", "Hugging Face DETR, Conditional DETR, RT-DETR saved with save_pretrained "
                  "(pip install camlens[hf])"),
    ("torchvision", "fasterrcnn_*, retinanet_*, fcos_resnet50_fpn, ssd300_vgg16, ssdlite320_* by name "
                    "(`camlens models rcnn`)"),
]  # fmt: skip


@click.command("models")
@click.argument("pattern", required=False)
def models_cmd(pattern):
    """List the model names `--model` accepts (optionally those containing PATTERN) and where their
    pretrained weights come from. camlens never downloads weights at run time."""
    import camlens

    names = [n for n in camlens.available_models() if not pattern or pattern.lower() in n.lower()]
    families = not pattern or any(pattern.lower() in f.lower() for f, _ in DETECTOR_FAMILIES)
    if not names and not families:
        raise click.ClickException(f"no model name contains {pattern!r}; `camlens models` lists them all")
    rows = [(n, _weights_status(n)) for n in names]
    if rows:
        click.echo(table(rows, ("model", "pretrained weights")))
    if families:
        click.echo("\ndetector families (--model; one map per detection, `camlens explain --target box:...`):")
        click.echo(table(DETECTOR_FAMILIES, ("family", "what"), indent="  "))
    click.echo(
        f"\n{len(names)} model(s). Default: efficientnet_lite0. Use --weights random for an untrained "
        "network, --weights FILE for a state dict, --checkpoint DIR for a fine-tuned model. Any timm model: "
        "--model timm:NAME (e.g. timm:deit_tiny_patch16_224 --weights random). An Ultralytics YOLO (detect, "
        "segment, classify): --model yolo:best.pt, or yolo:yolov8n.yaml / yolov8n-seg.yaml / yolov8n-cls.yaml "
        "for random weights (pip install camlens[yolo]). A MONAI 3-D network: --model monai:densenet121_3d "
        "(resnet18_3d, seresnet50_3d…; pip install camlens[medical])."
    )


@click.command("methods")
@click.option("-v", "--verbose", is_flag=True, help="also show each method's summary and options")
@click.option(
    "--model",
    default=None,
    help="only the methods that apply to this zoo model (a CNN classifier, a transformer, a detector, a segmenter)",
)
def methods_cmd(verbose, model):
    """List the explanation methods with their kind, the models they apply to and their paper."""
    import camlens

    ms = camlens.methods()
    skipped = {}
    if model:
        from camlens.attribution.traits import model_traits

        traits = model_traits(load_model_opts(model, "random", None, "cpu"))  # the traits do not depend on weights
        skipped = {n: i for n, i in ms.items() if not i.applies(traits)}
        ms = {n: i for n, i in ms.items() if n not in skipped}
        click.echo(f"methods for {traits.describe()}:\n")
    rows = [(n, i.kind, i.applies_to.text, i.paper) for n, i in ms.items()]
    click.echo(table(rows, ("method", "kind", "models", "paper")))
    if skipped:
        click.echo("\nnot for this model: " + ", ".join(f"{n} ({i.applies_to.text})" for n, i in skipped.items()))
    if verbose:
        click.echo("")
        for n, i in ms.items():
            opts = ", ".join(f"{k}={v!r}" for k, v in i.options().items()) or "none"
            click.echo(f"{n}: {i.summary}\n    options: {opts}")
    click.echo(
        "\nkind: layer = a map from a layer's features (CAM family; transformer tokens are seen as a grid) "
        "or from the attention matrices (attention_rollout, generic_attention); pixel = an attribution per "
        "input pixel (gradients, or the scores of masked copies)."
        + ("" if model else " `camlens methods --model NAME` lists those for one model.")
    )


@click.command("layers")
@click.argument("model", default="efficientnet_lite0")
@click.option(
    "--weights",
    default="random",
    show_default=True,
    help="weights to load (shapes do not depend on them; 'random' is fastest)",
)
@click.option("--checkpoint", default=None, type=click.Path(), help="a `camlens finetune` checkpoint instead")
@click.option("--size", default=None, type=int, help="input side in pixels (default: the model's input size)")
def layers_cmd(model, weights, checkpoint, size):
    """List MODEL's candidate target layers (modules with a spatial (C, h, w) output, and for
    transformers token (T, D) or channels-last (h, w, C) outputs, with the grid the layer methods see)
    with their output shapes, in execution order, and the layer chosen by default. Pass a name to
    --layer."""
    import torch

    import camlens
    from camlens.core.layers import candidate_layers
    from camlens.models.zoo import card_of

    net = load_model_opts(model, weights, checkpoint, "cpu")
    card = card_of(net)
    hw = (size, size) if size else (tuple(card.preprocess.size) if card else (224, 224))
    converted = getattr(net, "converted", None)  # an ONNX model: its layers are the converted graph's nodes
    rows = candidate_layers(converted if converted is not None else net, size=hw)
    for r in rows if converted is not None else []:
        r["name"] = net.onnx_label(r["name"])
    if not rows:
        raise click.ClickException(f"{model} has no module with a spatial (N, C, h, w) output")
    tokens = any(r["layout"] for r in rows)
    click.echo(
        table(
            [(r["name"], r["type"], "x".join(str(s) for s in r["shape"]), r["layout"] or "-") for r in rows]
            if tokens
            else [(r["name"], r["type"], "x".join(str(s) for s in r["shape"])) for r in rows],
            ("layer", "type", "output", "layout (seen as C x h x w)")
            if tokens
            else ("layer", "type", "output (C x h x w)"),
        )
    )
    try:
        exp = camlens.explain(net, torch.zeros(1, 3, *hw), method="eigencam")
        h, w = exp.raw.shape[-2:]
        click.echo(f"\ndefault layer: {exp.layer} ({h}x{w} map at {hw[0]}x{hw[1]} input)")
    except Exception as exc:  # report, do not fail the listing
        click.echo(f"\ndefault layer: could not be determined ({exc})")
    click.echo(f"{len(rows)} candidate layer(s); choose one with --layer NAME.")
