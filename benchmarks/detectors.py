"""Grad-CAM for a detector's top-10 detections (issue 25): ``python -m benchmarks.detectors [--quick] [--out F.json]``.

Two groups in one run, each with the model's own inference forward as the unit, contenders
interleaved round by round (:func:`benchmarks.runner.time_round_robin`), one image, random weights:

* **YOLOv8n** (Ultralytics ``yolov8n.yaml``, 640x640 px, so the letterbox is the identity):

  - ``forward``: the detector adapter's inference forward (letterbox, network, decode, NMS) — the
    detections the user sees;
  - ``camlens gradcam, top-10``: ``explain(adapter, x, "gradcam", targets=Detection(max_boxes=10))``,
    ten maps, one per detection, at the default layer (the P3 neck output);
  - ``camlens eigencam (recipe layer)``: camlens' EigenCAM at the layer the peer's recipe uses (one
    class-agnostic map), whose Pearson correlation with the peer's map says both computed the same;
  - ``pytorch-grad-cam EigenCAM recipe``: the steps of pytorch-grad-cam's "EigenCAM for YOLO5"
    tutorial, re-implemented for YOLOv8: run the detector once for its boxes, call ``EigenCAM`` with
    the layer before the ``Detect`` head (``model[-2]``) on the input tensor (one class-agnostic
    map: the first principal component of the activations, no gradients), then min-max
    renormalise the map inside each of the ten boxes (the tutorial's last step; its overlay drawing
    is left out). The network is wrapped to return its prediction tensor only (the peer reads the
    output with ``.cpu()``).

* **DETR** (Hugging Face ``DetrForObjectDetection``, the default ``DetrConfig``: ResNet-50 backbone
  built by timm with ``use_pretrained_backbone=False``, 100 queries; an 800x1066 px input, what the
  processor makes of a 4:3 photo): ``forward`` and ``camlens gradcam, top-10`` at the default layer
  (``input_projection``). pytorch-grad-cam documents no DETR recipe: no peer row.

Random weights make "top-10 detections" degenerate (YOLO's class scores are all ~1e-4 to 1e-2,
DETR's softmax ~1/92): the post-processing threshold is lowered to just below the 20th best
candidate score (YOLO: before NMS; the 100th, then the 1000th, if NMS leaves fewer than ten), so that at
least ten detections exist; the run prints and records the threshold. Medians, ranges (min-max
over rounds) and ratios to the same run's forward are reported, with the load average before and
after each group. ``--quick``: YOLOv8n at 64 px and a tiny DETR at 64 px (a smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import camlens
from camlens.targets import Detection

from .runner import machine_info, time_round_robin
from .tasks import Job, pearson_whole

TOP = 10


@dataclass
class Group:
    """One model's contenders: the jobs (the forward first), map pairs to compare, what was set."""

    name: str
    jobs: list[Job]
    pairs: list[tuple[str, str, Callable[[Any, Any], float]]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def _loadavg() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _inference(ad: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def forward():  # not inference_mode: Ultralytics caches its anchors at the first forward
        with torch.no_grad():
            return ad(x)

    return forward


def _lower_threshold(ad: nn.Module, x: torch.Tensor, attr: str, ranks: Sequence[int]) -> dict[str, Any]:
    """Set ``ad.<attr>`` just below the ``rank``-th best candidate score (the first rank that leaves
    at least ``TOP`` detections after the post-processing); what was done, for the output."""
    with torch.no_grad():
        best = ad.candidates(x)[0].scores.max(1).values.sort(descending=True).values
    for rank in ranks:
        k = min(rank, len(best))
        setattr(ad, attr, float(best[k - 1]) * (1 - 1e-4))
        with torch.no_grad():
            n = len(ad(x)[0]["scores"])
        if n >= TOP or k == len(best):
            break
    return {
        f"{attr}_lowered_to": getattr(ad, attr),
        "best_candidate_score": float(best[0]),
        "candidates_above_threshold": k,
        "detections_after_post_processing": n,
    }


def _pgc_eigencam_recipe(net: nn.Module, layer: nn.Module, ad: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """pytorch-grad-cam's EigenCAM-for-YOLO tutorial, step by step (see the module docstring)."""
    from pytorch_grad_cam import EigenCAM
    from pytorch_grad_cam.utils.image import scale_cam_image

    class PredictionOnly(nn.Module):  # the peer calls .cpu() on the output: the prediction tensor only
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            out = self.inner(t)
            return out[0] if isinstance(out, (tuple, list)) else out

    cam = EigenCAM(PredictionOnly(net), [layer])

    def recipe() -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            boxes = ad(x)[0]["boxes"][:TOP].round().int().tolist()  # 1. the detector's boxes
        grayscale = cam(x, targets=None)[0]  # 2. one EigenCAM call on the input tensor
        renorm = np.zeros_like(grayscale)  # 3. min-max inside each box
        for x0, y0, x1, y1 in boxes:
            if x1 > x0 and y1 > y0:
                renorm[y0:y1, x0:x1] = scale_cam_image(grayscale[y0:y1, x0:x1].copy())
        return grayscale, renorm

    return recipe


def yolo_group(quick: bool, device: str) -> Group:
    from camlens.models.detectors import load_yolo
    from camlens.models.detectors.yolo import ultralytics_yolo

    size = 64 if quick else 640
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        y = ultralytics_yolo()("yolov8n.yaml")
    y.model.eval().to(device)
    ad = load_yolo(y, imgsz=size)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    meta = {"model": "yolov8n.yaml (random weights)", "size": [size, size]}
    meta |= _lower_threshold(ad, x, "conf", (20, 100, 1000))
    top = Detection(score_threshold=0.0, max_boxes=TOP)
    recipe_layer = f"net.model.{len(y.model.model) - 2}"
    meta |= {"camlens_layer": ad.camlens.layer, "recipe_layer": recipe_layer}
    jobs = [
        Job("YOLOv8n forward (inference, with NMS)", _inference(ad, x)),
        Job(f"camlens gradcam, top-{TOP}", lambda: camlens.explain(ad, x, "gradcam", targets=top)),
        Job(
            "camlens eigencam (recipe layer)",
            lambda: camlens.explain(
                ad, x, "eigencam", targets=Detection(score_threshold=0.0, max_boxes=1), center=True, layer=recipe_layer
            ),
        ),
    ]
    group = Group("yolov8n", jobs, meta=meta)
    with contextlib.suppress(ImportError):
        recipe = _pgc_eigencam_recipe(y.model, y.model.model[-2], ad, x)
        jobs.append(Job("pytorch-grad-cam EigenCAM recipe (1 map, renormalised in 10 boxes)", recipe))
        group.pairs.append(
            (
                jobs[2].key,
                jobs[3].key,
                lambda o, t: abs(pearson_whole(o.maps[0, 0], t[0])),
            )  # an eigenvector's sign is free
        )
    return group


def _tiny_detr_config(t: Any) -> Any:
    backbone = t.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="basic", out_features=["stage4"]
    )
    return t.DetrConfig(
        backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False, num_queries=20,
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_labels=5,
    )  # fmt: skip


def detr_group(quick: bool, device: str) -> Group:
    import transformers as t  # heavy, optional

    from camlens.models.detectors import as_detector

    torch.manual_seed(0)
    if quick:
        cfg, (h, w) = _tiny_detr_config(t), (64, 80)
    else:
        cfg, (h, w) = t.DetrConfig(use_pretrained_backbone=False), (800, 1066)
    net = t.DetrForObjectDetection(cfg).eval().to(device)
    ad = as_detector(net)
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    meta = {"model": "DetrForObjectDetection (tiny config)" if quick else "DetrForObjectDetection (default "
            "DetrConfig, ResNet-50, use_pretrained_backbone=False)", "size": [h, w]}  # fmt: skip
    meta |= _lower_threshold(ad, x, "threshold", (20, cfg.num_queries))
    meta |= {
        "camlens_layer": ad.camlens.layer,
        "peer_recipe": "none documented (pytorch-grad-cam has no DETR tutorial)",
    }
    top = Detection(score_threshold=0.0, max_boxes=TOP)
    jobs = [
        Job("DETR forward (inference, with post-processing)", _inference(ad, x)),
        Job(f"camlens gradcam, top-{TOP}", lambda: camlens.explain(ad, x, "gradcam", targets=top)),
    ]
    return Group("detr", jobs, meta=meta)


def _measure(group: Group, quick: bool, device: str, log) -> list[dict[str, Any]]:
    log(f"{group.name}: {group.meta}")
    load_before = _loadavg()
    outs = {j.key: j.fn() for j in group.jobs}  # also the warm-up
    explained = outs[group.jobs[1].key]
    group.meta["maps"] = list(explained.maps.shape)
    for a, b, cmp in group.pairs:
        group.meta[f"pearson {a} vs {b}"] = cmp(outs[a], outs[b])
    del outs, explained
    reps = dict(warmup=0, min_reps=2 if quick else 5, max_reps=2 if quick else 15, budget_s=2 if quick else 240)
    times = time_round_robin(group.jobs, device=device, log=log, **reps)
    group.meta |= {"loadavg_before": load_before, "loadavg_after": _loadavg()}
    unit = statistics.median(times[group.jobs[0].key])
    rows = []
    for j in group.jobs:
        ts = times[j.key]
        med = statistics.median(ts)
        rows.append(
            {
                "model": group.name,
                "contender": j.key,
                "median_ms": 1000 * med,
                "min_ms": 1000 * min(ts),
                "max_ms": 1000 * max(ts),
                "ratio_to_forward": med / unit,
                "ratio_range": [min(ts) / unit, max(ts) / unit],
                "reps": len(ts),
            }
        )
        log(
            f"  {j.key:<70} {1000 * med:9.1f} ms [{1000 * min(ts):.1f}-{1000 * max(ts):.1f}]"
            f"  x{med / unit:6.2f} forward"
        )
    log(f"  load average {load_before} before, {group.meta['loadavg_after']} after")
    return rows


def run(quick: bool, device: str, log=print) -> dict[str, Any]:
    log(
        f"Random weights: the post-processing thresholds are lowered so that {TOP} detections exist "
        "(see each group's *_lowered_to); the scores are not meaningful, the timings are."
    )
    rows: list[dict[str, Any]] = []
    meta: dict[str, Any] = {"top": TOP, "threshold_note": "lowered below the random network's scores so that "
                            f"{TOP} detections exist"}  # fmt: skip
    for build in (yolo_group, detr_group):
        group = build(quick, device)
        rows += _measure(group, quick, device, log)
        meta[group.name] = group.meta
    return {"machine": machine_info(torch.get_num_threads(), device), "meta": meta, "rows": rows}


def main(argv: Sequence[str] | None = None, log=print) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.detectors", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="YOLOv8n and a tiny DETR at 64 px (a smoke run)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = run(args.quick, args.device, log=log)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
