r"""``camlens.train.finetune``: fine-tune a classifier on an ImageFolder, keep the best, explain it.

The loop is notebook 004's (SGD, lr 0.001, momentum 0.9, per-epoch validation loss and accuracy,
"best so far") with notebook 000/003's objective, cross-entropy plus
:math:`\lambda \sum_W \lVert W\rVert^2/2` over convolution and linear weights only (see
:mod:`camlens.train.losses`). Every epoch writes:

* ``last.safetensors`` + ``last.json`` (model + card), ``train_state.safetensors`` + ``.json``
  (optimizer buffers, epoch, history) — what ``resume=True`` continues from;
* ``best.safetensors`` + ``best.json`` when the validation accuracy improves (ties: lower
  validation loss) — what ``load_model(checkpoint=OUT)`` loads;
* ``metrics.csv``, ``metrics.json`` and ``curves.png``.

After training, ``val_grid.png`` shows validation images with their Grad-CAM (or CAM) overlay,
true label, predicted label and probability (notebook 004's figure).

Determinism: the new head's initialization, the shuffling, the augmentation and dropout draw
from random streams derived from ``seed`` (and the epoch), inside
:func:`torch.random.fork_rng`, so the caller's global RNG is untouched, two runs with the same
seed give the same weights on the same machine, and an interrupted-then-resumed run gives the
same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from camlens._version import versions
from camlens.base._util import eval_mode, with_options
from camlens.base.errors import CamlensError, CheckpointError, OutputExistsError
from camlens.base.fsio import atomic_write_json, remove_output, safe_out_dir
from camlens.models.cam_ready import CAM_CHANNELS, cam_ready
from camlens.models.heads import last_linear, replace_classifier
from camlens.models.preprocess import IMAGENET
from camlens.models.weights import prepare_checkpoint, read_state_dict
from camlens.models.zoo import ModelCard, attach_card, card_of, checkpoint_card, load_model
from camlens.train.checkpoint import (
    STATE_FILE,
    load_train_state,
    reconcile_checkpoints,
    save_train_state,
    write_state_summary,
)
from camlens.train.data import (
    FolderDataset,
    ImageFolderData,
    check_same_classes,
    epoch_order,
    loader,
    scan_image_folder,
    stratified_split,
)
from camlens.train.losses import regularized_loss

#: files a run writes (the only ones ``overwrite=True`` removes)
OUTPUT_FILES = (
    "config.json",
    "best.safetensors",
    "best.json",
    "last.safetensors",
    "last.json",
    "train_state.safetensors",
    "train_state.json",
    "metrics.csv",
    "metrics.json",
    "curves.png",
    "val_grid.png",
)

#: options that define a run; ``resume=True`` takes them from the saved run
RUN_OPTIONS = (
    "model",
    "weights",
    "cam_ready",
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "image_size",
    "val_split",
    "val_dir",
    "freeze_backbone",
    "seed",
    "optimizer",
    "augment",
)


class WarningSkippedImages(UserWarning):
    """Some images of the dataset could not be read and were skipped."""


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        model: the best checkpoint's network (eval mode, ``model.camlens`` card with class names).
        out: the output folder.
        history: one dict per epoch (``epoch, train_loss, train_ce, train_acc, val_loss, val_acc,
            best_epoch, best_val_acc, lr, seconds``).
        best: the best epoch's row.
        classes: class names in label (ImageFolder) order.
        skipped: ``[(path, reason)]`` of unreadable images.
        files: the files written, by role.
    """

    model: nn.Module
    out: Path
    history: list[dict]
    best: dict
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- model
def prepare_model(
    model: str | nn.Module, weights: Any, cam: bool, num_classes: int, classes: list[str]
) -> tuple[nn.Module, dict[str, Any], ModelCard]:
    """The network to train (a private copy), its architecture record and its card."""
    if isinstance(model, str):
        base, base_class = model.lower().replace("-", "_"), None
        net = load_model(base, weights)
    elif isinstance(model, nn.Module):
        base, base_class = None, f"{type(model).__module__}.{type(model).__qualname__}"
        net = copy.deepcopy(model)
    else:
        raise CamlensError(f"model must be a zoo name or an nn.Module, not {type(model).__name__}")
    card0 = card_of(net) or ModelCard(type(net).__name__, IMAGENET)
    arch: dict[str, Any] = {"base": base, "base_class": base_class, "num_classes": num_classes}
    if cam:
        cam_opts = {"channels": CAM_CHANNELS, "groups": 2}
        net = cam_ready(net, num_classes, class_names=classes, channels=CAM_CHANNELS, groups=2)
        card = card_of(net)
        assert card is not None  # cam_ready always attaches its card
        arch.update(head="cam_ready", cam=cam_opts, head_modules=card.extra["head"])
    else:
        lin = last_linear(net)
        if base is None and lin is not None and lin[1].out_features == num_classes:
            arch.update(head="keep", head_modules=[lin[0]])
        else:
            arch.update(head="replace", head_modules=[replace_classifier(net, num_classes)])
        card = replace(card0, class_names=classes)
    return net, arch, card


