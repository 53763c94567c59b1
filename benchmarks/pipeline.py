"""Dataset throughput: ``camlens explain DIR --method gradcam`` against the forward-only ceiling and
the loops users write with the peers.

    python -m benchmarks.pipeline --images 500 --batch-size 32 --workers 4 --procs 1,2 --out bench-pipeline
    python -m benchmarks.pipeline --quick          # 24 images, batch 8: a smoke run
    python -m benchmarks.pipeline --sets phone --phone-images 100 --rounds 3

Two photo sets (``--sets``): ``small`` — ``--images`` JPEGs made from the scikit-image sample
photos by random crops, flips and resizes to 200-500 px wide, written once; ``phone`` —
``--phone-images`` 4032x3024 JPEGs (quality 90) made from the same photos upscaled (a 12 MP phone
photo's size; :func:`benchmarks.decode.make_phone_photos`), which camlens decodes at 1/8 scale in
the DCT domain. The rounds alternate between the sets. Every contender reads the same JPEG files
and delivers Grad-CAM maps of the top-1 class at input resolution for every image:

* ``forward only, preloaded tensors`` — the ceiling: the photos decoded and preprocessed first
  (not timed), then one ``torch.inference_mode`` forward per batch; ``forward only, same
  DataLoader``: the same with camlens' DataLoader (workers, batch size, preprocessing) decoding;
* ``camlens explain`` (1 and 2 processes): the command itself, ``--figures none``, the result
  store written; images/s from the run's own loop time (``index.json``) and from the wall clock
  (which adds interpreter start, model load and the final merge);
* ``camlens explain --figures overlay``: the same plus a titled overlay PNG per image; and
  ``--format png,npy,json``: the named files' outputs (overlay, ``.npy`` maps, JSON) per image,
  no store;
* ``pytorch-grad-cam loop``: the loop of its README — per file: PIL open, preprocess, one
  ``GradCAM(...)(input_tensor)`` call (top-1 target by default), maps kept as NumPy;
* ``Captum + DataLoader``: batched ``LayerGradCam`` over the same DataLoader, a forward for the
  top-1 class first, bilinear upsampling with ``LayerAttribution.interpolate``.

Every contender runs with the same allocator settings (``--malloc``): camlens' (what its CLI and
web app set for themselves, :mod:`camlens.base._malloc`; the default) or glibc's own. The in-process
contenders otherwise inherit whatever the earlier ones left in glibc's dynamic mmap threshold — the
same forward measured 40 or 64 images/s depending on what ran before it.

Results: a JSON file and a Markdown table per set (images/s, ratio to the ceiling, with the range
over the rounds) in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")  #: bundled with scikit-image (no download)
CEILING = "forward only, preloaded tensors (ceiling)"


def make_photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` distinct JPEG photos (random crop 50-100 %, flip, resize to 200-500 px wide)."""
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    have = sorted(folder.glob("*.jpg"))
    if len(have) >= n:
        return have[:n]
    rng = np.random.default_rng(seed)
    srcs = []
    for name in PHOTOS:
        fn = getattr(skimage.data, name, None)
        if fn is None:
            continue
        try:
            a = np.asarray(fn())
        except Exception:  # a sample photo that is not there is skipped
            continue
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, 2)
        srcs.append(np.ascontiguousarray(a[..., :3]).astype(np.uint8))
    out = []
    for i in range(n):
        a = srcs[i % len(srcs)]
        h, w = a.shape[:2]
        f = rng.uniform(0.5, 1.0)
        ch, cw = int(h * f), int(w * f)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = a[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        im = Image.fromarray(np.ascontiguousarray(crop))
        nw = int(rng.integers(200, 501))
        im = im.resize((nw, max(16, round(nw * ch / cw))))
        p = folder / f"photo{i:05d}.jpg"
        im.save(p, quality=90)
        out.append(p)
    return out


def _loader(paths, model, batch_size: int, workers: int, device: str = "cpu"):
    from torch.utils.data import DataLoader

    from camlens.models.zoo import card_of
    from camlens.pipeline.sources import ImageFiles, collate, records_for

    ds = ImageFiles(records_for([(str(p), None) for p in paths]), card_of(model).preprocess)
    return DataLoader(
        ds, batch_size=batch_size, num_workers=workers, collate_fn=collate, pin_memory=device.startswith("cuda")
    )


def forward_only(paths, model_name: str, batch_size: int, workers: int, device: str, preloaded: bool = False) -> float:
    """Inference forwards over the photos in batches: through the same DataLoader as camlens, or
    (``preloaded``) on tensors decoded and preprocessed beforehand (not timed) — the issue's ceiling."""
    import camlens

    model = camlens.load_model(model_name, device=device)
    if preloaded:
        xs = [b.x.to(device) for b in _loader(paths, model, batch_size, workers, device)]
        t0 = time.perf_counter()
        with torch.inference_mode():
            for x in xs:
                model(x).cpu()
        return len(paths) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in _loader(paths, model, batch_size, workers, device):
            model(b.x.to(device, non_blocking=True)).cpu()
    return len(paths) / (time.perf_counter() - t0)


def camlens_cli(
    paths,
    folder: Path,
    out: Path,
    model_name: str,
    batch_size: int,
    workers: int,
    procs: int,
    device: str,
    figures: str = "none",
    loose: bool = False,
) -> dict:
    """One ``camlens explain`` run. ``figures``: the store run's ``--figures``; ``loose``: the
    named files' outputs instead of the store (``--format png,npy,json``: a titled overlay, the
    ``.npy`` maps and a JSON summary per image, as ``camlens explain a.jpg b.jpg`` writes them)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if procs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // procs))
        pre = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}", "-m", "camlens"]
    else:
        pre = [sys.executable, "-m", "camlens"]
    outputs = ["--format", "png,npy,json"] if loose else ["--figures", figures]
    cmd = [
        *pre,
        "explain",
        str(folder),
        "--model",
        model_name,
        "--method",
        "gradcam",
        "--topk",
        "1",
        *outputs,
        "--batch-size",
        str(batch_size),
        "--workers",
        str(workers),
        "--out",
        str(out),
        "--overwrite",
        "-q",
    ]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    if loose:  # no index.json: the wall clock only (see main() for the loop estimate)
        return {"wall_images_per_s": len(paths) / wall, "wall_s": wall}
    idx = json.loads((out / "index.json").read_text())
    loop = idx["last_run"]["seconds"]
    return {"images_per_s": len(paths) / loop, "wall_images_per_s": len(paths) / wall, "loop_s": loop, "wall_s": wall}


def pgc_loop(paths, model_name: str, device: str) -> float | None:
    try:
        from pytorch_grad_cam import GradCAM
    except ImportError:
        return None
    from benchmarks.cases import MODELS, load_bench_model
    from camlens.base.io import load_image
    from camlens.models.zoo import card_of

    model = load_bench_model(model_name, device)
    pp = card_of(model).preprocess
    cam = GradCAM(model=model, target_layers=[model.get_submodule(MODELS[model_name].layer)])
    t0 = time.perf_counter()
    for p in paths:
        x = pp([load_image(p)], device=device)
        cam(input_tensor=x, targets=None)  # None: the top-1 class; maps at input size, NumPy
    cam.activations_and_grads.release()
    return len(paths) / (time.perf_counter() - t0)


def captum_loop(paths, model_name: str, batch_size: int, workers: int, device: str) -> float | None:
    try:
        from captum.attr import LayerAttribution, LayerGradCam
    except ImportError:
        return None
    from benchmarks.cases import MODELS, load_bench_model

    model = load_bench_model(model_name, device)
    lgc = LayerGradCam(model, model.get_submodule(MODELS[model_name].layer))
    t0 = time.perf_counter()
    for b in _loader(paths, model, batch_size, workers, device):
        x = b.x.to(device, non_blocking=True)
        with torch.no_grad():
            top1 = model(x).argmax(1)
        a = lgc.attribute(x, target=top1, relu_attributions=True)
        LayerAttribution.interpolate(a.detach(), tuple(x.shape[-2:]), "bilinear").cpu().numpy()
    return len(paths) / (time.perf_counter() - t0)


def in_child(fn: str, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` of this module in a fresh Python process (with this process's
    environment, hence its allocator settings), as the CLI contenders run: a process that has
    already run other contenders is faster or slower for reasons of its own (CPU torch forwards got
    up to 1.3x faster here after other work in the same process)."""
    code = (
        "import json, sys; from benchmarks import pipeline as P; a = json.loads(sys.argv[1]); "
        f"print('@@' + json.dumps(P.{fn}(*a['args'], **a['kwargs'])))"
    )
    payload = json.dumps({"args": [str(v) if isinstance(v, Path) else v for v in args], "kwargs": kwargs}, default=str)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", code, payload], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(next(line[2:] for line in p.stdout.splitlines() if line.startswith("@@")))


def files_rate(n: int, wall_s: float, overhead_s: float) -> tuple[float, str]:
    """Images/s of the named-files run, which has no loop timer: ``n`` over its wall clock less the
    store run's start-up and merge seconds (``"estimate"``). When that overhead is most of the wall
    clock (a loaded machine: the two processes started at different speeds) the difference means
    nothing — it gave 4.8e10 images/s once — and the wall-clock rate, a lower bound, is reported
    instead (``"lower bound"``)."""
    loop = wall_s - overhead_s
    if loop < 0.25 * wall_s:
        return n / wall_s, "lower bound"
    return n / loop, "estimate"


def one_round(a, photos, folder: Path, out: Path, dev: str) -> dict[str, dict]:
    """Every contender once, in a fixed order, each in a fresh process; ``vs_ceiling`` against this
    round's preloaded forward-only."""
    ps = [str(p) for p in photos]
    rows = {
        CEILING: {"images_per_s": in_child("forward_only", ps, a.model, a.batch_size, a.workers, dev, preloaded=True)},
        "forward only, same DataLoader": {
            "images_per_s": in_child("forward_only", ps, a.model, a.batch_size, a.workers, dev)
        },
    }
    for n in (int(v) for v in a.procs.split(",") if v.strip()):
        rows[f"camlens explain, {n} process{'es' if n > 1 else ''}"] = camlens_cli(
            photos, folder, out / f"store-{n}", a.model, a.batch_size, a.workers, n, dev
        )
    # with figures (issue 18: >= 50 % of forward-only): the store plus a titled overlay per image,
    # and the named files' per-image outputs (overlay PNG, .npy, JSON) without a store
    rows["camlens explain, 1 process, --figures overlay"] = camlens_cli(
        photos, folder, out / "store-overlay", a.model, a.batch_size, a.workers, 1, dev, figures="overlay"
    )
    r = camlens_cli(photos, folder, out / "files", a.model, a.batch_size, a.workers, 1, dev, loose=True)
    base = rows.get("camlens explain, 1 process")
    if base is not None:  # the loop's time: the wall clock less the store run's start-up and merge
        r["images_per_s"], r["estimated"] = files_rate(len(photos), r["wall_s"], base["wall_s"] - base["loop_s"])
    rows["camlens explain, 1 process, --format png,npy,json"] = r
    if not a.skip_peers:
        v = in_child("pgc_loop", ps, a.model, dev)
        if v is not None:
            rows["pytorch-grad-cam loop (one image per call)"] = {"images_per_s": v}
        v = in_child("captum_loop", ps, a.model, a.batch_size, a.workers, dev)
        if v is not None:
            rows["Captum LayerGradCam + DataLoader"] = {"images_per_s": v}
    ceiling = rows[CEILING]["images_per_s"]
    for r in rows.values():
        if "images_per_s" in r:
            r["vs_ceiling"] = r["images_per_s"] / ceiling
    return rows


def summarize(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Per contender: the median over rounds of each number, and the rounds' ``vs_ceiling`` range."""
    out: dict[str, dict] = {}
    for k in rounds[0]:
        per = [r[k] for r in rounds if k in r]
        row: dict = {"rounds": per}
        for f in ("images_per_s", "wall_images_per_s", "vs_ceiling", "loop_s", "wall_s"):
            vals = [p[f] for p in per if f in p]
            if vals:
                row[f] = float(np.median(vals))
        ratios = [p["vs_ceiling"] for p in per if "vs_ceiling" in p]
        if ratios:
            row["vs_ceiling_range"] = [min(ratios), max(ratios)]
        speeds = [p["images_per_s"] for p in per if "images_per_s" in p]
        if speeds:
            row["images_per_s_range"] = [min(speeds), max(speeds)]
        kinds = {p.get("estimated") for p in per}
        row["estimated"] = "lower bound" if "lower bound" in kinds else ("estimate" if any(kinds) else False)
        out[k] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=500, help="photos of the small set")
    ap.add_argument("--phone-images", type=int, default=100, help="photos of the phone set (4032x3024 JPEG)")
    ap.add_argument("--sets", default="small,phone", help="photo sets: small, phone (comma-separated)")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--procs", default="1,2", help="process counts for camlens explain (torchrun for > 1)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of every contender; medians and ranges")
    ap.add_argument("--out", default="bench-pipeline")
    ap.add_argument("--quick", action="store_true", help="24 images, batch 8, 1 worker")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--device", default=None, help="cpu, cuda… (default: cuda if available)")
    ap.add_argument(
        "--malloc",
        choices=("camlens", "default"),
        default="camlens",
        help="allocator settings of every contender: camlens' (what its CLI sets, camlens.base._malloc) or glibc's "
        "default; the run re-executes itself so that the in-process contenders get them too",
    )
    a = ap.parse_args(argv)
    if os.environ.get("CAMLENS_BENCH_MALLOC") != a.malloc:  # one allocator setting for every contender
        from camlens.base._malloc import tuned_env

        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "CAMLENS_MALLOC"}
        env = tuned_env(env) if a.malloc == "camlens" else {**env, "CAMLENS_MALLOC": "default"}
        env["CAMLENS_BENCH_MALLOC"] = a.malloc
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        args = list(sys.argv[1:] if argv is None else argv)
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.pipeline", *args], env)
    if a.quick:
        a.images, a.phone_images, a.batch_size, a.workers = 24, 8, 8, 1
    out = Path(a.out)
    sets = photo_sets(out, a)
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    load = [os.getloadavg()]
    rounds: dict[str, list] = {k: [] for k in sets}
    for _ in range(max(1, a.rounds)):  # the sets alternate: a change of machine load hits both
        for k, (photos, folder) in sets.items():
            for p in photos:  # the files in the OS cache before the first contender
                p.read_bytes()
            rounds[k].append(one_round(a, photos, folder, out / k, dev))
        load.append(os.getloadavg())
    results = {k: summarize(v) for k, v in rounds.items()}
    meta = {
        "images": {k: len(p) for k, (p, _) in sets.items()},
        "model": a.model,
        "batch_size": a.batch_size,
        "workers": a.workers,
        "rounds": max(1, a.rounds),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "malloc": a.malloc,
        "cpus": os.cpu_count(),
        "device": dev,
        "load_average": load,  # (1, 5, 15 min) before the first round and after each
    }
    (out / "pipeline.json").write_text(json.dumps({"meta": meta, "sets": results}, indent=2) + "\n")
    lines = []
    for k, rows in results.items():
        lines += table(k, rows, meta, a)
    (out / "pipeline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def photo_sets(out: Path, a) -> dict[str, tuple[list[Path], Path]]:
    """``{set: (photos, folder)}`` for ``--sets``: the small photos and the phone-sized ones."""
    from benchmarks.decode import make_phone_photos

    sets: dict[str, tuple[list[Path], Path]] = {}
    for k in (v.strip() for v in a.sets.split(",") if v.strip()):
        if k == "small":
            sets[k] = (make_photos(out / "photos", a.images), out / "photos")
        elif k == "phone":
            sets[k] = (make_phone_photos(out / "phone-photos", a.phone_images), out / "phone-photos")
        else:
            raise SystemExit(f"unknown photo set {k!r}: small or phone")
    return sets


def table(name: str, rows: dict[str, dict], meta: dict, a) -> list[str]:
    """The Markdown table of one photo set, each row with its range over the rounds."""
    spread = meta["rounds"] > 1
    what = "4032x3024 phone JPEGs (q90)" if name == "phone" else "JPEG photos, 200-500 px wide"
    lines = [
        f"**{name}**: {meta['images'][name]} {what}, {a.model}, batch {a.batch_size}, {a.workers} workers, "
        f"{meta['cpus']} CPUs, device {meta['device']}; allocator: {a.malloc}"
        + (f"; medians of {meta['rounds']} rounds [range over the rounds]" if spread else ""),
        "",
        "| contender | images/s | vs forward-only | wall images/s |",
        "|---|---:|---:|---:|",
    ]
    for k, r in rows.items():
        wall = f"{r['wall_images_per_s']:.1f}" if "wall_images_per_s" in r else ""
        est = {"estimate": "≈ ", "lower bound": "≥ "}.get(r.get("estimated") or "", "≈ " if r.get("estimated") else "")
        if "images_per_s" in r:
            lo, hi = r.get("vs_ceiling_range", [r["vs_ceiling"]] * 2)
            slo, shi = r.get("images_per_s_range", [r["images_per_s"]] * 2)
            rng = f" [{lo:.0%}–{hi:.0%}]" if spread else ""
            srng = f" [{slo:.1f}–{shi:.1f}]" if spread else ""
            lines.append(f"| {k} | {est}{r['images_per_s']:.1f}{srng} | {est}{r['vs_ceiling']:.0%}{rng} | {wall} |")
        else:
            lines.append(f"| {k} | | | {wall} |")
    if any(r.get("estimated") for r in rows.values()):
        lines += [
            "",
            "≈: no loop timer without a store; the wall clock less the start-up and merge seconds of the "
            "1-process store run (its wall − loop time). ≥: in some round that overhead was most of the wall "
            "clock, so the wall-clock rate (a lower bound) is used there.",
        ]
    return [*lines, ""]


if __name__ == "__main__":
    sys.exit(main())
