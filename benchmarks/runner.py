"""``python -m benchmarks``: camlens against Captum, pytorch-grad-cam and TorchCAM, in one run.

Method. For each model and batch size, every contender (the inference forward pass, camlens,
the peers) is called in turn, round after round, so that all of them see the same machine load;
after ``--warmup`` untimed calls each, a round times every contender once with
``time.perf_counter`` (the garbage collector run before each round and paused during it, the
rotation order shifted each round). Rounds continue until ``--min-reps`` rounds are done and ``--budget`` seconds have
passed, or ``--max-reps`` rounds are done. The table reports medians, and ratios of medians
against the same run's forward pass. ``torch.set_num_threads(--threads)`` is set before anything
runs and recorded with the machine. Peak memory comes from a child process (see
:mod:`benchmarks.memory`).

Score-CAM is measured at batch 1 on EfficientNet-Lite0 and ResNet-50 only (thousands of masked
forwards per image), with ``--scorecam-reps`` rounds at most, on ``--scorecam-photos`` photos
one after the other (the speed-up depends on the photo: camlens shares one forward between
channels whose masks coincide, e.g. all-zero channels), reported as the median and range over
the photos, and as the cost per masked forward.

On a machine shared with other jobs, ``--clock cpu --threads 1`` times each call by the CPU time
of the process (``time.process_time``) instead of the wall clock, which there mostly measures
waiting; the report says which clock a run used.

The ``topk`` task times Grad-CAM of the K best classes in one call for K = 1, 5, 20, 100 (and
the per-class loop, ``grad_batching(False)``, at K = 20 and 100), with their peak memory.

Results go to ``benchmarks/results/bench-<time>.json`` (git-ignored) and, for full runs, to
``BENCHMARKS.md``. ``--merge A.json B.json`` rebuilds the report from earlier runs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


# ------------------------------------------------------------------------------------ machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int, device: str) -> dict[str, Any]:
    import camlens

    from . import peers

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "threads_requested": threads,
        "device": device,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "camlens": camlens.__version__,
        "commit": commit,
        "peers": peers.peer_versions(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return info


# ------------------------------------------------------------------------------------ timing
#: the clock of a timed call: ``time.perf_counter`` (wall, the default) or ``time.process_time``
#: (``--clock cpu``: CPU seconds of this process, all threads; on a machine shared with other jobs
#: the wall clock mostly measures waiting, the CPU time still measures the work — use it with
#: ``--threads 1``, where no thread spins waiting for another)
CLOCK = time.perf_counter


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_round_robin(
    contenders: Sequence,
    *,
    warmup: int,
    min_reps: int,
    max_reps: int,
    budget_s: float,
    device: str = "cpu",
    log=print,
    times: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call for each contender, interleaved round by round (see the module docstring).

    After ``warmup`` untimed rounds, rounds run while fewer than ``min_reps`` are done, or while
    another round (as long as the last one) still fits in ``budget_s``; never more than
    ``max_reps``. ``times`` may hold rounds already timed (they count).
    """
    times = times if times is not None else {c.key: [] for c in contenders}
    for _ in range(warmup):
        for c in contenders:
            c.fn()
    _sync(device)
    start = time.perf_counter()
    rounds = min(len(v) for v in times.values())
    last = 0.0
    while rounds < max_reps and (rounds < min_reps or time.perf_counter() - start + last <= budget_s):
        order = list(contenders[rounds % len(contenders) :]) + list(contenders[: rounds % len(contenders)])
        gc.collect()
        gc.disable()
        t_round = time.perf_counter()
        try:
            for c in order:
                t = CLOCK()
                c.fn()
                _sync(device)
                times[c.key].append(CLOCK() - t)
        finally:
            gc.enable()
        last = time.perf_counter() - t_round
        rounds += 1
    log(f"    {rounds} timed rounds, {time.perf_counter() - start:.1f} s")
    return times


def first_round(contenders: Sequence, device: str = "cpu") -> tuple[dict[str, Any], dict[str, float]]:
    """Call every contender once: its result and its time (a warm-up round, or Score-CAM's first)."""
    outs: dict[str, Any] = {}
    secs: dict[str, float] = {}
    for c in contenders:
        t = CLOCK()
        out = c.fn()
        _sync(device)
        secs[c.key] = CLOCK() - t
        if c.task != "forward":
            outs[c.key] = out
    return outs, secs


