"""Transformer benchmarks: Grad-CAM and the attention methods on torchvision ``vit_b_16`` and
``swin_t`` (random weights, 224 px) against the forward pass and pytorch-grad-cam with its
documented ``reshape_transform``, in one run (same batch, same classes, round-robin timing).

    python -m benchmarks.transformers                      # the full cases (the lead's run)
    python -m benchmarks.transformers --quick              # one round, batch 1: a smoke run

Contenders per model:

* ``forward``: ``model(x)`` under ``inference_mode`` (the unit of the ratios);
* ``gradcam|camlens``: ``explain(model, x, "gradcam", classes, layer=LAYER)``; tokens / channels-last
  features are reshaped by camlens' layout adapter (no user code);
* ``gradcam|camlens (auto layer)``: ``explain(model, x, "gradcam", classes)``;
* ``gradcam|pytorch-grad-cam``: ``GradCAM(model, [LAYER], reshape_transform=...)`` with the
  transform from its documentation (ViT: drop the class token, ``reshape(B, 14, 14, C)``, channels
  first; Swin: channels first);
* ViT only: ``attention_rollout|camlens`` and ``generic_attention|camlens`` (no peer ships them).

``LAYER``: ViT ``encoder.layers.encoder_layer_11.ln_1`` (the norm before the last attention, what
pytorch-grad-cam's ViT example hooks); Swin ``norm`` (the final norm, ``(N, 7, 7, 768)``).
Results go to ``benchmarks/results/transformers-TIME.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import camlens

from .cases import Contender, explain_full, forward_contender
from .runner import ROOT, agreement, first_round, machine_info, time_round_robin

LAYERS = {"vit_b_16": "encoder.layers.encoder_layer_11.ln_1", "swin_t": "norm"}


def vit_reshape_transform(t: torch.Tensor, height: int = 14, width: int = 14) -> torch.Tensor:
    """pytorch-grad-cam's documented ViT transform (its ``vit_example.py``)."""
    result = t[:, 1:, :].reshape(t.size(0), height, width, t.size(2))
    return result.transpose(2, 3).transpose(1, 2)


def swin_reshape_transform(t: torch.Tensor) -> torch.Tensor:
    """torchvision's Swin gives ``(B, h, w, C)``: channels first."""
    return t.permute(0, 3, 1, 2)


def bench_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = camlens.load_model(name, weights="random")
    for m in model.modules():  # torchvision zero-initialises the ViT head: random logits need weights
        if isinstance(m, nn.Linear) and not m.weight.any():
            nn.init.normal_(m.weight, std=0.02)
    return model.eval()


def contenders(name: str, model: nn.Module, x: torch.Tensor, classes: list[int], peers: bool) -> list[Contender]:
    layer = LAYERS[name]
    out = [forward_contender(model, x)]
    out.append(Contender("gradcam", "camlens", lambda: explain_full(model, x, "gradcam", classes, layer=layer)))
    out.append(
        Contender(
            "gradcam",
            "camlens (auto layer)",
            lambda: explain_full(model, x, "gradcam", classes),
            ref=None,
            note="layer=None",
        )
    )
    if peers:
        try:
            from pytorch_grad_cam import GradCAM
            from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

            mine = copy.deepcopy(model)
            rt = vit_reshape_transform if name.startswith("vit") else swin_reshape_transform
            cam = GradCAM(model=mine, target_layers=[mine.get_submodule(layer)], reshape_transform=rt)
            tg = [ClassifierOutputTarget(c) for c in classes]
            out.append(
                Contender(
                    "gradcam",
                    "pytorch-grad-cam",
                    lambda: torch.from_numpy(cam(input_tensor=x, targets=tg)),
                    ref="camlens",
                    note="documented reshape_transform",
                    close=cam.activations_and_grads.release,
                )
            )
        except ImportError:
            pass
    if name.startswith("vit"):
        for m in ("attention_rollout", "generic_attention"):
            out.append(Contender(m, "camlens", lambda m=m: explain_full(model, x, m, classes)))
    return out


def run_model(name: str, batch: int, args, log=print) -> list[dict[str, Any]]:
    import statistics

    model = bench_model(name)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        classes = model(x).argmax(1).tolist()
    conts = contenders(name, model, x, classes, not args.no_peers)
    try:
        outs, _ = first_round(conts)
        agree = agreement(conts, outs)
        del outs
        times = time_round_robin(
            conts, warmup=args.warmup, min_reps=args.min_reps, max_reps=args.max_reps, budget_s=args.budget, log=log
        )
    finally:
        for c in conts:
            c.close()
    fwd = statistics.median(times["forward|torch"]) * 1000
    rows = []
    for c in conts:
        ms = statistics.median(times[c.key]) * 1000
        rows.append(
            {
                "task": c.task,
                "impl": c.impl,
                "model": name,
                "batch": batch,
                "layer": LAYERS[name],
                "ms": ms,
                "reps": len(times[c.key]),
                "ratio_to_forward": ms / fwd,
                "pearson_vs_ref": agree.get(c.key),
                "note": c.note,
            }
        )
        r = agree.get(c.key)
        log(
            f"    {c.task:<18} {c.impl:<24} {ms:9.1f} ms  x{ms / fwd:.2f}  (n={len(times[c.key])})"
            + ("" if r is None else f"  r={r:.4f}")
        )
    return rows


def main(argv: Sequence[str] | None = None, log=print) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.transformers", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vit_b_16,swin_t")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--max-reps", type=int, default=11)
    p.add_argument("--budget", type=float, default=45.0)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--quick", action="store_true", help="batch 1, one timed round, no warm-up")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.warmup, args.min_reps, args.max_reps, args.budget = "1", 0, 1, 1, 0.0
    torch.set_num_threads(args.threads)
    doc: dict[str, Any] = {"machine": machine_info(args.threads, "cpu"), "config": vars(args) | {"out": None}}
    doc["results"] = []
    for name in args.models.split(","):
        for b in (int(v) for v in args.batches.split(",")):
            log(f"[{name} batch {b}]")
            doc["results"] += run_model(name, b, args, log)
    out = args.out or ROOT / "benchmarks" / "results" / f"transformers-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
