"""LIME and KernelSHAP against Captum, and RISE through ONNX Runtime (issue 30):
``python -m benchmarks.surrogate [--quick] [--out F.json]`` (also run by ``python -m benchmarks``).

ResNet-18 (random weights, 224 px, the chelsea photo, its top-1 class) on the same superpixels
(SLIC, ~50 segments, a label map given to both libraries), the same baseline (0, i.e. the
normalized mean colour), the same number of samples (``--samples``, default 256) and the same
batch of masked images per forward (64): camlens ``lime`` / ``kernelshap`` against Captum's ``Lime``
(weighted ridge, exponential kernel over the cosine distance, as camlens) / ``KernelShap``. The
unit is one batched inference forward of 64 images; a method's **per-sample cost** is its median
time divided by its samples, reported as a multiple of one image's share of that batched forward
(1.0 = the method costs only its forwards). Contenders run interleaved round by round
(:func:`benchmarks.runner.time_round_robin`); the Pearson correlation of each camlens map with
Captum's says both estimated the same attribution (different random coalitions: close, not equal;
KernelSHAP with few samples per superpixel is noisy: two camlens seeds at 128 samples and 42
superpixels correlate 0.26, at 2048 samples 0.91 — equality on the same coalitions is tested in
``tests/attribution/test_surrogate.py``).

With ``onnx``/``onnxruntime``/``onnx2torch`` installed, RISE (``--masks`` masks) on the same network
exported to ONNX and run by ONNX Runtime, against RISE on the PyTorch module (same seed, same maps).
``--quick``: 64 px, 24 samples and masks, one round (a smoke run, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import camlens

from .runner import machine_info, time_round_robin
from .tasks import Job, pearson_whole

BATCH = 64


def _inputs(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chelsea photo at ``size`` (ImageNet normalization) and its SLIC label map (0..S-1)."""
    from skimage import data, segmentation

    from camlens.models.preprocess import IMAGENET

    pp = replace(IMAGENET, size=(size, size))
    x = pp([data.chelsea()])
    rgb = pp.resize_image(data.chelsea()).permute(1, 2, 0).numpy() / 255.0
    seg = segmentation.slic(rgb, n_segments=50, start_label=0)
    _, seg = np.unique(seg, return_inverse=True)
    return x, torch.from_numpy(seg.reshape(size, size)).long()


def _captum(model, x, seg, cls: int, n: int) -> list[Job]:
    import torch.nn.functional as F
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import KernelShap, Lime

    def similarity(original, perturbed, interpretable, **kwargs):  # camlens's LIME kernel (width 0.25)
        cos = F.cosine_similarity(interpretable.float(), torch.ones_like(interpretable, dtype=torch.float), dim=1)
        return torch.exp(-((1 - cos) ** 2) / (2 * 0.25**2))

    lime = Lime(model, SkLearnRidge(alpha=1.0), similarity_func=similarity)
    shap = KernelShap(model)
    kw = {"baselines": 0.0, "target": cls, "feature_mask": seg[None, None], "n_samples": n}
    return [
        Job("captum Lime", lambda: lime.attribute(x, perturbations_per_eval=BATCH, **kw)),
        Job("captum KernelShap", lambda: shap.attribute(x, perturbations_per_eval=BATCH, **kw)),
    ]


def _onnx_jobs(model, x, cls: int, masks: int, log) -> list[Job]:
    try:
        import onnx  # noqa: F401  (camlens[onnx])
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        log(f"onnx/onnxruntime not installed ({exc}): the ONNX rows are skipped")
        return []
    path = Path(tempfile.mkdtemp()) / "resnet18.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x, str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, opset_version=17)  # fmt: skip
    om = camlens.load_model(path)
    kw = {"targets": cls, "n_masks": masks, "batch_size": BATCH, "seed": 0, "progress": False}
    return [
        Job("camlens rise (PyTorch)", lambda: camlens.explain(model, x, "rise", **kw)),
        Job("camlens rise (ONNX Runtime)", lambda: camlens.explain(om, x, "rise", **kw)),
    ]