def agreement(contenders: Sequence, outs: dict[str, Any]) -> dict[str, float]:
    """Pearson correlation of each contender's maps with its reference contender's maps."""
    from .cases import maps_of, pearson

    maps = {k: maps_of(v) for k, v in outs.items()}
    agree = {}
    for c in contenders:
        ref = f"{c.task}|{c.ref}" if c.ref else None
        if ref in maps and c.key in maps and maps[ref].shape == maps[c.key].shape:
            agree[c.key] = pearson(maps[c.key], maps[ref])
    return agree


def _rows(
    contenders: Sequence,
    times: dict[str, list[float]],
    agree: dict[str, float],
    model: str,
    batch: int,
    layer: str,
    peaks: dict[str, float] | None,
) -> list[dict[str, Any]]:
    fwd = statistics.median(times["forward|torch"]) * 1000
    rows = []
    for c in contenders:
        ts = times[c.key]
        ms = statistics.median(ts) * 1000 * c.scale
        rows.append(
            {
                "task": c.task,
                "impl": c.impl,
                "model": model,
                "batch": batch,
                "layer": layer,
                "ms": ms,
                "reps": len(ts),
                "ms_min": min(ts) * 1000 * c.scale,
                "ms_all": [round(t * 1000 * c.scale, 3) for t in ts],
                "forward_ms": fwd,
                "ratio_to_forward": ms / fwd,
                "pearson_vs_ref": agree.get(c.key),
                "ref": c.ref,
                "note": c.note,
                "peak_mb": None if peaks is None else peaks.get(c.key),
                "different_work": getattr(c, "different_work", "") or None,
            }
        )
    return rows


# ------------------------------------------------------------------------------------ groups
def run_gradient_group(name: str, batch: int, args, log=print) -> list[dict[str, Any]]:
    from .cases import MODELS, gradient_contenders, load_bench_model, make_batch
    from .memory import group_peaks

    log(f"[{name} batch {batch}] {', '.join(args.tasks_grad)}")
    model = load_bench_model(name, args.device)
    x, classes = make_batch(model, batch, args.size)
    conts = gradient_contenders(name, model, x, classes, args.tasks_grad, not args.no_peers)
    try:
        outs, secs = first_round(conts, args.device)
        agree = agreement(conts, outs)
        del outs
        # long rounds (big models at batch 16): the first round was warm-up enough
        warmup = args.warmup if sum(secs.values()) < args.long_round else 0
        times = time_round_robin(
            conts,
            warmup=warmup,
            min_reps=args.min_reps,
            max_reps=args.max_reps,
            budget_s=args.budget,
            device=args.device,
            log=log,
        )
    finally:
        for c in conts:
            c.close()
    peaks = None
    if args.memory and args.device == "cpu":
        spec = {
            "model": name,
            "batch": batch,
            "size": args.size,
            "tasks": list(args.tasks_grad),
            "threads": args.threads,
            "peers": not args.no_peers,
        }
        try:
            peaks = group_peaks(spec, list(times))
        except Exception as exc:  # memory is informative; a failure must not lose the timings
            log(f"    memory measurement failed: {exc}")
    rows = _rows(conts, times, agree, name, batch, MODELS[name].layer, peaks)
    _log_rows(rows, log)
    return rows


def run_scorecam_group(name: str, args, log=print) -> list[dict[str, Any]]:
    """Score-CAM at batch 1 on each of ``args.scorecam_photos`` photos (rows carry ``photo``)."""
    rows: list[dict[str, Any]] = []
    for i in range(max(1, args.scorecam_photos)):
        rows += _scorecam_photo(name, args, i, log)
    return rows


