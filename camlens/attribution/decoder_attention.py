r"""Generic attention through an encoder–decoder detector (DETR, Conditional DETR).

Chefer, Gur & Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers", ICCV 2021 (its rules for DETR). Image tokens :math:`i` (the
:math:`T = h w` cells of the projected backbone map), object queries :math:`q`. For each attention
map :math:`A` (heads :math:`H`) and the gradient :math:`G = \partial y / \partial A` of the target
detection's score :math:`y`: :math:`\bar A = \mathbb{E}_h[(G \odot A)^+]`. Starting from
:math:`R^{ii} = I_T`, :math:`R^{qq} = I_Q`, :math:`R^{qi} = 0`:

* encoder self-attention: :math:`R^{ii} \leftarrow R^{ii} + \bar A\, R^{ii}`;
* decoder self-attention: :math:`R^{qq} \leftarrow R^{qq} + \bar A\, R^{qq}`,
  :math:`R^{qi} \leftarrow R^{qi} + \bar A\, R^{qi}`;
* decoder cross-attention (queries read image tokens):
  :math:`R^{qi} \leftarrow R^{qi} + (\bar R^{qq})^\top \bar A\, \bar R^{ii}`, with the normalisation
  :math:`\bar R = \hat R / \hat R\mathbf{1} + I`, :math:`\hat R = R - I` (each row of the
  aggregated part sums to 1; a zero row stays zero). :math:`R^{qq}` is unchanged (image tokens never
  attend to queries).

The map of a detection is the row of its query, :math:`R^{qi}_{q,\cdot}`, on the :math:`h\times w`
grid (mapped to the photo like every layer map). The detection's query is the one whose box and
label best match the target box (the :class:`~camlens.targets.Detection` score's arg-max).
"""

from __future__ import annotations

import torch

from camlens.attribution.registry import DETECTORS, MethodOutput, register
from camlens.base.errors import MethodError
from camlens.targets import Detection, box_iou


def _rownorm(R: torch.Tensor) -> torch.Tensor:
    """:math:`\bar R = (R - I) / \text{rowsum}(R - I) + I` (zero rows stay zero)."""
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    hat = R - eye
    s = hat.sum(-1, keepdim=True)
    return torch.where(s > 0, hat / s.clamp_min(1e-12), torch.zeros_like(hat)) + eye


def relevance(encoder: list, decoder: list, cross: list) -> torch.Tensor:
    """``R^{qi}`` ``(Q, T)`` from the head-averaged ``(G ⊙ A)^+`` of each layer (one image):
    ``encoder`` ``[(T, T)]``, ``decoder`` ``[(Q, Q)]``, ``cross`` ``[(Q, T)]`` in layer order."""
    T, Q = cross[0].shape[-1], cross[0].shape[-2]
    like = cross[0]
    Rii = torch.eye(T, dtype=like.dtype, device=like.device)
    Rqq = torch.eye(Q, dtype=like.dtype, device=like.device)
    Rqi = torch.zeros(Q, T, dtype=like.dtype, device=like.device)
    for a in encoder:
        Rii = Rii + a @ Rii
    for s, c in zip(decoder, cross):
        Rqq = Rqq + s @ Rqq
        Rqi = Rqi + s @ Rqi
        Rqi = Rqi + _rownorm(Rqq).T @ c @ _rownorm(Rii)
    return Rqi


def _queries(det: Detection, dets: list, rows: int, k: int) -> torch.Tensor:
    """``(N, K)`` the query of each target detection (``-1``: none matched)."""
    out = torch.full((rows, k), -1, dtype=torch.long)
    refs, labs = det.reference_boxes, det.labels
    for n, d in enumerate(dets):
        if len(d["boxes"]) == 0:
            continue
        boxes = d["boxes"].detach()
        for j in range(k):
            if torch.isnan(refs[n, j]).any():
                continue
            iou = box_iou(refs[n, j : j + 1].to(boxes), boxes)[0]
            same = (d["labels"] == labs[n, j]) | (labs[n, j] < 0)
            q = iou * same.to(iou) * d["scores"].detach()
            if float(q.max()) > 0:
                out[n, j] = int(d["candidate"][int(q.argmax())])
    return out


@register(
    "generic_attention_detr",
    paper="Chefer, Gur & Wolf, Generic Attention-model Explainability for Encoder-Decoder Transformers, ICCV 2021",
    summary="relevance of image tokens to a DETR query through encoder, decoder self- and cross-attention",
    needs=(),
    title="Generic attention (DETR)",
    aliases=("chefer_detr",),
    applies_to=DETECTORS,
    boxes=True,
)
def generic_attention_detr(ctx) -> MethodOutput:
    model = ctx.model
    det = ctx.targets.obj
    if not hasattr(model, "attention_pass") or not isinstance(det, Detection):
        raise MethodError(
            "generic_attention_detr explains a DETR or Conditional DETR detector (camlens.models.detectors) "
            "with a Detection target; use gradcam or drise for other detectors"
        )
    xs = list(ctx.x) if isinstance(ctx.x, (list, tuple)) else list(ctx.x.unbind(0))
    with torch.enable_grad():  # an input that requires grad: the attention maps are in the graph even
        ap = model.attention_pass([t.detach().requires_grad_(True) for t in xs])  # with frozen weights
        scores = det(ap.detections)  # (N, K), as the shared pass scored them
        n, k = scores.shape
        queries = _queries(det, ap.detections, n, k)
        h, w = ap.grid
        maps = scores.new_zeros(n, k, h, w)
        mats = [*ap.encoder, *ap.decoder, *ap.cross]
        L = len(ap.encoder)
        D = len(ap.decoder)
        for j in range(k):
            grads = torch.autograd.grad(scores[:, j].sum(), mats, retain_graph=j < k - 1, allow_unused=True)
            bars = [
                torch.zeros_like(a[:, 0]) if g is None else (g * a).clamp_min(0).mean(1)
                for a, g in zip((m.detach() for m in mats), grads)
            ]
            for i in range(n):
                if queries[i, j] < 0:
                    continue
                R = relevance([b[i] for b in bars[:L]], [b[i] for b in bars[L : L + D]], [b[i] for b in bars[L + D :]])
                maps[i, j] = R[queries[i, j]].reshape(h, w)
    return MethodOutput(maps.detach(), extras={"queries": queries.numpy()})
