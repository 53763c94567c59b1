"""The chunked evaluation runner and ``camlens evaluate``: outputs, consistency with the metric
functions, --overwrite semantics and clear errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import camlens
from camlens import metrics as M
from camlens.base.errors import InputError
from camlens.base.io import sample_image
from camlens.cli import main
from camlens.core.inputs import prepare_inputs
from camlens.metrics.runner import evaluate, resolve_metrics
from camlens.models.preprocess import Preprocess


@pytest.fixture
def arrays():
    g = np.random.default_rng(0)
    return [g.integers(0, 256, (20 + 3 * i, 18, 3), dtype=np.uint8) for i in range(3)]


def test_resolve_metrics():
    assert resolve_metrics("deletion, insertion") == ["deletion", "insertion"]
    assert resolve_metrics(["increase", "drop", "deletion"]) == ["increase_in_confidence", "average_drop", "deletion"]
    assert len(resolve_metrics("all")) == 9
    with pytest.raises(InputError, match="deletion"):
        resolve_metrics("deleton")


def test_runner_matches_metric_functions_and_chunking(tiny, arrays):
    pp = Preprocess(size=(12, 12))
    wanted = [
        "deletion",
        "insertion",
        "average_drop",
        "increase_in_confidence",
        "road",
        "pointing_game",
        "class_sensitivity",
        "sanity",
    ]
    gt = [[[0, 0, 10, 12]], None, [[5, 0, 18, 9]]]  # original-image pixels; image 1 has none
    kw = {"metrics": wanted, "steps": 3, "percentages": (0.5,), "preprocess": pp, "gt": gt, "batch_size": 5}
    chunks = []
    rep = evaluate(tiny, arrays, ["gradcam", "cam"], chunk_size=2, on_chunk=lambda i, n: chunks.append((i, n)), **kw)
    assert chunks == [(1, 2), (2, 2)]
    rep1 = evaluate(tiny, arrays, ["gradcam", "cam"], chunk_size=8, **kw)
    assert rep.rows == rep1.rows  # chunking does not change any value
    assert [(r["image"], r["method"]) for r in rep.rows] == [
        (f"image{i}", m) for m in ("gradcam", "cam", "random", "centre") for i in range(3)
    ]
    # each value equals the metric function applied directly
    x, _, _ = prepare_inputs(arrays, tiny, pp)
    e = camlens.explain(tiny, x, "gradcam")
    cls = e.classes[:, 0]
    g = e.maps[:, 0]
    rows = {(r["image"], r["method"]): r for r in rep.rows}
    direct = {
        "deletion": M.deletion(tiny, x, g, cls, steps=3),
        "insertion": M.insertion(tiny, x, g, cls, steps=3),
        "average_drop": M.average_drop(tiny, x, g, cls),
        "increase_in_confidence": M.increase_in_confidence(tiny, x, g, cls),
        "road_morf": M.road(tiny, x, g, cls, percentages=(0.5,)),
        "road_lerf": M.road(tiny, x, g, cls, order="lerf", percentages=(0.5,)),
        "class_sensitivity": M.class_sensitivity(tiny, x, "gradcam", cls),
    }
    for col, v in direct.items():
        got = [rows[(f"image{i}", "gradcam")][col] for i in range(3)]
        assert got == pytest.approx(v.tolist(), abs=1e-6), col
    # pointing game: boxes scaled from image to input pixels (stretch), None skips the image
    box0 = np.array([[0, 0, 10 * 12 / 18, 12 * 12 / 20]])
    want0 = M.pointing_game(None, x[:1], g[:1], gt=[box0])
    assert rows[("image0", "gradcam")]["pointing_game"] == float(want0[0])
    assert rows[("image1", "gradcam")]["pointing_game"] is None
    assert "pointing_game" in rows[("image0", "centre")] and "deletion" not in rows[("image0", "centre")]
    # the mean curves, the summary and the merged sanity result
    f, c = rep.curves[("gradcam", "deletion")]
    ref = M.deletion_curve(tiny, x, g, cls, steps=3).probs.mean(0)
    assert np.allclose(c, ref.numpy(), atol=1e-6) and f.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    summ = {(s["method"], s["metric"]): s for s in rep.summary()}
    assert summ[("gradcam", "deletion")]["mean"] == pytest.approx(float(direct["deletion"].mean()), abs=1e-6)
    assert summ[("gradcam", "pointing_game")]["n"] == 2
    san = M.sanity_randomization(tiny, x, ["gradcam", "cam"], cls)
    assert torch.allclose(rep.sanity.values["spearman_abs"]["cam"], san.values["spearman_abs"]["cam"])
    assert "gradcam" in rep.table() and "sanity" in rep.table()
    json.dumps(rep.to_dict())  # serializable


def test_runner_bounded_batches(tiny, arrays):
    seen = []
    h = tiny.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    try:
        evaluate(
            tiny,
            arrays * 3,
            ["cam"],
            ["deletion", "road"],
            steps=4,
            percentages=(0.3, 0.6),
            preprocess=Preprocess(size=(12, 12)),
            batch_size=4,
            chunk_size=2,
        )
    finally:
        h.remove()
    assert max(seen) <= 4


def _write_photos(folder):
    folder.mkdir()
    for name in ("camera", "coffee"):
        Image.fromarray(sample_image(name)).resize((96, 64)).save(folder / f"{name}.png")


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_cli_evaluate_writes_tables_and_plots(tmp_path):
    data = tmp_path / "data"
    _write_photos(data)
    out = tmp_path / "out"
    args = [
        "evaluate",
        str(data),
        "--size",
        "64",
        "--steps",
        "2",
        "--percentages",
        "50",
        "--device",
        "cpu",
        "--metrics",
        "deletion,insertion,average_drop,increase,road",
        "--metrics",
        "sanity",
        "--sanity-layers",
        "2",
        "--out",
        str(out),
        "--quiet",
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "gradcam" in r.output and "random" in r.output and "deletion ↓" in r.output
    files = {p.name for p in out.iterdir()}
    assert {
        "per_image.csv",
        "summary.csv",
        "summary.json",
        "sanity.csv",
        "curves_gradcam.png",
        "road.png",
        "sanity.png",
    } <= files
    rows = _read_csv(out / "per_image.csv")
    assert [(r["image"], r["method"]) for r in rows] == [
        ("camera", "gradcam"),
        ("coffee", "gradcam"),
        ("camera", "random"),
        ("coffee", "random"),
    ]
    for row in rows:
        for col in ("deletion", "insertion", "road_morf", "road_lerf"):
            assert 0.0 <= float(row[col]) <= 1.0
        assert float(row["increase_in_confidence"]) in (0.0, 100.0)
    assert rows[0]["target_name"] == "tripod" or rows[0]["target_name"]
    summary = json.loads((out / "summary.json").read_text())
    assert {s["metric"] for s in summary["summary"]} >= {"deletion", "road_morf", "average_drop"}
    assert [row["layer"] for row in summary["sanity"]] == ["original", "_fc", "_bn1"]
    assert summary["settings"]["steps"] == 2
    # existing outputs are not overwritten without --overwrite
    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0 and "--overwrite" in again.output
    before = (out / "summary.json").stat().st_mtime_ns
    assert (out / "summary.json").stat().st_mtime_ns == before


def test_cli_pointing_with_gt_and_overwrite(tmp_path):
    data = tmp_path / "data"
    _write_photos(data)
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"camera": [[20, 5, 60, 60]], "coffee": [[10, 10, 80, 50]]}))
    out = tmp_path / "out"
    args = [
        "evaluate",
        str(data / "*.png"),
        "--size",
        "32",
        "--device",
        "cpu",
        "--gt",
        str(gt),
        "--metrics",
        "pointing_game,energy_pointing_game",
        "--method",
        "cam",
        "--out",
        str(out),
        "--quiet",
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rows = _read_csv(out / "per_image.csv")
    assert {r["method"] for r in rows} == {"cam", "centre"}
    assert all(float(r["pointing_game"]) in (0.0, 1.0) and 0 <= float(r["energy_pointing_game"]) <= 1 for r in rows)
    assert CliRunner().invoke(main, args).exit_code != 0
    r = CliRunner().invoke(main, [*args, "--overwrite"])
    assert r.exit_code == 0, r.output


def test_cli_gt_reads_the_boxes_files_localize_reads(tmp_path):
    """One --gt: a CSV of localize --gt (and a COCO JSON) gives the same pointing-game rows as the
    {stem: boxes} JSON with the same boxes."""
    data = tmp_path / "data"
    _write_photos(data)
    boxes = {"camera": [20, 5, 60, 60], "coffee": [10, 10, 80, 50]}
    (tmp_path / "gt.json").write_text(json.dumps({k: [v] for k, v in boxes.items()}))
    (tmp_path / "gt.csv").write_text(
        "path,class,x0,y0,x1,y1\n" + "".join(f"data/{k}.png,x,{','.join(map(str, v))}\n" for k, v in boxes.items())
    )
    coco = {
        "images": [{"id": i, "file_name": f"data/{k}.png"} for i, k in enumerate(boxes)],
        "annotations": [
            {"id": i, "image_id": i, "category_id": 1, "bbox": [v[0], v[1], v[2] - v[0], v[3] - v[1]]}
            for i, v in enumerate(boxes.values())
        ],
        "categories": [{"id": 1, "name": "x"}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    tables = {}
    for name in ("gt.json", "gt.csv", "coco.json"):
        out = tmp_path / f"out-{name}"
        args = ["evaluate", str(data / "*.png"), "--size", "32", "--device", "cpu", "--gt", str(tmp_path / name)]
        args += ["--metrics", "pointing_game,energy_pointing_game", "--method", "cam", "--out", str(out), "--quiet"]
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
        tables[name] = _read_csv(out / "per_image.csv")
    assert tables["gt.csv"] == tables["gt.json"] == tables["coco.json"]
    assert len(tables["gt.json"]) == 4  # 2 images x (cam, centre)


def test_cli_errors(tmp_path):
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "no such file" in r.output
    r = CliRunner().invoke(main, ["evaluate", "--metrics", "deleton", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "deletion" in r.output
    r = CliRunner().invoke(
        main,
        ["evaluate", "--metrics", "pointing_game", "--size", "32", "--device", "cpu", "--out", str(tmp_path / "o")],
    )
    assert r.exit_code != 0 and "--gt" in r.output
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "no image files" in r.output


def test_cli_default_photos(tmp_path):
    out = tmp_path / "o"
    r = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--metrics",
            "average_drop",
            "--size",
            "32",
            "--device",
            "cpu",
            "--no-plots",
            "--no-baseline",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    rows = _read_csv(out / "per_image.csv")
    assert [r["image"] for r in rows] == ["chelsea", "coffee", "astronaut"]
    assert not (out / "curves_gradcam.png").exists()


def test_evaluate_config_object_equals_keywords_and_unknown_settings_raise(tiny, arrays):
    from camlens.base.errors import InputError
    from camlens.metrics.runner import EvaluateConfig

    pp = Preprocess(size=(12, 12))
    cfg = EvaluateConfig(steps=3, preprocess=pp, batch_size=5, chunk_size=2)
    a = evaluate(tiny, arrays, ["gradcam"], ["deletion", "average_drop"], config=cfg)
    b = evaluate(tiny, arrays, ["gradcam"], ["deletion", "average_drop"], steps=3, preprocess=pp, batch_size=5)
    c = evaluate(tiny, arrays, ["gradcam"], ["deletion", "average_drop"], config=cfg, steps=5)  # keywords override
    assert a.rows == b.rows and a.settings["steps"] == 3 and c.settings["steps"] == 5
    with pytest.raises(InputError, match="unknown evaluate option.*stepz.*valid: steps"):
        evaluate(tiny, arrays, ["gradcam"], ["deletion"], stepz=3)
    with pytest.raises(InputError, match="batch"):
        evaluate(tiny, arrays, ["gradcam"], ["deletion"], config=EvaluateConfig(batch_size=0))


def _eval_args(data, out):
    return [
        "evaluate",
        str(data),
        "--size",
        "32",
        "--steps",
        "2",
        "--percentages",
        "50",
        "--device",
        "cpu",
        "--metrics",
        "deletion,insertion,average_drop,increase,road,sanity",
        "--sanity-layers",
        "1",
        "--chunk",
        "1",
        "--no-plots",
        "--quiet",
        "--out",
        str(out),
    ]


def test_cli_evaluate_resumes_after_an_interruption(tmp_path, monkeypatch):
    """Ctrl-C after one chunk, then the same command: it continues (it used to refuse: 'per_image.csv
    already exists … pass --overwrite') and ends with the files of an uninterrupted run (issue 24)."""
    from camlens.metrics import runner

    data = tmp_path / "data"
    data.mkdir()
    for name in ("camera", "coffee", "astronaut"):
        Image.fromarray(sample_image(name)).resize((40, 32)).save(data / f"{name}.png")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    r = CliRunner().invoke(main, _eval_args(data, whole))
    assert r.exit_code == 0, r.output
    real = runner._Plan.chunk
    calls = []

    def interrupted(self, images, idx, bar):
        calls.append(idx)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, images, idx, bar)

    monkeypatch.setattr(runner._Plan, "chunk", interrupted)
    r = CliRunner().invoke(main, _eval_args(data, cut))
    assert r.exit_code == 130
    assert "1 of 3 image(s) done" in r.output and "run the same command again to resume" in r.output
    assert {row["image"] for row in _read_csv(cut / "per_image.csv")} == {"astronaut"}
    monkeypatch.setattr(runner._Plan, "chunk", real)
    calls.clear()
    monkeypatch.setattr(
        runner._Plan, "chunk", lambda self, images, idx, bar: calls.append(idx) or real(self, images, idx, bar)
    )
    r = CliRunner().invoke(main, _eval_args(data, cut))
    assert r.exit_code == 0, r.output
    assert calls == [[1], [2]]  # only the missing chunks were computed
    for f in ("per_image.csv", "summary.csv", "sanity.csv"):
        assert (cut / f).read_bytes() == (whole / f).read_bytes(), f
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, cut))
    assert a == b
    assert sorted(p.name for p in cut.iterdir()) == sorted(p.name for p in whole.iterdir())  # nothing left over
    # a finished run is not resumed: the same command is refused, as before
    r = CliRunner().invoke(main, _eval_args(data, cut))
    assert r.exit_code != 0 and "--overwrite" in r.output
    # other settings into an unfinished run are refused, naming what differs
    monkeypatch.setattr(runner._Plan, "chunk", interrupted)
    calls.clear()
    other = tmp_path / "other"
    assert CliRunner().invoke(main, _eval_args(data, other)).exit_code == 130
    r = CliRunner().invoke(main, [*_eval_args(data, other), "--steps", "3"])
    assert r.exit_code != 0 and "steps" in r.output and "unfinished" in r.output


