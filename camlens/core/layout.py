r"""Layout adapter: token sequences and channels-last maps seen as ``(N, D, h, w)`` feature maps.

Layer methods (CAM, Grad-CAM…) work on a spatial feature map :math:`A \in \mathbb{R}^{D\times h\times w}`.
Transformers and some hybrids produce other layouts at the layers worth explaining:

* **tokens** ``(N, T, D)`` (ViT, DeiT, timm, Hugging Face): ``T = p + h\,w`` where the ``p``
  *prefix tokens* (class, distillation, register tokens) come first and the ``h\,w`` patch tokens
  follow in row-major order. The map is ``A[:, d, i, j] = tokens[:, p + i\,w + j, d]``.
* **channels-last** ``(N, h, w, D)`` (torchvision Swin and ConvNeXt blocks, timm): a permutation.

How the layout is found (:func:`infer_layout`), from the captured shape and the input size
``H x W``:

* tokens: with the patch size ``s`` of the model's patch embedding (the first ``Conv2d`` whose
  kernel equals its stride), ``h, w = H // s, W // s`` (or the ceiling, for padded embeddings) and
  ``p = T - h\,w``; without one, every ``p`` in ``0..16`` with a factorisation ``T - p = h\,w``
  whose grid fits the input (some stride ``s`` with ``|h - H/s| < 1`` and ``|w - W/s| < 1``)
  is a candidate, the one whose aspect ratio is closest to ``H/W`` wins (then the smallest ``p``).
  Any resolution and non-square inputs work.
* 4-D ``(N, a, b, c)``: channels-first when ``(b, c)`` fits the input, else channels-last when
  ``(a, b)`` does, else left as it is.

``reshape=`` overrides it: ``"none"`` (no adapter), ``"nchw"``, ``"nhwc"``, ``"tokens"``
(automatic prefix), ``(h, w)`` (tokens with ``p = T - h\,w``) or ``(p, h, w)``.

Clips and volumes ``(N, C, D, H, W)`` (the input size is then ``D x H x W``):

* tubelet tokens ``(N, T, D)`` (video transformers: MViT, ViViT, VideoMAE): ``T = p + t\,h\,w``,
  the tokens after the prefix in ``(t, h, w)`` row-major order, so
  ``A[:, d, i, j, k] = tokens[:, p + (i\,h + j)\,w + k, d]``. The grid comes from the model's patch
  embedding (the first strided ``Conv3d``, its output size by the convolution formula) and the
  grids a stage that pools by 2 makes of it (:func:`tubelet_grid`);
* 5-D ``(N, a, b, c, e)``: channels-first when ``(b, c, e)`` fits the input, else channels-last
  (torchvision Swin3D's stages, ``(N, t, h, w, D)``) when ``(a, b, c)`` does;
* ``reshape=(t, h, w)`` or ``(p, t, h, w)`` gives the tubelet grid by hand.

Gradients: :func:`camlens.core.capture.capture` applies :meth:`Layout.to_nchw` to the captured tensor,
makes the ``(N, D, h, w)`` view the captured leaf and hands the model :meth:`Layout.from_nchw` of
it, so the layer gradient is taken with respect to the reshaped features themselves; the values
the model sees are bit-identical to what it produced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from camlens.base.errors import LayoutError

MAX_PREFIX = 16  # class + distillation + register tokens: at most this many prefix tokens
ReshapeSpec = None | str | tuple[int, int] | tuple[int, int, int] | tuple[int, int, int, int]


@dataclass(frozen=True)
class Layout:
    """How a captured tensor maps to ``(N, D, h, w)``: ``kind`` is ``"nchw"`` (as is), ``"nhwc"``
    or ``"tokens"`` with ``prefix`` leading tokens and a ``grid`` ``(h, w)``; ``how`` says how it
    was determined."""

    kind: str = "nchw"
    prefix: int = 0
    grid: tuple[int, ...] | None = None  # (h, w), or (t, h, w) for the tubelet tokens of a clip / volume
    how: str = "auto"

    @property
    def adapted(self) -> bool:
        return self.kind != "nchw"

    def describe(self) -> str:
        if self.kind == "tokens":
            g = self.grid or (0, 0)
            pre = f"{self.prefix} prefix token(s) dropped, " if self.prefix else ""
            sizes, what = ", ".join(map(str, g)), ("tubelet" if len(g) == 3 else "patch")
            return (
                f"tokens (N, {self.prefix + math.prod(g)}, D) -> (N, D, {sizes}): {pre}"
                f"{'x'.join(map(str, g))} {what} grid ({self.how})"
            )
        axes = "d, h, w" if self.grid is not None and len(self.grid) == 3 else "h, w"
        if self.kind == "nhwc":
            return f"channels-last (N, {axes}, D) -> (N, D, {axes}) ({self.how})"
        return f"(N, C, {axes}) as captured"

    def to_nchw(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``t`` in this layout -> ``((N, D, h, w) features, prefix tokens (N, p, D) or None)``."""
        if self.kind == "tokens":
            assert self.grid is not None
            n, _, d = t.shape
            feats = t[:, self.prefix :, :].transpose(1, 2).reshape(n, d, *self.grid)
            return feats, (t[:, : self.prefix, :] if self.prefix else None)
        if self.kind == "nhwc":
            return t.permute(0, t.dim() - 1, *range(1, t.dim() - 1)), None
        return t, None

    def from_nchw(self, feats: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
        """The inverse of :meth:`to_nchw`: a new tensor (never a view of ``feats``) in this layout."""
        if self.kind == "tokens":
            tokens = feats.flatten(2).transpose(1, 2)
            return torch.cat([prefix, tokens], dim=1) if prefix is not None else tokens.contiguous()
        if self.kind == "nhwc":
            return feats.permute(0, *range(2, feats.dim()), 1).clone()
        return feats.clone()


NCHW = Layout()


def grid_fits(h: int, w: int, H: int, W: int) -> bool:
    """Whether an ``h x w`` grid is what some stride ``s`` makes of an ``H x W`` input:
    ``|h - H/s| < 1`` and ``|w - W/s| < 1`` for one ``s`` (the two open intervals of ``s`` meet)."""
    if h < 1 or w < 1 or h > H or w > W:
        return False

    def interval(a: int, A: int) -> tuple[float, float]:
        return A / (a + 1), (A / (a - 1) if a > 1 else math.inf)

    lo1, hi1 = interval(h, H)
    lo2, hi2 = interval(w, W)
    return max(lo1, lo2) < min(hi1, hi2)


def patch_size(model: nn.Module) -> tuple[int, int] | None:
    """The stride of the model's patch embedding: the first ``Conv2d`` whose kernel equals its
    stride (> 1), e.g. torchvision's ``conv_proj``, timm's ``patch_embed.proj``; else ``None``."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == tuple(m.stride) and max(m.stride) > 1:
            return (int(m.stride[0]), int(m.stride[1]))
    return None


def token_grid(T: int, input_hw: tuple[int, int], patch: tuple[int, int] | None = None) -> tuple[int, int, int] | None:
    """``(prefix, h, w)`` for ``T`` tokens of an ``H x W`` input (see the module docstring), or None."""
    H, W = input_hw
    if patch is not None:
        for rnd in (math.floor, math.ceil):
            h, w = int(rnd(H / patch[0])), int(rnd(W / patch[1]))
            if h >= 1 and w >= 1 and 0 <= T - h * w <= MAX_PREFIX:
                return T - h * w, h, w
    best: tuple[float, int, int, int] | None = None
    target = math.log(H / W)
    for p in range(0, min(MAX_PREFIX, T - 1) + 1):
        n = T - p
        for h in range(1, math.isqrt(n) + 1):
            if n % h:
                continue
            for hh, ww in ((h, n // h), (n // h, h)):
                if grid_fits(hh, ww, H, W):
                    key = (abs(math.log(hh / ww) - target), p, hh, ww)
                    if best is None or key[:2] < best[:2]:
                        best = key
    return None if best is None else (best[1], best[2], best[3])


def infer_layout(
    shape: tuple[int, ...],
    input_hw: tuple[int, ...] | None,
    patch: tuple[int, int] | None = None,
    reshape: ReshapeSpec = None,
    what: str = "the captured features",
    embed: tuple[int, int, int] | None = None,
) -> Layout:
    """The :class:`Layout` of a captured tensor of ``shape`` (see the module docstring); for a clip or
    volume input (``input_hw`` is ``(D, H, W)``) see :func:`tubelet_grid` (``embed``: the token grid
    of the model's patch embedding, :func:`embed_grid`)."""
    dims = len(shape)
    if isinstance(reshape, str):
        key = reshape.lower().replace("-", "_")
        if key == "none":
            return Layout(how="reshape='none'")
        if key == "nchw":
            return Layout(how="reshape='nchw'")
        if key in ("nhwc", "channels_last"):
            if dims not in (4, 5):
                raise LayoutError(f"reshape={reshape!r} needs (N, h, w, D) features; {what} have shape {shape}")
            return Layout("nhwc", grid=tuple(shape[1:-1]), how=f"reshape={reshape!r}")
        if key != "tokens" and key != "auto":
            raise LayoutError(
                f"reshape={reshape!r} is not a layout; use None, 'none', 'nchw', 'nhwc', 'tokens', (h, w) or "
                "(prefix, h, w)"
            )
        if key == "tokens" and dims != 3:
            raise LayoutError(f"reshape='tokens' needs (N, T, D) tokens; {what} have shape {shape}")
        reshape = None
    volume = input_hw is not None and len(input_hw) == 3
    if volume:
        return _infer_volume(shape, input_hw, embed, reshape, what)  # type: ignore[arg-type]
    if isinstance(reshape, (tuple, list)):
        if dims != 3:
            raise LayoutError(f"reshape={tuple(reshape)} describes tokens (N, T, D); {what} have shape {shape}")
        T = shape[1]
        if len(reshape) == 2:
            h, w = (int(v) for v in reshape)
            p = T - h * w
        elif len(reshape) == 3:
            p, h, w = (int(v) for v in reshape)
        else:
            raise LayoutError("reshape= as a tuple is (h, w) or (prefix, h, w)")
        if h < 1 or w < 1 or p < 0 or p + h * w != T or (len(reshape) == 2 and p > MAX_PREFIX):
            raise LayoutError(
                f"reshape={tuple(reshape)} does not fit {T} tokens (prefix + h*w must equal {T}, and (h, w) "
                f"leaves at most {MAX_PREFIX} prefix tokens; give (prefix, h, w) for more)"
            )
        return Layout("tokens", p, (h, w), how=f"reshape={tuple(reshape)}")
    if reshape is not None:
        raise LayoutError(f"reshape= must be None, a layout name or a tuple, not {type(reshape).__name__}")
    hw = (input_hw[0], input_hw[1]) if input_hw is not None else None  # an image: (H, W)
    if dims == 4:
        if hw is None:
            return NCHW
        _, a, b, c = shape
        if grid_fits(b, c, *hw) or not grid_fits(a, b, *hw):
            return NCHW
        return Layout("nhwc", how=f"({a}, {b}) fits the {hw[0]}x{hw[1]} input, ({b}, {c}) does not")
    if dims == 3:
        if hw is None:
            raise LayoutError(f"{what} are tokens of shape {shape} but the input size is unknown; pass reshape=(h, w)")
        got = token_grid(shape[1], hw, patch)
        if got is None:
            raise LayoutError(
                f"{what} are {shape[1]} tokens of shape {shape}, and no grid of patch tokens (plus at most "
                f"{MAX_PREFIX} class/register tokens) fits the {hw[0]}x{hw[1]} input; pass "
                "reshape=(h, w) or reshape=(prefix, h, w), or choose another layer"
            )
        p, h, w = got
        how = f"patch {patch[0]}x{patch[1]}" if patch is not None and (h, w) in _patch_grids(hw, patch) else "grid"
        return Layout("tokens", p, (h, w), how=f"{how} of the {hw[0]}x{hw[1]} input")
    return NCHW


def fits_volume(g: tuple[int, ...], dhw: tuple[int, ...]) -> bool:
    """Whether a ``(t, h, w)`` grid is what some strides make of a ``D x H x W`` input: ``t <= D`` (any
    temporal stride) and ``(h, w)`` fits ``(H, W)`` with one spatial stride (:func:`grid_fits`)."""
    return len(g) == 3 and 1 <= g[0] <= dhw[0] and grid_fits(g[1], g[2], dhw[1], dhw[2])


def embed_grid(model: nn.Module, dhw: tuple[int, int, int]) -> tuple[int, int, int] | None:
    """The ``(t, h, w)`` output grid of the model's tubelet / patch embedding for a ``D x H x W`` input:
    the first ``Conv3d`` with a stride > 1 (a ViViT / VideoMAE tubelet embedding, MViT's
    ``conv_proj``), by the convolution's size formula; ``None`` without one."""
    for m in model.modules():
        if isinstance(m, nn.Conv3d) and max(m.stride) > 1 and not isinstance(m.padding, str):
            k, st, pad, dil = m.kernel_size, m.stride, m.padding, m.dilation
            g = tuple((n + 2 * pad[i] - dil[i] * (k[i] - 1) - 1) // st[i] + 1 for i, n in enumerate(dhw))
            return g if min(g) >= 1 else None  # type: ignore[return-value]
    return None


def tubelet_grid(T: int, embed: tuple[int, int, int] | None) -> tuple[int, int, int, int] | None:
    r"""``(prefix, t, h, w)`` for ``T`` tubelet tokens of a clip / volume whose patch embedding makes a
        ``t_0 x h_0 x w_0`` grid: the grids a stage that pools by 2 makes of it,
        ``(\lceil t_0/2^i
    ceil, \lceil h_0/2^j
    ceil, \lceil w_0/2^j
    ceil)`` (MViT's query pooling),
        with ``p = T - t\,h\,w`` in ``0..16`` prefix tokens; the fewest temporal poolings ``i`` win (video
        transformers rarely pool time), then the fewest prefix tokens. ``None`` when none fits."""
    if embed is None:
        return None
    t0, h0, w0 = embed
    best: tuple[int, int, int, tuple[int, int, int]] | None = None
    for i in range(4):
        for j in range(6):
            g = (-(-t0 // 2**i), -(-h0 // 2**j), -(-w0 // 2**j))
            p = T - math.prod(g)
            if 0 <= p <= MAX_PREFIX and (best is None or (i, p, j) < best[:3]):
                best = (i, p, j, g)
    return None if best is None else (best[1], *best[3])


def _infer_volume(
    shape: tuple[int, ...],
    dhw: tuple[int, int, int],
    embed: tuple[int, int, int] | None,
    reshape: ReshapeSpec,
    what: str,
) -> Layout:
    """:func:`infer_layout` for a clip / volume input ``(N, C, D, H, W)``: tokens ``(N, T, D)`` of a
    tubelet grid, channels-first or channels-last 5-D features."""
    dims = len(shape)
    if isinstance(reshape, (tuple, list)):
        if dims != 3 or len(reshape) not in (3, 4):
            raise LayoutError(
                f"for a clip or volume, reshape= as a tuple is (t, h, w) or (prefix, t, h, w) of tokens (N, T, D); "
                f"{what} have shape {shape}"
            )
        vals = tuple(int(v) for v in reshape)
        p, g = (shape[1] - math.prod(vals), vals) if len(vals) == 3 else (vals[0], vals[1:])
        if min(g) < 1 or p < 0 or p + math.prod(g) != shape[1] or (len(vals) == 3 and p > MAX_PREFIX):
            raise LayoutError(
                f"reshape={tuple(reshape)} does not fit {shape[1]} tokens (prefix + t*h*w must equal {shape[1]}, and "
                f"(t, h, w) leaves at most {MAX_PREFIX} prefix tokens; give (prefix, t, h, w) for more)"
            )
        return Layout("tokens", p, g, how=f"reshape={tuple(reshape)}")
    if dims == 5:
        if fits_volume(shape[2:], dhw) or not fits_volume(shape[1:4], dhw):
            return Layout(grid=tuple(shape[2:]))
        return Layout("nhwc", grid=tuple(shape[1:4]), how=f"{shape[1:4]} fits the {'x'.join(map(str, dhw))} input")
    if dims != 3:
        return NCHW
    got = tubelet_grid(shape[1], embed)
    if got is None:
        emb = "no strided Conv3d patch embedding found" if embed is None else f"patch embedding grid {embed}"
        raise LayoutError(
            f"{what} are {shape[1]} tokens of shape {shape} and no tubelet grid fits the "
            f"{'x'.join(map(str, dhw))} input ({emb}); pass reshape=(t, h, w) or reshape=(prefix, t, h, w), "
            "or choose another layer"
        )
    p, t, h, w = got
    how = f"from the {'x'.join(map(str, embed or ()))} patch-embedding grid of the {'x'.join(map(str, dhw))} input"
    return Layout("tokens", p, (t, h, w), how=how)


def _patch_grids(input_hw: tuple[int, int], patch: tuple[int, int]) -> set[tuple[int, int]]:
    H, W = input_hw
    return {(int(r(H / patch[0])), int(r(W / patch[1]))) for r in (math.floor, math.ceil)}


@dataclass
class LayoutRequest:
    """What :func:`camlens.core.capture.capture` needs to adapt a capture: the input size, the model
    (for its patch size, looked up only when tokens are seen) and the user's ``reshape=``."""

    input_hw: tuple[int, ...] | None  # (H, W); (D, H, W) for clips and volumes
    model: nn.Module | None = None
    reshape: ReshapeSpec = None
    _patch: tuple[int, ...] | bool | None = False

    def patch(self) -> tuple[int, int] | None:
        """The 2-D patch size (:func:`patch_size`), looked up once."""
        if self._patch is False:
            self._patch = patch_size(self.model) if self.model is not None else None
        return self._patch  # type: ignore[return-value]

    def embed(self) -> tuple[int, int, int] | None:
        """For a clip / volume input: the tubelet grid of the patch embedding (:func:`embed_grid`), once."""
        if self._patch is False:
            dhw = self.input_hw
            self._patch = embed_grid(self.model, dhw) if self.model is not None and dhw is not None else None  # type: ignore[arg-type]
        return self._patch  # type: ignore[return-value]

    def layout(self, shape: tuple[int, ...], what: str = "the captured features") -> Layout:
        tokens = len(shape) == 3 and (self.reshape is None or self.reshape in ("tokens", "auto"))
        if self.input_hw is not None and len(self.input_hw) == 3:
            return infer_layout(shape, self.input_hw, None, self.reshape, what, self.embed() if tokens else None)
        return infer_layout(shape, self.input_hw, self.patch() if tokens else None, self.reshape, what)


__all__ = [
    "Layout",
    "LayoutRequest",
    "ReshapeSpec",
    "embed_grid",
    "fits_volume",
    "grid_fits",
    "infer_layout",
    "patch_size",
    "token_grid",
    "tubelet_grid",
]
