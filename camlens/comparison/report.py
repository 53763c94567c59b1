"""The outputs of a comparison: the table (Parquet and CSV) and one self-contained HTML report
(``report.html``: inline CSS, images as ``data:`` URIs, no external asset, opens offline)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from camlens._version import versions
from camlens.base.fsio import atomic_write, check_targets, safe_out_dir
from camlens.comparison.config import METRICS, CompareResult, has_interval
from camlens.metrics import plot_sanity
from camlens.viz import denormalize, figure_png, overlay

CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}.flag{color:#a40000}.small{color:#666;font-size:12px}
.grid td{padding:2px;text-align:center;font-size:11px}img{display:block}"""


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _fmt(r: Any) -> str:
    """The mean and its 95 % interval (the mean alone without one, :func:`has_interval`)."""
    if r is None:
        return "–"
    if not has_interval(r):
        return f"{r['mean']:.3g}"
    return f"{r['mean']:.3g} <span class=small>[{r['low']:.3g}, {r['high']:.3g}]</span>"


def _ranking_html(res: CompareResult) -> str:
    cols = ["faithfulness_gain", "deletion", "insertion", "randomization_similarity", "max_sensitivity", "sparseness"]
    if res.config.truth:
        cols.insert(1, "top_k_precision")
    cols += ["ms_per_image", "peak_memory_mib"]
    head = "".join(f"<th>{html.escape(METRICS[c].title)}</th>" for c in cols)
    rows = []
    for k, m in enumerate([*res.ranking, *res.baselines], 1):
        rank = str(k) if m in res.ranking else "baseline"
        cells = "".join(f"<td>{_fmt(res.row(m, c))}</td>" for c in cols)
        verdict = res.verdicts.get(m, "reference map")
        cls = " class=flag" if m in res.flags else ""
        rows.append(f"<tr><td>{rank}</td><td{cls}>{html.escape(m)}</td>{cells}<td>{html.escape(verdict)}</td></tr>")
    dropped = "".join(
        f"<li><b>{html.escape(m)}</b>: {html.escape(w)}</li>" for m, w in res.flags.items() if m not in res.ranking
    )
    flagged = "".join(
        f"<li class=flag><b>{html.escape(m)}</b>: {html.escape(w)}</li>"
        for m, w in res.flags.items()
        if m in res.ranking
    )
    return (
        f"<table id=ranking><tr><th>#</th><th>method</th>{head}<th>verdict</th></tr>{''.join(rows)}</table>"
        f"<ul>{flagged}</ul>" + (f"<p>Not run:</p><ul>{dropped}</ul>" if dropped else "")
    )


def _grid_html(res: CompareResult, preprocess: Any) -> str:
    k = min(res.config.overlay_images, res.x.shape[0])
    images = denormalize(res.x[:k], preprocess)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in res.names[:k])
    rows = [f"<tr><th>image</th>{''.join(f'<td><img src={_uri(_png(im))} width=112></td>' for im in images)}</tr>"]
    for m in [*res.ranking, *res.baselines]:
        cells = "".join(
            f"<td><img src={_uri(_png(overlay(im, res.maps[m][i].numpy())))} width=112></td>"
            for i, im in enumerate(images)
        )
        rows.append(f"<tr><th>{html.escape(m)}</th>{cells}</tr>")
    return f"<table class=grid><tr><th></th>{head}</tr>{''.join(rows)}</table>"


