"""Smoke run of the benchmark runner (``python -m benchmarks --quick``) and checks of its arithmetic.

No timing is asserted here: timings belong to BENCHMARKS.md, never to the test suite.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

bench_runner = pytest.importorskip("benchmarks.runner")
from benchmarks.cases import Contender, pearson  # noqa: E402
from benchmarks.report import evaluate_targets, markdown  # noqa: E402


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_quick_run_writes_json_and_report(tmp_path, keep_threads):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    logs: list[str] = []
    rc = bench_runner.main(["--quick", "--size", "64", "--out", str(out), "--markdown", str(md)], log=logs.append)
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["machine"]["torch_threads"] == 2 and doc["machine"]["torch"] == torch.__version__
    rows = {(r["task"], r["impl"]): r for r in doc["results"]}
    assert set(rows) == {
        ("forward", "torch"),
        ("forward", "torch no_grad"),
        ("gradcam", "camlens"),
        ("gradcam", "camlens (auto layer)"),
        ("top5", "camlens"),
        ("all", "camlens"),
    }
    fwd = rows["forward", "torch"]["ms"]
    for r in rows.values():
        assert r["reps"] == 2 and len(r["ms_all"]) == 2 and r["ms"] > 0
        assert r["ms"] == pytest.approx(float(np.median(r["ms_all"])), rel=1e-3, abs=1e-3)
        assert r["ratio_to_forward"] == pytest.approx(r["ms"] / fwd)
    # the automatic layer of EfficientNet-Lite0 is the explicit benchmark layer: same maps
    assert rows["gradcam", "camlens (auto layer)"]["pearson_vs_ref"] == pytest.approx(1.0, abs=1e-5)
    text = md.read_text()
    assert "## Targets" in text and "| efficientnet_lite0 | 1 |" in text and "Grad-CAM ≤ 1.15 × forward" in text


@pytest.mark.slow
def test_round_robin_counts_and_rotates():
    calls: list[str] = []
    conts = [Contender("t", name, (lambda n=name: calls.append(n))) for name in "abc"]
    times = bench_runner.time_round_robin(conts, warmup=1, min_reps=3, max_reps=3, budget_s=0.0, log=lambda s: None)
    assert {k: len(v) for k, v in times.items()} == {"t|a": 3, "t|b": 3, "t|c": 3}
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")


def test_pearson_matches_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 50)), rng.normal(size=(3, 50))
    b[1] = 2 * a[1] + 1
    expected = min(np.corrcoef(a[i], b[i])[0, 1] for i in range(3))
    assert pearson(torch.tensor(a), torch.tensor(b)) == pytest.approx(expected)
    assert pearson(torch.tensor(a[1:2]), torch.tensor(b[1:2])) == pytest.approx(1.0)


def _row(task, impl, ms, batch=16, model="m", **kw):
    return {
        "task": task,
        "impl": impl,
        "model": model,
        "batch": batch,
        "ms": ms,
        "reps": 3,
        "forward_ms": 100.0,
        "ratio_to_forward": ms / 100.0,
        **kw,
    }


def test_targets_are_judged_from_the_numbers():
    rows = [
        _row("forward", "torch", 100),
        _row("gradcam", "camlens", 110),
        _row("gradcam", "pytorch-grad-cam", 230),
        _row("gradcam", "Captum", 105),
        _row("top5", "camlens", 170),
        _row("all", "camlens", 140),
        _row("guided_backprop", "camlens", 300),
        _row("guided_backprop", "pytorch-grad-cam", 1600),
        _row(
            "scorecam",
            "camlens",
            1000,
            batch=1,
            scorecam={"pearson_vs_pytorch_grad_cam": {"camlens channel_softmax": 0.995}},
        ),
        _row("scorecam", "pytorch-grad-cam", 1900, batch=1),
    ]
    leak = {"model": "m", "calls": 1000, "growth_mb": 7.0, "hooks_left": 0, "grads_left": 0}
    verdicts = [(t["value"], t["ok"]) for t in evaluate_targets(rows, leak)]
    assert verdicts == [
        ("1.100×", True),
        ("2.09×", True),
        ("0.95×", False),
        ("1.55×", False),
        ("1.27×", True),
        ("1.90×", False),
        ("r = 0.9950", True),
        ("5.33×", True),
        ("+7.0 MB", False),
    ]
    text = markdown(
        [
            {
                "machine": {
                    "cpu": "x",
                    "cpus_available": 2,
                    "logical_cpus": 2,
                    "torch": "t",
                    "torch_threads": 2,
                    "torch_interop_threads": 2,
                    "device": "cpu",
                    "python": "3",
                    "camlens": "0",
                    "peers": {},
                    "date": "d",
                },
                "results": rows,
                "leak": None,
            }
        ]
    )
    assert text.count("❌") == 3 and text.count("✅") == 5


def test_cli_bench_is_registered_and_never_overwrites(tmp_path):
    from click.testing import CliRunner

    from camlens.cli import main

    existing = tmp_path / "report.md"
    existing.write_text("mine")
    res = CliRunner().invoke(main, ["bench", "--quick", "--markdown", str(existing)])
    assert res.exit_code != 0 and "--overwrite" in res.output
    assert existing.read_text() == "mine"


def test_topk_scorecam_photos_and_different_work_in_the_report():
    from benchmarks.report import scorecam_photos

    sc = {"channels": 100, "all_zero_channels": 40}
    rows = [
        _row("forward", "torch", 100, peak_mb=200.0),
        _row("topk", "camlens K=100", 130, peak_mb=210.0),
        _row("topk", "camlens K=100 loop", 210, peak_mb=700.0),
        _row("guided_backprop", "camlens", 300),
        _row("guided_backprop", "pytorch-grad-cam", 1600, different_work="plain gradient"),
    ]
    for photo, me, pgc, fw in (("a", 100, 400, 50), ("b", 200, 400, 100), ("c", 100, 150, 80)):
        ex = {**sc, "camlens_forwards": {"camlens channel_softmax": [fw]}}
        rows.append(_row("scorecam", "camlens", me, batch=1, photo=photo, scorecam=ex))
        rows.append(_row("scorecam", "camlens channel_softmax", me, batch=1, photo=photo, scorecam=ex))
        rows.append(_row("scorecam", "pytorch-grad-cam", pgc, batch=1, photo=photo, scorecam=ex))
    per = scorecam_photos(rows, "m")
    assert [p["speedup"] for p in per] == [4.0, 2.0, 1.5]
    assert [p["camlens_ms_per_forward"] for p in per] == [2.0, 2.0, 1.25]
    assert per[0]["pgc_ms_per_forward"] == 4.0
    verdicts = {t["target"]: (t["value"], t["ok"], t["where"]) for t in evaluate_targets(rows, None)}
    assert verdicts["top-100 Grad-CAM ≤ 1.4 × forward"][:2] == ("1.30×", True)
    assert verdicts["top-100 Grad-CAM peak memory ≤ 1.1 × forward's"][:2] == ("1.05×", True)
    sc_t = verdicts["Score-CAM ≥ 2× faster than pytorch-grad-cam"]
    assert sc_t[:2] == ("2.00×", True) and "median of 3 photos" in sc_t[2]
    assert not any("guided" in t for t in verdicts)  # no target judged on a peer doing other work


def test_merge_keeps_the_hand_written_sections(tmp_path):
    """The README's rebuild command (`python -m benchmarks --merge …run2.json`) rewrote
    BENCHMARKS.md whole: 94 lines deleted, the "0.2 additions" section among them (issue 24)."""
    from benchmarks.report import BEGIN, END
    from benchmarks.runner import main

    repo = Path(__file__).resolve().parents[2]
    text = (repo / "BENCHMARKS.md").read_text(encoding="utf-8")
    md = tmp_path / "BENCHMARKS.md"
    i, j = text.index(BEGIN), text.index(END)
    stale = text[:i] + text[i:j].replace(" ms", " MS-STALE") + text[j:]  # the generated part out of date
    assert stale != text
    md.write_text(stale, encoding="utf-8")
    runs = sorted((repo / "benchmarks" / "published").glob("2026-11-23-*-run2.json"))
    assert len(runs) >= 2
    assert main(["--merge", *map(str, runs), "--markdown", str(md)], log=lambda s: None) == 0
    new = md.read_text(encoding="utf-8")

    def outside(t):
        return t[: t.index(BEGIN)], t[t.index(END) :]

    assert outside(new) == outside(text)  # byte-identical around the markers
    assert "## 0.2 additions" in outside(new)[1]
    inside = new[new.index(BEGIN) + len(BEGIN) + 1 : new.index(END)]
    assert inside == markdown([json.loads(p.read_text()) for p in runs])  # the generated part rebuilt
    assert new == text  # the published files rebuild exactly what is committed
    # a file without the markers is refused, not overwritten
    bare = tmp_path / "other.md"
    bare.write_text("# my notes\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="markers"):
        main(["--merge", *map(str, runs), "--markdown", str(bare)], log=lambda s: None)
    assert bare.read_text(encoding="utf-8") == "# my notes\n"


def test_named_files_rate_falls_back_to_a_lower_bound_when_the_overhead_swamps_the_wall_clock():
    """The named-files row's rate is n / (wall - the store run's start-up); on a loaded machine that
    difference once came out near zero and the table said 4.8e10 images/s."""
    from benchmarks.pipeline import files_rate

    assert files_rate(96, 20.0, 8.0) == (96 / 12.0, "estimate")
    rate, kind = files_rate(96, 20.0, 19.9999)  # the overhead is nearly the whole wall clock
    assert kind == "lower bound" and rate == 96 / 20.0
