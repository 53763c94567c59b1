"""``camlens explain scan.nii.gz --model r3d_18 ...``: NIfTI scans (and video files) explained by a 3-D network.

When every input of ``camlens explain`` is a NIfTI file (``.nii``, ``.nii.gz``; needs
``camlens[medical]``), each scan is read with its affine (:mod:`camlens.base.nifti`), given to the
model as one ``(1, C, D, H, W)`` volume (the single channel repeated to the channels of the model's
first convolution; no resampling: the model must take the scan's grid), and explained by the
``--method`` methods (default Grad-CAM) for the ``--topk`` classes or ``--class`` classes. Written
to ``--out`` per scan, method and target: the map as NIfTI in the scan's own space
(``STEM_METHOD_top1.nii.gz``, opens on top of the scan in ITK-SNAP / 3D Slicer), its slice montage
(``.png``), and one ``STEM.json`` summary with the 3-D boxes in voxels and the peak in voxels and
world millimetres (the box's extent in mm too). Existing files are refused before any work unless
``--overwrite``.

Video files (``.mp4``, ``.avi``, ``.webm``…; needs ``camlens[video]``) go the same way as 16-frame
clips (:func:`camlens.base.video.read_clip`, resized to 112x112 and Kinetics-normalized): per clip,
method and target the map ``(T, H, W)`` as ``.npy``, a montage of frames, and a JSON summary with the
frames' timestamps, the 3-D box ``(x0, y0, t0, x1, y1, t1)``, its time span in seconds, the peak,
the temporal extent (first and last frame above the threshold, with their times) and the per-frame
box track (:func:`camlens.base.cliptrack.clip_track`: ``box_xyxy`` in the model's input pixels,
``box_xyxy_video`` in the video's, ``null`` for a frame with nothing above the threshold).

**Folders** (of NIfTI scans, of DICOM series — one folder of slices each — or of video files), or
``--format store``: a dataset run into the result store ``--out`` (:func:`camlens.explain_dataset`,
see :mod:`camlens.pipeline.volumes`): ``(N, K, D, H, W)`` maps in Zarr, one table row per volume x
class x method with the 3-D box in voxels and millimetres, the affine, spacing and timestamps;
resumable, checked. ``--format store,nii`` also writes each map as NIfTI in its scan's space to
``OUT/nifti/STEM_METHOD_topK.nii.gz``; ``--figures overlay|all`` a slice montage per volume, method
and class to ``OUT/figures``.

``--volume-figures KINDS`` (comma-separated) picks the pictures of each map (:mod:`camlens.viz.volume`,
:mod:`camlens.viz.clip`): ``montage`` (``.png``), ``threeview`` (``_threeview.png``: the orthogonal
slices through the peak, in mm), ``strip`` (``_strip.png``: every k-th frame with its time), ``gif``
and ``mp4`` (the animated overlay over the clip's own frames, or a scan's axial slices); ``auto`` is
montage and three-view for scans, montage, strip and GIF for videos.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from camlens.cli.common import (
    check_layer,
    check_overwrite,
    echo,
    echo_err,
    parse_classes,
    parse_method_options,
    resolve_device,
)
from camlens.cli.dataset import load_model_seeded

DEFAULT_VOLUME_METHODS = ("gradcam",)
#: --volume-figures kinds -> the suffix of their files (after STEM_METHOD_topJ)
VOLUME_FIGURES = {"montage": ".png", "threeview": "_threeview.png", "strip": "_strip.png", "gif": ".gif", "mp4": ".mp4"}
AUTO_FIGURES = {"scan": ("montage", "threeview"), "video": ("montage", "strip", "gif")}


def parse_volume_figures(text: str | None) -> tuple[str, ...]:
    """``"threeview,gif"`` -> ``("threeview", "gif")``; ``"auto"`` / ``None`` -> ``()`` (per input kind)."""
    if text is None or text.strip() == "auto":
        return ()
    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    bad = [k for k in kinds if k not in VOLUME_FIGURES]
    if bad or not kinds:
        raise click.BadParameter(
            f"unknown figure kind(s) {', '.join(bad) or text!r}; choose from {', '.join(VOLUME_FIGURES)} or auto",
            param_hint="--volume-figures",
        )
    return kinds


def nifti_inputs(cmd: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate ``camlens explain``: NIfTI inputs go to :func:`explain_scans`, images to ``cmd``."""

    @click.option(
        "--volume-figures",
        default="auto",
        show_default=True,
        metavar="KINDS",
        help="NIfTI scans and video files: comma-separated figures per map, of "
        f"{','.join(VOLUME_FIGURES)}; auto = montage,threeview for scans, montage,strip,gif for videos "
        "(a scan's GIF/MP4/strip run through its axial slices)",
    )
    @functools.wraps(cmd)
    def run(**kw: Any) -> Any:
        from camlens.base.nifti import is_nifti
        from camlens.base.video import is_video
        from camlens.pipeline.volumes import holds_volumes

        images = kw.get("images") or ()
        folders = [p for p in images if holds_volumes(p)]  # a folder of scans, series or clips: a store run
        scans = [p for p in images if is_nifti(p) or is_video(p)] + folders
        if not scans:
            if kw.pop("volume_figures", "auto") != "auto":
                raise click.BadParameter("is for NIfTI scans and video files", param_hint="--volume-figures")
            return cmd(**kw)
        if len(scans) != len(images):
            raise click.BadParameter(
                "give NIfTI scans / DICOM series / video files or images, not both in one call", param_hint="IMAGES"
            )
        formats = _volume_formats(kw.get("formats") or "auto")
        if folders or "store" in formats:
            return explain_volume_store(ScanRun.of(kw), VolumeStoreRun.of(kw, formats))
        if formats != ["auto"]:
            raise click.BadParameter(
                "named scans and clips write their maps, montages and summary; --format store (or a folder) "
                "writes a result store, store,nii also the maps as NIfTI",
                param_hint="--format",
            )
        return explain_scans(ScanRun.of(kw))

    return run


