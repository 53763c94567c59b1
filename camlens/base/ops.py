r"""Small numeric operations shared by the whole package (imports torch only).

**One min–max normalization.** Every map that camlens scales to [0, 1] — ``Explanation.normalized()``,
the overlays and colour maps of :mod:`camlens.viz`, the confidence-drop mask and SSIM of
:mod:`camlens.metrics`, Score-CAM's masks, Gradient × CAM's factors, the fine-tuning report's
overlays — goes through :func:`minmax`:

.. math:: \hat m = \begin{cases} \dfrac{m - \min m}{\max m - \min m} & \max m - \min m > \tau \\
          0 & \text{otherwise} \end{cases}, \qquad
          \tau = u \cdot \varepsilon_{\mathrm{dtype}} \cdot \max(|\min m|, |\max m|)

with :math:`\varepsilon_{\mathrm{dtype}}` the machine epsilon of the map's dtype (float32:
:math:`1.19 \cdot 10^{-7}`) and :math:`u` = :data:`ULPS` = 64. The threshold is *relative*: a map
whose values differ by no more than a few dozen units in the last place of its own magnitude is
constant up to rounding and becomes exactly zero. A constant map upsampled bilinearly from 1×1
features carries about 2 ulp of float32 ripple; an absolute threshold (the former ``1e-8``) took
that ripple for signal and stretched it into [0, 1] noise for maps of magnitude above ~0.05, and
hid genuine contrast in maps of magnitude below ~1e-8. With the relative threshold a
contrast of 1e-3 of the map's magnitude (~8000 ulp) is kept, at any scale. NaN entries give 0.
"""

from __future__ import annotations

import torch

#: a map whose range is at most ``ULPS`` float units of its magnitude is constant (see the module docstring)
ULPS = 64.0


def _dims(dims: int | tuple[int, ...]) -> tuple[int, ...]:
    return (dims,) if isinstance(dims, int) else tuple(dims)


def constant_tolerance(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype, ulps: float = ULPS) -> torch.Tensor:
    r""":math:`\tau = u \cdot \varepsilon_{\mathrm{dtype}} \cdot \max(|lo|, |hi|)`: the largest range
    ``hi - lo`` that is still rounding noise for values of that magnitude in ``dtype``."""
    return ulps * torch.finfo(dtype).eps * torch.maximum(lo.abs(), hi.abs())


def is_constant(t: torch.Tensor, dims: int | tuple[int, ...] = (-2, -1), *, ulps: float = ULPS) -> torch.Tensor:
    """Whether each slice of ``t`` over ``dims`` is constant up to rounding (``keepdim=False``
    boolean tensor); the test :func:`minmax` uses. NaN slices count as constant."""
    work = t if t.dtype in (torch.float32, torch.float64) else t.float()
    d = _dims(dims)
    lo, hi = work.amin(dim=d), work.amax(dim=d)
    dtype = t.dtype if t.is_floating_point() else torch.float32
    return ~(hi - lo > constant_tolerance(lo, hi, dtype, ulps))


def minmax(maps: torch.Tensor, dims: int | tuple[int, ...] = (-2, -1), *, ulps: float = ULPS) -> torch.Tensor:
    """Min–max normalize every slice of ``maps`` over ``dims`` (default: each ``(H, W)`` map) to [0, 1].

    A slice constant up to rounding (range at most ``ulps`` units in the last place of its
    magnitude, see the module docstring) becomes exactly zero; NaN entries become 0. Float
    tensors keep their dtype (half precision is computed in float32, with its own epsilon);
    integer tensors give float32.
    """
    dtype = maps.dtype if maps.is_floating_point() else torch.float32
    work = maps if maps.dtype in (torch.float32, torch.float64) else maps.float()
    d = _dims(dims)
    lo = work.amin(dim=d, keepdim=True)
    hi = work.amax(dim=d, keepdim=True)
    rng = hi - lo
    ok = rng > constant_tolerance(lo, hi, dtype, ulps)
    out = torch.where(ok, (work - lo) / torch.where(ok, rng, torch.ones_like(rng)), torch.zeros_like(work))
    return torch.nan_to_num(out, nan=0.0).to(dtype)


def spatial_axes(t: torch.Tensor, lead: int = 2) -> tuple[int, ...]:
    """The spatial axes of ``t`` after ``lead`` leading axes: ``(2, 3)`` for ``(N, C, h, w)``,
    ``(2, 3, 4)`` for a volume's ``(N, C, d, h, w)``."""
    return tuple(range(lead, t.dim()))


def spatial_letters(t: torch.Tensor, lead: int = 2) -> str:
    """Einsum letters of ``t``'s spatial axes after ``lead`` leading axes: ``"hw"`` for 2-D
    features, ``"dhw"`` for 3-D ones (so that 2-D einsums keep their exact spelling)."""
    n = t.dim() - lead
    if not 1 <= n <= 3:
        raise ValueError(f"expected 1 to 3 spatial axes after {lead} leading ones; got shape {tuple(t.shape)}")
    return "dhw"[3 - n :]


__all__ = ["ULPS", "constant_tolerance", "is_constant", "minmax", "spatial_axes", "spatial_letters"]
