r"""Score-CAM — Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional
Neural Networks", CVPRW 2020.

Each channel :math:`A_k` of the features is upsampled to the input size and min-max normalized
to a mask :math:`H_k \in [0, 1]` (:func:`camlens.base.ops.minmax`: a channel constant up to rounding gives
the mask 0); the masked input :math:`x \odot H_k` is scored by the model, and

.. math:: M_c = \mathrm{ReLU}\Big(\sum_k s_k^c A_k\Big),\qquad s_k^c = \mathrm{softmax}(f(x \odot H_k))_c

(``weighting="prob"``, the paper). ``weighting="channel_softmax"`` uses
:math:`s^c = \mathrm{softmax}_k(f_c(x \odot H_k))` over channels instead (the weighting of
pytorch-grad-cam), ``weighting="logit"`` the raw logit. Callable targets use their own score.

Speed: masked forwards run batched under ``torch.inference_mode()`` (``batch_size`` masked images
per forward, across images; by default 8 on CPU, where larger batches fall out of the caches and
cost more per image — EfficientNet-Lite0 at 224 px: ~25 ms per image at batch 8, ~59 ms at
batch 64 — and 64 on accelerators), on CPU in channels-last memory format once the first batch has
shown that this gives the same logits (oneDNN's faster convolutions; see ``_masked_logits``).
Channels whose normalized masks coincide — in particular the all-zero channels that a ReLU
leaves, which all give the mask 0 — share one forward (``dedupe=True``; exact, since the
normalized low-resolution maps are compared bit for bit and upsampling then normalizing is the
same affine-invariant operation). ``max_channels=m`` keeps only the ``m`` channels with the
largest mean activation (the others get weight 0) for a further speed-up at some cost in fidelity.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from camlens.attribution.registry import Cost, MethodOutput, register
from camlens.base.errors import MethodError
from camlens.base.ops import minmax, spatial_letters
from camlens.core.extra import rows as image_rows
from camlens.targets import take_rows

EPS = 1e-8
PROGRESS_MIN = 256  # masked forwards above which the progress bar shows by default
CPU_BATCH = 8  # masked images per forward on CPU (cache-friendly)
ACCEL_BATCH = 64  # ... on GPUs and other accelerators
CHEAPER_CHANNELS = 64  # the max_channels= the cost estimate suggests for wider layers


def _minmax_rows(t: torch.Tensor) -> torch.Tensor:
    return minmax(t, dims=1)


def _masked_logits(model, imgs: torch.Tensor, layout: dict[str, bool]) -> torch.Tensor:
    """``model(imgs)`` for a batch of masked images; on CPU in float32, in channels-last memory
    format once that is checked to give the same logits.

    oneDNN's channels-last convolutions are 20-35% faster on CPU for these batched inference
    forwards. The first batch runs as given and is the reference: a few of its images run again
    in channels-last format, and only if that raises nothing and the logits agree (to float
    rounding) are the remaining batches converted. A model whose code assumes contiguous
    tensors (``.view`` on a feature map, custom kernels) thus keeps the default layout.
    """
    if "channels_last" not in layout:
        check = imgs.device.type == "cpu" and imgs.dtype == torch.float32 and imgs.dim() == 4 and len(imgs) > 1
        k = min(len(imgs), 4)
        # the same images for the check, copied before an in-place first layer may change them
        alt_in = imgs[:k].contiguous(memory_format=torch.channels_last) if check else None
        logits = model(imgs)
        ok = False
        if alt_in is not None and isinstance(logits, torch.Tensor):  # a tensor output (not a detector's)
            try:
                alt = model(alt_in)
                ref = logits[:k]
                ok = (
                    isinstance(alt, torch.Tensor)
                    and alt.shape == ref.shape
                    and bool(torch.allclose(alt, ref, rtol=1e-4, atol=1e-4 * (1 + float(ref.abs().max()))))
                )
            except RuntimeError:
                ok = False
        layout["channels_last"] = ok
        return logits
    if layout["channels_last"]:
        imgs = imgs.contiguous(memory_format=torch.channels_last)
    return model(imgs)


def _input_masks(keys: torch.Tensor, size: tuple[int, ...], frames, images: list[int]) -> torch.Tensor:
    """Low-resolution masks ``(B, 1, h, w)`` -> ``(B, 1, H, W)`` over the input (bilinear).

    A torchvision detector resizes each image and pads the batch before its backbone, so its
    features cover the padded frame ``(Hb, Wb)``, of which image ``n`` fills ``[0, h_n) × [0, w_n)``:
    the mask is upsampled to the frame, cropped to the image's region and resized to the input —
    the same mapping as the maps (:func:`camlens.models.tasks.frame_maps`). Stretching it over the
    input directly would shift it by up to the padding (31 px of the frame)."""
    if frames is None:
        mode = "bilinear" if keys.dim() == 4 else "trilinear"  # a volume's (B, 1, d, h, w) masks
        return F.interpolate(keys, size=size, mode=mode, align_corners=False)
    full = F.interpolate(keys, size=frames.padded, mode="bilinear", align_corners=False)
    out = torch.empty((keys.shape[0], 1, *size), dtype=keys.dtype, device=keys.device)
    for i, n in enumerate(images):
        hr, wr = frames.resized[n]
        out[i : i + 1] = F.interpolate(full[i : i + 1, :, :hr, :wr], size=size, mode="bilinear", align_corners=False)
    return out


def _channel_jobs(A: torch.Tensor, max_channels: int | None, dedupe: bool) -> list:
    """Per image: which channels, and the unique normalized low-res masks among them:
    ``[(image index, unique keys (U, h*w), inverse (C',), channel ids (C',))]``."""
    N, C = A.shape[:2]
    if max_channels is not None and max_channels < 1:
        raise MethodError("max_channels must be >= 1")
    jobs = []
    for n in range(N):
        ch = torch.arange(C, device=A.device)
        if max_channels is not None and max_channels < C:
            ch = A[n].mean(dim=tuple(range(1, A.dim() - 1))).topk(max_channels).indices.sort().values
        keys = _minmax_rows(A[n, ch].flatten(1))
        if dedupe:
            uniq, inv = torch.unique(keys, dim=0, return_inverse=True)
        else:
            uniq, inv = keys, torch.arange(len(ch), device=A.device)
        jobs.append((n, uniq, inv, ch))
    return jobs


def _layout_checks(x: torch.Tensor, first_batch: int, tensor_output: bool) -> int:
    """Images :func:`_masked_logits` forwards a second time to check the channels-last layout."""
    check = x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and first_batch > 1
    return min(first_batch, 4) if check and tensor_output else 0


def scorecam_cost(ctx, *, batch_size=None, max_channels=None, dedupe=True, **_) -> Cost:
    """One masked forward per distinct channel mask of each image (after ``max_channels`` and the
    deduplication), and the few images of the layout check; ``max_channels=64`` is suggested above
    64 channels."""
    A = ctx.layer_features.detach()
    with torch.inference_mode():
        n = sum(len(uniq) for _, uniq, _, _ in _channel_jobs(A, max_channels, dedupe))
    bs = batch_size or (CPU_BATCH if A.device.type == "cpu" else ACCEL_BATCH)
    x = ctx.x if isinstance(ctx.x, torch.Tensor) else None
    tensor_out = ctx.logits is not None or isinstance(getattr(ctx, "output", None), torch.Tensor)
    n += _layout_checks(x, min(bs, n), tensor_out) if x is not None and n else 0
    cap = CHEAPER_CHANNELS if A.shape[1] > CHEAPER_CHANNELS and (max_channels or A.shape[1]) > CHEAPER_CHANNELS else 0
    return Cost(n, "masked forwards", cheaper={"max_channels": cap} if cap else None)


@register(
    "scorecam",
    paper="Wang et al., Score-CAM, CVPR Workshops 2020",
    summary="channels weighted by the class score of the input masked by each channel",
    needs=("features",),
    title="Score-CAM",
    aliases=("score-cam",),
    cost=scorecam_cost,
    volumes=True,
)
def scorecam(
    ctx,
    *,
    batch_size: int | None = None,
    max_channels: int | None = None,
    weighting: str = "prob",
    dedupe: bool = True,
    progress: bool | None = None,
) -> MethodOutput:
    """``progress``: a tqdm bar on stderr counting masked forwards (rate and ETA); ``None`` shows it
    when there are more than :data:`PROGRESS_MIN` of them (a few seconds of work or more)."""
    if weighting not in ("prob", "channel_softmax", "logit"):
        raise MethodError(f"weighting must be 'prob', 'channel_softmax' or 'logit', not {weighting!r}")
    A = ctx.layer_features.detach()
    if batch_size is None:
        batch_size = CPU_BATCH if A.device.type == "cpu" else ACCEL_BATCH
    if batch_size < 1:
        raise MethodError("batch_size must be >= 1")
    if isinstance(ctx.x, list):
        raise MethodError(
            "scorecam masks one batch of images of one size; these differ in size: explain them one at a time"
        )
    x = ctx.x.detach()
    frames = ctx.frames  # a detector: the features cover its resized, padded frame
    N, low = A.shape[0], tuple(A.shape[2:])  # (h, w), or (d, h, w) for a volume
    high = tuple(x.shape[2:])
    jobs = _channel_jobs(A, max_channels, dedupe)
    # All masked forwards, batched across images.
    flat = [(n, u) for n, uniq, _, _ in jobs for u in range(len(uniq))]
    scores_per_job: list[list[torch.Tensor]] = [[] for _ in jobs]
    layout: dict[str, bool] = {}
    show = len(flat) > PROGRESS_MIN if progress is None else bool(progress)
    bar = tqdm(total=len(flat), desc="scorecam", unit="fwd", disable=not show, file=sys.stderr, leave=False)
    with torch.inference_mode(), bar:
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            keys = torch.stack([jobs[n][1][u] for n, u in chunk]).view(-1, 1, *low)
            masks = _input_masks(keys, high, frames, [n for n, _ in chunk])
            masks = _minmax_rows(masks.flatten(1)).view(-1, 1, *high)
            images = [n for n, _ in chunk]
            imgs = x[images] * masks

            def run(t: torch.Tensor, images: list[int] = images) -> torch.Tensor:
                with image_rows(images[: len(t)]):  # the first rows of the chunk (the channels-last check)
                    return ctx.select(ctx.model(t))

            logits = _masked_logits(run, imgs, layout)
            if ctx.targets.obj is not None:  # a target object scores the raw output of its own images
                s = take_rows(ctx.targets.obj, [n for n, _ in chunk])(logits)
            elif ctx.targets.fn is not None:
                s = ctx.targets.fn(logits)[:, None]
            else:
                cls = ctx.targets.classes.to(logits.device)[[n for n, _ in chunk]]
                src = logits.softmax(dim=1) if weighting == "prob" else logits
                s = src.gather(1, cls)
            for (n, _), row in zip(chunk, s):
                scores_per_job[n].append(row)
            bar.update(len(chunk))
    raw = torch.zeros(N, ctx.k, *low, device=A.device, dtype=A.dtype)
    n_forwards = []
    for (n, uniq, inv, ch), rows in zip(jobs, scores_per_job):
        s = torch.stack(rows)[inv].to(A.dtype)  # (C', K)
        if weighting == "channel_softmax":
            s = s.softmax(dim=0)
        sp = spatial_letters(A)
        raw[n] = torch.einsum(f"ck,c{sp}->k{sp}", s, A[n, ch]).relu()
        n_forwards.append(len(uniq))
    return MethodOutput(raw, extras={"forwards": n_forwards})