def _scorecam_photo(name: str, args, photo: int, log=print) -> list[dict[str, Any]]:
    from .cases import MODELS, PHOTOS, load_bench_model, make_batch, scorecam_contenders

    log(f"[{name} batch 1, photo {PHOTOS[photo % len(PHOTOS)]}] scorecam")
    model = load_bench_model(name, args.device)
    x, classes = make_batch(model, 1, args.size, offset=photo)
    with torch.inference_mode():  # warm the batch shapes the contenders use (64, 32, 16)
        for b in (64, 32, 16):
            model(x.expand(b, -1, -1, -1))
    conts = scorecam_contenders(name, model, x, classes, tuple(args.scorecam_channels), not args.no_peers)
    extras: dict[str, Any] = {}
    try:
        outs, secs = first_round(conts, args.device)  # the first round is timed: thousands of forwards each
        agree = agreement(conts, outs)
        from .cases import maps_of, pearson

        pgc = "scorecam|pytorch-grad-cam"
        if pgc in outs:
            ref = maps_of(outs[pgc])
            for k, v in outs.items():
                if k.startswith("scorecam|camlens"):
                    extras.setdefault("pearson_vs_pytorch_grad_cam", {})[k.split("|", 1)[1]] = pearson(maps_of(v), ref)
        feats = _features(model, x, MODELS[name].layer)
        extras["channels"] = int(feats.shape[1])
        extras["all_zero_channels"] = int((feats.flatten(2).amax(2) == 0).sum())
        for k, v in outs.items():
            if k.startswith("scorecam|camlens"):
                extras.setdefault("camlens_forwards", {})[k.split("|", 1)[1]] = v.extras.get("forwards")
        del outs
        times = time_round_robin(
            conts,
            warmup=0,
            min_reps=1,
            max_reps=args.scorecam_reps,
            budget_s=args.budget,
            device=args.device,
            log=log,
            times={k: [v] for k, v in secs.items()},
        )
    finally:
        for c in conts:
            c.close()
    rows = _rows(conts, times, agree, name, 1, MODELS[name].layer, None)
    for r in rows:
        r["photo"] = PHOTOS[photo % len(PHOTOS)]
        if r["task"] == "scorecam":
            r["scorecam"] = extras
    _log_rows(rows, log)
    return rows


def _features(model, x, layer: str) -> torch.Tensor:
    feats = []
    h = model.get_submodule(layer).register_forward_hook(lambda m, a, o: feats.append(o.detach().clone()))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        h.remove()
    return feats[-1]


def _log_rows(rows: list[dict[str, Any]], log=print) -> None:
    for r in rows:
        agree = "" if r["pearson_vs_ref"] is None else f"  r={r['pearson_vs_ref']:.4f}"
        mem = "" if r.get("peak_mb") is None else f"  peak {r['peak_mb']:.0f} MB"
        log(
            f"    {r['task']:<16} {r['impl']:<44} {r['ms']:10.1f} ms  x{r['ratio_to_forward']:.3f}"
            f"  (n={r['reps']}){agree}{mem}"
        )


# ------------------------------------------------------------------------------------ CLI
def _csv(kind):
    def parse(s: str):
        items = [t.strip() for t in s.split(",") if t.strip()]
        return [kind(t) for t in items]

    return parse


def build_parser() -> argparse.ArgumentParser:
    from .cases import MODELS, TASKS

    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", type=_csv(str), default=list(MODELS), help="comma list (default: all)")
    p.add_argument(
        "--tasks", type=_csv(str), default=list(TASKS), help=f"comma list of {', '.join(TASKS)} (default: all)"
    )
    p.add_argument("--batches", type=_csv(int), default=[1, 16], help="batch sizes (default: 1,16)")
    p.add_argument("--size", type=int, default=224, help="input size (default 224)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall (default) or cpu: CPU time of the process, for a loaded machine (with --threads 1)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed rounds after the first (untimed) round that checks the maps (default 1)",
    )
    p.add_argument(
        "--long-round",
        type=float,
        default=20.0,
        help="no extra warm-up when the first round took longer than this many seconds (default 20)",
    )
    p.add_argument("--min-reps", type=int, default=3, help="timed rounds at least (default 3)")
    p.add_argument("--max-reps", type=int, default=21, help="timed rounds at most (default 21)")
    p.add_argument(
        "--budget",
        type=float,
        default=45.0,
        help="seconds of timed rounds per group: another round runs if it fits (default 45)",
    )
    p.add_argument("--scorecam-models", type=_csv(str), default=["efficientnet_lite0", "resnet50"])
    p.add_argument(
        "--scorecam-channels",
        type=_csv(int),
        default=[512, 256, 128, 64],
        help="max_channels caps to time (default 512,256,128,64)",
    )
    p.add_argument(
        "--scorecam-photos",
        type=int,
        default=4,
        help="Score-CAM on this many photos, one at a time (default 4: chelsea, coffee, astronaut, rocket)",
    )
    p.add_argument(
        "--scorecam-reps",
        type=int,
        default=2,
        help="timed Score-CAM rounds at most, the first one included (default 2)",
    )
    p.add_argument(
        "--surrogate-samples", type=int, default=256, help="LIME/KernelSHAP samples and RISE masks (default 256)"
    )
    p.add_argument("--no-peers", action="store_true", help="camlens only")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip peak-memory children")
    p.add_argument("--leak", action="store_true", help="run only the leak check")
    p.add_argument("--no-leak", dest="with_leak", action="store_false", help="skip the leak check")
    p.add_argument("--leak-calls", type=int, default=1000)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: EfficientNet-Lite0, batch 1, Grad-CAM/top-5/all, 2 rounds, no peers, "
        "no memory, no leak, no BENCHMARKS.md",
    )
    p.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/bench-TIME.json)")
    p.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="report file (default BENCHMARKS.md for full runs; none for --quick)",
    )
    p.add_argument("--no-markdown", action="store_true", help="write the JSON only")
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="rebuild the report from these JSON results instead of measuring",
    )
    return p


