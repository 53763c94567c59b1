"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint ``best`` in a ``camlens finetune`` output folder is two files:

* ``best.safetensors`` — the model's state dict; its safetensors metadata also holds the card
  (key ``camlens_card``), so the file alone is enough to rebuild the model;
* ``best.json`` — the card: architecture, class names (ImageFolder order), preprocessing,
  image size, target layer, metrics, library versions, and the SHA-256 of the weights file.
  When the card is present, the weights' hash is checked before loading: a modified
  (tampered) or truncated file gives a :class:`~camlens.errors.CheckpointError`.

User ``.pth`` state dicts are read with ``torch.load(weights_only=True)`` (no code is
unpickled). Training state for ``--resume`` (optimizer buffers) is kept the same way in
``train_state.safetensors`` + ``train_state.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, WeightsNotFoundError

CARD_KEY = "camlens_card"
FORMAT = "camlens-checkpoint"
FORMAT_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


# ---------------------------------------------------------------------------------------------- files
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file + rename (never a half-written file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    import numpy
    import safetensors
    import torchvision

    from .. import __version__

    return {
        "camlens": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc}). The file is truncated, "
        "tampered with or not a checkpoint; camlens reads only safetensors files and weights-only .pth "
        "files. Use another checkpoint (e.g. last instead of best) or fine-tune again."
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pth`` (``torch.load(weights_only=True)``).

    Unwraps ``{"state_dict": …}`` / ``{"model": …}`` containers and DataParallel ``module.``
    prefixes. Raises :class:`CheckpointError` for unreadable files.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _unreadable(path, exc) from None
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict (names -> tensors), found {type(state).__name__}")
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def _tensors_for_saving(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, seen = {}, set()
    for k, v in state.items():
        t = v.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if key in seen:  # safetensors refuses shared storage
            t = t.clone()
        seen.add(key)
        out[k] = t
    return out


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write tensors atomically; return the SHA-256 of the written file."""
    from safetensors.torch import save

    data = save(_tensors_for_saving(tensors), metadata=metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------- save
def save_checkpoint(model: nn.Module, stem: str | os.PathLike, card: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``stem.safetensors`` (state dict, card in its metadata) and ``stem.json`` (card + hash)."""
    stem = Path(stem)
    weights = stem.with_name(stem.name + ".safetensors")
    card = {"format": FORMAT, "format_version": FORMAT_VERSION, **card, "weights_file": weights.name}
    card.setdefault("versions", versions())
    digest = write_safetensors(weights, model.state_dict(), {CARD_KEY: json.dumps(card)})
    path = stem.with_name(stem.name + ".json")
    atomic_write_json(path, {**card, "sha256": digest})
    return weights, path


# ---------------------------------------------------------------------------------------------- load
def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """``path`` (an output folder, ``DIR/best``, a ``.json`` card or a weights file) ->
    ``(weights file, card file or None)``."""
    p = Path(path)
    if p.is_dir():
        for stem in ("best", "last"):
            if (p / f"{stem}.safetensors").is_file():
                return resolve_checkpoint(p / f"{stem}.safetensors")
        raise CheckpointError(
            f"{p} holds no best.safetensors or last.safetensors; pass a camlens finetune "
            "output folder or a checkpoint file"
        )
    if p.suffix == ".json":
        if not p.is_file():
            raise CheckpointError(f"checkpoint card not found: {p}")
        card = _read_json(p)
        return p.with_name(str(card.get("weights_file") or p.stem + ".safetensors")), p
    if p.suffix not in WEIGHT_SUFFIXES:  # DIR/best -> DIR/best.safetensors
        for suffix in WEIGHT_SUFFIXES:
            cand = p.with_name(p.name + suffix)
            if cand.is_file():
                return resolve_checkpoint(cand)
        raise CheckpointError(
            f"checkpoint not found: {p} (nor {p.name}.safetensors); pass a camlens "
            "finetune output folder, DIR/best, or a .safetensors/.pth file"
        )
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    card = p.with_suffix(".json")
    return p, card if card.is_file() else None


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: the checkpoint card is not valid JSON ({exc}); it was truncated or "
            "edited by hand. Restore it or fine-tune again."
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: the checkpoint card must be a JSON object")
    return obj


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """The card of a checkpoint (from its ``.json``, else from the safetensors metadata)."""
    weights, card_path = resolve_checkpoint(path)
    if card_path is not None:
        return _read_json(card_path)
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(weights), "pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:
            raise _unreadable(weights, exc) from None
        if CARD_KEY in meta:
            try:
                return json.loads(meta[CARD_KEY])
            except ValueError:
                raise CheckpointError(f"{weights}: its embedded card is not valid JSON (tampered?)") from None
    raise CheckpointError(
        f"{weights} has no camlens card (no {weights.stem}.json beside it, no card in the file), so its "
        "architecture is unknown. Load a plain state dict with camlens.load_model(NAME, weights=PATH)."
    )


def build_model(arch: dict[str, Any], model: nn.Module | None = None) -> nn.Module:
    """An untrained network of the checkpoint's architecture (weights are loaded afterwards).

    ``arch``: ``{"base": zoo name or None, "head": "cam_ready" | "replace" | "keep",
    "num_classes": C, "cam": {...}}``. For a custom base network pass ``model`` (an instance of
    the same class; it is not modified).
    """
    import copy

    from ..models.cam_ready import cam_ready
    from ..models.zoo import available_models, load_model

    try:
        head = arch["head"]
        num_classes = int(arch["num_classes"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"the checkpoint card's architecture is incomplete: {arch!r}") from None
    with torch.random.fork_rng(devices=[]):  # random initializations must not consume the caller's RNG
        if model is None:
            base = arch.get("base")
            if not base or base.lower() not in available_models():
                raise CheckpointError(
                    f"the checkpoint was trained from a custom network ({arch.get('base_class') or base}); "
                    "camlens cannot rebuild it from JSON. Pass an instance: "
                    "camlens.train.load_checkpoint(PATH, model=MyNet())"
                )
            net = load_model(base, weights="random")
        else:
            net = copy.deepcopy(model)
        if head == "cam_ready":
            cam = arch.get("cam") or {}
            net = cam_ready(net, num_classes, check=False, **cam)
        elif head == "replace":
            from .loop import replace_head

            replace_head(net, num_classes)
        elif head != "keep":
            raise CheckpointError(f"unknown head transformation {head!r} in the checkpoint card")
    return net


def model_card(card: dict[str, Any], weights: Path, card_path: Path | None = None):
    """The :class:`~camlens.models.zoo.ModelCard` described by a checkpoint card."""
    from ..models.preprocess import Preprocess
    from ..models.zoo import ModelCard

    try:
        pp = Preprocess.from_dict(card["preprocess"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{card_path or weights}: bad preprocessing in the card ({exc})") from None
    names = card.get("class_names")
    arch = card.get("architecture") or {}
    return ModelCard(
        name=str(card.get("name") or arch.get("base") or "finetuned"),
        preprocess=pp,
        class_names=list(names) if names else None,
        layer=card.get("layer"),
        capture=card.get("capture") or "output",
        extra={
            "checkpoint": str(weights),
            "architecture": arch,
            "image_size": card.get("image_size"),
            "metrics": card.get("metrics"),
            "epoch": card.get("epoch"),
            "head": arch.get("head_modules"),
            "cam_ready": arch.get("head") == "cam_ready",
        },
    )


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Load a ``camlens finetune`` checkpoint as a ready-to-explain model (eval mode).

    Args:
        path: the output folder (its ``best`` checkpoint), ``DIR/best`` or ``DIR/last``, a
            ``.json`` card, or a ``.safetensors`` / ``.pth`` weights file with its card.
        model: for checkpoints of a custom network, an instance of the base network.
        device: where to put the model.

    Returns:
        The network with ``model.camlens`` (class names in ImageFolder order, preprocessing at the
        training image size, the target layer, and ``extra["metrics"]``).
    """
    from ..models.zoo import attach_card

    weights, card_path = resolve_checkpoint(path)
    card = read_card(weights if card_path is None else card_path)
    if card.get("format") != FORMAT:
        raise CheckpointError(f"{card_path or weights}: not a camlens checkpoint card (format={card.get('format')!r})")
    if not weights.is_file():
        raise CheckpointError(f"{weights}: the weights file named by the card is missing")
    expected = card.get("sha256") if card_path is not None else None
    if expected and sha256_file(weights) != expected:
        raise CheckpointError(
            f"{weights}: the file's SHA-256 does not match its card {card_path.name}: it was modified, "
            "truncated or tampered with after training. Use another checkpoint or fine-tune again."
        )
    state = read_state_dict(weights)
    net = build_model(card.get("architecture") or {}, model)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights}: the weights do not fit the architecture in its card:\n{exc}") from None
    attach_card(net, model_card(card, weights, card_path))
    net.eval()
    if device is not None:
        net.to(device)
    return net


# ---------------------------------------------------------------------------------------------- train state
def save_train_state(out: Path, optimizer: torch.optim.Optimizer, info: dict[str, Any]) -> None:
    """Optimizer buffers -> ``train_state.safetensors``; the rest -> ``train_state.json``."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{idx}/{key}"] = val
            else:
                meta.setdefault(str(idx), {})[key] = val
    digest = write_safetensors(out / "train_state.safetensors", tensors)
    atomic_write_json(
        out / "train_state.json",
        {**info, "optimizer": {"param_groups": sd["param_groups"], "state": meta}, "tensors_sha256": digest},
    )


def load_train_state(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(info, optimizer state dict)`` saved by :func:`save_train_state`."""
    jpath, tpath = out / "train_state.json", out / "train_state.safetensors"
    if not jpath.is_file() or not tpath.is_file():
        raise CheckpointError(
            f"{out} has no training state to resume (train_state.json/.safetensors); "
            "start a new run (pass overwrite=True / --overwrite to replace the folder)"
        )
    info = _read_json(jpath)
    if info.get("tensors_sha256") and sha256_file(tpath) != info["tensors_sha256"]:
        raise CheckpointError(f"{tpath}: does not match train_state.json (modified or truncated); cannot resume")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(tpath))
    except Exception as exc:
        raise _unreadable(tpath, exc) from None
    opt = info.pop("optimizer")
    state: dict[int, dict[str, Any]] = {}
    for idx, st in opt.get("state", {}).items():
        state.setdefault(int(idx), {}).update(st)
    for key, t in tensors.items():
        idx, _, name = key.partition("/")
        state.setdefault(int(idx), {})[name] = t
    return info, {"state": state, "param_groups": opt["param_groups"]}


__all__ = [
    "build_model",
    "load_checkpoint",
    "load_train_state",
    "read_card",
    "read_state_dict",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_train_state",
]
