"""FullGrad, RefineCAM and LeGrad against the peers that ship them (issue 27):
``python -m benchmarks.newmethods [--quick] [--out F.json]``.

Two groups, each with its own inference forward as the unit, contenders interleaved round by round
(:func:`benchmarks.runner.time_round_robin`), one image, its top-1 class, random weights:

* ResNet-50 at 224 px: camlens ``fullgrad`` (``scale="channel"``) vs pytorch-grad-cam's ``FullGrad``;
  camlens ``refinecam`` (``layer2, layer3, layer4``, Grad-CAM++, ``resolution="input"``) vs
  pytorch-grad-cam's ``RefineCAM``, and camlens ``refinecam`` with ``base="layercam"`` vs TorchCAM's
  ``RefineCAM(base_method=LayerCAM)``;
* ViT-B/16 at 224 px (its zero-initialised head re-drawn, so that the gradients are not all zero):
  camlens ``legrad`` with TorchCAM's mean-token head vs TorchCAM's ``LeGrad`` over all 12 blocks.

The Pearson correlation of each camlens map with its peer's says that both computed the same thing.
``--quick``: ResNet-18 at 64 px and a 2-block ViT at 32 px (a smoke run, not a measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

import camlens

from .runner import machine_info, time_round_robin
from .tasks import Job, pearson_whole


def _quiet(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run():
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return fn()

    return run


def cnn_jobs(quick: bool, device: str) -> tuple[list[Job], list[tuple[str, str, Callable]], dict]:
    """Jobs on ResNet and (ours, theirs, how to compare their outputs) pairs."""
    import torchvision

    arch, size = ("resnet18", 64) if quick else ("resnet50", 224)
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval().to(device)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        cls = int(model(x).argmax())
    jobs = [Job(f"{arch} forward (inference)", lambda: model(x).detach())]
    jobs.append(Job("camlens fullgrad", lambda: camlens.explain(model, x, "fullgrad", targets=cls, scale="channel")))
    layers = "layer2,layer3,layer4"
    jobs.append(
        Job(
            "camlens refinecam (gradcam++)",
            lambda: camlens.explain(model, x, "refinecam", targets=cls, layers=layers, resolution="input"),
        )
    )
    jobs.append(
        Job(
            "camlens refinecam (layercam)",
            lambda: camlens.explain(model, x, "refinecam", targets=cls, layers=layers, base="layercam"),
        )
    )
    pairs: list[tuple[str, str, Callable]] = []
    with contextlib.suppress(ImportError):
        from pytorch_grad_cam import FullGrad, RefineCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        tgt = [ClassifierOutputTarget(cls)]
        m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
        fg = _quiet(lambda: FullGrad(m1, []))()
        rc = RefineCAM(m2, [m2.layer2, m2.layer3, m2.layer4])
        jobs.append(Job("pytorch-grad-cam FullGrad", _quiet(lambda: fg(x, targets=tgt))))
        jobs.append(Job("pytorch-grad-cam RefineCAM", _quiet(lambda: rc(x, targets=tgt))))
        pairs += [
            ("camlens fullgrad", "pytorch-grad-cam FullGrad", lambda o, t: pearson_whole(o.maps[0, 0], t[0])),
            (
                "camlens refinecam (gradcam++)",
                "pytorch-grad-cam RefineCAM",
                lambda o, t: pearson_whole(o.maps[0, 0], t[0]),
            ),
        ]
    with contextlib.suppress(ImportError):
        from torchcam.methods import LayerCAM
        from torchcam.methods import RefineCAM as TcRefine

        m3 = copy.deepcopy(model)
        ext = TcRefine(m3, ["layer2", "layer3", "layer4"], input_shape=(3, size, size), base_method=LayerCAM)

        def torchcam_refine():
            return ext(cls, m3(x))[0].detach()

        jobs.append(Job("TorchCAM RefineCAM (LayerCAM)", torchcam_refine))
        pairs.append(
            (
                "camlens refinecam (layercam)",
                "TorchCAM RefineCAM (LayerCAM)",
                lambda o, t: pearson_whole(o.raw[0, 0], t[0]),
            )
        )
    return jobs, pairs, {"cnn": arch, "cnn_size": size, "class": cls}


def vit_jobs(quick: bool, device: str) -> tuple[list[Job], list[tuple[str, str, Callable]], dict]:
    """Jobs on a torchvision ViT: camlens legrad vs TorchCAM's LeGrad (same mean-token head)."""
    from torchvision.models.vision_transformer import VisionTransformer, vit_b_16

    torch.manual_seed(0)
    if quick:
        size = 32
        model = VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10
        )
    else:
        size, model = 224, vit_b_16(weights=None)
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initialises the head
    model = model.eval().to(device)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        cls = int(model(x).argmax())
    head = lambda z: model.heads(model.encoder.ln(z.mean(1)))  # noqa: E731  TorchCAM's score projection
    jobs = [
        Job("vit forward (inference)", lambda: model(x).detach()),
        Job("camlens legrad", lambda: camlens.explain(model, x, "legrad", targets=cls, head=head)),
    ]
    pairs: list[tuple[str, str, Callable]] = []
    with contextlib.suppress(ImportError):
        from torchcam.methods import LeGrad

        m2 = copy.deepcopy(model)
        ext = LeGrad(m2, list(m2.encoder.layers))

        def torchcam_legrad():
            return ext(cls, m2(x))[0].detach()

        jobs.append(Job("TorchCAM LeGrad", torchcam_legrad))
        pairs.append(("camlens legrad", "TorchCAM LeGrad", lambda o, t: pearson_whole(o.raw[0, 0], t[0])))
    return jobs, pairs, {"vit": "vit_b_16" if not quick else "tiny", "vit_size": size}


def _group(jobs, pairs, quick: bool, device: str, log) -> tuple[list[dict], dict]:
    outs = {j.key: j.fn() for j in jobs}  # also the warm-up
    agree = {f"pearson {a} vs {b}": cmp(outs[a], outs[b]) for a, b, cmp in pairs}
    del outs
    reps = dict(warmup=0, min_reps=2 if quick else 3, max_reps=3 if quick else 5, budget_s=5 if quick else 60)
    times = time_round_robin(jobs, device=device, log=log, **reps)
    unit = statistics.median(times[jobs[0].key])
    rows = []
    for j in jobs:
        med = statistics.median(times[j.key])
        rows.append(
            {"contender": j.key, "median_ms": 1000 * med, "ratio_to_forward": med / unit, "reps": len(times[j.key])}
        )
        log(f"  {j.key:<40} {1000 * med:10.1f} ms  x{med / unit:7.1f} forward")
    for a, b, _ in pairs:
        ta, tb = statistics.median(times[a]), statistics.median(times[b])
        log(f"  {a} vs {b}: {tb / ta:.2f}x the peer's speed; {agree[f'pearson {a} vs {b}']:.6f} correlation")
    return rows, agree


def run(quick: bool, device: str, log=print) -> dict[str, Any]:
    rows: list[dict] = []
    meta: dict[str, Any] = {}
    for build in (cnn_jobs, vit_jobs):
        jobs, pairs, info = build(quick, device)
        got, agree = _group(jobs, pairs, quick, device, log)
        rows += got
        meta |= info | agree
    log(f"  {meta}")
    return {"machine": machine_info(torch.get_num_threads(), device), "meta": meta, "rows": rows}


def main(argv: Sequence[str] | None = None, log=print) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.newmethods", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ResNet-18 at 64 px, a tiny ViT (a smoke run)")
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