@dataclass(frozen=True)
class ScanRun:
    """The ``camlens explain`` arguments a scan run uses (the image-only options are ignored)."""

    scans: tuple[str, ...]
    model: str
    weights: str | None
    checkpoint: str | None
    layer: str | None
    device: str | None
    methods: tuple[str, ...]
    topk: int
    classes: tuple[str, ...]
    out: str
    overwrite: bool
    threshold: float | None
    method_options: tuple[str, ...]
    figures: tuple[str, ...] = ()  # --volume-figures; () = AUTO_FIGURES per input kind
    frames: int = 16  # video files: frames per clip and the stride between them
    stride: int = 1

    def kinds(self, scan: str) -> tuple[str, ...]:
        """The figure kinds written for ``scan`` (a NIfTI file or a video)."""
        from camlens.base.video import is_video

        return self.figures or AUTO_FIGURES["video" if is_video(scan) else "scan"]

    @classmethod
    def of(cls, kw: dict[str, Any]) -> ScanRun:
        from camlens.cli.common import parse_threshold

        thr = kw.get("threshold")
        return cls(
            tuple(kw["images"]),
            kw["model"],
            kw.get("weights"),
            kw.get("checkpoint"),
            kw.get("layer"),
            kw.get("device"),
            tuple(kw.get("methods") or DEFAULT_VOLUME_METHODS),
            int(kw.get("topk") or 1),
            tuple(kw.get("classes") or ()),
            kw["out"],
            bool(kw.get("overwrite")),
            parse_threshold(thr) if thr is not None else None,
            tuple(kw.get("method_options") or ()),
            parse_volume_figures(kw.get("volume_figures")),
        )


def _volume_formats(value: str) -> list[str]:
    """``--format`` of a volume run: ``auto``, or some of ``store`` and ``nii`` (which implies the store)."""
    if value == "auto":
        return ["auto"]
    fmts = [f.strip() for f in value.split(",") if f.strip()]
    bad = [f for f in fmts if f not in ("store", "nii")]
    if bad or not fmts:
        raise click.BadParameter(
            f"volume and clip runs write 'store' (Parquet + Zarr) and optionally 'nii' (each map as NIfTI in its "
            f"scan's space, OUT/nifti/), not {', '.join(bad) or repr(value)}",
            param_hint="--format",
        )
    return sorted(set(fmts) | {"store"})


