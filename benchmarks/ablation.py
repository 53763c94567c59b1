"""Ablation-CAM and Recipro-CAM against pytorch-grad-cam's AblationCAM (issue 27):
``python -m benchmarks.ablation [--quick] [--out F.json]``.

ResNet-50 (random weights, 224 px, one image, its top-1 class), the last block ``layer4`` (its
output, 2048 channels of 7x7): camlens ``ablationcam`` (zeroes each non-zero channel, scores the
ablated copies through the layers above the target only, see :mod:`camlens.attribution._head`),
camlens ``reciprocam`` (49 masked feature maps through the same head) and pytorch-grad-cam's
``AblationCAM(model, [model.layer4[-1]])`` with its defaults (batch 32: it re-runs the whole
network on copies of the image, with the target layer replaced by its ablated activations), and
the inference forward as the unit. The first round is timed (the peer's call is ~2000 forwards);
further rounds run while they fit in the budget. Contenders run interleaved round by round
(:func:`benchmarks.runner.time_round_robin`); medians and ratios come from the same run, and the
Pearson correlation of camlens's Ablation-CAM map with pytorch-grad-cam's says that both computed
the same thing. ``--quick``: ResNet-18 at 64 px (a smoke run, not a measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import camlens

from .runner import machine_info, time_round_robin
from .tasks import Job, pearson_whole


def _pgc_ablation(model, x: torch.Tensor, cls: int):
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = AblationCAM(model=model, target_layers=[model.layer4[-1]])

    def run() -> np.ndarray:
        with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar
            return cam(input_tensor=x, targets=[ClassifierOutputTarget(cls)])

    return run, cam.activations_and_grads.release


def run(quick: bool, device: str, log=print) -> dict[str, Any]:
    import torchvision

    arch, size = ("resnet18", 64) if quick else ("resnet50", 224)
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval().to(device)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        cls = int(model(x).argmax())

    def forward():
        with torch.inference_mode():
            return model(x)

    jobs = [
        Job("forward (inference, batch 1)", forward),
        Job("camlens ablationcam", lambda: camlens.explain(model, x, "ablationcam", targets=cls, layer="layer4")),
        Job("camlens reciprocam", lambda: camlens.explain(model, x, "reciprocam", targets=cls, layer="layer4")),
    ]
    close = lambda: None  # noqa: E731
    try:
        pgc, close = _pgc_ablation(model, x, cls)
        jobs.append(Job("pytorch-grad-cam AblationCAM (batch 32)", pgc))
    except ImportError as exc:
        log(f"pytorch-grad-cam not installed ({exc}): skipped")
    meta: dict[str, Any] = {"model": arch, "size": size, "layer": "layer4", "class": cls}
    try:
        outs, first = {}, {}
        for j in jobs:  # the first round, timed too (a peer call is thousands of forwards): do the maps agree?
            t = time.perf_counter()
            outs[j.key] = j.fn()
            first[j.key] = [time.perf_counter() - t]
        ours = outs["camlens ablationcam"]
        meta["camlens_head"] = ours.extras["head"]
        meta["camlens_ablated_channels"] = ours.extras["forwards"]
        if len(jobs) > 3:
            theirs = outs[jobs[3].key][0]
            up = F.interpolate(ours.raw, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
            meta["pearson_ablationcam_vs_pytorch_grad_cam"] = pearson_whole(up.cpu().numpy(), theirs)
        del outs
        reps = dict(warmup=0, min_reps=1, max_reps=2 if quick else 5, budget_s=5 if quick else 600)
        times = time_round_robin(jobs, device=device, log=log, times=first, **reps)  # type: ignore[arg-type]
    finally:
        close()
    unit = statistics.median(times[jobs[0].key])
    rows = []
    for j in jobs:
        med = statistics.median(times[j.key])
        rows.append(
            {"contender": j.key, "median_ms": 1000 * med, "ratio_to_forward": med / unit, "reps": len(times[j.key])}
        )
        log(f"  {j.key:<45} {1000 * med:10.1f} ms  x{med / unit:8.1f} forward")
    if len(jobs) > 3:
        peer = statistics.median(times[jobs[3].key])
        for r in rows[1:3]:
            r["speedup_vs_pytorch_grad_cam"] = peer / (r["median_ms"] / 1000)
            log(f"  {r['contender']}: {r['speedup_vs_pytorch_grad_cam']:.1f}x faster than pytorch-grad-cam")
    log(f"  {meta}")
    return {"machine": machine_info(torch.get_num_threads(), device), "meta": meta, "rows": rows}


def main(argv: Sequence[str] | None = None, log=print) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ablation", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ResNet-18 at 64 px (a smoke run, not a measurement)")
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