def run(quick: bool, samples: int, masks: int, log=print, size: int = 224) -> dict[str, Any]:
    import torchvision

    size, samples, masks = (64, 24, 24) if quick else (size, samples, masks)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x, seg = _inputs(size)
    with torch.inference_mode():
        cls = int(model(x).argmax())
    xb = x.expand(BATCH, -1, -1, -1).contiguous()

    def forward():
        with torch.inference_mode():
            return model(xb)

    kw = {"targets": cls, "segments": seg, "baseline": 0.0, "n_samples": samples, "batch_size": BATCH,
          "weighting": "logit", "progress": False}  # fmt: skip
    jobs = [
        Job(f"forward (inference, batch {BATCH})", forward),
        Job("camlens lime", lambda: camlens.explain(model, x, "lime", **kw)),
        Job("camlens kernelshap", lambda: camlens.explain(model, x, "kernelshap", **kw)),
    ]
    try:
        jobs += _captum(model, x, seg, cls, samples)
    except ImportError as exc:
        log(f"captum not installed ({exc}): skipped")
    jobs += _onnx_jobs(model, x, cls, masks, log)
    outs, first = {}, {}
    for j in jobs:  # the first round, timed too; do the maps agree?
        t = time.perf_counter()
        outs[j.key] = j.fn()
        first[j.key] = [time.perf_counter() - t]
    meta: dict[str, Any] = {"model": "resnet18", "size": size, "class": cls, "segments": int(seg.max()) + 1,
                            "samples": samples, "masks": masks, "batch": BATCH}  # fmt: skip
    for ours, theirs in (("camlens lime", "captum Lime"), ("camlens kernelshap", "captum KernelShap")):
        if theirs in outs:
            meta[f"pearson {ours} vs {theirs}"] = pearson_whole(outs[ours].maps[0, 0], outs[theirs][0, 0])
    if "camlens rise (ONNX Runtime)" in outs:
        a, b = outs["camlens rise (ONNX Runtime)"].maps, outs["camlens rise (PyTorch)"].maps
        meta["rise onnx vs torch max rel diff"] = float((a - b).abs().max() / b.abs().max())
    del outs
    reps = {"warmup": 0, "min_reps": 1, "max_reps": 1 if quick else 5, "budget_s": 0 if quick else 300}
    times = time_round_robin(jobs, log=log, times=first, **reps)  # type: ignore[arg-type]
    return {
        "machine": machine_info(torch.get_num_threads(), "cpu"),
        "meta": meta,
        "rows": _rows(jobs, times, meta, log),
    }


def _rows(jobs: list[Job], times: dict[str, list[float]], meta: dict[str, Any], log) -> list[dict[str, Any]]:
    unit = statistics.median(times[jobs[0].key]) / BATCH  # one image's share of a batched forward
    rows = []
    for j in jobs:
        med = statistics.median(times[j.key])
        per = meta["masks"] if "rise" in j.key else meta["samples"] if "forward" not in j.key else BATCH
        row = {"contender": j.key, "median_ms": 1000 * med, "per_sample_ms": 1000 * med / per,
               "per_sample_vs_forward": med / per / unit, "reps": len(times[j.key])}  # fmt: skip
        rows.append(row)
        log(f"  {j.key:<32} {1000 * med:10.1f} ms  {row['per_sample_ms']:8.2f} ms/sample  "
            f"x{row['per_sample_vs_forward']:6.2f} batched forward per image")  # fmt: skip
    log(f"  {meta}")
    return rows


def main(argv: Sequence[str] | None = None, log=print) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.surrogate", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 px, 24 samples, one round (a smoke run)")
    ap.add_argument("--samples", type=int, default=256, help="LIME/KernelSHAP samples (default 256)")
    ap.add_argument("--masks", type=int, default=256, help="RISE masks for the ONNX rows (default 256)")
    ap.add_argument("--size", type=int, default=224, help="input side in pixels (default 224)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = run(args.quick, args.samples, args.masks, log=log, size=args.size)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
