"""Grad-CAM on a video classifier and a 3-D medical network, against the forward pass and MONAI's own
``GradCAM`` (issue 31): ``python -m benchmarks.volumes [--quick] [--out F.json]``.

Two cases, random weights (seeded), batch 1:

* torchvision ``r3d_18``, a 16x112x112 clip (Kinetics' clip size), its top-1 class;
* MONAI ``DenseNet121`` with ``spatial_dims=3``, one channel, two classes, a 96³ volume.

Contenders, run interleaved round by round (:func:`benchmarks.runner.time_round_robin`), medians
and ratios to the same case's inference forward: the forward; camlens ``gradcam`` (the maps
upsampled trilinearly to the input, as MONAI does); ``monai.visualize.GradCAM`` (its call: forward,
a full backward with a backward hook at the layer, trilinear upsampling and min-max
normalization). MONAI runs on its own copy of the network (it turns in-place activations off and
leaves its hooks registered). Both explain the same features — r3d_18's ``layer4`` output (camlens:
the input of its global pooling), the DenseNet's ``class_layers.relu`` output — so the maps are
compared: the raw maps (MONAI's ``compute_map``) by Pearson correlation and the largest difference
relative to the map's maximum, and the upsampled, normalized maps (MONAI maps (min, max) to (1, 0):
compared with ``1 - normalized()``) by their largest absolute difference. MONAI's call is compared at
batch 1 only: with ``class_idx=None`` and more images its score ``logits[:, argmax]`` sums every
image's logit of every image's class. The load average is recorded before and after; each row also
gives the per-round ratios to the forward (median, min, max: rounds are interleaved, so a ratio
compares calls under the same load) and its raw times. ``--clock cpu --threads 1`` times CPU time
of the process, for a machine shared with other jobs.

``--quick``: an 8x32x32 clip and a 64³ volume, one round (a smoke run, not a measurement).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import camlens

from . import runner
from .runner import machine_info, time_round_robin
from .tasks import Job, pearson_whole


@dataclass
class Case:
    """One network and input: its name, the layer MONAI hooks, and the camlens layer it equals."""

    name: str
    model: nn.Module
    x: torch.Tensor
    monai_layer: str


def cases(quick: bool) -> list[Case]:
    from monai.networks.nets import DenseNet121

    clip, side = ((8, 32, 32), 64) if quick else ((16, 112, 112), 96)
    gen = torch.Generator().manual_seed(0)
    r3d = camlens.load_model("r3d_18", weights="random")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dense = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).eval()
    return [
        Case(f"r3d_18 ({'x'.join(map(str, clip))} clip)", r3d, torch.randn(1, 3, *clip, generator=gen), "layer4"),
        Case(
            f"MONAI DenseNet121 3-D ({side}³ volume)",
            dense,
            torch.randn(1, 1, side, side, side, generator=gen),
            "class_layers.relu",
        ),
    ]


def case_jobs(case: Case) -> tuple[list[Job], dict[str, Any]]:
    """The three contenders of one case, and how their maps compare."""
    from monai.visualize import GradCAM

    model, x = case.model, case.x
    peer_net = copy.deepcopy(model)
    peer = GradCAM(nn_module=peer_net, target_layers=case.monai_layer)

    def forward():
        with torch.inference_mode():
            return model(x)

    def ours():
        exp = camlens.explain(model, x, "gradcam", targets="top1")
        exp.maps  # noqa: B018 - upsampled to the input (computed on first access)
        return exp

    jobs = [
        Job(f"{case.name}: forward (inference)", forward),
        Job(f"{case.name}: camlens gradcam", ours),
        Job(f"{case.name}: MONAI GradCAM", lambda: peer(x)),
    ]
    exp = ours()
    cls = int(exp.classes[0, 0])
    raw = peer.compute_map(x, class_idx=cls, layer_idx=-1)[0].detach()
    up = peer(x, class_idx=cls)[0, 0].detach()
    mine = exp.raw[0, 0]
    agree = {
        "layer": exp.layer,
        "class": cls,
        "raw pearson": pearson_whole(mine, raw[0]),
        "raw max diff / max": float((mine - raw[0]).abs().max() / raw.abs().max().clamp_min(1e-30)),
        "raw max": float(raw.abs().max()),
        "normalized max abs diff": float(((1 - exp.normalized()[0, 0]) - up).abs().max()),
    }
    return jobs, agree


def run(quick: bool, log=print) -> dict[str, Any]:
    clock = "cpu" if runner.CLOCK is time.process_time else "wall"
    load_start = os.getloadavg()
    jobs: list[Job] = []
    import monai

    meta: dict[str, Any] = {"quick": quick, "batch": 1, "clock": clock, "monai": monai.__version__, "cases": {}}
    for case in cases(quick):
        js, agree = case_jobs(case)
        jobs += js
        meta["cases"][case.name] = {"input": list(case.x.shape), **agree}
        log(f"  {case.name}: {agree}")
    first: dict[str, list[float]] = {}
    for j in jobs:  # a first round, timed too
        t = runner.CLOCK()
        j.fn()
        first[j.key] = [runner.CLOCK() - t]
    reps = {"warmup": 0, "min_reps": 1, "max_reps": 1 if quick else 7, "budget_s": 0 if quick else 480}
    times = time_round_robin(jobs, log=log, times=first, **reps)
    machine = machine_info(torch.get_num_threads(), "cpu")
    machine["loadavg_start"], machine["loadavg_end"] = load_start, os.getloadavg()
    return {"machine": machine, "meta": meta, "rows": _rows(jobs, times, log)}


def _per_round(a: list[float], b: list[float]) -> dict[str, float]:
    """Median, min and max of the per-round ratios ``a[i] / b[i]`` (same round: same machine load)."""
    r = [x / y for x, y in zip(a, b, strict=True)]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def _rows(jobs: list[Job], times: dict[str, list[float]], log) -> list[dict[str, Any]]:
    rows = []
    for j in jobs:
        case, contender = j.key.split(": ", 1)
        t, fwd = times[j.key], times[f"{case}: forward (inference)"]
        med, fmed = statistics.median(t), statistics.median(fwd)
        row = {"case": case, "contender": contender, "median_ms": 1000 * med, "vs_forward": med / fmed,
               "vs_forward_rounds": _per_round(t, fwd), "min_ms": 1000 * min(t), "max_ms": 1000 * max(t),
               "reps": len(t), "times_s": list(t)}  # fmt: skip
        rows.append(row)
        log(f"  {j.key:<60} {1000 * med:9.1f} ms  x{row['vs_forward']:5.2f} forward")
    for case in dict.fromkeys(r["case"] for r in rows):
        ours = next(r for r in rows if r["case"] == case and r["contender"] == "camlens gradcam")
        peer = next(r for r in rows if r["case"] == case and r["contender"] == "MONAI GradCAM")
        ours["vs_monai"] = ours["median_ms"] / peer["median_ms"]
        ours["vs_monai_rounds"] = _per_round(ours["times_s"], peer["times_s"])
    return rows


def main(argv: Sequence[str] | None = None, log=print) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.volumes", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8x32x32 clip, 64³ volume, one round (a smoke run)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: CPU time of the process, for a loaded machine (with --threads 1)")  # fmt: skip
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    runner.CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    res = run(args.quick, log=log)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
