"""Detectors in the web app: list a served detector's detections on an image, explain one.

``GET /api/detections/{image_id}?model=NAME&score_threshold=T`` runs the detector once (no
gradient) and lists its detections above ``T``, best first: each one's ``index`` (its place in the
model's own output), class, score and box in the photo's pixels and in the displayed copy's (the
page draws them). ``POST /api/explain_detection`` ``{image_id, model, methods, index}`` explains
detection ``index`` with each method through a :class:`CandidateDetection` target (that
candidate's score for its label: the map ``camlens.explain`` gives for exactly that detection)
and answers as ``/api/explain`` does, with the detection's index in place of a class id, so the
result routes (heat maps, figure, ``.npy``) serve it unchanged. Only the methods that apply to
detectors are accepted (the page asks ``/api/methods?model=NAME``).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from camlens.base.errors import CamlensError
from camlens.models.card import card_task
from camlens.models.zoo import card_of
from camlens.serve.service import LRU, ImageEntry, Result, ServeError, Service, _panels_of
from camlens.targets import Detection

#: the most detections listed per image
MAX_LISTED = 50


def is_served_detector(net: nn.Module) -> bool:
    """Whether a served model is a detector (its card says so: YOLO, DETR adapters, torchvision)."""
    return card_task(net) == "detection"


def _display_box(box: list[float], img: ImageEntry) -> list[float]:
    h, w = img.rgb.shape[:2]
    dh, dw = img.display.shape[:2]
    return [round(box[0] * dw / w, 2), round(box[1] * dh / h, 2), round(box[2] * dw / w, 2), round(box[3] * dh / h, 2)]


class CandidateDetection(Detection):
    r"""One detection of a detector adapter's output, by its candidate (DETR query, YOLO anchor) and
    label: the score is that candidate's score for that label, :math:`y = s_{a, c}` — exactly that
    detection, where :class:`~camlens.targets.Detection`'s box matching may pick a neighbouring
    candidate of higher IoU x score. Outputs without ``"candidate"`` (torchvision's) fall back to
    the box matching."""

    def __init__(self, box: list[float], label: int, candidate: int | None) -> None:
        super().__init__([box], [label])
        self.candidate = candidate

    def bind(self, output: Any, model: nn.Module | None = None) -> Detection:
        out = super().bind(output, model)
        bound = CandidateDetection.__new__(CandidateDetection)
        bound.__dict__.update(out.__dict__)
        bound.candidate = self.candidate
        return bound

    def match(self, det: Any, ref: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        if self.candidate is None or "candidate" not in det:
            return super().match(det, ref, lab)
        hit = (det["candidate"] == self.candidate) & (det["labels"] == lab.to(det["labels"].device)[0])
        return (det["scores"] * hit.to(det["scores"].dtype)).sum()[None]


class Detections:
    """The detector routes' work over a :class:`~camlens.serve.service.Service` (its models,
    images and results); each image's detections are computed once per model and cached."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self._cache = LRU(64)  # (image id, model) -> every detection of the model's output, in its order

    def _all(self, net: nn.Module, name: str, img: ImageEntry) -> list[dict[str, Any]]:
        key = (img.id, name)
        got = self._cache.get(key)
        if got is not None:
            return got
        x = torch.from_numpy(np.ascontiguousarray(img.rgb)).permute(2, 0, 1).float() / 255
        x = x.to(next((p.device for p in net.parameters()), torch.device("cpu")))
        try:
            with torch.no_grad():
                out = net([x])[0]
        except CamlensError as exc:
            raise ServeError(f"{name} cannot detect on this image: {exc}", 422) from None
        names = card_of(net).class_names if card_of(net) else None  # type: ignore[union-attr]
        dets = []
        for j in range(len(out["scores"])):
            c = int(out["labels"][j])
            cand = int(out["candidate"][j]) if "candidate" in out else None
            box = [float(v) for v in out["boxes"][j]]
            dets.append(
                {
                    "index": j,
                    "class_id": c,
                    "class_name": names[c] if names and 0 <= c < len(names) else str(c),
                    "score": float(out["scores"][j]),
                    "candidate": cand,
                    "box": box,
                    "display_box": _display_box(box, img),
                }
            )
        return self._cache.put(key, dets)

    def _detector(self, model: str | None) -> tuple[str, nn.Module]:
        name = model or self.svc.default_model
        net = self.svc.pool.entry(name).model
        if not is_served_detector(net):
            raise ServeError(f"{name} is not a detector; choose one of the detectors this server was started with", 400)
        return name, net

    def listed(self, image_id: str, model: str | None, score_threshold: float = 0.0) -> dict[str, Any]:
        """The detections scoring at least ``score_threshold``, best first (at most :data:`MAX_LISTED`)."""
        if not 0.0 <= score_threshold <= 1.0:
            raise ServeError(f"score_threshold must be in [0, 1], not {score_threshold}", 400)
        name, _ = self._detector(model)
        img = self.svc.image(image_id)
        with self.svc.pool.use(name) as net:
            dets = self._all(net, name, img)
        shown = sorted((d for d in dets if d["score"] >= score_threshold), key=lambda d: -d["score"])[:MAX_LISTED]
        return {
            "model": name,
            "image": img.info(),
            "score_threshold": score_threshold,
            "detections": [{**d, "rank": r + 1} for r, d in enumerate(shown)],
            "total": len(dets),
        }

    def explain(self, image_id: str, model: str | None, methods: list[str], index: int) -> Result:
        """Detection ``index`` (its place in the model's output) explained by each method."""
        from camlens.api.explainer import explain

        name, net0 = self._detector(model)
        meths = self.svc._check_methods(methods)
        self.svc._check_applicable(net0, name, meths)
        img = self.svc.image(image_id)
        panels: dict[tuple[str, int], Any] = {}
        errors: dict[str, str] = {}
        cost: dict[str, float | None] = {}
        with self.svc.pool.use(name) as net:
            dets = self._all(net, name, img)
            if not 0 <= index < len(dets):
                raise ServeError(
                    f"no detection {index}: {name} has {len(dets)} on this image (0..{len(dets) - 1})", 404
                )
            d = dets[index]
            target = CandidateDetection(d["box"], d["class_id"], d["candidate"])
            for m in meths:
                t0 = time.perf_counter()
                try:
                    exp = explain(net, [img.rgb], method=m, targets=target)
                except CamlensError as exc:
                    errors[m] = str(exc)
                    continue
                ms = (time.perf_counter() - t0) * 1e3
                cost[m] = ms
                (p,) = _panels_of(exp, m, ms, None, img.display.shape[:2])
                panels[(m, index)] = replace(p, cls=index, name=_title(d, dets), prob=math.nan)
        if not panels:
            raise ServeError("; ".join(f"{m}: {e}" for m, e in errors.items()), 400)
        card = card_of(net0)
        res = Result(
            id=uuid.uuid4().hex[:16], image=img, model=name, predictions=[], classes=[index],
            methods=[m for m in meths if m not in errors], panels=panels, errors=errors, cost_ms=cost,
            predict_ms=0.0, random_weights=bool(card and card.extra.get("weights") == "random"), served=name,
        )  # fmt: skip
        return self.svc.results.put(res.id, res)


