r"""The fine-tuning objective of the notebooks: softmax cross-entropy plus L2 on the weights only.

.. math::

    \mathcal{L} = \frac{1}{N}\sum_n -\log \mathrm{softmax}(z_n)_{y_n}
                  \;+\; \lambda \sum_{W} \tfrac{1}{2}\lVert W\rVert_2^2

where the sum runs over the ``weight`` tensors of the convolution and linear layers that are
being trained (``requires_grad``) — biases and normalization parameters (BatchNorm, LayerNorm,
GroupNorm scales and shifts) are excluded. This is notebook 000/003's
``CE + 0.0005 * sum(tf.nn.l2_loss(W))`` with ``tf.nn.l2_loss(W) = sum(W**2) / 2``, where only
the trainable variables named ``W`` enter. It is an explicit term of the loss (not an optimizer's
``weight_decay``), so the reported loss is the quantity minimized, for SGD and AdamW alike. Its
gradient :math:`\lambda W` equals SGD's coupled weight decay restricted to those tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

#: module types whose ``weight`` is decayed
DECAYED = (_ConvNd, nn.Linear)


def decayed_parameters(model: nn.Module, trainable_only: bool = True) -> list[tuple[str, nn.Parameter]]:
    """``(name, weight)`` of every convolution / linear layer (no biases, no norm parameters).

    A weight shared by several modules is listed once.
    """
    out: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for mname, m in model.named_modules():
        if isinstance(m, DECAYED) and isinstance(getattr(m, "weight", None), nn.Parameter):
            w = m.weight
            assert isinstance(w, nn.Parameter)
            if id(w) in seen or (trainable_only and not w.requires_grad):
                continue
            seen.add(id(w))
            out.append((f"{mname}.weight" if mname else "weight", w))
    return out


def l2_penalty(model: nn.Module, trainable_only: bool = True) -> torch.Tensor:
    r""":math:`\sum_W \lVert W\rVert^2 / 2` over :func:`decayed_parameters` (a 0-d tensor)."""
    params = [w for _, w in decayed_parameters(model, trainable_only)]
    if not params:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return torch.stack([w.pow(2).sum() for w in params]).sum() / 2


def regularized_loss(
    logits: torch.Tensor, target: torch.Tensor, model: nn.Module, weight_decay: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""``(total, cross_entropy, penalty)`` with ``total = CE + weight_decay * penalty``."""
    ce = F.cross_entropy(logits, target)
    if weight_decay:
        pen = l2_penalty(model).to(ce.dtype)
        return ce + weight_decay * pen, ce, pen
    return ce, ce, torch.zeros((), device=ce.device, dtype=ce.dtype)


__all__ = ["decayed_parameters", "l2_penalty", "regularized_loss"]
