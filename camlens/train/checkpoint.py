"""The training state of a ``camlens finetune`` run: one file per epoch, the run's commit point.

Checkpoints themselves (``best``/``last``: safetensors + JSON card, checksums, validation) are read
and written by :mod:`camlens.models.weights`; loading one as a model is
:func:`camlens.models.zoo.load_checkpoint` (re-exported here).

``train_state.safetensors`` holds *everything* needed to resume after epoch ``e``: the model's state
dict (``model/…``), the optimizer's buffers (``optim/<param>/<name>``) and, in its metadata, the epoch,
the history, the best row, the run's configuration, the optimizer's other state and the sealed cards
of the ``last`` and ``best`` checkpoints of that epoch. It is one file written by one atomic rename,
so weights, optimizer state and cards always belong to the same epoch. Each epoch is committed in
this order:

1. ``train_state.safetensors`` — the commit: from here on epoch ``e`` is done;
2. ``best.safetensors`` + ``best.json`` when the epoch improved, then ``last.*``;
3. ``train_state.json`` (a readable summary, never read back), ``metrics.*``, ``curves.png``.

An interruption anywhere (SIGINT, SIGKILL, a full disk) leaves either the previous epoch's commit
(resume re-runs epoch ``e`` from exactly the state that started it) or this one's; on resume,
:func:`reconcile_checkpoints` rewrites ``last.*`` (and ``best.*`` when the best epoch is the committed
one) from the commit when they are missing or belong to another epoch, and refuses with a clear
message when an older ``best`` was damaged (its weights exist nowhere else).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from camlens.base.errors import CheckpointError
from camlens.base.fsio import atomic_write, atomic_write_json
from camlens.models.weights import (
    CARD_KEY,
    PreparedCheckpoint,
    read_card,
    read_checkpoint,
    read_state_dict,
    safetensors_bytes,
    save_checkpoint,
    tensors_digest,
    versions,
    with_metadata,
)
from camlens.models.zoo import build_model, checkpoint_card, load_checkpoint

STATE_FILE = "train_state.safetensors"
SUMMARY_FILE = "train_state.json"
STATE_KEY = "camlens_train_state"


def save_train_state(out: Path, net: nn.Module, optimizer: torch.optim.Optimizer, info: dict[str, Any]) -> str:
    """Write the epoch's commit (``train_state.safetensors``, one atomic rename); return its digest."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {f"model/{k}": v for k, v in net.state_dict().items()}
    meta: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim/{idx}/{key}"] = val
            else:
                meta.setdefault(str(idx), {})[key] = val
    data = safetensors_bytes(tensors)
    digest = tensors_digest(data)
    body = {**info, "optimizer": {"param_groups": sd["param_groups"], "state": meta}, "tensors_sha256": digest}
    data = with_metadata(data, {STATE_KEY: json.dumps(body)})
    atomic_write(Path(out) / STATE_FILE, data, overwrite=True)
    return digest


def write_state_summary(out: Path, info: dict[str, Any]) -> None:
    """``train_state.json``: what the commit holds, for people (resume reads the commit itself)."""
    keep = {k: v for k, v in info.items() if k != "cards"}
    atomic_write_json(Path(out) / SUMMARY_FILE, {**keep, "commit": STATE_FILE}, overwrite=True)


def load_train_state(out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """``(info, model state dict, optimizer state dict)`` of the last committed epoch."""
    path = Path(out) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{out} has no training state to resume ({STATE_FILE}); start a new run "
            "(pass overwrite=True / --overwrite to replace the folder)"
        )
    from safetensors import safe_open

    try:
        data = path.read_bytes()
        with safe_open(str(path), "pt") as f:
            body = json.loads((f.metadata() or {})[STATE_KEY])
        digest = tensors_digest(data)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot read the training state ({type(exc).__name__}: {exc}); it was truncated or "
            "modified. Start a new run (--overwrite)."
        ) from None
    if not isinstance(body, dict) or body.get("tensors_sha256") != digest:
        raise CheckpointError(f"{path}: its tensors do not match its own checksum (modified?); cannot resume")
    tensors = read_state_dict(path)
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}
    opt = body.pop("optimizer")
    state: dict[int, dict[str, Any]] = {}
    for idx, st in opt.get("state", {}).items():
        state.setdefault(int(idx), {}).update(st)
    for key, t in tensors.items():
        if key.startswith("optim/"):
            idx, _, name = key[6:].partition("/")
            state.setdefault(int(idx), {})[name] = t
    return body, model, {"state": state, "param_groups": opt["param_groups"]}


def _matches(out: Path, stem: str, card: dict[str, Any] | None) -> bool:
    """Whether ``out/stem.*`` is a valid checkpoint with exactly this sealed card."""
    if card is None or not (out / f"{stem}.safetensors").is_file() or not (out / f"{stem}.json").is_file():
        return False
    try:
        ck = read_checkpoint(out / stem)
    except CheckpointError:
        return False
    return ck.card.get("checksum") == card.get("checksum")


def reconcile_checkpoints(out: Path, info: dict[str, Any], net: nn.Module) -> list[str]:
    """Make ``last.*`` and ``best.*`` those of the committed epoch (``net`` holds its weights); return
    what was rewritten. Refuses when the best checkpoint of an earlier epoch is missing or damaged."""
    out = Path(out)
    cards = info.get("cards") or {}
    fixed = []

    def rewrite(stem: str, card: dict[str, Any]) -> None:
        data = with_metadata(safetensors_bytes(net.state_dict()), {CARD_KEY: json.dumps(card)})
        if tensors_digest(data) != card.get("weights_sha256"):
            raise CheckpointError(f"{out}: the committed {stem} card does not match the committed weights")
        PreparedCheckpoint(out / f"{stem}.safetensors", out / f"{stem}.json", data, card).write()
        fixed.append(stem)

    epoch = info.get("epoch")
    best = info.get("best") or {}
    best_card = cards.get("best")
    if best_card is not None and not _matches(out, "best", best_card):
        if best.get("epoch") == epoch:
            rewrite("best", best_card)
        else:
            raise CheckpointError(
                f"{out}: best.safetensors/best.json (epoch {best.get('epoch')}) are missing or do not match the "
                f"run's commit (epoch {epoch}): they were modified or deleted, and their weights exist nowhere "
                "else. Start a new run (--overwrite), or copy the folder and load last instead."
            )
    if cards.get("last") is not None and not _matches(out, "last", cards["last"]):
        rewrite("last", cards["last"])
    return fixed


__all__ = [
    "build_model",
    "checkpoint_card",
    "load_checkpoint",
    "load_train_state",
    "read_card",
    "read_checkpoint",
    "read_state_dict",
    "reconcile_checkpoints",
    "save_checkpoint",
    "save_train_state",
    "versions",
    "write_state_summary",
]
