"""BENCHMARKS.md from one or more result documents (see :mod:`benchmarks.runner`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

PEER_NAMES = ("pytorch-grad-cam", "Captum", "TorchCAM")
FROZEN = "Captum (frozen parameters)"
#: models without any ``nn.ReLU`` module (EfficientNet-Lite0: ReLU6 only): the peers' guided backprop
#: replaces ``nn.ReLU`` modules only, so on these it computes the plain gradient (runs made before
#: the rows carried ``different_work`` are judged by this list)
NO_NN_RELU = ("efficientnet_lite0",)


def different_work(r: dict[str, Any] | None) -> bool:
    """Whether a row did other work than camlens' (a peer's guided backprop on a ReLU6 network)."""
    if r is None:
        return False
    if r.get("different_work"):
        return True
    return r["task"] == "guided_backprop" and r["impl"] in PEER_NAMES and r["model"] in NO_NN_RELU


LEAK_MB = 5.0  # "memory flat within a few MB"


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "–"
    if ms >= 10000:
        return f"{ms / 1000:.1f} s"
    if ms >= 100:
        return f"{ms:.0f} ms"
    return f"{ms:.1f} ms"


def _find(rows, task, impl, model, batch):
    for r in rows:
        if r["task"] == task and r["impl"] == impl and r["model"] == model and r["batch"] == batch:
            return r
    return None


def _groups(rows, task) -> list[tuple[str, int]]:
    seen = []
    for r in rows:
        if r["task"] == task and (r["model"], r["batch"]) not in seen:
            seen.append((r["model"], r["batch"]))
    return seen


def _median(v: list[float]) -> float:
    import statistics

    return statistics.median(v)


def scorecam_photos(rows, model: str) -> list[dict[str, Any]]:
    """Per photo of a Score-CAM group: camlens' and pytorch-grad-cam's time, masked forwards, the
    speed-up and each one's cost per masked forward."""
    out = []
    photos = []
    for r in rows:
        if r["task"] == "scorecam" and r["model"] == model and r.get("photo", "chelsea") not in photos:
            photos.append(r.get("photo", "chelsea"))
    for ph in photos:
        sel = [r for r in rows if r["task"] == "scorecam" and r["model"] == model and r.get("photo", "chelsea") == ph]
        me = next((r for r in sel if r["impl"] == "camlens channel_softmax"), None) or next(
            (r for r in sel if r["impl"] == "camlens"), None
        )
        pgc = next((r for r in sel if r["impl"] == "pytorch-grad-cam"), None)
        if me is None:
            continue
        ex = me.get("scorecam") or {}
        fw = (ex.get("camlens_forwards") or {}).get(me["impl"])
        n_me = fw[0] if isinstance(fw, list) and fw else fw
        n_pgc = ex.get("channels")
        out.append(
            {
                "photo": ph,
                "impl": me["impl"],
                "camlens_ms": me["ms"],
                "pgc_ms": pgc["ms"] if pgc else None,
                "speedup": pgc["ms"] / me["ms"] if pgc else None,
                "camlens_forwards": n_me,
                "pgc_forwards": n_pgc,
                "zero_channels": ex.get("all_zero_channels"),
                "camlens_ms_per_forward": me["ms"] / n_me if n_me else None,
                "pgc_ms_per_forward": pgc["ms"] / n_pgc if pgc and n_pgc else None,
            }
        )
    return out