@dataclass(frozen=True)
class VolumeStoreRun:
    """The dataset settings of a volume or clip store run (``camlens explain FOLDER --out STORE``)."""

    nifti: bool
    batch_size: int
    workers: int | None
    figures: str
    map_dtype: str

    @classmethod
    def of(cls, kw: dict[str, Any], formats: list[str]) -> VolumeStoreRun:
        figures = kw.get("figures") or "auto"
        if figures == "montage":
            raise click.BadParameter(
                "a volume store draws one slice montage per volume, method and class: --figures overlay or all",
                param_hint="--figures",
            )
        return cls(
            "nii" in formats,
            int(kw.get("batch_size") or 1),
            kw.get("workers"),
            "none" if figures == "auto" else figures,
            kw.get("map_dtype") or "float32",
        )


def explain_volume_store(run: ScanRun, data: VolumeStoreRun) -> None:
    """Explain folders of NIfTI scans, DICOM series or video files into a result store
    (:func:`camlens.explain_dataset`; resumable), optionally each map as NIfTI in ``OUT/nifti``."""
    from camlens.attribution.registry import get_method
    from camlens.base.errors import CamlensError
    from camlens.models.zoo import card_of
    from camlens.pipeline.run import explain_dataset
    from camlens.pipeline.volumes import VolumeReader, export_nifti

    try:
        names = list(dict.fromkeys(get_method(m).name for m in run.methods))
    except CamlensError as exc:
        raise click.BadParameter(str(exc), param_hint="--method") from None
    options = parse_method_options(run.method_options, names)
    net = load_model_seeded(run.model, run.weights, run.checkpoint, resolve_device(run.device))
    check_layer(net, run.layer)
    card = card_of(net)
    targets: Any = parse_classes(run.classes, card.class_names if card else None) if run.classes else None
    try:
        res = explain_dataset(
            net, list(run.scans), names, run.out, targets=targets if targets is not None else f"top{run.topk}",
            layer=run.layer, batch_size=data.batch_size, num_workers=data.workers, threshold=run.threshold,
            map_dtype=data.map_dtype, figures=data.figures, overwrite=run.overwrite,
            volume_reader=VolumeReader(frames=run.frames, stride=run.stride), explain_options=options,
        )  # fmt: skip
        written = export_nifti(res, Path(run.out) / "nifti", overwrite=run.overwrite) if data.nifti else []
    except CamlensError as exc:
        raise click.ClickException(str(exc)) from None
    stats = res.stats  # type: ignore[attr-defined]
    for f in stats.failed:
        echo_err(f"error: {f['error']}")
    n = int(res.run.get("signature", {}).get("n_images", 0))
    line = f"explained {n - len(stats.failed)} of {n} volume(s) with {', '.join(stats.methods)} "
    line += f"({stats.computed} now, {stats.skipped} already in the store); "
    line += f"store {run.out} ({len(res.table)} rows: results.parquet, maps.zarr)"
    if written:
        line += f"; {len(written)} NIfTI map(s) in {Path(run.out) / 'nifti'}"
    echo(line + (f"; {len(stats.failed)} input(s) failed" if stats.failed else ""))
    if stats.failed:
        raise SystemExit(1)


def _planned(run: ScanRun, names: list[str], k: int) -> list[Path]:
    from camlens.base.video import is_video

    out = Path(run.out)
    paths = []
    for scan in run.scans:
        stem = _stem(scan)
        paths.append(out / f"{stem}.json")
        ext = ".npy" if is_video(scan) else ".nii.gz"
        for m in names:
            for j in range(k):
                paths.append(out / f"{stem}_{m}_top{j + 1}{ext}")
                paths += [out / f"{stem}_{m}_top{j + 1}{VOLUME_FIGURES[f]}" for f in run.kinds(scan)]
    return paths


def _stem(path: str) -> str:
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem


