r"""Model-parameter randomization sanity check (Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim,
"Sanity Checks for Saliency Maps", NeurIPS 2018).

If a map explains the *model*, it must change when the model's learned weights are destroyed.
**Cascading randomization** re-draws the weights layer by layer from the top (the classifier)
down to the input, and after each step compares the maps of the partly random network with the
original maps, for the same images and the same target classes (the original top-1 by default):

* Spearman rank correlation of the absolute maps (``spearman_abs``, the paper's main figure) and of
  the signed maps (``spearman``), see :func:`camlens.metrics.spearman`;
* SSIM of the min-max normalized absolute maps (``ssim``), see :func:`camlens.metrics.ssim`.

The paper's finding: Guided Backprop (and Guided Grad-CAM) stay highly similar to the original
maps even when the top layers are random, while the gradient and Grad-CAM do not.

Randomization works on a ``copy.deepcopy`` of the model: the user's model is never modified.
Units: the model's parameterized children in execution order, containers (``Sequential``,
``ModuleList``, ``ModuleDict``) expanded, so EfficientNet-Lite0 gives ``_fc``, ``_bn1``,
``_conv_head``, ``_blocks.15`` … ``_blocks.0``, ``_bn0``, ``_conv_stem`` (top-down); pass
``layers=`` to choose. ``init="normal"`` (default) re-draws every parameter tensor of the unit
from a normal distribution with that tensor's own mean and standard deviation (activation scales
stay plausible, so no layer saturates or overflows; a constant tensor stays constant);
``init="reset"`` calls the modules' own ``reset_parameters`` (PyTorch's default initialization,
also re-setting batch-norm statistics). Draws come from a CPU generator seeded by ``seed`` and the
step, so a cascade is reproducible on any device and ``mode="independent"`` (only one unit random
at a time) uses the same draws.

3-D models (volumes and clips ``(N, C, D, H, W)``) go the same way: their maps ``(N, D, H, W)`` are
compared over all voxels (Spearman of the voxel ranks; SSIM with the Gaussian window along each of
the three axes, :func:`camlens.metrics.ssim`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from camlens.api.explainer import ExplainRequest, explain
from camlens.base._util import eval_mode
from camlens.base.errors import InputError, LayerNotFoundError
from camlens.core.engine import model_input
from camlens.core.inputs import prepare_inputs
from camlens.metrics._common import check_batch_size, explain_kwargs, explain_targets, resolve_classes
from camlens.metrics.similarity import spearman, ssim

METRICS = ("spearman_abs", "spearman", "ssim")


# --------------------------------------------------------------------------------------------
# units and randomization
# --------------------------------------------------------------------------------------------
def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _children_units(module: nn.Module, prefix: str) -> list[str]:
    out = []
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if not _has_params(child):
            continue
        if isinstance(child, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            out += _children_units(child, full)
        else:
            out.append(full)
    return out


def randomization_layers(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The units randomized by :func:`sanity_randomization`, top-down (last executed first).

    Parameterized children of the model, containers expanded (a lone wrapper child is expanded
    too); units that never run in a forward pass of ``x[:1]`` are left out.
    """
    units = _children_units(model, "")
    while len(units) == 1:
        inner = _children_units(model.get_submodule(units[0]), units[0])
        if not inner:
            break
        units = inner
    if not units:
        raise InputError("the model has no parameters to randomize")
    first: dict[str, int] = {}
    handles = []
    for name in units:

        def pre(_m, _a, name=name):
            first.setdefault(name, len(first))

        handles.append(model.get_submodule(name).register_forward_pre_hook(pre))
    try:
        with eval_mode(model), torch.inference_mode():
            model(model_input(x[:1]))
    finally:
        for h in handles:
            h.remove()
    ran = [u for u in units if u in first]
    return sorted(ran, key=lambda u: -first[u])


def _generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + 17 * step + 1)


