"""Mixed precision: how far ``explain(..., precision="bf16")`` maps are from fp32, and what it costs.

    python -m benchmarks.precision                 # CPU: bf16 against fp32, the 4 bundled photos
    python -m benchmarks.precision --device cuda   # also fp16

Per model family (CNN: EfficientNet-Lite0 with its ImageNet weights, ResNet-18 with random
weights; ViT: timm's ``vit_tiny_patch16_224`` with random weights) and method, over the bundled
photos at 224 x 224: the Pearson correlation of each map with its fp32 map, the largest absolute
difference of the min-max normalised maps (in [0, 1] units) and whether the top-1 class agrees; and
the time of one ``explain`` call in each precision, medians of interleaved rounds (fp32 and the
reduced precision alternate, so that a change of machine load hits both). The thresholds that
``tests/core/test_precision.py`` holds were set from these numbers (worst case over photos, with margin).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

from .tasks import pearson_whole

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
METHODS = ("gradcam", "gradcam++", "saliency", "guided_backprop")


def family_models() -> dict[str, Any]:
    """``{name: zero-argument builder}`` of one model per family (no download)."""
    import camlens

    def vit() -> torch.nn.Module:
        import timm

        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000).eval()

    return {
        "efficientnet_lite0": lambda: camlens.load_model("efficientnet_lite0"),
        "resnet18 (random)": lambda: camlens.load_model("resnet18", weights="random"),
        "vit_tiny_patch16_224 (random)": vit,
    }


def minmax(m: torch.Tensor) -> torch.Tensor:
    """Per-map min-max to [0, 1] over the last two dimensions (a constant map -> zeros)."""
    flat = m.flatten(-2)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).reshape(m.shape)


def compare(ref: Any, low: Any) -> dict[str, float]:
    """Worst case over the images: Pearson of the maps, max |difference| of the min-max maps, top-1 agreement."""
    r, q = ref.maps.float(), low.maps.float()
    if r.dim() == 5:  # pixel maps (N, K, C, H, W): the channel-summed magnitude, as drawn
        r, q = r.abs().sum(2), q.abs().sum(2)
    per = [pearson_whole(r[i], q[i]) for i in range(r.shape[0])]
    diff = (minmax(r) - minmax(q)).abs().amax().item()
    same = float((ref.logits.argmax(1) == low.logits.argmax(1)).float().mean()) if ref.logits is not None else 1.0
    return {"pearson_min": min(per), "max_abs_diff": diff, "top1_agreement": same}


def timed(fn, rounds: int) -> dict[str, list[float]]:
    """``fn(precision)`` for each precision of ``fn.precisions``, interleaved over ``rounds``."""
    out: dict[str, list[float]] = {p: [] for p in fn.precisions}
    for _ in range(rounds):
        for p in fn.precisions:
            t0 = time.perf_counter()
            fn(p)
            out[p].append(time.perf_counter() - t0)
    return out


def run(device: str, batch: int, rounds: int, methods=METHODS) -> dict[str, Any]:
    import camlens
    from camlens.base.errors import CamlensError
    from camlens.base.io import sample_image
    from camlens.core.inputs import prepare_inputs

    lows = ("bf16", "fp16") if device.startswith("cuda") else ("bf16",)
    images = [sample_image(PHOTOS[i % len(PHOTOS)]) for i in range(batch)]
    rows: dict[str, Any] = {}
    for name, build in family_models().items():
        model = build().to(device)
        x, _, _ = prepare_inputs(images, model)
        for method in methods:
            try:
                ref = camlens.explain(model, x, method)
            except CamlensError as exc:  # guided backprop on a ViT (no ReLU): refused by design
                rows[f"{name} / {method}"] = {"not_applicable": str(exc).splitlines()[0][:200]}
                continue
            row: dict[str, Any] = {}
            for p in lows:
                row[p] = compare(ref, camlens.explain(model, x, method, precision=p))

            def call(p: str, method: str = method, model: nn.Module = model, x: torch.Tensor = x) -> None:
                camlens.explain(model, x, method, precision=p).maps  # noqa: B018  (the maps are made)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()

            call.precisions = ("fp32", *lows)  # type: ignore[attr-defined]
            call("fp32")  # warm-up
            times = timed(call, rounds)
            row["seconds_median"] = {p: statistics.median(v) for p, v in times.items()}
            row["speedup_vs_fp32"] = {
                p: statistics.median(times["fp32"]) / statistics.median(v) for p, v in times.items() if p != "fp32"
            }
            rows[f"{name} / {method}"] = row
            print(f"{name} / {method}: {json.dumps(row)}", file=sys.stderr, flush=True)  # progress
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--methods", default=",".join(METHODS))
    a = ap.parse_args(argv)
    meta = {
        "device": a.device,
        "batch": a.batch,
        "rounds": a.rounds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }
    rows = run(a.device, a.batch, a.rounds, tuple(m for m in a.methods.split(",") if m))
    meta["load_average_after"] = os.getloadavg()
    print(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
