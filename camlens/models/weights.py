"""Reading and writing weights and checkpoints, in one place: no pickle, every file verified.

**Weights.** State dicts are read from ``.safetensors`` files or from ``.pth``/``.pt``/``.bin`` files
with ``torch.load(weights_only=True)`` (no code is ever unpickled); ``{"state_dict": …}`` /
``{"model": …}`` containers and DataParallel ``module.`` prefixes are unwrapped. Writes go through
:mod:`camlens.base.fsio` (temporary file + atomic rename, never through a symbolic link).

**Checkpoints.** A checkpoint ``STEM`` (``best`` or ``last`` in a ``camlens finetune`` folder) is

* ``STEM.safetensors`` — the state dict, with the *card* in its safetensors metadata (key
  ``camlens_card``), so the file alone rebuilds the model;
* ``STEM.json`` — the same card, readable.

The card (format ``camlens-checkpoint`` version 2) holds the architecture, class names, preprocessing,
image size, target layer, epoch, metrics and library versions, plus two digests:

* ``weights_sha256`` — SHA-256 over the tensors (the safetensors header's names, dtypes, shapes and
  offsets, canonical JSON without the metadata, then the data bytes): the weights' identity;
* ``checksum`` — SHA-256 over the card's canonical JSON (sorted keys, every field but ``checksum``,
  ``weights_sha256`` included), so **card + weights are covered together**: editing either is detected.

Before anything is built, :func:`validate_card` checks every field against a schema with bounds and
against the shapes of the weights themselves (``num_classes`` must be the head's output count, the
CAM convolution's channels its weight's, sizes within [8, 8192], ``std > 0``…): a tampered or broken
card gives :class:`~camlens.base.errors.CheckpointError` naming the field, never an allocation of
petabytes or a raw ``TypeError``. Cards of format version 1 (camlens 0.1: a SHA-256 of the weights
file only) are still read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from camlens._version import versions
from camlens.base.errors import CheckpointError, WeightsNotFoundError
from camlens.base.fsio import atomic_write, atomic_write_json

CARD_KEY = "camlens_card"
FORMAT = "camlens-checkpoint"
FORMAT_VERSION = 2
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
HEADS = ("cam_ready", "replace", "keep")
CAPTURES = ("output", "input", "pool")
#: bounds a card must respect (anything else is a broken or tampered card)
MAX_CLASSES = 1_000_000
MAX_CHANNELS = 65_536
SIZE_RANGE = (8, 8192)


# ---------------------------------------------------------------------------------------------- reading weights
def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path}: cannot read the weights ({type(exc).__name__}: {exc}). The file is truncated, "
        "tampered with or not a weights file; camlens reads only safetensors files and weights-only .pth "
        "files. Use another checkpoint (e.g. last instead of best), fine-tune again or re-download it."
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pth`` (``torch.load(weights_only=True)``).

    Unwraps ``{"state_dict": …}`` / ``{"model": …}`` / ``{"model_state_dict": …}`` containers and
    DataParallel ``module.`` prefixes. Raises :class:`WeightsNotFoundError` for a missing file and
    :class:`CheckpointError` for an unreadable one or one that is not names -> tensors.
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


def load_weights_file(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load the state dict in ``path`` (see :func:`read_state_dict`) into ``model``; a mismatch of
    names or shapes is a :class:`CheckpointError`. Returns ``model``."""
    state = read_state_dict(path)
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the weights do not fit this architecture:\n{exc}") from None
    return model


# ---------------------------------------------------------------------------------------------- writing weights
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


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors serialization of ``tensors`` (moved to the CPU, shared storage cloned)."""
    from safetensors.torch import save

    return save(_tensors_for_saving(tensors), metadata=metadata)


def with_metadata(data: bytes, metadata: dict[str, str]) -> bytes:
    """The safetensors file ``data`` with its ``__metadata__`` replaced by ``metadata`` (the tensors'
    bytes are reused: offsets are relative to the data section, so only the header changes)."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(metadata)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def tensors_digest(data: bytes | memoryview) -> str:
    """SHA-256 of a safetensors file's tensors: the header without ``__metadata__`` (canonical JSON:
    names, dtypes, shapes, offsets), then the data bytes. Independent of the metadata (the card)."""
    view = memoryview(data)
    if len(view) < 8:
        raise ValueError("too short for a safetensors file")
    (n,) = struct.unpack("<Q", view[:8])
    if n > len(view) - 8:
        raise ValueError("header longer than the file")
    header = json.loads(bytes(view[8 : 8 + n]))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    h = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    h.update(view[8 + n :])
    return h.hexdigest()


