"""Peak memory of one call, and the leak check, measured in a child process.

CPU memory of a PyTorch call cannot be read with ``tracemalloc`` (tensors are allocated in C++),
so the child reads the kernel's accounting: ``VmHWM`` (peak resident set size) is reset to the
current ``VmRSS`` by writing ``5`` to ``/proc/self/clear_refs`` (Linux), the call runs, and its
peak is ``VmHWM - VmRSS(before)``. The child starts with ``MALLOC_MMAP_THRESHOLD_=65536`` so that
every tensor buffer above 64 KiB is its own mapping, returned to the system when freed: later
calls cannot hide their peak in memory that earlier calls left inside the heap. Each contender
is called once before it is measured (one-time caches are not counted). Where ``clear_refs``
is not writable, each contender gets a fresh child and ``ru_maxrss`` growth is used instead.

The leak check (``--leak``) calls ``explain(model, x, "gradcam")`` 1,000 times on one image and
samples the resident set size; it also reports the peak for a batch of 64 and verifies that
the model carries no hook and no ``.grad`` afterwards.

Run as ``python -m benchmarks.memory '<json spec>'``; prints one JSON object.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from typing import Any

CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONUNBUFFERED": "1"}


def _status() -> dict[str, float]:
    with open("/proc/self/status") as f:
        text = f.read()
    return {k: int(re.search(k + r":\s+(\d+)", text).group(1)) / 1024 for k in ("VmRSS", "VmHWM")}


def rss_mb() -> float:
    """Current resident set size in MiB."""
    return _status()["VmRSS"]


def can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb(fn) -> float:
    """Peak resident memory added by ``fn()`` above the resident set size before it, in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status()["VmRSS"]
    fn()
    return max(0.0, _status()["VmHWM"] - before)


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------ child side
def _group(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from .cases import gradient_contenders, load_bench_model, make_batch

    torch.set_num_threads(spec["threads"])
    model = load_bench_model(spec["model"])
    x, classes = make_batch(model, spec["batch"], spec["size"])
    conts = gradient_contenders(spec["model"], model, x, classes, tuple(spec["tasks"]), spec["peers"])
    only = spec.get("only")
    out: dict[str, float] = {}
    try:
        if only is not None:  # fallback mode: one contender per fresh child, ru_maxrss growth
            (c,) = [c for c in conts if c.key == only]
            base = maxrss_mb()
            c.fn()
            return {c.key: max(0.0, maxrss_mb() - base)}
        for c in conts:
            c.fn()  # warm-up
        for c in conts:
            out[c.key] = peak_mb(c.fn)
    finally:
        for c in conts:
            c.close()
    return out


def _leak(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import camlens

    from .cases import load_bench_model, make_batch

    torch.set_num_threads(spec["threads"])
    model = load_bench_model(spec["model"])
    x, _ = make_batch(model, 1, spec["size"])
    calls, every, warm = spec["calls"], spec["sample_every"], spec.get("warmup", 20)
    for _ in range(warm):
        camlens.explain(model, x, "gradcam")
    samples = [(0, rss_mb())]
    t0 = time.perf_counter()
    for i in range(1, calls + 1):
        camlens.explain(model, x, "gradcam")
        if i % every == 0:
            samples.append((i, rss_mb()))
    seconds = time.perf_counter() - t0
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    grads = sum(p.grad is not None for p in model.parameters())
    result: dict[str, Any] = {
        "model": spec["model"],
        "calls": calls,
        "warmup": warm,
        "samples": samples,
        "seconds": seconds,
        "growth_mb": samples[-1][1] - samples[0][1],
        "max_minus_min_mb": max(s[1] for s in samples) - min(s[1] for s in samples),
        "hooks_left": hooks,
        "grads_left": grads,
    }
    if spec.get("batch64", True) and can_reset_peak():
        x64, cls64 = make_batch(model, 64, spec["size"])
        del cls64

        def fwd():
            with torch.inference_mode():
                model(x64)

        def gc():
            camlens.explain(model, x64, "gradcam")

        fwd(), gc()
        result["batch64"] = {
            "forward_peak_mb": peak_mb(fwd),
            "gradcam_peak_mb": peak_mb(gc),
            "input_mb": x64.numel() * x64.element_size() / 2**20,
        }
    return result


def child_main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    out = _leak(spec) if spec["mode"] == "leak" else _group(spec)
    print("@@RESULT@@" + json.dumps(out))
    return 0


# ----------------------------------------------------------------------------------- parent side
def run_child(spec: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run a measurement in a fresh interpreter (with :data:`CHILD_ENV`) and return its result."""
    env = {**os.environ, **CHILD_ENV}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", json.dumps(spec)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@") :])
    raise RuntimeError(f"memory child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def group_peaks(spec: dict[str, Any], keys: list[str]) -> dict[str, float]:
    """Peak MiB per contender key for one (model, batch) group."""
    if can_reset_peak():
        return run_child({**spec, "mode": "group"})
    out: dict[str, float] = {}
    for k in keys:
        out.update(run_child({**spec, "mode": "group", "only": k}))
    return out


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1:]))
