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
    return _finetune(data, cfg)


@dataclass
class _Run:
    """The state of one fine-tuning run, passed between the named steps of :func:`_finetune`."""

    cfg: FinetuneConfig
    out: Path
    echo: Callable[[str], None]
    settings: dict[str, Any]  # the run's options (RUN_OPTIONS): given, or the saved run's on resume
    model: str | nn.Module
    saved: tuple[dict, dict, dict] | None = None  # (info, model state, optimizer state) on resume
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    best_card: dict | None = None
    best_state: dict[str, torch.Tensor] | None = None
    start: int = 0


@dataclass
class _Data:
    train: Any
    val: Any
    classes: list[str]
    skipped: list[tuple[str, str]]


@dataclass
class _Net:
    net: nn.Module
    heads: list[str]
    pp: Any
    card: ModelCard
    arch: dict[str, Any]
    opt: torch.optim.Optimizer
    device: torch.device


def _finetune(data: str | os.PathLike, cfg: FinetuneConfig) -> FinetuneResult:
    """The body of :func:`finetune`: named steps over one :class:`FinetuneConfig`."""
    run = _start_run(cfg)
    ds = _read_data(data, run)
    dev = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(run.settings["seed"])
        built = _build_net(run, ds, dev)
        safe_out_dir(run.out)  # data read and model built: the run starts
        _restore(run, built)
        _train(run, ds, built, data)
    return _finish(run, ds, built)


def _start_run(cfg: FinetuneConfig) -> _Run:
    """Check the settings, prepare ``out`` and, on resume, load the saved run and its options."""
    from tqdm.auto import tqdm

    model = cfg.model
    given = {k: getattr(cfg, k) for k in RUN_OPTIONS}
    given.update(
        model=model if isinstance(model, str) else None,
        weights=None if cfg.weights is None else str(cfg.weights),
        val_dir=None if cfg.val_dir is None else str(cfg.val_dir),
    )
    _check_settings(cfg.epochs, given)
    echo = cfg.log or ((lambda s: tqdm.write(s, file=sys.stderr)) if cfg.progress else (lambda s: None))
    out = Path(cfg.out)
    _prepare_out(out, cfg.resume, cfg.overwrite)
    if not cfg.resume:
        return _Run(cfg, out, echo, dict(given), model)
    saved = load_train_state(out)
    defaults = {f.name: f.default for f in fields(FinetuneConfig) if f.name in RUN_OPTIONS}
    settings = _resume_config(saved[0].get("config", {}), given, defaults)
    if isinstance(model, str) and settings["model"] != given["model"]:
        raise CamlensError(f"resume: the run trained {settings['model']!r}, not {given['model']!r}")
    if not isinstance(model, str) and settings["model"] is not None:
        model = settings["model"]
    return _Run(cfg, out, echo, settings, model, saved)


def _read_data(data: str | os.PathLike, run: _Run) -> _Data:
    """The training and validation images (a stratified split unless ``val_dir``); unreadable ones
    are skipped with a warning."""
    cfg = run.settings
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
        warnings.warn(msg, WarningSkippedImages, stacklevel=4)
        run.echo(msg)
    if run.saved is not None and run.saved[0].get("classes") != classes:
        raise CamlensError(f"resume: the data's classes {classes} differ from the run's {run.saved[0].get('classes')}")
    return _Data(train, val, classes, skipped)


def _build_net(run: _Run, ds: _Data, dev: torch.device) -> _Net:
    """The model with its new head on ``dev``, its preprocessing at the run's size, the optimizer."""
    cfg = run.settings
    model_arg = cfg["model"] if isinstance(run.model, str) else run.model
    net, arch, card = prepare_model(model_arg, cfg["weights"], cfg["cam_ready"], len(ds.classes), ds.classes)
    heads = arch["head_modules"]
    size = cfg["image_size"] or card.preprocess.size[0]
    cfg["image_size"] = size
    pp = replace(card.preprocess, size=(size, size))
    card = replace(card, preprocess=pp)
    if cfg["freeze_backbone"]:
        _freeze(net, heads)
    net.to(dev)
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise CamlensError("nothing to train: every parameter is frozen")
    opt = _optimizer(cfg["optimizer"], params, cfg["lr"], cfg["momentum"])
    return _Net(net, heads, pp, card, arch, opt, dev)