def evaluate_targets(rows: list[dict[str, Any]], leak: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's targets, each as ``{target, where, value, limit, ok}``."""
    out = []

    def add(target, where, value, limit, ok):
        out.append({"target": target, "where": where, "value": value, "limit": limit, "ok": bool(ok)})

    for model, b in _groups(rows, "gradcam"):
        me = _find(rows, "gradcam", "camlens", model, b)
        if me is None:
            continue
        add(
            "Grad-CAM ≤ 1.15 × forward",
            f"{model}, batch {b}",
            f"{me['ratio_to_forward']:.3f}×",
            "≤ 1.15",
            me["ratio_to_forward"] <= 1.15,
        )
        pgc = _find(rows, "gradcam", "pytorch-grad-cam", model, b)
        if pgc is not None and b >= 16:
            s = pgc["ms"] / me["ms"]
            add(
                "Grad-CAM ≥ 2× faster than pytorch-grad-cam (batch 16)",
                f"{model}, batch {b}",
                f"{s:.2f}×",
                "≥ 2",
                s >= 2,
            )
        cap = _find(rows, "gradcam", "Captum", model, b)
        if cap is not None:
            s = cap["ms"] / me["ms"]
            add("Grad-CAM no slower than Captum", f"{model}, batch {b}", f"{s:.2f}×", "≥ 1", s >= 1)
        top5 = _find(rows, "top5", "camlens", model, b)
        if top5 is not None:
            s = top5["ms"] / me["ms"]
            add("top-5 classes ≤ 1.5 × one class", f"{model}, batch {b}", f"{s:.2f}×", "≤ 1.5", s <= 1.5)
        allm = _find(rows, "all", "camlens", model, b)
        if allm is not None:
            s = allm["ms"] / me["ms"]
            add("all layer methods in one call ≤ 1.3 × Grad-CAM", f"{model}, batch {b}", f"{s:.2f}×", "≤ 1.3", s <= 1.3)
    for model, b in _groups(rows, "topk"):
        top = _find(rows, "topk", "camlens K=100", model, b)
        fwd = _find(rows, "forward", "torch", model, b)
        if top is not None:
            r = top["ratio_to_forward"]
            add("top-100 Grad-CAM ≤ 1.4 × forward", f"{model}, batch {b}", f"{r:.2f}×", "≤ 1.4", r <= 1.4)
            if fwd is not None and top.get("peak_mb") is not None and fwd.get("peak_mb"):
                m = top["peak_mb"] / fwd["peak_mb"]
                add(
                    "top-100 Grad-CAM peak memory ≤ 1.1 × forward's",
                    f"{model}, batch {b}",
                    f"{m:.2f}×",
                    "≤ 1.1",
                    m <= 1.1,
                )
    for model, b in _groups(rows, "scorecam"):
        me = _find(rows, "scorecam", "camlens", model, b)
        pgc = _find(rows, "scorecam", "pytorch-grad-cam", model, b)
        if me is not None and pgc is not None:
            per = [p["speedup"] for p in scorecam_photos(rows, model) if p["speedup"] is not None]
            s = _median(per) if per else pgc["ms"] / me["ms"]
            where = f"{model}, batch {b}" + (f", median of {len(per)} photos" if len(per) > 1 else "")
            add("Score-CAM ≥ 2× faster than pytorch-grad-cam", where, f"{s:.2f}×", "≥ 2", s >= 2)
            r = ((me.get("scorecam") or {}).get("pearson_vs_pytorch_grad_cam") or {}).get("camlens channel_softmax")
            if r is not None:
                add(
                    "Score-CAM maps agree with pytorch-grad-cam (same weighting)",
                    f"{model}, batch {b}",
                    f"r = {r:.4f}",
                    "≥ 0.99",
                    r >= 0.99,
                )
    for model, b in _groups(rows, "guided_backprop"):
        me = _find(rows, "guided_backprop", "camlens", model, b)
        pgc = _find(rows, "guided_backprop", "pytorch-grad-cam", model, b)
        if me is not None and pgc is not None and b >= 16 and not different_work(pgc):
            s = pgc["ms"] / me["ms"]
            add(
                "guided backprop ≥ 5× pytorch-grad-cam's per-image throughput (batch 16)",
                f"{model}, batch {b}",
                f"{s:.2f}×",
                "≥ 5",
                s >= 5,
            )
    if leak:
        add(
            f"no leak: RSS flat over {leak['calls']:,} calls",
            f"{leak['model']}, batch 1, {leak['calls']} calls",
            f"{leak['growth_mb']:+.1f} MB",
            f"within ±{LEAK_MB:.0f} MB",
            abs(leak["growth_mb"]) <= LEAK_MB and not leak["hooks_left"] and not leak["grads_left"],
        )
    return out


def _machine_lines(docs) -> list[str]:
    lines = []
    for i, d in enumerate(docs):
        m = d["machine"]
        peers = ", ".join(f"{k} {v}" for k, v in m["peers"].items() if v) or "none installed"
        la = m.get("loadavg_start")
        la_end = m.get("loadavg_end")
        load = (
            ""
            if la is None
            else f"; load average {la[0]:.2f} at start, {la_end[0]:.2f} at end"
            if la_end
            else f"; load average {la[0]:.2f} at start"
        )
        tag = f"Run {i + 1}: " if len(docs) > 1 else ""
        clock = (d.get("config") or {}).get("clock", "wall")
        if clock == "cpu":
            tag += "(**CPU time** of the process, `--clock cpu`, not wall time) "
        lines.append(
            f"- {tag}**{m['cpu']}**, {m['cpus_available']} of {m['logical_cpus']} logical CPUs available, "
            f"**torch {m['torch']}** with **{m['torch_threads']} threads** (interop {m['torch_interop_threads']}), "
            f"device {m['device']}{' (' + m['gpu'] + ')' if m.get('gpu') else ''}; Python {m['python']}; "
            f"camlens {m['camlens']} (commit {m.get('commit') or '?'}); peers: {peers}; {m['date']}"
            f"{load}; measured in {m.get('wall_s', 0) / 60:.1f} min."
        )
    return lines


def _ips(r, batch: int) -> str:
    return f"{1000 * batch / r['ms']:.1f}" if r else "–"


def _cell(r, base_ms=None, speed=False, r_ok=True) -> str:
    if r is None:
        return "–"
    s = _fmt_ms(r["ms"])
    if base_ms is not None:
        s += f" ({r['ms'] / base_ms:.2f}×)" if not speed else f" ({base_ms and r['ms'] / base_ms:.1f}× camlens)"
    if r_ok and r.get("pearson_vs_ref") is not None and r["pearson_vs_ref"] < 0.999:
        s += f" r={r['pearson_vs_ref']:.3f}"
    return s


def surrogate_lines(doc: dict[str, Any] | None) -> list[str]:
    """The LIME / KernelSHAP / ONNX Runtime section (:mod:`benchmarks.surrogate`)."""
    if not doc:
        return []
    m = doc["meta"]
    L = [
        "## LIME, KernelSHAP and ONNX Runtime",
        "",
        f"{m['model']} at {m['size']} px, one image, {m['segments']} SLIC superpixels, baseline 0, "
        f"{m['samples']} samples (RISE: {m['masks']} masks), {m['batch']} masked images per forward. Per-sample "
        "cost as a multiple of one image's share of a batched inference forward of the same batch size.",
        "",
        "| contender | median ms | ms per sample | × batched forward per image |",
        "|---|---|---|---|",
    ]
    for r in doc["rows"]:
        L.append(
            f"| {r['contender']} | {r['median_ms']:.0f} | {r['per_sample_ms']:.2f} | {r['per_sample_vs_forward']:.2f} |"
        )
    agree = ", ".join(f"{k}: {v:.3g}" for k, v in m.items() if k.startswith(("pearson", "rise")))
    return [*L, "", f"Agreement: {agree}.", ""]


def markdown(docs: Sequence[dict[str, Any]]) -> str:
    rows = [r for d in docs for r in d["results"]]
    leak = next((d["leak"] for d in docs if d.get("leak")), None)
    targets = evaluate_targets(rows, leak)
    L = [
        "# camlens benchmarks",
        "",
        "Generated by `python -m benchmarks` (`make bench`); do not edit by hand. Peers come from "
        "`requirements-bench.txt` only.",
        "",
    ]
    L += ["## Machine", "", *_machine_lines(docs), ""]
    loaded = [
        d
        for d in docs
        if max((d["machine"].get(k) or [0.0])[0] for k in ("loadavg_start", "loadavg_end"))
        > (d["machine"].get("cpus_available") or 1) + 0.5
    ]
    if loaded:
        L += [
            f"**{len(loaded)} of {len(docs)} run(s) measured on a loaded machine** (load average above the number "
            "of CPUs at the start or the end): absolute times are unreliable there; the ratios within one run (every "
            "contender interleaved round by round) are what to read. Rerun on an idle machine for the record.",
            "",
        ]
    L += [
        "## How it is measured",
        "",
        "- Inputs: 224×224 real photos (scikit-image's chelsea, coffee, astronaut, rocket, cycled to the batch), "
        "each model's own preprocessing; the explained class is each image's top-1 class, given to every "
        "library explicitly. EfficientNet-Lite0 has its bundled ImageNet weights; ResNet-50 and VGG-16 random "
        "weights.",
        "- Layer: the same for every library (EfficientNet-Lite0: the features entering the global pooling, "
        "exposed as `_avg_pooling.features` by an `nn.Identity`; ResNet-50: `layer4`; VGG-16: `features.29`). "
        '*camlens (auto layer)* is the default call `explain(model, x, "gradcam")`, which finds the layer '
        "itself (VGG-16 has no global pooling: it falls back to the last spatial module, `features.30`).",
        "- Every contender returns maps at input resolution (Captum and TorchCAM stop at the layer's "
        "resolution: their time includes the same bilinear upsampling camlens does).",
        "- Timing: warm-up calls, then round-robin rounds (every contender once per round, the order rotated, "
        "the garbage collector run before a round and paused during it); the median per contender; ratios "
        "are ratios of medians within the same run. *forward* is `model(x)` under `torch.inference_mode()`.",
        "- Peak memory: a child process per model and batch; the peak resident set size (VmHWM, reset through "
        "`/proc/self/clear_refs`) minus the resident set size just before the call, after one warm-up call, "
        "with `MALLOC_MMAP_THRESHOLD_=65536` so that freed tensor buffers leave the process (`tracemalloc` "
        "does not see PyTorch's allocations).",
        "- Agreement: where a cell shows `r=`, the smallest per-image Pearson correlation of its maps with "
        "camlens' maps is below 0.999 (otherwise the maps agree to r ≥ 0.999).",
        "",
    ]
    if targets:
        L += ["## Targets", "", "| target | where | measured | limit | |", "|---|---|---|---|---|"]
        for t in targets:
            L.append(f"| {t['target']} | {t['where']} | {t['value']} | {t['limit']} | {'✅' if t['ok'] else '❌'} |")
        L.append("")
    groups = _groups(rows, "gradcam")
    if groups:
        L += [
            "## Grad-CAM at the last convolutional layer",
            "",
            "Time per call (× the same run's forward pass).",
            "",
            "| model | batch | forward | forward (no_grad) | camlens | camlens (auto layer) | pytorch-grad-cam "
            "| Captum | Captum (frozen parameters) | TorchCAM |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for model, b in groups:
            f = _find(rows, "forward", "torch", model, b)
            fms = f["ms"] if f else None
            cells = [
                _cell(_find(rows, "gradcam", i, model, b), fms)
                for i in ("camlens", "camlens (auto layer)", "pytorch-grad-cam", "Captum", FROZEN, "TorchCAM")
            ]
            ng = _cell(_find(rows, "forward", "torch no_grad", model, b), fms)
            L.append(f"| {model} | {b} | {_fmt_ms(fms)} | {ng} | " + " | ".join(cells) + " |")
        L.append("")
    groups = _groups(rows, "top5") + [g for g in _groups(rows, "all") if g not in _groups(rows, "top5")]
    if groups:
        L += [
            "## Several classes or methods from one call",
            "",
            "| model | batch | Grad-CAM, 1 class | Grad-CAM, top-5 classes | all layer methods | methods |",
            "|---|---|---|---|---|---|",
        ]
        for model, b in groups:
            g = _find(rows, "gradcam", "camlens", model, b)
            gms = g["ms"] if g else None
            t5 = _find(rows, "top5", "camlens", model, b)
            al = _find(rows, "all", "camlens", model, b)
            L.append(
                f"| {model} | {b} | {_fmt_ms(gms)} | {_cell(t5, gms, r_ok=False)} | "
                f"{_cell(al, gms, r_ok=False)} | {al.get('note', '') if al else ''} |"
            )
        L += ["", "Ratios are against Grad-CAM of one class in the same run.", ""]
    groups = _groups(rows, "topk")
    if groups:
        from .cases import KS, LOOP_KS

        impls = (
            [f"camlens K={k}" for k in KS] + [f"camlens K={KS[-1]} +maps"] + [f"camlens K={k} loop" for k in LOOP_KS]
        )
        L += [
            "## Grad-CAM of K classes in one call",
            "",
            "The K best classes of each image, one `explain` call: one forward, then one batched backward "
            "(`is_grads_batched`) per chunk of classes, with the layer gradients reduced chunk by chunk (the "
            "`(N, K, C, h, w)` tensor is never built). The maps stay at feature resolution until used "
            "(`exp.maps` upsamples them on first access; boxes, files and figures go image by image); "
            "*+maps*: the same call, then `exp.maps` built for every image and class at input resolution. "
            "*loop*: one backward per class (`grad_batching(False)`). Time × the same run's forward; "
            "peak memory (MiB) × the forward's peak.",
            "",
            "| model | batch | forward | " + " | ".join(i.replace("camlens ", "") for i in impls) + " |",
            "|---|---|---|" + "---|" * len(impls),
        ]
        for model, b in groups:
            f = _find(rows, "forward", "torch", model, b)
            fms = f["ms"] if f else None
            cells = [_cell(_find(rows, "topk", i, model, b), fms, r_ok=False) for i in impls]
            L.append(f"| {model} | {b} | {_fmt_ms(fms)} | " + " | ".join(cells) + " |")
            if f is not None and f.get("peak_mb"):
                mem = []
                for i in impls:
                    r = _find(rows, "topk", i, model, b)
                    pk = r.get("peak_mb") if r else None
                    mem.append("–" if pk is None else f"{pk:.0f} MiB ({pk / f['peak_mb']:.2f}×)")
                L.append(f"| {model} | {b} | peak {f['peak_mb']:.0f} MiB | " + " | ".join(mem) + " |")
        L.append("")
    groups = _groups(rows, "scorecam")
    if groups:
        L += [
            "## Score-CAM (batch 1)",
            "",
            "This table: the first photo (chelsea); the next one: every photo measured.",
            "",
            "pytorch-grad-cam and TorchCAM weight channel k by the softmax over channels of the class logit "
            "of the masked input; camlens' default is the paper's softmax probability "
            '(`weighting="prob"`) and `weighting="channel_softmax"` is the peers\' weighting. '
            "Pearson correlations of the maps: *r vs pgc* with pytorch-grad-cam's, *r vs channel_softmax* "
            'with camlens\' uncapped `weighting="channel_softmax"` map.',
            "",
            "| model | contender | masked forwards | time | × forward | speed-up vs pytorch-grad-cam | r vs pgc | "
            "r vs channel_softmax |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for model, b in groups:
            pgc = _find(rows, "scorecam", "pytorch-grad-cam", model, b)
            ex = (
                next(
                    (
                        r.get("scorecam")
                        for r in rows
                        if r["task"] == "scorecam" and r["model"] == model and r.get("scorecam")
                    ),
                    {},
                )
                or {}
            )
            vs = ex.get("pearson_vs_pytorch_grad_cam", {})
            fw = ex.get("camlens_forwards") or {}
            sel = [r for r in rows if r["task"] == "scorecam" and r["model"] == model and r["batch"] == b]
            first = sel[0].get("photo") if sel else None
            for r in [r for r in sel if r.get("photo") == first]:
                sp = f"{pgc['ms'] / r['ms']:.2f}×" if pgc else "–"
                rp, rc = vs.get(r["impl"]), r.get("pearson_vs_ref")
                n = fw.get(r["impl"])
                n = n[0] if n else (ex.get("channels", "?") if r["impl"] in PEER_NAMES else "")
                L.append(
                    f"| {model} | {r['impl']} | {n} | {_fmt_ms(r['ms'])} (n={r['reps']}) | "
                    f"{r['ratio_to_forward']:.0f}× | {sp} | {'' if rp is None else f'{rp:.4f}'} | "
                    f"{'' if rc is None else f'{rc:.4f}'} |"
                )
            L.append(
                f"| {model} | *{ex.get('channels', '?')} channels, {ex.get('all_zero_channels', '?')} of "
                "them all zero on this image* | | | | | | |"
            )
        L.append("")
        L += [
            "### Score-CAM over several photos, and per masked forward",
            "",
            'camlens (`weighting="channel_softmax"`, the peers\' weighting) against pytorch-grad-cam on each photo: '
            "the speed-up comes mostly from channels whose masks coincide (all-zero channels share one forward), "
            "so it depends on the photo; the cost of one masked forward is the fairer per-unit comparison.",
            "",
            "| model | photo | all-zero channels | camlens forwards | pgc forwards | camlens | pytorch-grad-cam | "
            "speed-up | camlens ms/forward | pgc ms/forward |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for model in dict.fromkeys(m for m, _ in groups):
            per = scorecam_photos(rows, model)
            for p in per:

                def f(v, fmt="{:.1f}"):
                    return "–" if v is None else fmt.format(v)

                L.append(
                    f"| {model} | {p['photo']} | {f(p['zero_channels'], '{}')} | {f(p['camlens_forwards'], '{}')} | "
                    f"{f(p['pgc_forwards'], '{}')} | {_fmt_ms(p['camlens_ms'])} | {_fmt_ms(p['pgc_ms'])} | "
                    f"{f(p['speedup'], '{:.2f}×')} | {f(p['camlens_ms_per_forward'])} | "
                    f"{f(p['pgc_ms_per_forward'])} |"
                )
            sp = [p["speedup"] for p in per if p["speedup"] is not None]
            cf = [p["camlens_ms_per_forward"] for p in per if p["camlens_ms_per_forward"] is not None]
            pf = [p["pgc_ms_per_forward"] for p in per if p["pgc_ms_per_forward"] is not None]
            if sp:
                L.append(
                    f"| {model} | **median of {len(sp)}** (range) | | | | | | **{_median(sp):.2f}×** "
                    f"({min(sp):.2f}–{max(sp):.2f}) | {_median(cf) if cf else float('nan'):.1f} | "
                    f"{_median(pf) if pf else float('nan'):.1f} |"
                )
        L.append("")
    groups = _groups(rows, "guided_backprop")
    if groups:
        L += [
            "## Guided backprop",
            "",
            "pytorch-grad-cam's `GuidedBackpropReLUModel` takes one image per call: its batch time is N × "
            "the time of one image, timed in the same run. Captum's `GuidedBackprop` only changes `nn.ReLU` "
            "modules (on EfficientNet-Lite0, whose activations are `ReLU6`, it returns the plain gradient: "
            "see r). Cells marked **different work** are such rows: the peer computed the plain gradient, "
            "not guided backprop, so their time is not comparable with camlens' (and no target is judged on them).",
            "",
            "| model | batch | camlens | Captum | pytorch-grad-cam | camlens images/s | pgc images/s |",
            "|---|---|---|---|---|---|---|",
        ]
        for model, b in groups:
            me = _find(rows, "guided_backprop", "camlens", model, b)
            cap = _find(rows, "guided_backprop", "Captum", model, b)
            pgc = _find(rows, "guided_backprop", "pytorch-grad-cam", model, b)
            dw = " **different work** (plain gradient)"
            c_cap = _cell(cap, me["ms"] if me else None, speed=True) + (dw if different_work(cap) else "")
            c_pgc = _cell(pgc, me["ms"] if me else None, speed=True) + (dw if different_work(pgc) else "")
            L.append(f"| {model} | {b} | {_cell(me)} | {c_cap} | {c_pgc} | {_ips(me, b)} | {_ips(pgc, b)} |")
        L.append("")
    mem = [r for r in rows if r.get("peak_mb") is not None]
    if mem:
        impls = []
        for r in mem:
            k = (r["task"], r["impl"])
            if k not in impls:
                impls.append(k)
        L += [
            "## Peak memory",
            "",
            "MiB above the resident set size before the call.",
            "",
            "| model | batch | " + " | ".join(f"{t}: {i}" for t, i in impls) + " |",
            "|---|---|" + "---|" * len(impls),
        ]
        for model, b in _groups(mem, "forward"):
            cells = []
            for t, i in impls:
                r = _find(mem, t, i, model, b)
                cells.append("–" if r is None else f"{r['peak_mb']:.0f}")
            L.append(f"| {model} | {b} | " + " | ".join(cells) + " |")
        L.append("")
    L += surrogate_lines(next((d["surrogate"] for d in docs if d.get("surrogate")), None))
    if leak:
        s = leak["samples"]
        L += [
            "## Leak check",
            "",
            f'{leak["calls"]} calls of `explain(model, x, "gradcam")` on {leak["model"]}, batch 1, after '
            f"{leak['warmup']} warm-up calls ({leak['seconds']:.0f} s). Resident set size every "
            f"{s[1][0] - s[0][0] if len(s) > 1 else '?'} calls (MiB): " + ", ".join(f"{v:.0f}" for _, v in s) + ".",
            "",
            f"Growth {leak['growth_mb']:+.1f} MiB (largest minus smallest sample "
            f"{leak['max_minus_min_mb']:.1f} MiB); hooks left on the model: {leak['hooks_left']}; parameters "
            f"with `.grad`: {leak['grads_left']}.",
        ]
        b64 = leak.get("batch64")
        if b64:
            L += [
                "",
                f"Batch of 64 ({b64['input_mb']:.0f} MiB input): peak {b64['gradcam_peak_mb']:.0f} MiB for "
                f"Grad-CAM, {b64['forward_peak_mb']:.0f} MiB for the inference forward alone.",
            ]
        L.append("")
    return "\n".join(L) + "\n"


#: The generated report lies between these lines; what lies outside them is written by hand (the
#: dataset throughput, the 0.2 additions…) and is kept byte for byte by :func:`write_markdown`.
BEGIN = "<!-- generated by `python -m benchmarks` (edit outside these markers): begin -->"
END = "<!-- generated by `python -m benchmarks`: end -->"


def splice(existing: str | None, generated: str, path: str | Path = "the report") -> str:
    """``existing`` with the text between :data:`BEGIN` and :data:`END` replaced by ``generated``.

    A new file (``existing`` is None) is the generated block alone. A file without exactly one pair
    of markers is refused rather than overwritten (it would lose its hand-written sections)."""
    block = f"{BEGIN}\n{generated}{END}\n"
    if existing is None:
        return block
    if existing.count(BEGIN) != 1 or existing.count(END) != 1 or existing.index(BEGIN) > existing.index(END):
        raise SystemExit(
            f"{path} does not hold one pair of the markers {BEGIN!r} … {END!r}, so the generated "
            "part cannot be told from the hand-written sections; add the markers around the generated "
            "part, or pass --markdown NEW.md to write a separate report"
        )
    i, j = existing.index(BEGIN), existing.index(END) + len(END)
    return existing[:i] + block + existing[j:].removeprefix("\n")


def write_markdown(docs: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Write the generated report into ``path``, keeping whatever lies outside the markers."""
    from camlens.base.fsio import atomic_write

    p = Path(path)
    existing = p.read_text(encoding="utf-8") if p.is_file() else None
    text = splice(existing, markdown(docs), p)
    atomic_write(p, text, overwrite=True)  # atomic; a link is replaced, never followed