def _bars_png(res: CompareResult) -> bytes:
    metrics = [m for m in dict.fromkeys(res.table["metric"]) if METRICS[m].family not in ("cost",)]
    order = [*res.ranking, *res.baselines]
    ncol = 3
    nrow = max(1, -(-len(metrics) // ncol))
    fig = Figure(figsize=(4.2 * ncol, 0.22 * len(order) * nrow + 1.2 * nrow))
    for j, metric in enumerate(metrics):
        ax = fig.add_subplot(nrow, ncol, j + 1)
        sub = res.table[res.table["metric"] == metric].set_index("method")
        ms = [m for m in order if m in sub.index]
        mean = sub.loc[ms, "mean"].to_numpy()
        err = np.abs(np.stack([mean - sub.loc[ms, "low"].to_numpy(), sub.loc[ms, "high"].to_numpy() - mean]))
        colors = ["#999" if m in res.baselines else "#c44" if m in res.flags else "#3a7" for m in ms]
        ax.barh(range(len(ms)), mean, xerr=err, color=colors, capsize=2)
        ax.set_yticks(range(len(ms)), ms, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{METRICS[metric].title} ({METRICS[metric].better} is better)", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return figure_png(fig, dpi=90)


def _sanity_png(res: CompareResult) -> bytes | None:
    if res.sanity is None:
        return None
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot(1, 1, 1)
    plot_sanity(res.sanity, ax=ax)
    ax.axhline(res.config.sanity_threshold, color="#a40000", ls=":", lw=1)
    fig.tight_layout()
    return figure_png(fig, dpi=90)


def _definitions_html(res: CompareResult) -> str:
    used = dict.fromkeys(res.table["metric"])
    rows = "".join(
        f"<tr><td>{html.escape(METRICS[m].title)}</td><td>{METRICS[m].better}</td><td>{html.escape(METRICS[m].paper)}</td>"
        f"<td><code>{html.escape(METRICS[m].formula)}</code></td></tr>"
        for m in used
    )
    return f"<table><tr><th>metric</th><th>better</th><th>paper</th><th>definition</th></tr>{rows}</table>"


def _budgets(res: CompareResult) -> str:
    """The options each method ran with (its budget and the user's), without the progress switch."""
    opts = {m: {k: v for k, v in res.config.method_options(m).items() if k != "progress"} for m in res.ranking}
    return "; ".join(f"{m} {o}" for m, o in opts.items() if o) or "none"


def report_html(res: CompareResult, model_name: str, preprocess: Any) -> str:
    """The whole report as one HTML string."""
    v = versions()
    sanity = _sanity_png(res)
    cfg = res.config
    took = f"{res.elapsed_s:.0f} s on this machine" + (" (this call; the rest reused)" if res.reused else "")
    sections = [
        f"<h1>Which map should I trust? — {html.escape(model_name)}</h1>",
        f"<p class=small>camlens {html.escape(v['camlens'])} · torch {html.escape(v['torch'])} · "
        f"{res.x.shape[0]} images · seed {res.seed} · {took} · intervals: "
        f"bootstrap 95 % over images ({cfg.bootstrap} resamples)</p>",
        f"<p class=small>sample budgets of the slow methods: {html.escape(_budgets(res))}</p>",
        f"<p class=small>continued an interrupted or earlier run; reused: {html.escape(res.reused)}</p>"
        if res.reused
        else "",
        "<h2>Ranking</h2>",
        _ranking_html(res),
        "<h2>Metrics (mean and 95 % interval)</h2>",
        f"<img alt='metric bars' src={_uri(_bars_png(res))}>",
        "<h2>Sanity check: cascading randomization</h2>",
        f"<img alt='sanity curves' src={_uri(sanity)}>" if sanity else "<p>not run</p>",
        f"<p class=small>{cfg.sanity_images} image(s), top {cfg.sanity_layers} unit(s) randomized; a method above "
        f"the dotted line ({cfg.sanity_threshold}) on average over the steps is flagged.</p>",
        "<h2>Maps</h2>",
        _grid_html(res, preprocess),
        "<h2>Metric definitions</h2>",
        _definitions_html(res),
    ]
    body = "\n".join(sections)
    head = f"<meta charset=utf-8><title>camlens compare</title><style>{CSS}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{body}</body></html>"


def write_outputs(res: CompareResult, out: Path, card: Any, *, replace: bool = False) -> Path:
    """Write ``table.parquet``, ``table.csv`` and ``report.html`` into ``out``; returns the report's path.
    ``replace``: the folder's comparison record matched this run, so its outputs are this comparison's
    (rewritten); otherwise an existing file is refused unless ``config.overwrite``."""
    paths = [out / "table.parquet", out / "table.csv", out / "report.html"]
    ok = replace or res.config.overwrite
    check_targets(paths, overwrite=ok)
    safe_out_dir(out)
    buf = io.BytesIO()
    res.table.to_parquet(buf, index=False)
    atomic_write(paths[0], buf.getvalue(), overwrite=ok)
    atomic_write(paths[1], res.table.to_csv(index=False), overwrite=ok)
    name = getattr(card, "name", None) or "model"
    text = report_html(res, str(name), getattr(card, "preprocess", None))
    atomic_write(paths[2], text, overwrite=ok)
    return paths[2]