def _restore(run: _Run, built: _Net) -> None:
    """On resume: the committed epoch's weights, optimizer, history and best (files re-checked)."""
    if run.saved is None:
        return
    info, model_state, opt_state = run.saved
    try:  # weights and optimizer come from the same committed file: the same epoch
        built.net.load_state_dict(model_state, strict=True)
        built.opt.load_state_dict(opt_state)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{run.out}: the saved run does not fit this model ({exc})") from None
    fixed = reconcile_checkpoints(run.out, info, built.net)
    if fixed:
        run.echo(f"{run.out}: rewrote {' and '.join(fixed)} from the committed epoch {info.get('epoch')}")
    run.history = list(info.get("history", []))
    run.best = info.get("best")
    run.best_card = (info.get("cards") or {}).get("best")
    run.start = int(info.get("epoch", 0))
    if run.start >= run.cfg.epochs:
        run.echo(f"{run.out}: already trained {run.start} epoch(s); pass a larger epochs to continue")


def _train(run: _Run, ds: _Data, built: _Net, data: str | os.PathLike) -> None:
    """The epochs from ``run.start`` to ``epochs``: train, validate, commit, report."""
    cfg, out = run.settings, run.out
    ds_train = FolderDataset(ds.train, built.pp, augment=cfg["augment"], seed=cfg["seed"])
    dl_val = loader(FolderDataset(ds.val, built.pp, augment=False), cfg["batch_size"], num_workers=run.cfg.num_workers)
    size = cfg["image_size"]
    base_card = {
        "name": f"{built.arch['base'] or type(built.net).__name__}-finetuned",
        "architecture": built.arch,
        "class_names": ds.classes,
        "preprocess": built.pp.to_dict(),
        "image_size": [size, size],
        "layer": built.card.layer,
        "capture": built.card.capture,
    }
    run_info = {
        "classes": ds.classes,
        "config": cfg,
        "data": str(Path(data)),
        "counts": {"train": ds.train.counts(), "val": ds.val.counts()},
        "skipped": ds.skipped,
    }
    if run.saved is None:
        atomic_write_json(
            out / "config.json", {**run_info, "architecture": built.arch, "versions": versions()}, overwrite=True
        )
    else:  # an interruption after the commit may have left them one epoch behind
        write_state_summary(out, run.saved[0])
        write_metrics_files(out, run.history, run.best, run_info)
    for epoch in range(run.start, run.cfg.epochs):
        row = _one_epoch(run, built, ds_train, dl_val, epoch)
        _commit_epoch(run, built, {**base_card, "epoch": epoch + 1}, run_info, row)


def _one_epoch(run: _Run, built: _Net, ds_train: Any, dl_val: Any, epoch: int) -> dict[str, Any]:
    """Train one epoch (seeded order, no batch of one), validate; the metrics row."""
    cfg = run.settings
    t0 = time.perf_counter()
    torch.manual_seed(int(np.random.default_rng([cfg["seed"], epoch, 0xD0]).integers(2**62)))
    ds_train.epoch = epoch
    order = epoch_order(len(ds_train), cfg["seed"], epoch)
    if len(order) % cfg["batch_size"] == 1 and len(order) > 1:
        order = order[:-1]  # a batch of one breaks BatchNorm in training mode
    dl = loader(ds_train, cfg["batch_size"], order, run.cfg.num_workers)
    desc = f"epoch {epoch + 1}/{run.cfg.epochs}"
    row: dict[str, Any] = {"epoch": epoch + 1}
    row.update(
        _train_epoch(
            built.net,
            dl,
            built.opt,
            cfg["weight_decay"],
            built.device,
            built.heads,
            cfg["freeze_backbone"],
            desc,
            run.cfg.progress,
        )
    )
    row.update(evaluate(built.net, dl_val, built.device, progress=run.cfg.progress))
    row["seconds"] = time.perf_counter() - t0
    return row


