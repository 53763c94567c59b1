"""What is measured: the models, their layer, the input batches and the contenders of each task.

Every contender of a task does the same work on the same batch: maps at input resolution for
the same classes (the top-1 class of each image, computed once beforehand) at the same layer.
camlens gets the layer explicitly like the peers (``camlens``); ``camlens (auto layer)`` is the
default call ``explain(model, x)``, which finds the layer itself.

Models (224 x 224, batch of real photos from scikit-image):

* ``efficientnet_lite0`` (bundled ImageNet weights). Its last activation is a ``ReLU6`` module
  that the network reuses for every block, so no module *outputs* the features that enter the
  pooling; the peers hook module outputs. The benchmark copy therefore gets an ``nn.Identity``
  in front of the pooling (``_avg_pooling = Sequential(features=Identity(), pool=...)``), the
  same computation with a hookable name, ``_avg_pooling.features``, used by every library.
* ``resnet50`` (random weights): ``layer4`` (= the input of the global pooling).
* ``vgg16`` (random weights): ``features.29`` (the ReLU after the last convolution; torchvision's
  VGG has no global pooling, so the automatic choice differs: see the report).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import camlens
from camlens.base.io import sample_image
from camlens.core.inputs import prepare_inputs
from camlens.models.zoo import card_of

from . import peers as P

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
#: every method of the Grad-CAM family plus CAM, asked for in one call
ALL_LAYER_METHODS = ("cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")
#: task names accepted by ``--tasks``
TASKS = ("gradcam", "top5", "topk", "all", "scorecam", "guided_backprop", "surrogate")
#: numbers of classes of the ``topk`` task (Grad-CAM of the K best classes, one call)
KS = (1, 5, 20, 100)
#: the ``topk`` rows also timed with the per-class loop (``grad_batching(False)``), for comparison
LOOP_KS = (20, 100)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    weights: str | None
    layer: str
    cam_ok: bool = True  # GAP + linear head at ``layer`` (CAM applies)


MODELS = {
    "efficientnet_lite0": ModelSpec("efficientnet_lite0", None, "_avg_pooling.features"),
    "resnet50": ModelSpec("resnet50", "random", "layer4"),
    "vgg16": ModelSpec("vgg16", "random", "features.29", cam_ok=False),
}


def load_bench_model(name: str, device: str = "cpu") -> nn.Module:
    """The benchmark's own copy of a model (see the module docstring for EfficientNet-Lite0)."""
    spec = MODELS[name]
    model = camlens.load_model(spec.name, weights=spec.weights)
    if name == "efficientnet_lite0":
        pool = model._avg_pooling
        model._avg_pooling = nn.Sequential(OrderedDict(features=nn.Identity(), pool=pool))
    return model.to(device).eval()


def make_batch(model: nn.Module, n: int, size: int = 224, offset: int = 0) -> tuple[torch.Tensor, list[int]]:
    """``n`` real photos (cycled from photo ``offset``), preprocessed for ``model`` at ``size``; their
    top-1 classes."""
    from dataclasses import replace

    card = card_of(model)
    pp = replace(card.preprocess, size=(size, size)) if card else None
    images = [sample_image(PHOTOS[(offset + i) % len(PHOTOS)]) for i in range(n)]
    x, _, _ = prepare_inputs(images, model, pp)
    with torch.inference_mode():
        classes = model(x).argmax(1).tolist()
    return x.clone(), classes


@dataclass
class Contender:
    """One timed call. ``scale`` multiplies its time (e.g. a per-image peer run on one image of
    a batch of ``N``: ``scale = N``); ``ref`` names the contender its maps are compared with."""

    task: str
    impl: str
    fn: Callable[[], Any]
    scale: float = 1.0
    note: str = ""
    ref: str | None = None
    close: Callable[[], None] = field(default=lambda: None)
    #: not the same work as camlens' (e.g. a peer's "guided backprop" that is the plain gradient)
    different_work: str = ""

    @property
    def key(self) -> str:
        return f"{self.task}|{self.impl}"


def explain_full(*args: Any, **kwargs: Any) -> Any:
    """``camlens.explain`` with every map built at input resolution (``exp.maps``), as the peers
    return them: a layer method's maps are otherwise upsampled only when first used."""
    out = camlens.explain(*args, **kwargs)
    for e in out.values() if isinstance(out, dict) else [out]:
        e.maps  # noqa: B018
    return out


