"""The GPU benchmark, ready to run: ``python -m benchmarks.gpu`` prints one JSON object.

    python -m benchmarks.gpu                      # one CUDA GPU, under 5 minutes
    python -m benchmarks.gpu --dry-run            # CPU, tiny models and inputs: checks it runs end to end
    python -m benchmarks.gpu --budget 200 --skip-tests

What it measures, in order (each part inside a time budget; a cell that would start after the
budget is listed as skipped, never silently dropped):

1. ``tests``: the CUDA-only tests (``pytest -m cuda tests/``): passed / failed / skipped counts and
   the failures' tail.
2. ``grid``: for ResNet-50 (random weights), EfficientNet-Lite0 (its weights) and ViT-B/16 (random
   weights), at batch 1, 64 and 256 of real photos (the four bundled photos, cycled), in fp32 and
   bf16 (``explain(..., precision="bf16")``; the forward and the peers under ``torch.autocast``):
   the seconds of an inference forward, camlens Grad-CAM, Grad-CAM of the top-100 classes,
   guided backprop and Score-CAM (``max_channels=64``), and of the peers' Grad-CAM (pytorch-grad-cam,
   Captum, TorchCAM), guided backprop (Captum) and Score-CAM (pytorch-grad-cam, TorchCAM; batch 1
   only: they score every channel); each as a median of ``--repeats`` timed calls after a warm-up,
   its ratio to the forward of the same cell, and its peak CUDA memory (``max_memory_allocated``
   above what was allocated before the call). The ViT gets no peer rows (every peer needs a
   hand-written reshape of its tokens) and no guided backprop (no ReLU: camlens refuses it, a
   ``not_applicable`` row).
3. ``pipeline``: the dataset pipeline (``camlens.pipeline.run.stream``: DataLoader workers decoding
   the JPEGs, Grad-CAM, maps moved off the device, no store) in images/s against the bare GPU
   forward on tensors preloaded to the device, and against the forward over the same DataLoader,
   on the small-photo set and on phone photos (4032x3024 JPEG, quality 90; scaled decode);
   also the forward over ``torchvision.io.decode_jpeg(device="cuda")`` (batched decode on the
   GPU, resize on the GPU), to show whether GPU decoding would help.

``--dry-run`` runs every part on the CPU with tiny stand-ins (ResNet-18 and Lite0 at 64 px, a
2-layer ViT at 32 px, batch 2, 8 small and 2 phone-like photos; the peers' Score-CAM, which
forwards every channel, left out): the numbers mean nothing, the JSON has every key.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
#: a call whose warm-up took longer than this is timed once
SLOW_S = 1.0


@dataclass(frozen=True)
class Setup:
    """What one run measures: the device, the models ``{name: (builder, input size, peer layer or
    None)}``, the batches, precisions, repeats, Score-CAM channels, pipeline photos, time budget."""

    device: str
    models: dict[str, tuple[Callable[[], nn.Module], int, str | None]]
    batches: tuple[int, ...]
    precisions: tuple[str, ...]
    repeats: int
    channels: int
    photos: int
    phone_photos: int
    budget_s: float
    workers: int
    dry_run: bool = False
    started: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)


def _tiny_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)


def setup(a: argparse.Namespace) -> Setup:
    import camlens

    from .cases import load_bench_model

    if a.dry_run:
        models = {
            "resnet18 (dry run)": (lambda: camlens.load_model("resnet18", weights="random"), 64, "layer4"),
            "efficientnet_lite0 (dry run)": (
                lambda: load_bench_model("efficientnet_lite0"),
                64,
                "_avg_pooling.features",
            ),
            "tiny vit (dry run)": (_tiny_vit, 32, None),
        }
        return Setup("cpu", models, (2,), ("fp32", "bf16"), 1, 8, 8, 2, 1e9, 0, dry_run=True)
    models = {
        "resnet50": (lambda: load_bench_model("resnet50"), 224, "layer4"),
        "efficientnet_lite0": (lambda: load_bench_model("efficientnet_lite0"), 224, "_avg_pooling.features"),
        "vit_b_16": (lambda: camlens.load_model("vit_b_16", weights="random"), 224, None),
    }
    workers = min(8, max(1, (os.cpu_count() or 2) - 2))
    return Setup(a.device, models, (1, 64, 256), ("fp32", "bf16"), a.repeats, 64, 512, 64, a.budget, workers)


def say(msg: str) -> None:
    """Progress on stderr (the JSON goes to stdout)."""
    print(f"[benchmarks.gpu] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ timing
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn: Callable[[], Any], s: Setup) -> dict[str, Any]:
    """Median seconds of ``s.repeats`` calls after one warm-up (one call when the warm-up took over
    :data:`SLOW_S`: the budget goes further), and the peak device memory above the memory allocated
    before the call (CUDA; ``None`` elsewhere)."""
    t0 = time.perf_counter()
    fn()
    _sync(s.device)
    warm = time.perf_counter() - t0
    cuda = s.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times = []
    for _ in range(s.repeats if warm < SLOW_S else 1):
        t0 = time.perf_counter()
        out = fn()
        _sync(s.device)
        times.append(time.perf_counter() - t0)
        del out
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda else None
    return {"seconds": statistics.median(times), "times": times, "peak_mib": peak}


def _autocast(precision: str, device: str):
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _batch(model: nn.Module, size: int, n: int, device: str) -> tuple[torch.Tensor, list[int]]:
    """``n`` real photos (the four cycled) at ``size``, preprocessed for ``model``, and their top-1."""
    from dataclasses import replace

    from camlens.base.io import sample_image
    from camlens.core.inputs import prepare_inputs
    from camlens.models.preprocess import IMAGENET
    from camlens.models.zoo import card_of

    card = card_of(model)
    pp = replace(card.preprocess if card else IMAGENET, size=(size, size))
    four, _, _ = prepare_inputs([sample_image(p) for p in PHOTOS], model, pp)
    x = four.repeat((n + 3) // 4, 1, 1, 1)[:n].to(device).contiguous()
    with torch.inference_mode():
        classes = model(x).argmax(1).tolist()
    return x, classes


# ------------------------------------------------------------------------------------------ the grid
def camlens_cells(model, x, classes, precision: str, s: Setup) -> dict[str, Callable[[], Any]]:
    import camlens

    def explain(method: str, targets: Any, **kw: Any) -> Callable[[], Any]:
        def fn() -> Any:
            e = camlens.explain(model, x, method, targets, precision=precision, **kw)
            return e.maps  # every map built at input resolution, as the peers return them

        return fn

    def forward() -> Any:
        with torch.inference_mode(), _autocast(precision, s.device):
            return model(x)

    return {
        "forward": forward,
        "camlens gradcam": explain("gradcam", classes),
        "camlens top100": explain("gradcam", "top100"),
        "camlens guided_backprop": explain("guided_backprop", classes),
        "camlens scorecam": explain("scorecam", classes, max_channels=s.channels, progress=False),
    }


def peer_cells(model, layer: str, x, classes, precision: str, s: Setup) -> dict[str, Any]:
    """The peers' calls on their own copies of the model (see :mod:`benchmarks.peers`), under
    ``torch.autocast`` for bf16 (what their users would write); Score-CAM at batch 1 only."""
    import copy

    from . import peers as P

    plan = [("gradcam", d, f, byname) for d, f, byname in P.ADAPTERS["gradcam"]]
    plan += [("guided_backprop", d, f, b) for d, f, b in P.ADAPTERS["guided_backprop"] if d == "captum"]
    if x.shape[0] == 1 and not s.dry_run:  # every channel, one masked forward each: GPU only
        plan += [("scorecam", d, f, byname) for d, f, byname in P.ADAPTERS["scorecam"]]
    cells: dict[str, Any] = {}
    for task, dist, adapter, byname in plan:
        mine = copy.deepcopy(model)
        try:
            call = adapter(mine, layer if byname else mine.get_submodule(layer), x, classes)
        except ImportError:
            continue
        name = f"{call.label or P.PEERS[dist]} {task}"

        def run(call=call) -> Any:
            with _autocast(precision, s.device):
                return call.run()

        cells[name] = (run, call.close)
    return cells


def grid_cell(name: str, build, size: int, layer: str | None, n: int, precision: str, s: Setup) -> dict[str, Any]:
    """Every contender of one (model, batch, precision) cell; ratios to its forward."""
    from camlens.base.errors import CamlensError

    model = build().to(s.device).eval()
    x, classes = _batch(model, size, n, s.device)
    rows: dict[str, Any] = {}
    cells: dict[str, Any] = {k: (fn, None) for k, fn in camlens_cells(model, x, classes, precision, s).items()}
    if layer is not None:
        cells.update(peer_cells(model, layer, x, classes, precision, s))
    for key, (fn, close) in cells.items():
        if s.left() <= 0:
            rows[key] = {"skipped": "time budget"}
            continue
        try:
            rows[key] = measure(fn, s)
        except CamlensError as exc:  # guided backprop on a ViT (no ReLU): refused by camlens, by design
            rows[key] = {"not_applicable": str(exc).splitlines()[0][:200]}
        except Exception as exc:  # a peer that cannot run this cell (bf16 to NumPy…) is a row that says so
            rows[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
        finally:
            if close is not None:
                close()
    fwd = rows.get("forward", {}).get("seconds")
    for r in rows.values():
        if fwd and "seconds" in r:
            r["vs_forward"] = r["seconds"] / fwd
    del model, x
    if s.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def grid(s: Setup) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (build, size, layer) in s.models.items():
        for precision in s.precisions:
            for n in s.batches:
                key = f"{name} | batch {n} | {precision}"
                if s.left() <= 0:
                    out[key] = {"skipped": "time budget"}
                    continue
                t0 = time.perf_counter()
                out[key] = grid_cell(name, build, size, layer, n, precision, s)
                say(f"{key}: {time.perf_counter() - t0:.1f} s")
    return out


# ------------------------------------------------------------------------------------------ pipeline
def _photos(folder: Path, s: Setup) -> dict[str, list[Path]]:
    from .decode import make_phone_photos, phone_photo
    from .pipeline import make_photos

    small = make_photos(folder / "small", s.photos)
    if s.dry_run:
        phone = [phone_photo(PHOTOS[i], folder / "phone" / f"p{i}.jpg", size=(600, 800)) for i in range(s.phone_photos)]
    else:
        phone = make_phone_photos(folder / "phone", s.phone_photos)
    return {"small photos": small, "phone photos 4032x3024": phone}


def _pipeline_rows(paths: list[Path], model: nn.Module, s: Setup, batch: int) -> dict[str, Any]:
    from camlens.api.explainer import ExplainRequest
    from camlens.pipeline.run import StreamOptions, stream
    from camlens.pipeline.sources import ImageFiles, records_for

    from .pipeline import _loader

    rows: dict[str, Any] = {}
    dev = s.device
    xs = [b.x.to(dev) for b in _loader(paths, model, batch, s.workers, dev)]
    _sync(dev)

    def bare() -> None:
        with torch.inference_mode():
            for x in xs:
                model(x)

    rows["bare forward, preloaded on the device"] = {"images_per_s": len(paths) / measure(bare, s)["seconds"]}

    def loader_forward() -> None:
        with torch.inference_mode():
            for b in _loader(paths, model, batch, s.workers, dev):
                model(b.x.to(dev, non_blocking=True))

    rows["forward over the DataLoader"] = {"images_per_s": len(paths) / measure(loader_forward, s)["seconds"]}
    ds = ImageFiles(records_for([(str(p), None) for p in paths]), _pp(model))

    def pipeline() -> None:
        ids = list(range(len(ds)))
        request = ExplainRequest(methods=("gradcam",))
        stream(model, ds, ids, [], request, StreamOptions(batch_size=batch, num_workers=s.workers, progress=False))

    rows["camlens pipeline (stream), Grad-CAM"] = {"images_per_s": len(paths) / measure(pipeline, s)["seconds"]}
    if dev.startswith("cuda"):
        rows["forward over torchvision.io.decode_jpeg on the GPU"] = _gpu_decode_row(paths, model, s, batch)
    ceiling = rows["bare forward, preloaded on the device"]["images_per_s"]
    for r in rows.values():
        if "images_per_s" in r:
            r["vs_bare_forward"] = r["images_per_s"] / ceiling
    return rows


def _pp(model: nn.Module) -> Any:
    from camlens.models.preprocess import IMAGENET
    from camlens.models.zoo import card_of

    card = card_of(model)
    return card.preprocess if card else IMAGENET


def _gpu_decode_row(paths: list[Path], model: nn.Module, s: Setup, batch: int) -> dict[str, Any]:
    """Files read on the CPU, decoded in batches by nvJPEG (``torchvision.io.decode_jpeg``), resized
    and normalised on the GPU, then the forward."""
    import torch.nn.functional as F
    from torchvision.io import decode_jpeg, read_file

    pp = _pp(model)
    mean = torch.tensor(pp.mean, device=s.device)[:, None, None]
    std = torch.tensor(pp.std, device=s.device)[:, None, None]

    def run() -> None:
        with torch.inference_mode():
            for lo in range(0, len(paths), batch):
                data = [read_file(str(p)) for p in paths[lo : lo + batch]]
                imgs = decode_jpeg(data, device=s.device)
                x = torch.stack(
                    [F.interpolate(im[None].float(), size=pp.size, mode="bilinear", antialias=True)[0] for im in imgs]
                )
                model((x * pp.scale - mean) / std)

    try:
        return {"images_per_s": len(paths) / measure(run, s)["seconds"]}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def pipeline(s: Setup) -> dict[str, Any]:
    build, _, _ = s.models[next(k for k in s.models if "lite0" in k)]
    model = build().to(s.device).eval()
    batch = 2 if s.dry_run else 64
    out: dict[str, Any] = {"model": "efficientnet_lite0", "batch": batch, "workers": s.workers}
    with tempfile.TemporaryDirectory(prefix="camlens-gpu-bench-") as tmp:
        sets = _photos(Path(tmp), s)
        s = replace(s, started=time.perf_counter())  # the budget counts from the photos made
        for set_name, paths in sets.items():
            if s.left() <= 0:
                out[set_name] = {"skipped": "time budget"}
                continue
            for p in paths:  # the files in the OS cache before the first contender
                p.read_bytes()
            t0 = time.perf_counter()
            out[set_name] = {"images": len(paths), "rows": _pipeline_rows(paths, model, s, batch)}
            say(f"pipeline, {set_name}: {time.perf_counter() - t0:.1f} s")
    return out


# ------------------------------------------------------------------------------------------ tests
def cuda_tests(timeout: float, paths: list[str]) -> dict[str, Any]:
    """``pytest -m cuda PATHS`` in a child process: its counts and the tail of its output."""
    import importlib.util

    serial = ["-n", "0"] if importlib.util.find_spec("xdist") else []  # pytest-xdist, when installed: no workers
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *serial, *paths]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    tail = (p.stdout + p.stderr).strip().splitlines()
    counts: dict[str, int] = {}
    for word in ("passed", "failed", "skipped", "deselected", "error"):
        for line in tail[-3:]:
            for part in line.replace("=", " ").split(","):
                bits = part.split()
                if len(bits) >= 2 and bits[1].startswith(word) and bits[0].isdigit():
                    counts[word] = int(bits[0])
    return {"returncode": p.returncode, "counts": counts, "seconds": time.perf_counter() - t0, "tail": tail[-15:]}


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models and inputs: checks it runs end to end")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=150.0, help="seconds for the grid (cells after it: skipped)")
    ap.add_argument("--pipeline-budget", type=float, default=60.0, help="seconds for the pipeline part")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--tests", nargs="*", help="test files for `pytest -m cuda` (default: tests/)")
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--skip-grid", action="store_true")
    a = ap.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: run with --dry-run to check the script on the CPU"}))
        return 2
    s = setup(a)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"meta": meta(s)}
    if not a.skip_tests:
        result["tests"] = cuda_tests(90 if not a.dry_run else 300, a.tests or [str(ROOT / "tests")])
        say(f"tests: {result['tests'].get('seconds', 0):.1f} s")
    if not a.skip_grid:
        result["grid"] = grid(replace(s, started=time.perf_counter()))  # each part's budget starts with it
    if not a.skip_pipeline:
        result["pipeline"] = pipeline(s if a.dry_run else replace(s, budget_s=a.pipeline_budget))
    result["meta"]["seconds"] = time.perf_counter() - t0
    print(json.dumps(result, indent=1, default=str))
    return 0


def meta(s: Setup) -> dict[str, Any]:
    from . import peers as P

    gpu = torch.cuda.get_device_name(0) if s.device.startswith("cuda") and torch.cuda.is_available() else None
    return {
        "device": s.device,
        "gpu": gpu,
        "dry_run": s.dry_run,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "peers": P.peer_versions(),
        "batches": list(s.batches),
        "precisions": list(s.precisions),
        "repeats": s.repeats,
        "scorecam_max_channels": s.channels,
        "budget_s": s.budget_s,
    }


if __name__ == "__main__":
    sys.exit(main())
