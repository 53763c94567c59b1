"""camlens.compare continues an interrupted run: maps through the result store, finished stages kept,
and the table of the continued run is bit-equal to an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import camlens
import camlens.comparison.run as compare_run
from camlens.comparison import CompareConfig, compare
from camlens.pipeline import open_results
from camlens.pipeline.store import StoreMismatchError

CFG = CompareConfig(
    images=6,
    steps=3,
    road_percentages=(0.5,),
    sanity_images=2,
    sanity_layers=1,
    sensitivity_images=2,
    sensitivity_samples=2,
    bootstrap=30,
    batch_size=2,
    progress=False,
)
METHODS = "gradcam,saliency"
COST = ("ms_per_image", "peak_memory_mib")


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 4),
    ).eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    gt = torch.zeros(6, 32, 32, dtype=torch.bool)
    gt[:, 6:18, 8:24] = True
    return x, gt


def without_cost(t: pd.DataFrame) -> pd.DataFrame:
    return t[~t["metric"].isin(COST)].reset_index(drop=True)


class Interrupt(KeyboardInterrupt):
    """What Ctrl-C raises, injected after a number of calls."""


def interrupt_after(monkeypatch, name: str, calls: int) -> list[int]:
    real = getattr(compare_run, name)
    seen = [0]

    def wrapped(*args, **kwargs):
        seen[0] += 1
        if seen[0] > calls:
            raise Interrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compare_run, name, wrapped)
    return seen


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (into its own folder)."""
    x, gt = inputs()
    out = tmp_path_factory.mktemp("whole")
    return compare(tiny_net(), x, METHODS, seed=2, gt=gt, out=out, config=CFG), out


@pytest.mark.slow  # whole comparisons (several, with their reports)
def test_interrupted_twice_then_continued_is_bit_equal_to_an_uninterrupted_run(reference, tmp_path, monkeypatch):
    ref, ref_out = reference
    x, gt = inputs()
    out = tmp_path / "cmp"
    net = tiny_net()
    # 1) Ctrl-C during the maps: gradcam's 3 batches and saliency's first are committed
    interrupt_after(monkeypatch, "explain", 4)
    with pytest.raises(Interrupt):
        compare(net, x, METHODS, seed=2, gt=gt, out=out, config=CFG)
    monkeypatch.undo()
    done = sorted(open_results(out / "maps" / "saliency").table["image_id"])
    assert done == [0, 1] and sorted(open_results(out / "maps" / "gradcam").table["image_id"]) == list(range(6))
    assert not (out / "table.parquet").exists() and not (out / ".lock").exists()
    # 2) Ctrl-C during the metrics: two faithfulness stages finished (gradcam, saliency)
    calls = interrupt_after(monkeypatch, "explain", 10**6)
    interrupt_after(monkeypatch, "faithfulness_values", 2)
    with pytest.raises(Interrupt):
        compare(net, x, METHODS, seed=2, gt=gt, out=out, config=CFG)
    assert calls[0] == 2  # only saliency's two missing batches were explained
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "values").glob("*.faithfulness.npz")) == [
        "gradcam.faithfulness.npz",
        "saliency.faithfulness.npz",
    ]
    # 3) the same call again finishes; nothing done before is computed again
    calls = interrupt_after(monkeypatch, "explain", 10**6)
    faith = interrupt_after(monkeypatch, "faithfulness_values", 10**6)
    res = compare(net, x, METHODS, seed=2, gt=gt, out=out, config=CFG)
    assert calls[0] == 0 and faith[0] == 1  # only the random baseline's faithfulness is left
    pd.testing.assert_frame_equal(without_cost(res.table), without_cost(ref.table), check_exact=True)
    pd.testing.assert_frame_equal(
        without_cost(pd.read_parquet(out / "table.parquet")),
        without_cost(pd.read_parquet(ref_out / "table.parquet")),
        check_exact=True,
    )
    for m in ("gradcam", "saliency", "random"):
        assert torch.equal(res.maps[m], ref.maps[m])
    assert "gradcam: maps of 6/6 images" in res.reused and "saliency: maps of 6/6 images" in res.reused
    assert "gradcam: faithfulness" in res.reused
    assert "reused: " in res.report_path.read_text()
    rec = json.loads((out / "compare.json").read_text())
    assert len(rec["runs"]) == 3 and rec["reused"]["maps"] == {"gradcam": 6, "saliency": 6}