def test_evaluate_progress_counts_every_unit_and_moves_during_sanity(tiny, arrays, monkeypatch):
    """The bar ended at 80 % (increase_in_confidence, computed with average_drop, was never counted)
    and stood still through the sanity check (issue 24)."""
    import tqdm.auto

    bars = []

    class Bar:
        def __init__(self, total, **kw):
            self.total, self.updates, self.n = total, [], 0
            bars.append(self)

        def update(self, n=1):
            self.updates.append(n)
            self.n += n
            assert self.n <= self.total  # tqdm warns 'clamping frac to range [0, 1]' past it

        def set_postfix_str(self, s, refresh=True):
            self.updates.append(s)

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    evaluate(
        tiny,
        arrays,
        ["cam"],
        ["deletion", "average_drop", "increase_in_confidence", "sanity"],
        steps=2,
        preprocess=Preprocess(size=(12, 12)),
        chunk_size=2,
        sanity_layers=2,
        progress=True,
    )
    (bar,) = bars
    nums = [u for u in bar.updates if not isinstance(u, str)]
    assert bar.total == 3 * 4 and sum(nums) == pytest.approx(bar.total) and bar.n == pytest.approx(bar.total)
    after = bar.updates[bar.updates.index("sanity") + 1 :]
    assert sum(1 for u in after if not isinstance(u, str)) >= 2  # one move per randomized layer
