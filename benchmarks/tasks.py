"""Detection and black-box benchmarks (issue 14): ``python -m benchmarks.tasks [--quick] [--out F.json]``.

1. **Grad-CAM on a detector** (``fasterrcnn_mobilenet_v3_large_320_fpn``, random weights, every box
   kept so that there is something to explain): camlens ``explain(..., targets=Detection(boxes,
   labels))`` — one forward, one backward per box, ``K`` maps — against pytorch-grad-cam's
   documented recipe (``GradCAM(model, [model.backbone], reshape_transform=
   fasterrcnn_reshape_transform)`` with ``FasterRCNNBoxScoreTarget``), called once per box (``K``
   maps, as camlens) and once for all boxes (its usual one combined map). The layers differ by
   design: the recipe concatenates the |FPN levels| resized to the coarsest; camlens explains the
   backbone stage feeding every FPN level (``backbone.body.16``). The inference forward is the unit.
2. **RISE's cost per mask** against a batched inference forward of the same batch size (target:
   within 10 %), and against a straightforward per-mask loop (one masked forward per mask).

Contenders run interleaved round by round (:func:`benchmarks.runner.time_round_robin`); medians and
ratios are reported. Only tiny runs belong in the test suite; the lead reruns the full one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import camlens
from camlens.attribution.perturbation import rise_masks
from camlens.targets import Detection

from .runner import machine_info, time_round_robin


def pearson_whole(a: Any, b: Any) -> float:
    """Pearson correlation of two maps (tensors or arrays of any shape) taken whole, in float64
    (0 for a constant map): the one agreement figure of the benchmark scripts."""
    x = torch.as_tensor(a).detach().cpu().double().flatten()
    y = torch.as_tensor(b).detach().cpu().double().flatten()
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / (x.norm() * y.norm()).clamp_min(1e-300))


@dataclass
class Job:
    key: str
    fn: Callable[[], Any]
    scale: float = 1.0  # divide the time by this (per mask / per image)


def _median_ms(times: list[float], scale: float) -> float:
    return 1000 * statistics.median(times) / scale


def detector_jobs(quick: bool, device: str) -> tuple[list[Job], dict[str, Any]]:
    size = 160 if quick else 320
    k = 2 if quick else 5
    torch.manual_seed(0)
    model = camlens.load_model(
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        "random",
        min_size=size,
        max_size=2 * size,
        box_score_thresh=0.0,
        device=device,
    )
    x = torch.rand(1, 3, size, int(size * 1.25), device=device)
    with torch.inference_mode():
        out = model(x)
    boxes, labels = out[0]["boxes"][:k].clone(), out[0]["labels"][:k].clone()
    jobs = [Job("forward (inference)", lambda: _inference(model, x))]
    jobs.append(
        Job("camlens gradcam, K boxes", lambda: camlens.explain(model, x, "gradcam", targets=Detection(boxes, labels)))
    )
    agnostic = Detection(boxes, labels)  # class-agnostic map; the random detector has no detection >= 0.5
    jobs.append(
        Job("camlens eigencam (class-agnostic)", lambda: camlens.explain(model, x, "eigencam", targets=agnostic))
    )
    try:
        from pytorch_grad_cam import EigenCAM, GradCAM
        from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget
        from pytorch_grad_cam.utils.reshape_transforms import fasterrcnn_reshape_transform
    except ImportError:  # pragma: no cover - optional peer
        return jobs, {"k": k, "size": size, "peer": None}
    layers = [model.backbone]
    b_np, l_np = boxes.cpu().numpy(), labels.cpu().tolist()
    eigen = EigenCAM(model, target_layers=layers, reshape_transform=fasterrcnn_reshape_transform)
    box_target = [FasterRCNNBoxScoreTarget(l_np, b_np)]  # the tutorial passes it (EigenCAM ignores it)
    jobs.append(Job("pytorch-grad-cam EigenCAM recipe (documented)", lambda: eigen(x, targets=box_target)))
    # the gradient recipe on the same layer: FPN outputs are a dict, so no gradient hook fires
    grad = GradCAM(model, target_layers=layers, reshape_transform=fasterrcnn_reshape_transform)
    try:
        grad(x, targets=[FasterRCNNBoxScoreTarget(l_np, b_np)])
        grad_note = "runs"

        def pgc_each():
            return [grad(x, targets=[FasterRCNNBoxScoreTarget([l_np[j]], b_np[j : j + 1])]) for j in range(k)]

        jobs.append(Job("pytorch-grad-cam GradCAM + FasterRCNNBoxScoreTarget, per box", pgc_each))
    except Exception as exc:
        grad_note = f"fails: {type(exc).__name__}: {exc}"
    finally:
        model.eval()  # pytorch-grad-cam leaves the model as it found it? make sure
    return jobs, {"k": k, "size": size, "peer": "pytorch-grad-cam", "pgc_gradcam_on_backbone": grad_note}


def _inference(model, x):
    with torch.inference_mode():
        return model(x)


def rise_jobs(quick: bool, device: str) -> tuple[list[Job], dict[str, Any]]:
    import torchvision

    size = 64 if quick else 224
    n_masks = 32 if quick else 512
    bs = 8 if device == "cpu" else 64
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval().to(device)
    x = torch.rand(1, 3, size, size, device=device)
    xb = x.expand(bs, -1, -1, -1).contiguous()

    def loop():  # the straightforward per-mask loop: one masked forward per mask
        get = rise_masks(n_masks, (size, size), cell=7, p=0.5, seed=0, device=device)
        acc = torch.zeros(size, size, device=device)
        with torch.inference_mode():
            for i in range(n_masks):
                m = get(i, i + 1)
                s = F.softmax(model(x * m), dim=1)[0, 0]
                acc += s * m[0, 0]
        return acc / (n_masks * 0.5)

    jobs = [
        Job(f"forward (inference, batch {bs}) per image", lambda: _inference(model, xb), scale=bs),
        Job(
            f"camlens rise per mask (batch {bs})",
            lambda: camlens.explain(model, x, "rise", targets=0, n_masks=n_masks, batch_size=bs, progress=False),
            scale=n_masks,
        ),
        Job("per-mask loop per mask", loop, scale=n_masks),
    ]
    return jobs, {"size": size, "n_masks": n_masks, "batch": bs}


def run(quick: bool, device: str, log=print) -> dict[str, Any]:
    reps = dict(warmup=1, min_reps=1 if quick else 5, max_reps=2 if quick else 15, budget_s=5 if quick else 120)
    result: dict[str, Any] = {"machine": machine_info(torch.get_num_threads(), device), "groups": {}}
    for name, make in (("detector_gradcam", detector_jobs), ("rise_cost", rise_jobs)):
        jobs, meta = make(quick, device)
        log(f"{name}: {meta}")
        times = time_round_robin(jobs, device=device, log=log, **reps)  # type: ignore[arg-type]
        unit = _median_ms(times[jobs[0].key], jobs[0].scale)
        rows = []
        for j in jobs:
            ms = _median_ms(times[j.key], j.scale)
            rows.append({"contender": j.key, "median_ms": ms, "ratio_to_first": ms / unit, "reps": len(times[j.key])})
            log(f"  {j.key:<50} {ms:9.2f} ms  x{ms / unit:.2f}")
        result["groups"][name] = {"meta": meta, "rows": rows}
    return result


def main(argv: Sequence[str] | None = None, log=print) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tasks", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, not a measurement)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    res = run(args.quick, args.device, log=log)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