@pytest.mark.slow  # whole comparisons (several, with their reports)
def test_the_table_equals_an_in_memory_run(reference):
    """The maps read back from the store are the maps explain gives (float32, bit for bit)."""
    ref, _ = reference
    x, gt = inputs()
    mem = compare(tiny_net(), x, METHODS, seed=2, gt=gt, config=CFG)
    pd.testing.assert_frame_equal(without_cost(mem.table), without_cost(ref.table), check_exact=True)
    e = camlens.explain(tiny_net(), x[:2], "saliency", targets=ref.classes[:2, None])
    assert torch.equal(ref.maps["saliency"][:2], e.maps[:, 0].float())
    assert mem.reused == ""


@pytest.mark.slow  # whole comparisons (several, with their reports)
def test_a_finished_comparison_run_again_reuses_everything_and_rewrites_its_outputs(reference, monkeypatch):
    ref, out = reference
    x, gt = inputs()
    calls = interrupt_after(monkeypatch, "explain", 0)  # any explain call fails the test
    faith = interrupt_after(monkeypatch, "faithfulness_values", 0)
    again = compare(tiny_net(), x, METHODS, seed=2, gt=gt, out=out, config=CFG)
    assert calls[0] == 0 and faith[0] == 0
    pd.testing.assert_frame_equal(again.table, ref.table, check_exact=True)  # the cost rows too: kept
    pd.testing.assert_frame_equal(pd.read_parquet(out / "table.parquet"), ref.table, check_exact=True)


@pytest.mark.slow  # whole comparisons (several, with their reports)
def test_other_settings_are_refused_and_overwrite_starts_fresh(tmp_path):
    x, gt = inputs()
    out = tmp_path / "cmp"
    small = CompareConfig(**{**vars(CFG), "images": 2, "sanity_images": 1, "sensitivity_images": 0})
    compare(tiny_net(), x[:2], "saliency", seed=2, gt=gt[:2], out=out, config=small)
    other = CompareConfig(**{**vars(small), "steps": 4})
    with pytest.raises(StoreMismatchError, match=r"other settings \(settings: .*steps"):
        compare(tiny_net(), x[:2], "saliency", seed=2, gt=gt[:2], out=out, config=other)
    with pytest.raises(StoreMismatchError, match="seed: 2 then, 3 now"):
        compare(tiny_net(), x[:2], "saliency", seed=3, gt=gt[:2], out=out, config=small)
    with pytest.raises(StoreMismatchError, match="model_sha256"):
        compare(
            nn.Sequential(*list(tiny_net())[:-1], nn.Linear(5, 4)),
            x[:2],
            "saliency",
            seed=2,
            gt=gt[:2],
            out=out,
            config=small,
        )
    # more methods are not other settings: saliency's work is reused
    more = compare(tiny_net(), x[:2], "saliency,gradcam", seed=2, gt=gt[:2], out=out, config=small)
    assert "saliency: maps of 2/2 images" in more.reused and "gradcam: maps" not in more.reused
    fresh = compare(
        tiny_net(),
        x[:2],
        "saliency",
        seed=2,
        gt=gt[:2],
        out=out,
        config=CompareConfig(**{**vars(other), "overwrite": True}),
    )
    assert fresh.reused == "" and not (out / "maps" / "gradcam").exists()
    # a folder that is not a comparison's is refused
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "table.csv").write_text("mine\n")
    with pytest.raises(StoreMismatchError, match="compare.json does not"):
        compare(tiny_net(), x[:2], "saliency", seed=2, out=foreign, config=small)
    assert (foreign / "table.csv").read_text() == "mine\n"