@torch.no_grad()
def randomize_(module: nn.Module, generator: torch.Generator, init: str = "normal") -> None:
    """Re-draw the parameters of ``module`` in place (see the module docstring for ``init``)."""
    if init == "normal":
        for p in module.parameters():
            flat = p.detach().float()
            mean = flat.mean().cpu()
            std = flat.std().cpu() if p.numel() > 1 else torch.tensor(0.0)
            r = torch.randn(p.shape, generator=generator) * std + mean
            p.copy_(r.to(device=p.device, dtype=p.dtype))
    elif init == "reset":
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in module.modules():
                if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                    cpu = copy.deepcopy(m).cpu()  # draw on the (forked, seeded) CPU generator only
                    cpu.reset_parameters()
                    for (_, dst), (_, src) in zip(
                        m.named_parameters(recurse=False), cpu.named_parameters(recurse=False), strict=True
                    ):
                        dst.copy_(src.to(dst.device, dst.dtype))
                    for (_, dst), (_, src) in zip(
                        m.named_buffers(recurse=False), cpu.named_buffers(recurse=False), strict=True
                    ):
                        if dst.is_floating_point() or dst.dtype == src.dtype:
                            dst.copy_(src.to(dst.device, dst.dtype))
    else:
        raise InputError(f"init must be 'normal' or 'reset', not {init!r}")


# --------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------
@dataclass
class SanityResult:
    """Per-step similarity of randomized-model maps to the original maps.

    Attributes:
        methods: the methods compared.
        steps: ``"original"`` then the unit randomized at each step (top-down).
        mode: ``"cascading"`` or ``"independent"``.
        values: ``values[metric][method]`` is a ``(S+1, N)`` tensor, metric in
            ``spearman_abs``, ``spearman``, ``ssim``.
        classes: ``(N,)`` target classes (fixed for all steps).
    """

    methods: list[str]
    steps: list[str]
    mode: str
    values: dict[str, dict[str, torch.Tensor]]
    classes: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)

    def at(self, layer: str, method: str, metric: str = "spearman_abs") -> torch.Tensor:
        """Per-image values ``(N,)`` after the step that randomized ``layer``."""
        if layer not in self.steps:
            raise InputError(f"{layer!r} is not a step; steps: {', '.join(self.steps)}")
        return self.values[metric][method][self.steps.index(layer)]

    def table(self) -> list[dict[str, Any]]:
        """One row per (step, method): the mean (and standard deviation) over images of each metric."""
        rows = []
        for k, layer in enumerate(self.steps):
            for m in self.methods:
                row: dict[str, Any] = {"step": k, "layer": layer, "method": m}
                for metric in METRICS:
                    v = self.values[metric][m][k]
                    row[metric] = float(v.mean())
                    row[f"{metric}_std"] = float(v.std()) if v.numel() > 1 else 0.0
                rows.append(row)
        return rows

    def plot(self, metric: str = "spearman_abs", ax=None):
        """Mean ``metric`` per step, one line per method (the paper's figure); returns the axes."""
        return plot_sanity(self, metric=metric, ax=ax)