def _title(d: dict[str, Any], dets: list[dict[str, Any]]) -> str:
    rank = 1 + sum(o["score"] > d["score"] for o in dets)
    return f"detection {rank}: {d['class_name']} (score {d['score']:.3g})"


class ExplainDetectionRequest(BaseModel):
    """``POST /api/explain_detection``'s body: which detection of which image, with which methods."""

    model_config = ConfigDict(extra="forbid")

    image_id: str = Field(max_length=80)
    model: str | None = Field(default=None, max_length=200)
    methods: list[str] = Field(default_factory=lambda: ["gradcam"], max_length=32)
    index: int = Field(ge=0)


def add_detector_routes(app: Any, svc: Service, result_json: Any) -> None:
    """``GET /api/detections/{image_id}`` and ``POST /api/explain_detection`` (see the module docstring);
    ``result_json`` turns a :class:`Result` into the page's JSON (as ``/api/explain`` answers)."""
    dets = Detections(svc)

    @app.get("/api/detections/{image_id}")
    def detections(image_id: str, model: str | None = None, score_threshold: float = 0.0) -> dict[str, Any]:
        return dets.listed(image_id, model, score_threshold)

    @app.post("/api/explain_detection")
    def explain_detection(req: ExplainDetectionRequest) -> dict[str, Any]:
        res = dets.explain(req.image_id, req.model, req.methods, req.index)
        return {**result_json(res), "detection": req.index}


__all__ = [
    "MAX_LISTED",
    "CandidateDetection",
    "Detections",
    "ExplainDetectionRequest",
    "add_detector_routes",
    "is_served_detector",
]
