"""Figures and tables written by :func:`camlens.train.finetune`: metrics CSV/JSON, the loss and
accuracy curves, and the validation grid (image, heat map, true / predicted label, probability).

Figures are drawn on :class:`matplotlib.figure.Figure` objects directly (no pyplot state).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from camlens.base.fsio import atomic_write, atomic_write_json
from camlens.viz import batch_grid

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
    atomic_write(csv_path, buf.getvalue(), overwrite=True)
    atomic_write_json(json_path, {"history": history, **extra}, overwrite=True)
    return csv_path, json_path


def _save(fig, path: Path, dpi: int = 100) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"), overwrite=True)
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


def save_grid(images, maps, true_labels, pred_labels, probs, path: Path, title: str | None = None) -> tuple[Path, str]:
    """Draw the validation grid (true / pred / prob titles) with :func:`camlens.viz.batch_grid` and save
    it. Returns ``(path, which)``."""
    fig = batch_grid(list(images), maps, list(true_labels), list(pred_labels), list(probs), title=title)
    return _save(fig, path), "camlens.viz.batch_grid"


__all__ = ["plot_curves", "save_grid", "write_metrics"]
