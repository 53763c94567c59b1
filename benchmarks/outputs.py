"""``python -m benchmarks.outputs``: the cost of one batch's outputs next to its forward pass.

On ``--batch`` photos (scikit-image's, cycled, at their own resolution) with EfficientNet-Lite0, in
interleaved rounds (medians of ``--reps``), per batch:

* ``forward``: preprocessing + the inference forward (what ``camlens.predict`` costs: the CLI's
  old second forward for its top-5 table); ``exp.top(5)``: the same table from the explaining
  forward's logits;
* ``explain``: Grad-CAM of the top-2 classes;
* ``save titled, zlib 6``: the matplotlib overlay with its title band at PIL's default level (what
  0.1 wrote); ``save titled, zlib 1``: the same at the new default level; ``save untitled``:
  the NumPy + PIL overlay (``title=False``).

Prints a table of milliseconds and ratios to the forward; ``--out`` writes the JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def measure(batch: int = 8, reps: int = 3, threads: int = 2) -> dict[str, list[float]]:
    import camlens
    from camlens.base.io import sample_image

    from .cases import PHOTOS

    torch.set_num_threads(threads)
    model = camlens.load_model("efficientnet_lite0")
    imgs = [sample_image(PHOTOS[i % len(PHOTOS)]) for i in range(batch)]
    exp = camlens.explain(model, imgs, "gradcam", targets="top2")
    assert isinstance(exp, camlens.Explanation)
    exp.sources = [f"img{i}" for i in range(batch)]
    tmp = Path(tempfile.mkdtemp(prefix="camlens-bench-"))

    def save(**kw) -> Callable[[], object]:
        def fn():
            d = tmp / "out"
            exp.save(d, formats="png", overwrite=True, **kw)
            shutil.rmtree(d)

        return fn

    fns: dict[str, Callable[[], object]] = {
        "forward (predict)": lambda: camlens.predict(model, imgs, topk=5),
        "exp.top(5)": lambda: exp.top(5),
        "explain gradcam top2": lambda: camlens.explain(model, imgs, "gradcam", targets="top2"),
        "save titled, zlib 6": save(title=True, compress_level=6),
        "save titled, zlib 1": save(title=True, compress_level=1),
        "save untitled (PIL), zlib 1": save(title=False, compress_level=1),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    try:
        for f in fns.values():
            f()  # warm-up
        keys = list(fns)
        for r in range(reps):
            gc.collect()
            for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
                t = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return times


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.outputs", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    times = measure(args.batch, args.reps, args.threads)
    fwd = statistics.median(times["forward (predict)"])
    print(f"batch {args.batch}, {args.reps} rounds; medians")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"  {k:<30} {m * 1000:9.1f} ms  x{m / fwd:.3f} forward  ({1000 * m / args.batch:.1f} ms/image)")
    if args.out:
        args.out.write_text(json.dumps({"batch": args.batch, "reps": args.reps, "times_s": times}, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