def _commit_epoch(run: _Run, built: _Net, card: dict, run_info: dict, row: dict[str, Any]) -> None:
    """Update the best, write the checkpoints, commit the state (the epoch is done) and report it."""
    seconds = row.pop("seconds")
    improved = _better(row, run.best)
    if improved or run.best is None:  # (_better is True when there is no best yet)
        run.best = dict(row)
    best = run.best
    row.update(best_epoch=best["epoch"], best_val_acc=best["val_acc"], lr=run.settings["lr"], seconds=seconds)
    if improved:
        run.best = best = dict(row)
    run.history.append(row)
    epoch = row["epoch"]
    _check_finite(built.net, row, epoch)
    out = run.out
    ck = {**card, "metrics": row, "best": best}
    last_ck = prepare_checkpoint(built.net, out / "last", ck)
    best_ck = prepare_checkpoint(built.net, out / "best", ck) if improved else None
    if best_ck is not None:
        run.best_card = best_ck.card
        run.best_state = {k: v.detach().clone() for k, v in built.net.state_dict().items()}
    info = {**run_info, "epoch": epoch, "history": run.history, "best": best}
    info["cards"] = {"last": last_ck.card, "best": run.best_card}
    save_train_state(out, built.net, built.opt, info)  # the commit: this epoch is done
    if best_ck is not None:
        best_ck.write()
    last_ck.write()
    write_state_summary(out, info)
    write_metrics_files(out, run.history, best, run_info)
    run.echo(
        # the cross-entropies side by side (the train loss also holds the L2 term, which the
        # validation loss does not: printing their sum next to the val CE misleads)
        f"epoch {epoch}/{run.cfg.epochs}  train CE {row['train_ce']:.4f} + L2 "
        f"{row['train_loss'] - row['train_ce']:.4f}  val CE {row['val_loss']:.4f}  "
        f"val acc {row['val_acc']:.2%}  "
        f"best {best['val_acc']:.2%} (epoch {best['epoch']})  {row['seconds']:.1f}s"
    )


def _finish(run: _Run, ds: _Data, built: _Net) -> FinetuneResult:
    """The result is the best checkpoint, exactly as ``load_model(checkpoint=out)`` gives it."""
    out, best = run.out, run.best
    if best is None:
        raise CheckpointError(f"{out} holds no finished epoch to return; run at least one epoch (epochs >= 1)")
    best_state = run.best_state
    if best_state is None:  # the best epoch came before a resume
        best_state = read_state_dict(out / "best.safetensors")
    net = built.net
    net.load_state_dict(best_state)
    for p in net.parameters():
        p.requires_grad_(True)
    card_best = checkpoint_card(run.best_card or {}, out / "best.safetensors", out / "best.json")
    best_model = attach_card(net.eval(), card_best)
    files = {
        "config": out / "config.json",
        "best": out / "best.safetensors",
        "last": out / "last.safetensors",
        "metrics_csv": out / "metrics.csv",
        "metrics_json": out / "metrics.json",
        "curves": out / "curves.png",
    }
    cfg = run.cfg
    if cfg.grid:
        title = f"{card_best.name}: epoch {best['epoch']}, val acc {best['val_acc']:.1%} ({cfg.grid_method})"
        files["grid"], _ = validation_grid(
            best_model, ds.val, built.pp, out / "val_grid.png", cfg.grid_method, cfg.grid_size, title
        )
    return FinetuneResult(
        best_model, out, history=run.history, best=best, classes=ds.classes, skipped=ds.skipped, files=files
    )


def write_metrics_files(out: Path, history: list[dict], best: dict | None, run_info: dict) -> None:
    from camlens.train.report import plot_curves, write_metrics

    write_metrics(out, history, {"best": best, **run_info})
    plot_curves(history, out / "curves.png")


__all__ = ["FinetuneConfig", "FinetuneResult", "evaluate", "finetune", "prepare_model", "validation_grid"]
