"""``camlens bench``: how much an explanation costs next to a plain forward pass on this machine.

From a source checkout (the ``benchmarks/`` folder beside the package) it runs the full benchmark
of ``python -m benchmarks`` — camlens against pytorch-grad-cam, Captum and TorchCAM where they are
installed (``pip install -r requirements-bench.txt``). Elsewhere, or with ``--builtin``, it times
camlens alone: the inference forward pass, Grad-CAM, Grad-CAM of the top-5 classes and every layer
method in one call, interleaved round by round, medians and ratios to the forward pass.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import click

LAYER_METHODS = ("cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")


def _benchmarks_runner():
    """``benchmarks.runner`` from a source checkout, else ``None``."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "runner.py").is_file():
        return None
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from benchmarks import runner
    except ImportError:
        return None
    return runner


def builtin_bench(model_name: str, batches: list[int], threads: int, rounds: int, echo=click.echo) -> list[dict]:
    """camlens-only timings: one row per (batch, call) with the median and the ratio to the forward."""
    import torch

    import camlens
    from camlens.base.io import sample_image
    from camlens.core.inputs import prepare_inputs

    torch.set_num_threads(threads)
    model = camlens.load_model(model_name, weights=None if model_name == "efficientnet_lite0" else "random")
    photos = ("chelsea", "coffee", "astronaut", "rocket")
    rows = []
    for b in batches:
        x, _, _ = prepare_inputs([sample_image(photos[i % 4]) for i in range(b)], model)

        def fwd(x=x):
            with torch.inference_mode():
                model(x)

        calls = {
            "forward (inference)": fwd,
            "gradcam": lambda x=x: camlens.explain(model, x, "gradcam"),
            "gradcam top-5": lambda x=x: camlens.explain(model, x, "gradcam", "top5"),
            "all layer methods": lambda x=x: camlens.explain(model, x, list(LAYER_METHODS)),
        }
        times: dict[str, list[float]] = {k: [] for k in calls}
        for f in calls.values():  # warm-up
            f()
        for r in range(rounds):
            names = list(calls)
            for k in names[r % len(names) :] + names[: r % len(names)]:
                t = time.perf_counter()
                calls[k]()
                times[k].append(time.perf_counter() - t)
        fwd_ms = statistics.median(times["forward (inference)"]) * 1000
        for k, ts in times.items():
            ms = statistics.median(ts) * 1000
            rows.append({"model": model_name, "batch": b, "call": k, "ms": ms, "ratio": ms / fwd_ms})
            echo(f"{model_name:<20} batch {b:<3} {k:<22} {ms:9.1f} ms  x{ms / fwd_ms:.3f}")
    return rows


@click.command("bench")
@click.option("--quick", is_flag=True, help="a smoke run: EfficientNet-Lite0, batch 1, a few rounds")
@click.option("--models", default=None, help="comma list (efficientnet_lite0,resnet50,vgg16)")
@click.option("--tasks", default=None, help="comma list (gradcam,top5,all,scorecam,guided_backprop)")
@click.option("--batches", default=None, help="comma list of batch sizes (default 1,16)")
@click.option("--threads", type=int, default=2, show_default=True, help="torch threads")
@click.option("--no-peers", is_flag=True, help="camlens only")
@click.option("--leak", is_flag=True, help="run only the leak check (1,000 Grad-CAM calls)")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="JSON results file [default: camlens-bench-TIME.json in the current folder]",
)
@click.option("--markdown", type=click.Path(dir_okay=False), default=None, help="write a report here")
@click.option("--overwrite", is_flag=True, help="replace existing --out / --markdown files")
@click.option("--builtin", is_flag=True, help="camlens-only timing, even from a source checkout")
def bench_cmd(quick, models, tasks, batches, threads, no_peers, leak, out, markdown, overwrite, builtin):
    """Time explanations against the forward pass (and the peer libraries, from a source checkout)."""
    from camlens.base.errors import CamlensError
    from camlens.base.fsio import check_targets

    try:  # a file or a link (even a dangling one) is in the way without --overwrite
        check_targets([p for p in (out, markdown) if p], overwrite)
    except CamlensError as exc:
        raise click.UsageError(str(exc)) from None
    runner = None if builtin else _benchmarks_runner()
    if runner is None:
        if leak or out or markdown or tasks:
            raise click.UsageError(
                "--leak, --out, --markdown and --tasks need the benchmarks/ folder of a "
                "camlens source checkout; without it only the built-in timing runs"
            )
        names = models.split(",") if models else ["efficientnet_lite0"]
        sizes = [int(b) for b in batches.split(",")] if batches else ([1] if quick else [1, 16])
        for name in names:
            builtin_bench(name.strip(), sizes, threads, rounds=2 if quick else 7)
        return
    if not out:  # into the current folder, never into the source tree or the installed package
        out = str(Path.cwd() / f"camlens-bench-{time.strftime('%Y%m%d-%H%M%S')}.json")
    argv = ["--threads", str(threads)]
    for flag, value in (
        ("--models", models),
        ("--tasks", tasks),
        ("--batches", batches),
        ("--out", out),
        ("--markdown", markdown),
    ):
        if value:
            argv += [flag, str(value)]
    if quick:
        argv.append("--quick")
    if no_peers:
        argv.append("--no-peers")
    if leak:
        argv.append("--leak")
    if not markdown:
        argv.append("--no-markdown")
    sys.exit(runner.main(argv, log=click.echo))
