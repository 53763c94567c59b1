"""Figures and tables written by :func:`camlens.train.finetune`: metrics CSV/JSON, the loss and
accuracy curves, and the validation grid (image, heat map, true / predicted label, probability).

Figures are drawn on :class:`matplotlib.figure.Figure` objects directly (no pyplot state).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..ops import minmax
from .checkpoint import atomic_write_bytes, atomic_write_json

COLUMNS = (
    "epoch",
    "train_loss",
    "train_ce",
    "train_acc",
    "val_loss",
    "val_acc",
    "best_epoch",
    "best_val_acc",
    "lr",
    "seconds",
)


def write_metrics(out: Path, history: list[dict], extra: dict) -> tuple[Path, Path]:
    """``metrics.csv`` (one row per epoch) and ``metrics.json`` (rows + ``extra``)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    csv_path, json_path = out / "metrics.csv", out / "metrics.json"
    atomic_write_bytes(csv_path, buf.getvalue().encode())
    atomic_write_json(json_path, {"history": history, **extra})
    return csv_path, json_path


def _save(fig, path: Path, dpi: int = 100) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_curves(history: list[dict], path: Path) -> Path:
    """Loss (train objective, train CE, validation CE) and accuracy (train, validation) per epoch."""
    from matplotlib.figure import Figure

    ep = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(ep, [r["train_loss"] for r in history], "o-", label="train loss (CE + L2)")
    ax1.plot(ep, [r["train_ce"] for r in history], "o--", label="train cross-entropy")
    ax1.plot(ep, [r["val_loss"] for r in history], "s-", label="validation cross-entropy")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(ep, [r["train_acc"] for r in history], "o-", label="train (augmented)")
    ax2.plot(ep, [r["val_acc"] for r in history], "s-", label="validation")
    ax2.set_ylim(0, 1.02)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.set_xticks(ep)
    return _save(fig, path)


def _minmax(m: np.ndarray) -> np.ndarray:
    """:func:`camlens.ops.minmax` of one map (its dtype's rounding decides what is constant)."""
    return minmax(torch.from_numpy(np.ascontiguousarray(m))).numpy()


def fallback_batch_grid(
    images: Sequence[np.ndarray],
    maps: np.ndarray,
    true_labels: Sequence[str],
    pred_labels: Sequence[str],
    probs: Sequence[float],
    *,
    cols: int = 4,
    alpha: float = 0.45,
    cmap: str = "jet",
    title: str | None = None,
):
    """A grid of overlays titled "true / predicted (probability)" (green if right, red if wrong).

    Used when :func:`camlens.viz.batch_grid` is not available.
    """
    from matplotlib.figure import Figure

    n = len(images)
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(3 * cols, 3.3 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for i in range(n):
        ax = axes[i]
        ax.imshow(images[i])
        ax.imshow(
            _minmax(np.asarray(maps[i], dtype=np.float32)),
            cmap=cmap,
            alpha=alpha,
            extent=(-0.5, images[i].shape[1] - 0.5, images[i].shape[0] - 0.5, -0.5),
        )
        ok = true_labels[i] == pred_labels[i]
        ax.set_title(
            f"true: {true_labels[i]}\npred: {pred_labels[i]} ({float(probs[i]):.2f})",
            fontsize=9,
            color="green" if ok else "red",
        )
    if title:
        fig.suptitle(title)
    return fig


def save_grid(images, maps, true_labels, pred_labels, probs, path: Path, title: str | None = None) -> tuple[Path, str]:
    """Draw the validation grid with ``camlens.viz.batch_grid`` if it exists, else the fallback.
    Returns ``(path, which)``."""
    which = "fallback"
    fig = None
    try:
        from ..viz import batch_grid  # written by another part of camlens
    except ImportError:
        batch_grid = None
    if batch_grid is not None:
        try:
            fig = batch_grid(list(images), maps, list(true_labels), list(pred_labels), list(probs), title=title)
            which = "camlens.viz.batch_grid"
        except TypeError:
            fig = None
    if fig is None or not hasattr(fig, "savefig"):
        fig = fallback_batch_grid(images, maps, true_labels, pred_labels, probs, title=title)
        which = "fallback"
    return _save(fig, path), which


__all__ = ["fallback_batch_grid", "plot_curves", "save_grid", "write_metrics"]
