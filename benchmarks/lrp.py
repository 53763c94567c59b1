"""LRP and AttnLRP against one forward and against Zennit used directly (issue 27):
``python -m benchmarks.lrp [--quick] [--out F.json]``.

ResNet-50 (random weights, batch-norm statistics of one random batch, 224 px, one image, its
top-1 class): camlens ``lrp`` (``epsilon_plus``, its canonizers: exact batch-norm merge and
Zennit's block ``Sum`` modules) and Zennit used directly (``EpsilonPlus(canonizers=
[ResNetCanonizer()])`` with its ``Gradient`` attributor, the backward seeded with the one-hot
logit), the inference forward as the unit. The largest difference of the two relevance maps
(relative to the largest relevance) says that both computed the same thing (ResNet-50's batch
norms have eps = 1e-5: Zennit's merge differs by 1/sqrt(1 + eps) per batch norm). Then ViT-B/16
(torchvision, random weights) at 224 px: camlens ``attnlrp`` against its own inference forward.
Contenders run interleaved round by round (:func:`benchmarks.runner.time_round_robin`).
``--quick``: ResNet-18 at 64 px and a 2-layer ViT at 32 px (a smoke run, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

import camlens

from .runner import machine_info, time_round_robin
from .tasks import Job


def _resnet(arch: str, size: int, device: str) -> tuple[torch.nn.Module, torch.Tensor, int]:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None)
    for m in model.modules():  # batch-norm statistics of one batch: activations of order one
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1)))
    model = model.eval().to(device)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        cls = int(model(x).argmax())
    return model, x, cls


def _zennit_job(model, x: torch.Tensor, cls: int):
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlus
    from zennit.torchvision import ResNetCanonizer

    onehot = F.one_hot(torch.tensor([cls]), 1000).to(x)

    def run() -> torch.Tensor:
        with Gradient(model, EpsilonPlus(canonizers=[ResNetCanonizer()])) as attributor:
            return attributor(x, lambda out: onehot * out)[1]

    return run


def _vit(quick: bool, device: str) -> tuple[torch.nn.Module, torch.Tensor]:
    from torchvision.models.vision_transformer import VisionTransformer, vit_b_16

    torch.manual_seed(0)
    if quick:
        model = VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10
        )
        size = 32
    else:
        model, size = vit_b_16(weights=None), 224
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initialises the head
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    return model.eval().to(device), x


def _rows(jobs: list[Job], times: dict[str, list[float]], log) -> list[dict[str, Any]]:
    unit = statistics.median(times[jobs[0].key])
    rows = []
    for j in jobs:
        med = statistics.median(times[j.key])
        rows.append(
            {"contender": j.key, "median_ms": 1000 * med, "ratio_to_forward": med / unit, "reps": len(times[j.key])}
        )
        log(f"  {j.key:<45} {1000 * med:10.1f} ms  x{med / unit:6.1f} forward")
    return rows


def run(quick: bool, device: str, log=print) -> dict[str, Any]:
    arch, size = ("resnet18", 64) if quick else ("resnet50", 224)
    model, x, cls = _resnet(arch, size, device)
    reps = dict(warmup=1, min_reps=2 if quick else 5, max_reps=3 if quick else 20, budget_s=5 if quick else 120)

    def forward(m, inp):
        def f():
            with torch.inference_mode():
                return m(inp)

        return f

    jobs = [
        Job("forward (inference, batch 1)", forward(model, x)),
        Job("camlens lrp (epsilon_plus)", lambda: camlens.explain(model, x, "lrp", targets=cls)),
    ]
    meta: dict[str, Any] = {"model": arch, "size": size, "class": cls}
    try:
        zennit = _zennit_job(model, x, cls)
        jobs.append(Job("Zennit EpsilonPlus + ResNetCanonizer", zennit))
        ours = camlens.explain(model, x, "lrp", targets=cls).raw[:, 0]
        theirs = zennit()
        meta["max_abs_difference_vs_zennit_relative"] = float((ours - theirs).abs().max() / theirs.abs().max())
    except ImportError as exc:
        log(f"zennit not installed ({exc}): skipped")
    times = time_round_robin(jobs, device=device, log=log, **reps)  # type: ignore[arg-type]
    rows = _rows(jobs, times, log)
    if len(jobs) > 2:
        rows[1]["speedup_vs_zennit"] = rows[2]["median_ms"] / rows[1]["median_ms"]
    vit, xv = _vit(quick, device)
    vjobs = [
        Job("ViT forward (inference, batch 1)", forward(vit, xv)),
        Job("camlens attnlrp", lambda: camlens.explain(vit, xv, "attnlrp")),
    ]
    rows += _rows(vjobs, time_round_robin(vjobs, device=device, log=log, **reps), log)  # type: ignore[arg-type]
    meta["vit"] = "2-layer ViT, 32 px" if quick else "vit_b_16, 224 px"
    log(f"  {meta}")
    return {"machine": machine_info(torch.get_num_threads(), device), "meta": meta, "rows": rows}


def main(argv: Sequence[str] | None = None, log=print) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lrp", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ResNet-18 at 64 px, a 2-layer ViT (a smoke run)")
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