def explain_scans(run: ScanRun) -> None:
    """Explain each scan of ``run`` and write its maps, montages and summary (see the module doc)."""
    import torch

    from camlens.api.explainer import explain
    from camlens.attribution.registry import get_method
    from camlens.base.errors import CamlensError
    from camlens.base.fsio import safe_out_dir
    from camlens.base.nifti import read_nifti
    from camlens.base.video import is_video, read_clip
    from camlens.models.zoo import card_of

    try:
        names = list(dict.fromkeys(get_method(m).name for m in run.methods))
    except CamlensError as exc:
        raise click.BadParameter(str(exc), param_hint="--method") from None
    options = parse_method_options(run.method_options, names)
    net = load_model_seeded(run.model, run.weights, run.checkpoint, resolve_device(run.device))
    check_layer(net, run.layer)
    card = card_of(net)
    class_names = card.class_names if card else None
    targets: Any = parse_classes(run.classes, class_names) if run.classes else f"top{run.topk}"
    k = len(targets) if run.classes else run.topk
    check_overwrite(_planned(run, names, k), run.overwrite)
    out = safe_out_dir(run.out)
    first = next((m for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
    channels = first.in_channels if first is not None else 1
    device = next(net.parameters()).device
    for scan in run.scans:
        if is_video(scan):
            clip = read_clip(scan, frames=run.frames, stride=run.stride)
            res = explain(net, clip.tensor().to(device), names, targets=targets, layer=run.layer, **options)
            summary = _write_clip(out, scan, clip, res, run)
        else:
            vol = read_nifti(scan)
            x = vol.tensor().expand(-1, channels, -1, -1, -1).to(device)
            res = explain(net, x, names, targets=targets, layer=run.layer, **options)
            summary = _write_scan(out, scan, vol, res, run)
        echo(f"{scan}: {', '.join(f'{m} {len(v)} map(s)' for m, v in summary['methods'].items())} -> {out}")


def _write_scan(out: Path, scan: str, vol, res: dict, run: ScanRun) -> dict[str, Any]:
    """The maps (NIfTI), montages (PNG) and the JSON summary of one scan."""
    from camlens.base.fsio import atomic_write_json
    from camlens.base.localization import DEFAULT_THRESHOLD
    from camlens.base.nifti import save_nifti
    from camlens.viz.volume import peak_voxel

    stem = _stem(scan)
    background = vol.tensor()[0, 0]
    thr = DEFAULT_THRESHOLD if run.threshold is None else run.threshold
    summary: dict[str, Any] = {"scan": scan, "shape_dhw": list(vol.shape)}
    summary |= {"spacing_ijk_mm": list(vol.spacing), "affine": vol.affine.tolist(), "threshold": thr, "methods": {}}
    for method, exp in res.items():
        boxes = exp.boxes(thr)
        rows = []
        for j, label in enumerate(exp.labels()[0]):
            m = exp.map(0, j)
            save_nifti(m, vol, out / f"{stem}_{method}_top{j + 1}.nii.gz", overwrite=run.overwrite)
            pics = Pictures(background, None, vol.spacing[::-1], vol.affine, kinds=run.kinds(scan))
            write_figures(out / f"{stem}_{method}_top{j + 1}", exp, j, pics, run)
            peak = peak_voxel(m.numpy(), exp.signed)
            rows.append(
                {
                    "class": int(exp.classes[0, j]),
                    "label": label,
                    "score": float(exp.scores[0, j]),
                    "box_voxels_xyzxyz": [int(v) for v in boxes[0, j]],
                    "box_world_mm": vol.world_box(boxes[0, j]).tolist() if boxes[0, j, 0] >= 0 else None,
                    "peak_voxel_zyx": list(peak),
                    "peak_world_mm": [float(v) for v in vol.world(peak)],
                }
            )
        summary["methods"][method] = rows
    atomic_write_json(out / f"{stem}.json", summary, overwrite=run.overwrite, indent=2)
    return summary


def _write_clip(out: Path, path: str, clip, res: dict, run: ScanRun) -> dict[str, Any]:
    """The maps (``.npy`` ``(T, H, W)``), montages (PNG: a row of frames) and the JSON summary of one clip."""
    import io

    import numpy as np

    from camlens.base.fsio import atomic_write, atomic_write_json
    from camlens.base.localization import DEFAULT_THRESHOLD
    from camlens.viz.volume import peak_voxel

    stem = _stem(path)
    video_hw = tuple(int(v) for v in clip.frames.shape[1:3])
    thr = DEFAULT_THRESHOLD if run.threshold is None else run.threshold
    summary: dict[str, Any] = {"video": path, "timestamps_s": [float(t) for t in clip.timestamps], "fps": clip.fps}
    summary |= {"threshold": thr, "methods": {}}
    for method, exp in res.items():
        boxes = exp.boxes(thr)
        rows = []
        for j, label in enumerate(exp.labels()[0]):
            m = exp.map(0, j)
            buf = io.BytesIO()
            np.save(buf, m.numpy())
            atomic_write(out / f"{stem}_{method}_top{j + 1}.npy", buf.getvalue(), overwrite=run.overwrite)
            pics = Pictures(clip.frames, clip.timestamps, None, None, clip.fps, run.kinds(path))
            write_figures(out / f"{stem}_{method}_top{j + 1}", exp, j, pics, run)
            t, y, x = peak_voxel(m.numpy(), exp.signed)
            box = [int(v) for v in boxes[0, j]]
            rows.append(
                {
                    "class": int(exp.classes[0, j]),
                    "label": label,
                    "score": float(exp.scores[0, j]),
                    "box_xytxyt": box,
                    "seconds": [float(clip.timestamps[box[2]]), float(clip.timestamps[box[5] - 1])]
                    if box[2] >= 0
                    else None,
                    "peak_frame_yx": [t, y, x],
                    "peak_time_s": float(clip.timestamps[t]),
                    **_track(m, thr, clip.timestamps, video_hw),
                }
            )
        summary["methods"][method] = rows
    atomic_write_json(out / f"{stem}.json", summary, overwrite=run.overwrite, indent=2)
    return summary


def _track(m, threshold: float, timestamps, video_hw: tuple[int, ...]) -> dict[str, Any]:
    """The temporal extent and per-frame box track of one clip map, JSON-ready (boxes also in video pixels)."""
    from camlens.base.cliptrack import clip_track  # imports torch: loaded when a clip is written
    from camlens.base.localization import scale_boxes

    track = clip_track(m, threshold, timestamps=timestamps)
    frames = track.to_dict()["frames"]
    for row, box in zip(frames, scale_boxes(track.boxes, tuple(m.shape[-2:]), video_hw), strict=True):
        row["box_xyxy_video"] = [int(v) for v in box] if row["box_xyxy"] is not None else None
    return {"temporal_extent": track.extent.to_dict() if track.extent else None, "track": frames}


@dataclass(frozen=True)
class Pictures:
    """What the figures of one input are drawn over: ``background`` (a scan ``(D, H, W)`` or a
    clip's RGB frames ``(T, H, W, 3)``), the frames' ``timestamps``, the voxel ``spacing`` along
    ``(D, H, W)`` and the ``affine`` (scans), the ``fps`` (clips)."""

    background: Any
    timestamps: Any = None
    spacing: tuple[float, ...] | None = None
    affine: Any = None
    fps: float | None = None
    kinds: tuple[str, ...] = ("montage",)


def write_figures(base: Path, exp, j: int, pics: Pictures, run: ScanRun) -> None:
    """The figures ``pics.kinds`` of map ``(0, j)`` of ``exp``: ``BASE.png`` (montage),
    ``BASE_threeview.png``, ``BASE_strip.png``, ``BASE.gif``, ``BASE.mp4``."""
    from camlens.base.fsio import atomic_write

    for kind in pics.kinds:
        data = _figure_bytes(kind, exp, j, pics)
        atomic_write(base.with_name(base.name + VOLUME_FIGURES[kind]), data, overwrite=run.overwrite)


def _figure_bytes(kind: str, exp, j: int, pics: Pictures) -> bytes:
    """One figure of :func:`write_figures` as file bytes (PNG, GIF or MP4)."""
    from camlens.viz import figure_png
    from camlens.viz.clip import clip_explanation_figure, gif_bytes, mp4_bytes

    m = exp.map(0, j)
    pixel = exp.kind == "pixel"
    if kind == "gif":
        return gif_bytes(m, pics.background, timestamps=pics.timestamps, fps=pics.fps, pixel=pixel)
    if kind == "mp4":
        return mp4_bytes(m, pics.background, fps=pics.fps, pixel=pixel)
    if kind == "strip":
        opts: dict[str, Any] = {"frames": pics.background, "timestamps": pics.timestamps}
        opts["every"] = max(1, -(-m.shape[0] // 8))  # at most 8 frames (and the peak's)
        return figure_png(clip_explanation_figure(exp, 0, j, kind=kind, **opts))
    clip = pics.timestamps is not None
    opts = {"background": None if clip else pics.background, "spacing": pics.spacing}  # clips: the input's frames
    if kind == "threeview":
        opts["affine"] = pics.affine
    elif clip:
        opts |= {"views": ("axial",), "n_slices": min(8, m.shape[0])}
    return figure_png(clip_explanation_figure(exp, 0, j, kind=kind, **opts))


__all__ = ["ScanRun", "explain_scans", "nifti_inputs"]
