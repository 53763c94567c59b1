"""``camlens finetune DATA``: fine-tune a classifier on an ImageFolder and explain what it learned."""

from __future__ import annotations

import sys

import click

from camlens.cli.common import cap_workers


@click.command("finetune")
@click.argument("data", type=click.Path(file_okay=False))
@click.option(
    "--model",
    default="efficientnet_lite0",
    show_default=True,
    help="zoo name (efficientnet_lite0, resnet18, vgg16, vgg16_cam, …)",
)
@click.option("--weights", default=None, help="weights for the zoo model: a file, a torchvision name, or 'random'")
@click.option(
    "--cam-ready",
    is_flag=True,
    help="make the network CAM-ready (VGG: conv 1024 + GAP + linear without bias; others: new linear)",
)
@click.option("--epochs", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=0.001, show_default=True, type=float)
@click.option("--momentum", default=0.9, show_default=True, type=float)
@click.option(
    "--weight-decay",
    default=5e-4,
    show_default=True,
    type=float,
    help="λ of the loss term λ·Σ‖W‖²/2 over conv/linear weights (no biases, no norm parameters)",
)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--image-size", default=None, type=click.IntRange(min=8), help="input side [default: the model's]")
@click.option(
    "--val-split", default=0.2, show_default=True, type=float, help="fraction of each class held out for validation"
)
@click.option(
    "--val-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="a validation ImageFolder with the same classes (instead of --val-split)",
)
@click.option("--freeze-backbone", is_flag=True, help="train only the new head")
@click.option("--optimizer", default="sgd", show_default=True, type=click.Choice(["sgd", "adamw"]))
@click.option("--no-augment", is_flag=True, help="no random crop / flip")
@click.option(
    "--out",
    default="camlens-finetune",
    show_default=True,
    type=click.Path(),
    help="output folder (checkpoints, metrics, figures)",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="continue the run saved in --out from its last epoch")
@click.option("--overwrite", is_flag=True, help="replace the results in an existing --out folder")
@click.option("--device", default=None, help="cpu, cuda, cuda:1… [default: cuda if available]")
@click.option(
    "--workers",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    callback=cap_workers,
    help="data loader processes (at most the CPUs)",
)
@click.option("--grid-method", default="gradcam", show_default=True, help="method of the validation grid figure")
@click.option("--no-grid", is_flag=True, help="do not draw the validation grid")
@click.option("--quiet", is_flag=True, help="no progress bars")
def finetune_cmd(
    data,
    model,
    weights,
    cam_ready,
    epochs,
    lr,
    momentum,
    weight_decay,
    batch_size,
    image_size,
    val_split,
    val_dir,
    freeze_backbone,
    optimizer,
    no_augment,
    out,
    seed,
    resume,
    overwrite,
    device,
    workers,
    grid_method,
    no_grid,
    quiet,
):
    """Fine-tune a classifier on the ImageFolder DATA (DATA/<class>/<image>).

    Loss: cross-entropy + weight_decay·Σ‖W‖²/2 over conv/linear weights; SGD with momentum (the
    notebooks). Writes best/last checkpoints (safetensors + JSON card), metrics.csv/json, curves.png
    and val_grid.png to --out. Explain the result with `camlens explain --checkpoint OUT IMAGES`, or in
    Python with camlens.load_model(checkpoint=OUT).
    """
    import warnings

    from camlens.base.errors import CamlensError
    from camlens.cli.common import cli_message, resolve_device
    from camlens.train import finetune
    from camlens.train.loop import WarningSkippedImages

    device = resolve_device(device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", WarningSkippedImages)  # reported through the log below
            res = finetune(
                data,
                model=model,
                weights=weights,
                cam_ready=cam_ready,
                epochs=epochs,
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                batch_size=batch_size,
                image_size=image_size,
                val_split=val_split,
                val_dir=val_dir,
                freeze_backbone=freeze_backbone,
                out=out,
                seed=seed,
                resume=resume,
                optimizer=optimizer,
                overwrite=overwrite,
                augment=not no_augment,
                device=device,
                num_workers=workers,
                progress=not quiet,
                grid=not no_grid,
                grid_method=grid_method,
                log=lambda s: click.echo(s, err=True),
            )
    except CamlensError as exc:
        click.echo(f"error: {cli_message(exc)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; the last finished epoch is saved in {out}: continue with --resume", err=True)
        sys.exit(130)
    b = res.best
    click.echo(f"best: epoch {b['epoch']}, val acc {b['val_acc']:.2%}, val loss {b['val_loss']:.4f}")
    click.echo(f"classes: {', '.join(res.classes)}")
    if res.skipped:
        click.echo(f"skipped {len(res.skipped)} unreadable image(s) (listed in {res.out / 'metrics.json'})")
    for role, path in res.files.items():
        click.echo(f"{role:>12}: {path}")