def _apply_quick(args) -> None:
    args.models, args.batches = ["efficientnet_lite0"], [1]
    args.tasks = ["gradcam", "top5", "all"]
    args.warmup, args.min_reps, args.max_reps, args.budget = 0, 2, 2, 0.0
    args.no_peers, args.memory, args.with_leak = True, False, False


def run(args, log=print) -> dict[str, Any]:
    """Measure what ``args`` selects; return the result document (also written as JSON)."""
    from .cases import MODELS, TASKS

    global CLOCK
    CLOCK = time.process_time if getattr(args, "clock", "wall") == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    bad = [m for m in args.models if m not in MODELS] + [t for t in args.tasks if t not in TASKS]
    if bad:
        raise SystemExit(
            f"unknown model/task: {', '.join(bad)}; models: {', '.join(MODELS)}; tasks: {', '.join(TASKS)}"
        )
    args.tasks_grad = tuple(t for t in args.tasks if t not in ("scorecam", "surrogate"))
    doc: dict[str, Any] = {
        "machine": machine_info(args.threads, args.device),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("merge",)},
        "results": [],
        "leak": None,
    }
    t0 = time.perf_counter()
    if not args.leak:
        for name in args.models:
            if args.tasks_grad:
                for b in args.batches:
                    doc["results"] += run_gradient_group(name, b, args, log)
            if "scorecam" in args.tasks and name in args.scorecam_models:
                doc["results"] += run_scorecam_group(name, args, log)
    if "surrogate" in args.tasks and not args.leak:  # LIME/KernelSHAP vs Captum, RISE on ONNX Runtime
        from .surrogate import run as run_surrogate

        log("[surrogate] LIME / KernelSHAP per sample, against Captum; RISE through ONNX Runtime")
        doc["surrogate"] = run_surrogate(False, args.surrogate_samples, args.surrogate_samples, log)
    if args.leak or (args.with_leak and args.device == "cpu"):
        from .memory import run_child

        log(f"[leak] {args.leak_calls} Grad-CAM calls, EfficientNet-Lite0, batch 1")
        doc["leak"] = run_child(
            {
                "mode": "leak",
                "model": "efficientnet_lite0",
                "calls": args.leak_calls,
                "sample_every": 50,
                "size": args.size,
                "threads": args.threads,
            }
        )
        lk = doc["leak"]
        log(
            f"    RSS growth {lk['growth_mb']:+.1f} MB over {lk['calls']} calls "
            f"(max-min {lk['max_minus_min_mb']:.1f} MB); hooks left {lk['hooks_left']}, "
            f".grad left {lk['grads_left']}"
        )
    doc["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    doc["machine"]["wall_s"] = time.perf_counter() - t0
    return doc


def main(argv: Sequence[str] | None = None, log=print) -> int:
    from .report import write_markdown

    args = build_parser().parse_args(argv)
    if args.merge:
        docs = [json.loads(p.read_text()) for p in args.merge]
        write_markdown(docs, args.markdown or ROOT / "BENCHMARKS.md")
        log(f"wrote {args.markdown or ROOT / 'BENCHMARKS.md'}")
        return 0
    if args.quick:
        _apply_quick(args)
    doc = run(args, log)
    out = args.out or RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    from camlens.base.fsio import atomic_write, safe_out_dir

    safe_out_dir(out.parent)
    atomic_write(out, json.dumps(doc, indent=1), overwrite=True)  # `camlens bench` checked --overwrite
    log(f"wrote {out}")
    md = args.markdown if args.markdown is not None else (None if args.quick or args.leak else ROOT / "BENCHMARKS.md")
    if args.no_markdown:
        md = None
    if md is not None:
        write_markdown([doc], md)
        log(f"wrote {md}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
