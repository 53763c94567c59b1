"""Inputs and options shared by the commands that stream a dataset (``explain``, ``localize``):
files, folders, globs, ImageFolder trees and list files (CSV / COCO / VOC / TXT) -> records;
``--workers``, ``--figures``; and the ``torchrun`` context."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from camlens.cli.common import _is_glob, cap_workers, expand_inputs


@dataclass
class DatasetInputs:
    """``records`` to run, ``problems`` (inputs that named nothing) and ``dataset``: whether any
    input was a folder, glob or list (a dataset run: the store by default, no figures)."""

    records: list = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    dataset: bool = False

    def __len__(self) -> int:
        return len(self.records)


def collect(items: Sequence[str], *, recursive: bool = False) -> DatasetInputs:
    """Every CLI input -> records, in the order given, duplicates dropped; names as the loose-file
    outputs have always been named (file stem, parent folder prefixed on clashes)."""
    from camlens.base.errors import CamlensError
    from camlens.pipeline.sources import (
        image_folder_records,
        is_image_folder_tree,
        is_list_file,
        read_list,
        records_for,
    )

    out = DatasetInputs()
    pairs: list[tuple[str, str | None]] = []
    if not items:
        inp = expand_inputs([])
        pairs = [(s, None) for s in inp.sources]
    for item in items:
        p = Path(item)
        if is_list_file(p):
            out.dataset = True
            try:
                got, _ = read_list(p)
            except CamlensError as exc:
                out.problems.append(str(exc))
                continue
            pairs += got
        elif p.is_dir() and is_image_folder_tree(p):
            out.dataset = True
            pairs += image_folder_records(p)
        else:
            out.dataset = out.dataset or p.is_dir() or (not p.exists() and _is_glob(item))
            inp = expand_inputs([item], recursive=recursive)
            out.problems += inp.problems
            pairs += [(s, None) for s in inp.sources]
    seen: set[str] = set()
    uniq = []
    for s, lab in pairs:
        if s not in seen:
            seen.add(s)
            uniq.append((s, lab))
    out.records = records_for(uniq)
    return out


def dataset_options(f: Callable) -> Callable:
    """``--workers --figures --map-dtype`` for the streaming commands."""
    opts = [
        click.option(
            "--workers",
            default=None,
            type=click.IntRange(0),
            callback=cap_workers,
            help="DataLoader processes decoding images [default: up to 4 for more than two batches]",
        ),
        click.option(
            "--figures",
            type=click.Choice(["auto", "none", "overlay", "all", "montage"]),
            default="auto",
            show_default=True,
            help="PNG overlays: none, overlay (top-1 per image), all (every class), montage (one PNG per "
            "image: methods x classes); auto = all for named files, none for a dataset run (PNG encoding "
            "would dominate it)",
        ),
        click.option(
            "--map-dtype",
            type=click.Choice(["float32", "float16"]),
            default="float32",
            show_default=True,
            help="dtype of the maps in the result store (maps.zarr)",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


#: where :func:`request_options` keeps ``--precision`` and ``--exact-decode`` (click's ``ctx.meta``)
REQUEST_META = "camlens.request"


def _keep_request_field(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    ctx.meta.setdefault(REQUEST_META, {})[param.name] = value
    return value


def request_options(f: Callable) -> Callable:
    """``--precision`` and ``--exact-decode``: fields of the explain request (see
    :class:`camlens.api.explainer.ExplainRequest`), kept in ``ctx.meta[REQUEST_META]`` for the run
    (:func:`request_fields`) rather than passed to the command function."""
    opts = [
        click.option(
            "--precision",
            type=click.Choice(["fp32", "bf16", "fp16"]),
            default="fp32",
            show_default=True,
            expose_value=False,
            callback=_keep_request_field,
            help="the forward passes under torch.autocast in bf16/fp16 where the device supports it (CPU: "
            "bf16); maps computed in float32 and within a measured tolerance of fp32",
        ),
        click.option(
            "--exact-decode",
            is_flag=True,
            expose_value=False,
            callback=_keep_request_field,
            help="decode image files in full (default: a JPEG larger than the model's input is decoded at "
            "the smallest 1/2, 1/4 or 1/8 scale that still covers it; maps and boxes stay in the photo's pixels)",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def request_fields() -> dict[str, Any]:
    """The non-default request fields given by :func:`request_options` to the running command:
    ``{"precision": "bf16"}``, ``{"exact_decode": True}`` (what ``explain(**fields)`` takes)."""
    ctx = click.get_current_context(silent=True)
    given = ctx.meta.get(REQUEST_META, {}) if ctx is not None else {}
    out: dict[str, Any] = {}
    if given.get("precision", "fp32") != "fp32":
        out["precision"] = given["precision"]
    if given.get("exact_decode"):
        out["exact_decode"] = True
    return out


def load_model_seeded(model: str, weights: str | None, checkpoint: str | None, device: str | None):
    """:func:`load_model_opts`, with ``--weights random`` (and a ``yolo:MODEL.yaml``'s random weights)
    drawn from a fixed seed: every torchrun rank gets the same network, and a rerun the same checksum
    (so it can resume)."""
    import torch

    from camlens.cli.common import load_model_opts

    yaml = model.lower().startswith("yolo:") and model.lower().endswith((".yaml", ".yml"))  # random weights too
    if weights == "random" or yaml:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return load_model_opts(model, weights, checkpoint, device)
    return load_model_opts(model, weights, checkpoint, device)