def maps_of(out: Any) -> torch.Tensor:
    """The maps of any contender's result as an ``(N, -1)`` float tensor."""
    if isinstance(out, dict):
        out = next(iter(out.values()))
    if isinstance(out, camlens.Explanation):  # pixel methods: the (N, C, H, W) attribution itself
        out = out.raw[:, 0] if out.raw.dim() == 5 else out.maps[:, 0]
    return torch.as_tensor(out).detach().float().cpu().flatten(1)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest per-image Pearson correlation between two ``(N, D)`` map batches."""
    a = a.double() - a.double().mean(1, keepdim=True)
    b = b.double() - b.double().mean(1, keepdim=True)
    r = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-30)
    return float(r.min())


def forward_contender(model: nn.Module, x: torch.Tensor) -> Contender:
    def fwd():
        with torch.inference_mode():
            return model(x)

    return Contender("forward", "torch", fwd, note="inference_mode forward")


def no_grad_forward_contender(model: nn.Module, x: torch.Tensor) -> Contender:
    """The forward under ``torch.no_grad()``: what the part below a cut layer costs (camlens runs it
    without recording, but not as inference tensors: those must never reach the model's state)."""

    def fwd():
        with torch.no_grad():
            return model(x)

    return Contender("forward", "torch no_grad", fwd, note="no_grad forward")


def _peer(
    task: str,
    dist: str,
    adapter,
    byname: bool,
    model: nn.Module,
    layer: str,
    x,
    classes,
    *,
    scale: float = 1.0,
    ref: str = "camlens",
) -> Contender | None:
    mine = copy.deepcopy(model)
    try:
        call = adapter(mine, layer if byname else (mine.get_submodule(layer) if layer else None), x, classes)
    except ImportError:
        return None
    impl = call.label or P.PEERS[dist]
    return Contender(task, impl, call.run, scale=scale, note=call.note, ref=ref, close=call.close)


def gradient_contenders(
    name: str, model: nn.Module, x: torch.Tensor, classes: list[int], tasks: tuple[str, ...], with_peers: bool = True
) -> list[Contender]:
    """Forward, Grad-CAM (camlens, its automatic layer, the peers), top-5, all layer methods, and
    guided backprop (when camlens has it registered) on one batch."""
    spec = MODELS[name]
    layer = spec.layer
    n = x.shape[0]
    out = [forward_contender(model, x), no_grad_forward_contender(model, x)]
    if "gradcam" in tasks:
        out.append(Contender("gradcam", "camlens", lambda: explain_full(model, x, "gradcam", classes, layer=layer)))
        out.append(
            Contender(
                "gradcam",
                "camlens (auto layer)",
                lambda: explain_full(model, x, "gradcam", classes),
                ref="camlens",
                note="layer=None: the features entering the global pooling",
            )
        )
        if with_peers:
            for dist, adapter, byname in P.ADAPTERS["gradcam"]:
                c = _peer("gradcam", dist, adapter, byname, model, layer, x, classes)
                if c is not None:
                    out.append(c)
    if "top5" in tasks:
        out.append(
            Contender(
                "top5",
                "camlens",
                lambda: explain_full(model, x, "gradcam", "top5", layer=layer),
                note="Grad-CAM of the 5 best classes, one call",
            )
        )
    if "topk" in tasks:
        from camlens.core.engine import grad_batching

        def top(k: int, batched: bool = True):
            def fn():
                with grad_batching(batched):
                    return camlens.explain(model, x, "gradcam", f"top{k}", layer=layer)

            return fn

        for k in KS:
            out.append(Contender("topk", f"camlens K={k}", top(k), note=f"Grad-CAM of the {k} best classes, one call"))

        def top_maps(k: int):
            def fn():
                return explain_full(model, x, "gradcam", f"top{k}", layer=layer)

            return fn

        out.append(
            Contender(
                "topk",
                f"camlens K={KS[-1]} +maps",
                top_maps(KS[-1]),
                ref=f"camlens K={KS[-1]}",
                note="the same, then every map built at input resolution (exp.maps)",
            )
        )
        for k in LOOP_KS:
            out.append(
                Contender(
                    "topk",
                    f"camlens K={k} loop",
                    top(k, False),
                    ref=f"camlens K={k}",
                    note="grad_batching(False): one backward per class (the 0.1 engine)",
                )
            )
    if "all" in tasks:
        meths = [m for m in ALL_LAYER_METHODS if spec.cam_ok or m != "cam"]
        out.append(
            Contender(
                "all", "camlens", lambda: explain_full(model, x, meths, classes, layer=layer), note=", ".join(meths)
            )
        )
    if "guided_backprop" in tasks and "guided_backprop" in camlens.methods():
        out.append(Contender("guided_backprop", "camlens", lambda: explain_full(model, x, "guided_backprop", classes)))
        if with_peers:
            for dist, adapter, byname in P.ADAPTERS["guided_backprop"]:
                if dist == "grad-cam":  # one image per call: time one image, count it N times
                    c = _peer(
                        "guided_backprop", dist, adapter, byname, model, "", x[:1], classes[:1], scale=n, ref=None
                    )
                    if c is not None:
                        c.note = f"one image per call; {n} x the time of one image"
                else:
                    c = _peer("guided_backprop", dist, adapter, byname, model, "", x, classes)
                if c is not None:
                    if not any(isinstance(m, nn.ReLU) for m in model.modules()):
                        # both peers replace nn.ReLU modules only: on a ReLU6 network (EfficientNet-Lite0)
                        # their "guided backprop" is the plain gradient, a different (cheaper) computation
                        c.different_work = "plain gradient: the peer replaces nn.ReLU modules only"
                    out.append(c)
    return out


def scorecam_contenders(
    name: str,
    model: nn.Module,
    x: torch.Tensor,
    classes: list[int],
    channels: tuple[int, ...] = (),
    with_peers: bool = True,
) -> list[Contender]:
    """Score-CAM on one batch: camlens (default weighting; pytorch-grad-cam's weighting; and the
    ``max_channels`` caps), pytorch-grad-cam's ScoreCAM and TorchCAM's ScoreCAM (defaults)."""
    layer = MODELS[name].layer
    out = [forward_contender(model, x)]

    def cl(**kw):
        return lambda: explain_full(model, x, "scorecam", classes, layer=layer, **kw)

    out.append(Contender("scorecam", "camlens", cl(), note="weighting='prob' (the paper)"))
    out.append(
        Contender(
            "scorecam",
            "camlens channel_softmax",
            cl(weighting="channel_softmax"),
            note="weighting='channel_softmax' (the peers' weighting)",
        )
    )
    for m in channels:
        out.append(
            Contender(
                "scorecam",
                f"camlens channel_softmax max_channels={m}",
                cl(weighting="channel_softmax", max_channels=m),
                ref="camlens channel_softmax",
                note=f"top {m} channels by mean activation",
            )
        )
    if with_peers:
        for dist, adapter, byname in P.ADAPTERS["scorecam"]:
            c = _peer("scorecam", dist, adapter, byname, model, layer, x, classes, ref="camlens channel_softmax")
            if c is not None:
                out.append(c)
    return out