def write_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    overwrite: bool = True,
) -> str:
    """Write tensors atomically (:func:`camlens.base.fsio.atomic_write`); return :func:`tensors_digest`."""
    data = safetensors_bytes(tensors, metadata)
    atomic_write(path, data, overwrite=overwrite)
    return tensors_digest(data)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- cards
def card_checksum(card: dict[str, Any]) -> str:
    """SHA-256 of the card's canonical JSON, every field but ``checksum`` (so ``weights_sha256``,
    hence the weights, are covered too)."""
    body = {k: v for k, v in card.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def seal_card(card: dict[str, Any], weights_sha256: str) -> dict[str, Any]:
    """``card`` with its format, ``weights_sha256`` and ``checksum`` set."""
    sealed = {"format": FORMAT, "format_version": FORMAT_VERSION, **card, "weights_sha256": weights_sha256}
    sealed.pop("sha256", None)
    sealed.pop("checksum", None)
    sealed["checksum"] = card_checksum(sealed)
    return sealed


def checkpoint_files(stem: str | os.PathLike) -> tuple[Path, Path]:
    """``(STEM.safetensors, STEM.json)``."""
    stem = Path(stem)
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


@dataclass
class PreparedCheckpoint:
    """A checkpoint serialized in memory, not yet written: ``data`` (the safetensors bytes with the
    sealed card embedded) and ``card`` (sealed), for ``weights`` and ``card_path``."""

    weights: Path
    card_path: Path
    data: bytes
    card: dict[str, Any]

    def write(self, overwrite: bool = True) -> tuple[Path, Path]:
        """Write the weights, then the card (each atomically)."""
        atomic_write(self.weights, self.data, overwrite=overwrite)
        atomic_write_json(self.card_path, self.card, overwrite=overwrite)
        return self.weights, self.card_path


def prepare_checkpoint(
    model: nn.Module | dict[str, torch.Tensor], stem: str | os.PathLike, card: dict[str, Any]
) -> PreparedCheckpoint:
    """Serialize a checkpoint ``STEM`` in memory: the card sealed with the weights' digest and its
    checksum, embedded in the safetensors metadata."""
    weights, path = checkpoint_files(stem)
    state = model.state_dict() if isinstance(model, nn.Module) else model
    card = {**card, "weights_file": weights.name}
    card.setdefault("versions", versions())
    data = safetensors_bytes(state)  # the digest is of the tensors only: compute it, then embed the card
    sealed = seal_card(card, tensors_digest(data))
    return PreparedCheckpoint(weights, path, with_metadata(data, {CARD_KEY: json.dumps(sealed)}), sealed)


def save_checkpoint(
    model: nn.Module | dict[str, torch.Tensor],
    stem: str | os.PathLike,
    card: dict[str, Any],
    overwrite: bool = True,
) -> tuple[Path, Path]:
    """Write ``STEM.safetensors`` (state dict, sealed card in its metadata) then ``STEM.json`` (the
    same card). Each file is atomic; :func:`read_checkpoint` detects a pair from two different saves
    (the two cards differ) and any edit of either file (the checksums)."""
    return prepare_checkpoint(model, stem, card).write(overwrite)


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
        name = card.get("weights_file")
        if name is not None and (not isinstance(name, str) or Path(name).name != name or not name):
            raise CheckpointError(f"{p}: the card field weights_file must be a file name beside the card, not {name!r}")
        return p.with_name(name or p.stem + ".safetensors"), p
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
    card_path = p.with_suffix(".json")
    return p, card_path if card_path.is_file() else None


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: the checkpoint card is not valid JSON ({exc}); it was truncated or "
            "edited by hand. Restore it or fine-tune again."
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: the checkpoint card must be a JSON object")
    return obj


def embedded_card(weights: Path) -> dict[str, Any] | None:
    """The card in a safetensors file's metadata, or ``None``."""
    if weights.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise _unreadable(weights, exc) from None
    if CARD_KEY not in meta:
        return None
    try:
        card = json.loads(meta[CARD_KEY])
    except ValueError:
        raise CheckpointError(f"{weights}: its embedded card is not valid JSON (tampered?)") from None
    if not isinstance(card, dict):
        raise CheckpointError(f"{weights}: its embedded card is not a JSON object (tampered?)")
    return card


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """The card of a checkpoint (from its ``.json``, else from the safetensors metadata), unverified."""
    weights, card_path = resolve_checkpoint(path)
    if card_path is not None:
        return _read_json(card_path)
    card = embedded_card(weights)
    if card is not None:
        return card
    raise CheckpointError(
        f"{weights} has no camlens card (no {weights.stem}.json beside it, no card in the file), so its "
        "architecture is unknown. Load a plain state dict with camlens.load_model(NAME, weights=PATH)."
    )


# ---------------------------------------------------------------------------------------------- validation
def _bad(where: str, field: str, why: str) -> CheckpointError:
    return CheckpointError(
        f"{where}: the checkpoint card field {field} {why}. The card was edited, corrupted or written by "
        "another program; restore it from the run or fine-tune again."
    )


def _int(where: str, field: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(where, field, f"must be an integer, not {v!r}")
    if not lo <= v <= hi:
        raise _bad(where, field, f"must be in [{lo}, {hi}], not {v}")
    return v


def _num(where: str, field: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(where, field, f"must be a finite number, not {v!r}")
    return float(v)


def _str_or_none(where: str, field: str, v: Any) -> None:
    if v is not None and not isinstance(v, str):
        raise _bad(where, field, f"must be a string or null, not {v!r}")


def _size(where: str, field: str, v: Any) -> None:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise _bad(where, field, f"must be [height, width], not {v!r}")
    for i, s in enumerate(v):
        _int(where, f"{field}[{i}]", s, *SIZE_RANGE)


def validate_card(
    card: Any, state: dict[str, torch.Tensor] | None = None, where: str | os.PathLike = "checkpoint"
) -> dict[str, Any]:
    """Check every field of a checkpoint card against the schema and its bounds, and (with ``state``)
    against the weights' own shapes, before anything is built. Returns the card; raises
    :class:`CheckpointError` naming the first bad field."""
    w = str(where)
    if not isinstance(card, dict):
        raise CheckpointError(f"{w}: the checkpoint card must be a JSON object, not {type(card).__name__}")
    if card.get("format") != FORMAT:
        raise _bad(w, "format", f"must be {FORMAT!r} (not a camlens checkpoint card: {card.get('format')!r})")
    if card.get("format_version") not in (None, 1, FORMAT_VERSION):
        raise _bad(w, "format_version", f"is {card.get('format_version')!r}; this camlens reads 1 and {FORMAT_VERSION}")
    arch = card.get("architecture")
    if not isinstance(arch, dict):
        raise _bad(w, "architecture", f"must be an object, not {arch!r}")
    _str_or_none(w, "architecture.base", arch.get("base"))
    _str_or_none(w, "architecture.base_class", arch.get("base_class"))
    if arch.get("head") not in HEADS:
        raise _bad(w, "architecture.head", f"must be one of {', '.join(HEADS)}, not {arch.get('head')!r}")
    C = _int(w, "architecture.num_classes", arch.get("num_classes"), 1, MAX_CLASSES)
    heads = arch.get("head_modules")
    if heads is not None and (not isinstance(heads, list) or not all(isinstance(h, str) for h in heads)):
        raise _bad(w, "architecture.head_modules", f"must be a list of module names, not {heads!r}")
    cam = arch.get("cam")
    if cam is not None:
        if not isinstance(cam, dict) or set(cam) - {"channels", "groups"}:
            raise _bad(w, "architecture.cam", f"must be {{channels, groups}}, not {cam!r}")
        ch = _int(w, "architecture.cam.channels", cam.get("channels", 1024), 1, MAX_CHANNELS)
        g = _int(w, "architecture.cam.groups", cam.get("groups", 2), 1, MAX_CHANNELS)
        if ch % g:
            raise _bad(w, "architecture.cam.groups", f"({g}) must divide the channels ({ch})")
    names = card.get("class_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _bad(w, "class_names", f"must be a list of strings, not {names!r:.80}")
        if len(names) != C:
            raise _bad(w, "class_names", f"has {len(names)} names for architecture.num_classes={C}")
    pp = card.get("preprocess")
    if not isinstance(pp, dict):
        raise _bad(w, "preprocess", f"must be an object, not {pp!r}")
    known = {"size", "mean", "std", "scale", "channel_order", "resize", "name"}
    if set(pp) - known:
        raise _bad(w, "preprocess", f"has unknown keys {sorted(set(pp) - known)}")
    if "size" in pp:
        _size(w, "preprocess.size", pp["size"])
    for key in ("mean", "std"):
        if key in pp:
            v = pp[key]
            if not isinstance(v, (list, tuple)) or len(v) != 3:
                raise _bad(w, f"preprocess.{key}", f"must be 3 numbers, not {v!r}")
            vals = [_num(w, f"preprocess.{key}[{i}]", x) for i, x in enumerate(v)]
            if key == "std" and not all(x > 0 for x in vals):
                raise _bad(w, "preprocess.std", f"must be > 0 (it divides the input), not {v!r}")
    if "scale" in pp and not _num(w, "preprocess.scale", pp["scale"]) > 0:
        raise _bad(w, "preprocess.scale", f"must be > 0, not {pp['scale']!r}")
    if pp.get("channel_order", "RGB") not in ("RGB", "BGR"):
        raise _bad(w, "preprocess.channel_order", f"must be RGB or BGR, not {pp['channel_order']!r}")
    if pp.get("resize", "stretch") not in ("stretch", "center_crop"):
        raise _bad(w, "preprocess.resize", f"must be stretch or center_crop, not {pp['resize']!r}")
    _str_or_none(w, "preprocess.name", pp.get("name"))
    if card.get("image_size") is not None:
        _size(w, "image_size", card["image_size"])
    _str_or_none(w, "layer", card.get("layer"))
    if card.get("capture") is not None and card["capture"] not in CAPTURES:
        raise _bad(w, "capture", f"must be one of {', '.join(CAPTURES)}, not {card['capture']!r}")
    _str_or_none(w, "name", card.get("name"))
    if card.get("epoch") is not None:
        _int(w, "epoch", card["epoch"], 0, 10**9)
    for key in ("metrics", "best", "versions"):
        if card.get(key) is not None and not isinstance(card[key], dict):
            raise _bad(w, key, f"must be an object, not {card[key]!r:.80}")
    if state is not None:
        _check_shapes(w, arch, C, state)
    return card


def _check_shapes(w: str, arch: dict, C: int, state: dict[str, torch.Tensor]) -> None:
    """The card's sizes must be the weights' own: the head's outputs, the CAM convolution's channels."""
    heads = arch.get("head_modules") or []
    outs = [state[f"{h}.weight"] for h in heads if isinstance(state.get(f"{h}.weight"), torch.Tensor)]
    lin = [t for t in outs if t.dim() == 2]
    if heads and not lin:
        raise _bad(w, "architecture.head_modules", f"names {heads}, but the weights hold no such linear layer")
    if lin and lin[-1].shape[0] != C:
        raise _bad(w, "architecture.num_classes", f"is {C} but the head's weights have {lin[-1].shape[0]} outputs")
    cam = arch.get("cam")
    conv = state.get("cam_conv.weight")
    if arch.get("head") == "cam_ready" and cam is not None and isinstance(conv, torch.Tensor):
        ch, g = cam.get("channels", 1024), cam.get("groups", 2)
        if conv.dim() != 4 or conv.shape[0] != ch:
            raise _bad(w, "architecture.cam.channels", f"is {ch} but cam_conv has {tuple(conv.shape)}")
        if "features.28.weight" in state and conv.shape[1] * g != state["features.28.weight"].shape[0]:
            raise _bad(w, "architecture.cam.groups", f"({g}) does not fit cam_conv {tuple(conv.shape)}")


# ---------------------------------------------------------------------------------------------- verified reading
@dataclass
class Checkpoint:
    """A verified checkpoint: its card (validated), its state dict, and where they came from."""

    card: dict[str, Any]
    state: dict[str, torch.Tensor]
    weights: Path
    card_path: Path | None


def _verify_digests(card: dict[str, Any], data: bytes, weights: Path, where: str) -> None:
    if card.get("format_version", 1) == 1:  # camlens 0.1: the SHA-256 of the weights file only
        if card.get("sha256") and hashlib.sha256(data).hexdigest() != card["sha256"]:
            raise CheckpointError(
                f"{weights}: the file's SHA-256 does not match its card: it was modified, truncated or "
                "tampered with after training. Use another checkpoint or fine-tune again."
            )
        return
    if card.get("checksum") != card_checksum(card):
        raise CheckpointError(
            f"{where}: the card's checksum does not match its content: the card was edited or corrupted "
            "after training. Restore it (the same card is embedded in the .safetensors file) or fine-tune again."
        )
    try:
        digest = tensors_digest(data) if weights.suffix == ".safetensors" else hashlib.sha256(data).hexdigest()
    except ValueError as exc:
        raise _unreadable(weights, exc) from None
    if digest != card.get("weights_sha256"):
        raise CheckpointError(
            f"{weights}: the weights do not match the checksum of their card {Path(where).name}: the file "
            "was modified, truncated or replaced after training. Use another checkpoint or fine-tune again."
        )


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Resolve, read and verify a checkpoint: the card validated against its schema and against the
    weights' shapes, card + weights against the card's checksums, the ``.json`` card against the one
    embedded in the weights. Nothing is built."""
    weights, card_path = resolve_checkpoint(path)
    card = _read_json(card_path) if card_path is not None else read_card(weights)
    where = str(card_path or weights)
    if card.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a camlens checkpoint card (format={card.get('format')!r})")
    validate_card(card, None, where)  # the schema and its bounds first: each bad field is named
    if not weights.is_file():
        raise CheckpointError(f"{weights}: the weights file named by the card is missing")
    try:
        data = weights.read_bytes()
    except OSError as exc:
        raise _unreadable(weights, exc) from None
    _verify_digests(card, data, weights, where)
    inner = embedded_card(weights)
    if card_path is not None and inner is not None and inner != card:
        raise CheckpointError(
            f"{card_path} and the card embedded in {weights.name} differ: they come from two different "
            "saves (an interrupted write?) or one was edited. Use the other checkpoint or fine-tune again."
        )
    state = read_state_dict(weights)
    validate_card(card, state, where)  # the card's sizes are the weights' own: nothing huge is built
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(
            f"{weights}: the weights hold NaN/Inf values ({', '.join(bad[:4])}{' …' if len(bad) > 4 else ''}): "
            "the training diverged before this checkpoint was saved. Use an earlier checkpoint or fine-tune "
            "again with a lower learning rate."
        )
    return Checkpoint(card, state, weights, card_path)


__all__ = [
    "CARD_KEY",
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "PreparedCheckpoint",
    "card_checksum",
    "checkpoint_files",
    "embedded_card",
    "load_weights_file",
    "prepare_checkpoint",
    "read_card",
    "read_checkpoint",
    "read_state_dict",
    "resolve_checkpoint",
    "safetensors_bytes",
    "save_checkpoint",
    "seal_card",
    "sha256_file",
    "tensors_digest",
    "validate_card",
    "versions",
    "with_metadata",
    "write_safetensors",
]