def _in_head(name: str, heads: list[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in heads)


def _set_train_mode(net: nn.Module, heads: list[str], freeze: bool) -> None:
    net.train()
    if freeze:  # a frozen backbone keeps its BatchNorm statistics and runs without dropout
        for name, m in net.named_modules():
            if name and not _in_head(name, heads) and not any(_in_head(h, [name]) for h in heads):
                m.eval()


def _freeze(net: nn.Module, heads: list[str]) -> None:
    for name, p in net.named_parameters():
        p.requires_grad_(_in_head(name.rpartition(".")[0], heads))


def _optimizer(kind: str, params, lr: float, momentum: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if kind == "adamw":
        # the L2 term is in the loss for both optimizers; AdamW's own decoupled decay is off
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    raise CamlensError(f"optimizer must be 'sgd' or 'adamw', not {kind!r}")


# ---------------------------------------------------------------------------------------------- output folder
def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files of our outputs left by a killed run (``.NAME.XXXX.tmp``: never complete)."""
    if out.is_dir():
        for f in OUTPUT_FILES:
            for tmp in out.glob(f".{f}.*.tmp"):
                remove_output(tmp)


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    if resume or overwrite:
        _remove_stale_temporaries(out)
    if resume:
        if not (out / STATE_FILE).is_file():
            raise CheckpointError(
                f"nothing to resume in {out}: it holds no {STATE_FILE} from an earlier "
                "run (an interrupted first epoch saves nothing). Start a new run (without resume)."
            )
        return
    if os.path.lexists(out) and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(
                f"the output folder {out} already exists and is not empty; pass overwrite=True (--overwrite) "
                "to replace its results, resume=True (--resume) to continue its run, or choose another folder"
            )
        for f in OUTPUT_FILES:
            remove_output(out / f)  # a link is removed, never what it points to
        if (out / "val_grid").is_dir() and not (out / "val_grid").is_symlink():
            shutil.rmtree(out / "val_grid")
    # the folder itself is made once the data and the model are ready (safe_out_dir in _finetune):
    # a run refused for missing weights or bad data leaves nothing behind


def _check_settings(epochs: int, given: dict[str, Any]) -> None:
    """The numeric settings of a run are usable (before anything is read or written)."""
    if epochs < 1:
        raise CamlensError(f"epochs must be >= 1, not {epochs}")
    if given["batch_size"] < 1:
        raise CamlensError(f"batch_size must be >= 1, not {given['batch_size']}")
    if given["optimizer"] not in ("sgd", "adamw"):
        raise CamlensError(f"optimizer must be 'sgd' or 'adamw', not {given['optimizer']!r}")
    if given["lr"] <= 0 or given["weight_decay"] < 0 or not 0 <= given["momentum"] < 1:
        raise CamlensError("need lr > 0, weight_decay >= 0 and 0 <= momentum < 1")


def _resume_config(saved: dict, given: dict, defaults: dict) -> dict:
    """The saved run's options; an option given explicitly with another value is an error."""
    clash = [k for k in RUN_OPTIONS if given[k] != defaults[k] and given[k] != saved.get(k)]
    if clash:
        diffs = ", ".join(f"{k}={given[k]!r} (run: {saved.get(k)!r})" for k in clash)
        raise CamlensError(
            f"resume continues the saved run with its own options, but these differ: {diffs}. "
            "Drop them, or start a new run in another folder (or with overwrite)."
        )
    return {k: saved.get(k, given[k]) for k in RUN_OPTIONS}


# ---------------------------------------------------------------------------------------------- epochs
def _train_epoch(net, dl, opt, weight_decay, device, heads, freeze, desc, progress) -> dict[str, float]:
    from tqdm.auto import tqdm

    _set_train_mode(net, heads, freeze)
    tot = ce_sum = correct = n = 0.0
    bar = tqdm(dl, desc=desc, leave=False, disable=not progress, file=sys.stderr, unit="batch")
    for x, y, _ in bar:
        x, y = x.to(device), y.to(device)
        logits = net(x)
        loss, ce, _pen = regularized_loss(logits, y, net, weight_decay)
        if not torch.isfinite(loss):
            raise CamlensError(
                f"the training loss became {float(loss.detach())}; lower the learning rate (lr), or check the "
                "model's weights and the data for NaN/Inf values"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        b = y.shape[0]
        tot += float(loss.detach()) * b
        ce_sum += float(ce.detach()) * b
        correct += float((logits.detach().argmax(1) == y).sum())
        n += b
        bar.set_postfix(ce=f"{ce_sum / n:.4f}", l2=f"{(tot - ce_sum) / n:.4f}", acc=f"{correct / n:.2%}")
    bar.close()
    return {"train_loss": tot / n, "train_ce": ce_sum / n, "train_acc": correct / n}


@torch.no_grad()
def evaluate(net: nn.Module, dl, device, desc: str = "validate", progress: bool = False) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``net`` (eval mode) over a loader."""
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    with eval_mode(net):
        ce_sum = correct = n = 0.0
        for x, y, _ in tqdm(dl, desc=desc, leave=False, disable=not progress, file=sys.stderr, unit="batch"):
            x, y = x.to(device), y.to(device)
            logits = net(x)
            ce_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += float((logits.argmax(1) == y).sum())
            n += y.shape[0]
    return {"val_loss": ce_sum / n, "val_acc": correct / n}


def _check_finite(net: nn.Module, row: dict, epoch: int) -> None:
    """Refuse to save (and to go on) once the losses or the weights are NaN/Inf: nothing of this epoch
    is written, so the last committed epoch stays the last good one."""
    bad_rows = [k for k in ("train_loss", "train_ce", "val_loss") if not np.isfinite(row.get(k, 0.0))]
    bad = [n for n, t in net.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad_rows or bad:
        what = ", ".join(bad_rows + bad[:3]) + (" …" if len(bad) > 3 else "")
        raise CamlensError(
            f"training diverged in epoch {epoch}: non-finite values in {what}. Nothing of this epoch was "
            "saved; lower the learning rate (lr) or check the data for NaN/Inf pixels, then start again "
            "(or resume from the last good epoch)."
        )


def _better(row: dict, best: dict | None) -> bool:
    if best is None:
        return True
    return (row["val_acc"], -row["val_loss"]) > (best["val_acc"], -best["val_loss"])


# ---------------------------------------------------------------------------------------------- grid
def validation_grid(
    net: nn.Module, val: ImageFolderData, pp, path: Path, method: str = "gradcam", n: int = 16, title: str | None = None
) -> tuple[Path, str]:
    """Explain the first ``n`` validation images with ``method`` and save the grid figure."""
    from camlens.api.explainer import explain
    from camlens.train.report import save_grid

    idx = np.linspace(0, len(val) - 1, num=min(n, len(val))).round().astype(int)
    imgs = [val.image(int(i)) for i in idx]
    shown = [pp.resize_image(im).round().byte().permute(1, 2, 0).cpu().numpy() for im in imgs]
    p = next(net.parameters())
    x = pp(imgs, device=p.device).to(p.dtype)
    e = explain(net, x, method=method)
    names = e.class_names or [str(i) for i in range(int(e.classes.max()) + 1)]
    true = [names[int(val.labels[i])] for i in idx]
    pred = [names[int(c)] for c in e.classes[:, 0].tolist()]
    maps = e.maps[:, 0].cpu().numpy()
    return save_grid(shown, maps, true, pred, e.probs[:, 0].tolist(), path, title=title)


# ---------------------------------------------------------------------------------------------- finetune
@dataclass(frozen=True)
class FinetuneConfig:
    """Every setting of :func:`finetune` (the same names are accepted as keywords there); see
    :func:`finetune` for their meaning."""

    model: str | nn.Module = "efficientnet_lite0"
    weights: str | os.PathLike | None = None
    cam_ready: bool = False
    epochs: int = 5
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32
    image_size: int | None = None
    val_split: float = 0.2
    val_dir: str | os.PathLike | None = None
    freeze_backbone: bool = False
    out: str | os.PathLike = "camlens-finetune"
    seed: int = 0
    resume: bool = False
    optimizer: str = "sgd"
    overwrite: bool = False
    augment: bool = True
    device: str | torch.device | None = None
    num_workers: int = 0
    progress: bool = True
    grid: bool = True
    grid_method: str = "gradcam"
    grid_size: int = 16
    log: Callable[[str], None] | None = None


def finetune(data: str | os.PathLike, config: FinetuneConfig | None = None, **options: Any) -> FinetuneResult:
    r"""Fine-tune a classifier on an ImageFolder dataset and keep the best checkpoint.

    Objective: :math:`\mathrm{CE} + \lambda \sum_W \lVert W\rVert^2/2` over convolution and linear
    weights (``weight_decay`` = :math:`\lambda`; no biases, no normalization parameters), SGD with
    momentum (or AdamW) at a constant learning rate — notebooks 000/003/004.

    Settings are the fields of :class:`FinetuneConfig`: pass ``config=`` or any of them as
    keywords (keywords override ``config``).

    Args:
        data: ImageFolder root ``DATA/<class>/<image>``; classes are its sorted sub-folders.
        model: a zoo name (``"efficientnet_lite0"`` with its bundled ImageNet weights,
            ``"resnet18"``, ``"vgg16"``…) or an ``nn.Module`` (copied, never modified; its head is
            kept if it already has one output per class, else replaced).
        weights: weights for a zoo name (see :func:`camlens.load_model`; ``"random"`` to train
            from scratch).
        cam_ready: convert with :func:`camlens.models.cam_ready` (VGG: the CAM paper's conv-1024 +
            GAP + linear head); otherwise the last linear layer is replaced.
        epochs: total number of epochs (with ``resume``, training continues up to it).
        lr, momentum, weight_decay, batch_size, optimizer: ``"sgd"`` or ``"adamw"``.
        image_size: training / inference side in pixels (default: the model's, 224).
        val_split: fraction of each class held out for validation (stratified, seeded), unless
            ``val_dir`` (an ImageFolder with the same classes) is given.
        freeze_backbone: train only the new head (the backbone keeps its BatchNorm statistics).
        out: output folder; an existing non-empty one needs ``overwrite`` or ``resume``.
        seed: makes the run reproducible.
        resume: continue the run saved in ``out`` (same options) from its last epoch.
        augment: random-resized crop (60–100 % area) + horizontal flip on training images.
        device: default CUDA if available, else CPU.
        progress: tqdm bars and one line per epoch on stderr.
        grid, grid_method, grid_size: the validation grid figure (``val_grid.png``).
        log: where to send the per-epoch lines (default: stderr when ``progress``).

    Returns:
        A :class:`FinetuneResult` whose ``model`` is the best checkpoint, ready for
        :func:`camlens.explain`.
    """
    cfg = with_options(FinetuneConfig, config, options, "finetune")
    return _finetune(data, **{f.name: getattr(cfg, f.name) for f in fields(cfg)})


def _finetune(
    data: str | os.PathLike,
    *,
    model: str | nn.Module = "efficientnet_lite0",
    weights: str | os.PathLike | None = None,
    cam_ready: bool = False,
    epochs: int = 5,
    lr: float = 0.001,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 32,
    image_size: int | None = None,
    val_split: float = 0.2,
    val_dir: str | os.PathLike | None = None,
    freeze_backbone: bool = False,
    out: str | os.PathLike = "camlens-finetune",
    seed: int = 0,
    resume: bool = False,
    optimizer: str = "sgd",
    overwrite: bool = False,
    augment: bool = True,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
    grid: bool = True,
    grid_method: str = "gradcam",
    grid_size: int = 16,
    log: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """The body of :func:`finetune` (its arguments are the fields of :class:`FinetuneConfig`)."""
    from tqdm.auto import tqdm

    out = Path(out)
    given = dict(
        model=model if isinstance(model, str) else None,
        weights=None if weights is None else str(weights),
        cam_ready=cam_ready,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        batch_size=batch_size,
        image_size=image_size,
        val_split=val_split,
        val_dir=None if val_dir is None else str(val_dir),
        freeze_backbone=freeze_backbone,
        seed=seed,
        optimizer=optimizer,
        augment=augment,
    )
    defaults = {f.name: f.default for f in fields(FinetuneConfig) if f.name in RUN_OPTIONS}
    _check_settings(epochs, given)
    echo = log or ((lambda s: tqdm.write(s, file=sys.stderr)) if progress else (lambda s: None))

    _prepare_out(out, resume, overwrite)
    saved_info = saved_model = saved_opt = None
    if resume:
        saved_info, saved_model, saved_opt = load_train_state(out)
        cfg = _resume_config(saved_info.get("config", {}), given, defaults)
        if isinstance(model, str) and cfg["model"] != given["model"]:
            raise CamlensError(f"resume: the run trained {cfg['model']!r}, not {given['model']!r}")
        if not isinstance(model, str) and cfg["model"] is not None:
            model = cfg["model"]
    else:
        cfg = dict(given)
    model_arg = cfg["model"] if isinstance(model, str) else model
    S = cfg["image_size"]

    # ------------------------------------------------------------------ data
    train_all = scan_image_folder(data)
    skipped = [(str(p), r) for p, r in train_all.skipped]
    if cfg["val_dir"] is not None:
        val = scan_image_folder(cfg["val_dir"])
        check_same_classes(train_all, val)
        skipped += [(str(p), r) for p, r in val.skipped]
        train = train_all
    else:
        tr_idx, va_idx = stratified_split(train_all, cfg["val_split"], cfg["seed"])
        train, val = train_all.subset(tr_idx), train_all.subset(va_idx)
    classes = train_all.classes
    if skipped:
        msg = (
            f"skipped {len(skipped)} unreadable image(s): "
            + "; ".join(f"{p} ({r})" for p, r in skipped[:5])
            + (" …" if len(skipped) > 5 else "")
        )
        warnings.warn(msg, WarningSkippedImages, stacklevel=2)
        echo(msg)
    if saved_info is not None and saved_info.get("classes") != classes:
        raise CamlensError(f"resume: the data's classes {classes} differ from the run's {saved_info.get('classes')}")

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    fork = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(cfg["seed"])
        net, arch, card = prepare_model(model_arg, cfg["weights"], cfg["cam_ready"], len(classes), classes)
        heads = arch["head_modules"]
        S = S or card.preprocess.size[0]
        cfg["image_size"] = S
        pp = replace(card.preprocess, size=(S, S))
        card = replace(card, preprocess=pp)
        if cfg["freeze_backbone"]:
            _freeze(net, heads)
        net.to(dev)
        params = [p for p in net.parameters() if p.requires_grad]
        if not params:
            raise CamlensError("nothing to train: every parameter is frozen")
        opt = _optimizer(cfg["optimizer"], params, cfg["lr"], cfg["momentum"])
        safe_out_dir(out)  # data read and model built: the run starts

        history: list[dict] = []
        best: dict | None = None
        best_card: dict | None = None
        best_state: dict[str, torch.Tensor] | None = None
        start = 0
        if saved_info is not None:
            assert saved_model is not None and saved_opt is not None  # loaded with saved_info
            try:  # weights and optimizer come from the same committed file: the same epoch
                net.load_state_dict(saved_model, strict=True)
                opt.load_state_dict(saved_opt)
            except (RuntimeError, ValueError, KeyError) as exc:
                raise CheckpointError(f"{out}: the saved run does not fit this model ({exc})") from None
            fixed = reconcile_checkpoints(out, saved_info, net)
            if fixed:
                echo(f"{out}: rewrote {' and '.join(fixed)} from the committed epoch {saved_info.get('epoch')}")
            history = list(saved_info.get("history", []))
            best = saved_info.get("best")
            best_card = (saved_info.get("cards") or {}).get("best")
            start = int(saved_info.get("epoch", 0))
            if start >= epochs:
                echo(f"{out}: already trained {start} epoch(s); pass a larger epochs to continue")

        ds_train = FolderDataset(train, pp, augment=cfg["augment"], seed=cfg["seed"])
        ds_val = FolderDataset(val, pp, augment=False)
        dl_val = loader(ds_val, cfg["batch_size"], num_workers=num_workers)
        base_card = {
            "name": f"{arch['base'] or type(net).__name__}-finetuned",
            "architecture": arch,
            "class_names": classes,
            "preprocess": pp.to_dict(),
            "image_size": [S, S],
            "layer": card.layer,
            "capture": card.capture,
        }
        run_info = {
            "classes": classes,
            "config": cfg,
            "data": str(Path(data)),
            "counts": {"train": train.counts(), "val": val.counts()},
            "skipped": skipped,
        }
        if saved_info is None:
            atomic_write_json(
                out / "config.json", {**run_info, "architecture": arch, "versions": versions()}, overwrite=True
            )
        files = {"config": out / "config.json"}
        if saved_info is not None:  # an interruption after the commit may have left them one epoch behind
            write_state_summary(out, saved_info)
            write_metrics_files(out, history, best, run_info)
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            torch.manual_seed(int(np.random.default_rng([cfg["seed"], epoch, 0xD0]).integers(2**62)))
            ds_train.epoch = epoch
            order = epoch_order(len(ds_train), cfg["seed"], epoch)
            if len(order) % cfg["batch_size"] == 1 and len(order) > 1:
                order = order[:-1]  # a batch of one breaks BatchNorm in training mode
            dl = loader(ds_train, cfg["batch_size"], order, num_workers)
            row: dict[str, Any] = {"epoch": epoch + 1}
            row.update(
                _train_epoch(
                    net,
                    dl,
                    opt,
                    cfg["weight_decay"],
                    dev,
                    heads,
                    cfg["freeze_backbone"],
                    f"epoch {epoch + 1}/{epochs}",
                    progress,
                )
            )
            row.update(evaluate(net, dl_val, dev, progress=progress))
            improved = _better(row, best)
            if improved or best is None:  # (_better is True when there is no best yet)
                best = dict(row)
            row.update(
                best_epoch=best["epoch"], best_val_acc=best["val_acc"], lr=cfg["lr"], seconds=time.perf_counter() - t0
            )
            if improved:
                best = dict(row)
            history.append(row)
            _check_finite(net, row, epoch + 1)
            ck = {**base_card, "epoch": epoch + 1, "metrics": row, "best": best}
            last_ck = prepare_checkpoint(net, out / "last", ck)
            best_ck = prepare_checkpoint(net, out / "best", ck) if improved else None
            if best_ck is not None:
                best_card = best_ck.card
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            info = {**run_info, "epoch": epoch + 1, "history": history, "best": best}
            info["cards"] = {"last": last_ck.card, "best": best_card}
            save_train_state(out, net, opt, info)  # the commit: epoch + 1 is done
            if best_ck is not None:
                best_ck.write()
            last_ck.write()
            write_state_summary(out, info)
            write_metrics_files(out, history, best, run_info)
            echo(
                # the cross-entropies side by side (the train loss also holds the L2 term, which the
                # validation loss does not: printing their sum next to the val CE misleads)
                f"epoch {epoch + 1}/{epochs}  train CE {row['train_ce']:.4f} + L2 "
                f"{row['train_loss'] - row['train_ce']:.4f}  val CE {row['val_loss']:.4f}  "
                f"val acc {row['val_acc']:.2%}  "
                f"best {best['val_acc']:.2%} (epoch {best['epoch']})  {row['seconds']:.1f}s"
            )

    # the result is the best checkpoint, exactly as load_model(checkpoint=out) gives it
    if best is None:
        raise CheckpointError(f"{out} holds no finished epoch to return; run at least one epoch (epochs >= 1)")
    if best_state is None:  # the best epoch came before a resume
        best_state = read_state_dict(out / "best.safetensors")
    net.load_state_dict(best_state)
    for p in net.parameters():
        p.requires_grad_(True)
    card_best = checkpoint_card(best_card or {}, out / "best.safetensors", out / "best.json")
    best_model = attach_card(net.eval(), card_best)
    files.update(
        best=out / "best.safetensors",
        last=out / "last.safetensors",
        metrics_csv=out / "metrics.csv",
        metrics_json=out / "metrics.json",
        curves=out / "curves.png",
    )
    if grid:
        title = f"{card_best.name}: epoch {best['epoch']}, val acc {best['val_acc']:.1%} ({grid_method})"
        files["grid"], _ = validation_grid(best_model, val, pp, out / "val_grid.png", grid_method, grid_size, title)
    return FinetuneResult(best_model, out, history, best, classes, skipped, files)


def write_metrics_files(out: Path, history: list[dict], best: dict | None, run_info: dict) -> None:
    from camlens.train.report import plot_curves, write_metrics

    write_metrics(out, history, {"best": best, **run_info})
    plot_curves(history, out / "curves.png")


__all__ = ["FinetuneConfig", "FinetuneResult", "evaluate", "finetune", "prepare_model", "validation_grid"]
