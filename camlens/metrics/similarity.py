r"""Similarity of two sets of maps, and class sensitivity.

* :func:`spearman` — Spearman rank correlation per map pair: the Pearson correlation of the
  average ranks (ties share their mean rank, as :func:`scipy.stats.spearmanr`). ``absolute=True``
  ranks :math:`|m|` (Adebayo et al. 2018 report both). A constant map has no ranking: the
  correlation is 1 when both maps are constant and 0 when only one is (never NaN).
* :func:`ssim` — structural similarity (Wang, Bovik, Sheikh & Simoncelli, IEEE TIP 2004) of maps
  min-max normalized to [0, 1] (data range 1), an 11-tap Gaussian window of :math:`\sigma = 1.5`,
  :math:`C_1 = (0.01)^2`, :math:`C_2 = (0.03)^2`, averaged over the valid (unpadded) positions:

  .. math:: \mathrm{SSIM} = \mathrm{mean}\,\frac{(2\mu_a\mu_b + C_1)(2\sigma_{ab} + C_2)}
            {(\mu_a^2 + \mu_b^2 + C_1)(\sigma_a^2 + \sigma_b^2 + C_2)}.

  Maps smaller than the window use a window of their size. Volume maps ``(N, D, H, W)`` use the
  same window along each of the three axes (for the sanity check of 3-D models).
* :func:`class_sensitivity` — how similar the maps of two *different* classes on the same image
  are (a map that ignores the class is not explaining the decision); lower is better.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from camlens.api.explainer import ExplainRequest
from camlens.base._util import gaussian_kernel1d
from camlens.base.errors import InputError
from camlens.base.ops import is_constant, minmax
from camlens.core.inputs import prepare_inputs
from camlens.metrics._common import check_batch_size, explain_maps, logits_of, resolve_classes

SIMILARITIES = ("spearman_abs", "spearman", "ssim", "pearson")


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both map sets as float64 ``(N, H, W)`` on ``a``'s device, and which maps are constant —
    judged in their **own** dtype by :func:`camlens.base.ops.is_constant` (range within 64 ulps of the
    map's magnitude: a float32 map upsampled from a constant one ripples by ~1e-7 of its value,
    while a map of tiny values, 1e-13, can carry real contrast)."""
    a = torch.as_tensor(a).detach()
    b = torch.as_tensor(b).detach()
    if a.dim() == 2:
        a = a[None]
    if b.dim() == 2:
        b = b[None]
    if a.shape != b.shape or a.dim() not in (3, 4):
        raise InputError(
            "maps to compare must both be (N, H, W) (or volumes (N, D, H, W)) with equal shapes; "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    dims = tuple(range(1, a.dim()))
    ca, cb = is_constant(a, dims), is_constant(b, dims).to(a.device)
    return a.double(), b.to(a.device).double(), ca, cb


def average_ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks ``1..P`` of each row of ``(N, P)``, ties sharing their mean rank (vectorized)."""
    n, p = v.shape
    sv, order = v.sort(dim=1, stable=True)
    pos = torch.arange(p, device=v.device).expand(n, p)
    new_group = torch.ones(n, p, dtype=torch.bool, device=v.device)
    new_group[:, 1:] = sv[:, 1:] != sv[:, :-1]
    # first and last sorted position of each element's tie group
    start = torch.where(new_group, pos, torch.zeros_like(pos)).cummax(dim=1).values
    last_of_group = torch.ones(n, p, dtype=torch.bool, device=v.device)
    last_of_group[:, :-1] = new_group[:, 1:]
    end_marks = torch.where(last_of_group, pos, torch.full_like(pos, p))
    end = end_marks.flip(1).cummin(dim=1).values.flip(1)
    mean_rank = (start + end).double() / 2 + 1
    out = torch.empty(n, p, dtype=torch.float64, device=v.device)
    out.scatter_(1, order, mean_rank)
    return out


def _pearson(a: torch.Tensor, b: torch.Tensor, ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation of ``(N, P)``; rows flagged constant (``ca``, ``cb``) give 1
    when both are, 0 when one is."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    r = (a * b).sum(dim=1) / (na * nb).clamp_min(1e-300)
    r = torch.where(ca & cb, torch.ones_like(r), torch.where(ca | cb, torch.zeros_like(r), r))
    return r.clamp(-1, 1)


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each map pair ``(N, H, W)`` -> ``(N,)`` (constant maps as :func:`spearman`)."""
    a, b, ca, cb = _pair(a, b)
    return _pearson(a.flatten(1), b.flatten(1), ca, cb).float().cpu()


def spearman(a: torch.Tensor, b: torch.Tensor, absolute: bool = False) -> torch.Tensor:
    """Spearman rank correlation of each map pair ``(N, H, W)`` -> ``(N,)`` in [-1, 1]."""
    if absolute:
        a, b = torch.as_tensor(a).detach().abs(), torch.as_tensor(b).detach().abs()
    a, b, ca, cb = _pair(a, b)
    ra, rb = average_ranks(a.flatten(1)), average_ranks(b.flatten(1))
    # a constant map has no ranking (its rounding ripple would rank noise): 1 (both) or 0 (one)
    return _pearson(ra, rb, ca, cb).float().cpu()


def ssim(
    a: torch.Tensor, b: torch.Tensor, *, normalize: bool = True, window: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """SSIM of each map pair ``(N, H, W)`` -> ``(N,)`` (see the module docstring). ``normalize``:
    min-max normalize each map to [0, 1] first (constant maps become zeros)."""
    a, b, _, _ = _pair(a, b)
    if a.dim() == 4:
        return _ssim_3d(a, b, normalize=normalize, window=window, sigma=sigma)
    if normalize:
        a, b = minmax(a).double(), minmax(b).double()
    h, w = a.shape[-2:]
    kh, kw = min(window, h), min(window, w)
    gy = gaussian_kernel1d(kh, sigma, a.device, torch.float64).view(1, 1, -1, 1)
    gx = gaussian_kernel1d(kw, sigma, a.device, torch.float64).view(1, 1, 1, -1)
    # the five local statistics in one batch of separable "valid" convolutions
    stack = torch.stack([a, b, a * a, b * b, a * b], dim=1).flatten(0, 1)[:, None]
    f = F.conv2d(F.conv2d(stack, gy), gx)[:, 0].view(a.shape[0], 5, h - kh + 1, w - kw + 1)
    mu_a, mu_b = f[:, 0], f[:, 1]
    saa = f[:, 2] - mu_a**2
    sbb = f[:, 3] - mu_b**2
    sab = f[:, 4] - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return s.flatten(1).mean(dim=1).float().cpu()


def _ssim_3d(a: torch.Tensor, b: torch.Tensor, *, normalize: bool, window: int, sigma: float) -> torch.Tensor:
    """:func:`ssim` of volume maps ``(N, D, H, W)``: the same statistics over a separable 3-D
    Gaussian window (``min(window, side)`` taps per axis), averaged over the valid positions."""
    if normalize:
        dims = (1, 2, 3)
        a, b = minmax(a, dims).double(), minmax(b, dims).double()
    stack = torch.stack([a, b, a * a, b * b, a * b], dim=1).flatten(0, 1)[:, None]  # (5N, 1, D, H, W)
    for axis, side in enumerate(a.shape[1:]):
        k = min(window, side)
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k
        stack = F.conv3d(stack, gaussian_kernel1d(k, sigma, a.device, torch.float64).view(shape))
    f = stack[:, 0].view(a.shape[0], 5, -1)
    mu_a, mu_b = f[:, 0], f[:, 1]
    saa, sbb, sab = f[:, 2] - mu_a**2, f[:, 3] - mu_b**2, f[:, 4] - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return s.mean(dim=1).float().cpu()


def similarity(a: torch.Tensor, b: torch.Tensor, kind: str = "spearman_abs") -> torch.Tensor:
    """``"spearman_abs"``, ``"spearman"``, ``"ssim"`` or ``"pearson"`` of each map pair -> ``(N,)``."""
    key = kind.strip().lower()
    if key == "spearman_abs":
        return spearman(a, b, absolute=True)
    if key == "spearman":
        return spearman(a, b)
    if key == "ssim":
        return ssim(a, b)
    if key == "pearson":
        return pearson(a, b)
    raise InputError(f"unknown similarity {kind!r}; use one of {', '.join(SIMILARITIES)}")


def _other_classes(other: Any, logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    n = logits.shape[0]
    if isinstance(other, str):
        key = other.strip().lower()
        if key == "last":
            return logits.argmin(dim=1).cpu()
        if key in ("top2", "second", "next"):
            masked = logits.clone()
            masked[torch.arange(n), classes.to(masked.device)] = -float("inf")
            return masked.argmax(dim=1).cpu()
        raise InputError(f"unknown other={other!r}; use 'last', 'top2', a class id or one id per image")
    t = torch.as_tensor(other, dtype=torch.long).flatten()
    if t.numel() == 1:
        t = t.expand(n).clone()
    if t.numel() != n:
        raise InputError(f"{t.numel()} 'other' classes for {n} images")
    if torch.any((t < 0) | (t >= logits.shape[1])):
        raise InputError(f"other class out of range 0..{logits.shape[1] - 1}")
    return t


def class_sensitivity(
    model: nn.Module,
    inputs: Any,
    maps: Any = "gradcam",
    targets: Any = None,
    *,
    other: Any = "last",
    similarity_kind: str = "spearman_abs",
    batch_size: int = 32,
    preprocess=None,
    explain_options: dict[str, Any] | ExplainRequest | None = None,
) -> torch.Tensor:
    """Similarity of the maps of the target class and of another class on the same images, ``(N,)``.

    Args:
        maps: a method name (maps for both classes from one :func:`camlens.explain` pass with a
            two-column target table), or a pair ``(maps_target, maps_other)`` of ``(N, H, W)``.
        targets: first class per image (default: top-1).
        other: the second class: ``"last"`` (the least probable class, default: the most different
            decision), ``"top2"`` (the most probable class other than the target), or ids.
        similarity_kind: ``"spearman_abs"`` (default), ``"spearman"``, ``"ssim"`` or ``"pearson"``.

    A class-sensitive method gives *low* values; a value near 1 means the map barely depends on
    the class (as Guided Backprop often does).
    """
    batch_size = check_batch_size(batch_size)
    if isinstance(maps, (tuple, list)) and len(maps) == 2 and not isinstance(maps[0], str):
        a, b = (torch.as_tensor(m) for m in maps)
        return similarity(a, b, similarity_kind)
    if not isinstance(maps, str):
        raise InputError(
            "class_sensitivity needs maps for two classes: pass a method name, or a pair (maps_target, maps_other)"
        )
    if model is None:
        raise InputError("class_sensitivity with a method name needs the model")
    x, _, _ = prepare_inputs(inputs, model, preprocess)
    logits = logits_of(model, x, batch_size)
    classes = resolve_classes(model, x, targets, batch_size, logits=logits)
    second = _other_classes(other, logits, classes)
    both = torch.stack([classes, second], dim=1)
    m = explain_maps(model, x, maps, both, batch_size, explain_options)
    return similarity(m[:, 0], m[:, 1], similarity_kind)