def plot_sanity(result: SanityResult, metric: str = "spearman_abs", ax=None):
    """Plot a :class:`SanityResult`: ``metric`` (mean over images, band = +-1 std) against the
    randomization steps; returns the axes."""
    import matplotlib.pyplot as plt

    if metric not in METRICS:
        raise InputError(f"metric must be one of {', '.join(METRICS)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6, 0.32 * len(result.steps) + 2), 4))
    xs = list(range(len(result.steps)))
    for m in result.methods:
        v = result.values[metric][m]
        mean = v.mean(dim=1).numpy()
        std = v.std(dim=1).numpy() if v.shape[1] > 1 else 0.0 * mean
        (line,) = ax.plot(xs, mean, "-o", ms=3, label=m)
        ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xticks(xs)
    ax.set_xticklabels(result.steps, rotation=90, fontsize=7)
    ax.axhline(0, color="grey", lw=0.5)
    lowest = min(float(result.values[metric][m].mean(dim=1).min()) for m in result.methods)
    ax.set_ylim(min(-0.2, lowest - 0.1), 1.05)
    ax.set_ylabel({"spearman_abs": "rank correlation (|map|)", "spearman": "rank correlation", "ssim": "SSIM"}[metric])
    ax.set_xlabel(f"{result.mode} randomization, top layer first")
    ax.set_title("sanity check (Adebayo et al. 2018)")
    ax.legend(fontsize=8)
    return ax


# --------------------------------------------------------------------------------------------
# the check
# --------------------------------------------------------------------------------------------
def _maps(
    model: nn.Module,
    x: torch.Tensor,
    methods: list[str],
    classes: torch.Tensor,
    batch_size: int,
    options: dict[str, Any],
) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    for i in range(0, x.shape[0], batch_size):
        spec = explain_targets(classes, slice(i, i + batch_size))
        res = explain(model, x[i : i + batch_size], method=list(methods), targets=spec, **options)
        for m in methods:
            out[m].append(res[m].maps[:, 0].detach().float())
    return {m: torch.cat(v) for m, v in out.items()}


def _compare(orig: torch.Tensor, new: torch.Tensor) -> dict[str, torch.Tensor]:
    rho_abs = spearman(orig, new, absolute=True)
    nonneg = bool((orig >= 0).all()) and bool((new >= 0).all())  # then |m| = m: same ranks
    return {
        "spearman_abs": rho_abs,
        "spearman": rho_abs.clone() if nonneg else spearman(orig, new),
        "ssim": ssim(orig.abs(), new.abs()),
    }


def sanity_randomization(
    model: nn.Module,
    inputs: Any,
    method: str | list[str] = "gradcam",
    targets: Any = None,
    *,
    layers: list[str] | None = None,
    mode: str = "cascading",
    init: str = "normal",
    seed: int = 0,
    batch_size: int = 16,
    preprocess=None,
    explain_options: dict[str, Any] | ExplainRequest | None = None,
    progress: bool | Callable[[int, int], None] = False,
) -> SanityResult:
    """Cascading (or independent) model-parameter randomization test.

    Args:
        model: the classifier; it is deep-copied, never modified.
        inputs: a preprocessed ``(N, C, H, W)`` tensor or images, or volumes / clips ``(N, C, D, H, W)``.
        method: one method name or a list (computed from one shared pass per step).
        targets: class per image, fixed across steps (default: the original model's top-1).
        layers: unit names to randomize, top-down (default: :func:`randomization_layers`).
        mode: ``"cascading"`` (each step adds one random unit) or ``"independent"``.
        init: ``"normal"`` or ``"reset"`` (see the module docstring).
        seed: seed of the weight draws.
        batch_size: images per :func:`camlens.explain` call.
        explain_options: keyword arguments for :func:`camlens.explain` (``layer=``, method options).
        progress: ``True``: a tqdm progress bar over the steps; a callable: called with
            ``(k, number of steps)`` after the ``k``-th randomized layer (from 1), for a caller's own bar.

    Returns:
        A :class:`SanityResult` (``.table()``, ``.plot()``, ``.at(layer, method)``).
    """
    batch_size = check_batch_size(batch_size)
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be an nn.Module, not {type(model).__name__}")
    if mode not in ("cascading", "independent"):
        raise InputError(f"mode must be 'cascading' or 'independent', not {mode!r}")
    if init not in ("normal", "reset"):
        raise InputError(f"init must be 'normal' or 'reset', not {init!r}")
    methods = [method] if isinstance(method, str) else list(method)
    if not methods:
        raise InputError("no method given")
    options = explain_kwargs(explain_options)
    x, _, _ = prepare_inputs(inputs, model, preprocess)
    x = x.detach()
    classes = resolve_classes(model, x, targets, batch_size)
    work = copy.deepcopy(model)
    if layers is None:
        units = randomization_layers(work, x)
    else:
        units = [layers] if isinstance(layers, str) else list(layers)
        for u in units:
            try:
                work.get_submodule(u)
            except AttributeError:
                raise LayerNotFoundError(
                    f"no module named {u!r} to randomize; see camlens.metrics.randomization_layers(model, x)"
                ) from None
    original = _maps(work, x, methods, classes, batch_size, options)
    values: dict[str, dict[str, list[torch.Tensor]]] = {metric: {m: [] for m in methods} for metric in METRICS}
    for m in methods:
        for metric, v in _compare(original[m], original[m]).items():
            values[metric][m].append(v)
    steps = list(units)
    it = steps
    on_step = progress if callable(progress) else None
    if progress is True:
        from tqdm.auto import tqdm

        it = tqdm(steps, desc="sanity check", unit="layer", leave=False)
    pristine = copy.deepcopy(model) if mode == "independent" else None
    for k, unit in enumerate(it):
        if mode == "independent":
            assert pristine is not None
            work = copy.deepcopy(pristine)
        randomize_(work.get_submodule(unit), _generator(seed, k), init)
        new = _maps(work, x, methods, classes, batch_size, options)
        for m in methods:
            for metric, v in _compare(original[m], new[m]).items():
                values[metric][m].append(v)
        if on_step is not None:
            on_step(k + 1, len(steps))
    del work, pristine
    stacked = {metric: {m: torch.stack(v) for m, v in d.items()} for metric, d in values.items()}
    return SanityResult(methods, ["original", *steps], mode, stacked, classes)