KILLED = """
import os, signal, sys, torch
import camlens.comparison.run as r
from tests.comparison.test_compare_resume import CFG, METHODS, inputs, tiny_net
real, n = r.explain, [0]
def explain(*a, **k):
    n[0] += 1
    if n[0] > int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
r.explain = explain
x, gt = inputs()
r.compare(tiny_net(), x, METHODS, seed=2, gt=gt, out=sys.argv[1], config=CFG)
"""


@pytest.mark.slow  # two Python processes importing torch
def test_a_killed_process_then_the_same_call_continues(reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "cmp"
    root = Path(camlens.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    code = textwrap.dedent(KILLED)
    p = subprocess.run([sys.executable, "-c", code, str(out), "4"], env=env, cwd=root, capture_output=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]
    assert (out / ".lock").exists()  # left by the dead process: taken over
    assert sorted(open_results(out / "maps" / "saliency").table["image_id"]) == [0, 1]
    x, gt = inputs()
    res = compare(tiny_net(), x, METHODS, seed=2, gt=gt, out=out, config=CFG)
    pd.testing.assert_frame_equal(without_cost(res.table), without_cost(ref.table), check_exact=True)
    assert "saliency: maps of 2/6 images" in res.reused
    np.testing.assert_array_equal(pd.read_parquet(out / "table.parquet")["mean"], res.table["mean"])


class RecordingBar:
    """Stands in for tqdm: records the total, every update and the stages shown."""

    made: ClassVar[list[RecordingBar]] = []

    def __init__(self, total, **kwargs):
        self.total, self.n, self.stages, self.closed = total, 0, [], False
        RecordingBar.made.append(self)

    def update(self, k):
        self.n += k

    def set_postfix_str(self, s, refresh=True):
        self.stages.append(s)

    def refresh(self):
        pass

    def close(self):
        self.closed = True


def test_one_progress_bar_over_the_whole_run_reaches_100_percent(tmp_path, monkeypatch):
    """Maps, faithfulness, localization, sanity and robustness of every method and the baseline on one
    bar; a method that fails leaves the total; a continued run's bar also ends full."""
    import camlens.comparison.measure as measure
    from camlens.base.errors import InputError

    monkeypatch.setattr(measure, "tqdm", RecordingBar)
    real = compare_run.explain

    def explain(model, x, method, **kw):
        if method == "input_x_gradient":
            raise InputError("refused here")
        return real(model, x, method=method, **kw)

    monkeypatch.setattr(compare_run, "explain", explain)
    x, gt = inputs()
    cfg = CompareConfig(**{**vars(CFG), "images": 2, "progress": True, "sensitivity_images": 0, "bootstrap": 5})
    for _ in range(2):  # fresh, then everything reused
        RecordingBar.made.clear()
        res = compare(tiny_net(), x[:2], "saliency,input_x_gradient", seed=2, gt=gt[:2], out=tmp_path, config=cfg)
        (bar,) = RecordingBar.made
        # saliency: 5 stages; the refused method: its maps stage only; the random map: 2
        assert bar.closed and bar.n == bar.total == 5 + 1 + 2
        assert bar.stages[0] == "saliency: maps" and "random: localization" in bar.stages
        assert "input_x_gradient" in res.flags


def test_the_settings_digest_does_not_follow_numpys_print_options():
    # Per-image boxes are arrays inside a list; hashing their repr made the stored signature change when
    # anything in the process (another test, a notebook) changed numpy's print options (CI, stop 34).
    from camlens.comparison.resume import tensor_digest

    boxes = [np.array([[8.0, 6.0, 24.0, 18.0]]), np.array([[1.5, 2.25, 3.0, 4.0]])]
    plain = tensor_digest("none", boxes)
    with np.printoptions(precision=1, floatmode="fixed", legacy="1.13"):
        assert tensor_digest("none", boxes) == plain
    assert tensor_digest("none", [b + 1 for b in boxes]) != plain
