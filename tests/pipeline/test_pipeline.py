"""The streaming pipeline, the result store, resume, torchrun sharding and exact reductions.

Oracles: the store's maps, classes, scores and boxes against :func:`camlens.explain` and
:func:`camlens.localize` on the same images; a resumed or a 2-rank store against an
uninterrupted single-process one; the streaming localization metrics against
:func:`camlens.metrics.loceval.evaluate_maps`; 2-rank metrics against 1-rank metrics, exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import camlens
from camlens.cli import main as cli_main
from camlens.models.preprocess import Preprocess
from camlens.pipeline import StoreMismatchError, open_results
from camlens.pipeline.dist import shard

HERE = Path(__file__).parent
from tests.pipeline.pipeline_job import Synthetic, tiny_model  # noqa: E402

PY = sys.executable
PP = Preprocess(size=(24, 24))
ENV = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
TORCHRUN = [PY, "-m", "torch.distributed.run"]


def _images(folder: Path, n: int, bad: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        p = folder / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (18 + i % 4, 22 + i % 3, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    for j in range(bad):
        (folder / f"broken{j}.png").write_text("not an image")
    return paths


def _sorted(df):
    return df.sort_values(["image_id", "method", "rank"]).reset_index(drop=True)


def _same_store(a, b, atol=1e-5):
    """Same rows (floats to tolerance) and the same maps."""
    ta, tb = _sorted(a.table), _sorted(b.table)
    assert len(ta) == len(tb)
    floats = ["score", "prob"]
    exact_cols = [c for c in ta.columns if c not in floats]
    assert ta[exact_cols].equals(tb[exact_cols])
    np.testing.assert_allclose(ta[floats].to_numpy(), tb[floats].to_numpy(), atol=atol)
    for m in ta["method"].unique():
        ids = sorted(ta.loc[ta.method == m, "image_id"].unique())
        np.testing.assert_allclose(a.maps(m)[ids], b.maps(m)[ids], atol=atol)


def test_shard_covers_every_index_once():
    for n in (0, 1, 5, 12, 13):
        for world in (1, 2, 3, 5):
            parts = [shard(list(range(n)), r, world) for r in range(world)]
            flat = [i for p in parts for i in p]
            assert flat == list(range(n))  # contiguous, no padding duplicates, none missing
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_store_rows_and_maps_equal_direct_explain(tmp_path):
    paths = _images(tmp_path / "in", 7, bad=1)
    net = tiny_model()
    res = camlens.explain_dataset(
        net,
        tmp_path / "in",
        method=["gradcam", "cam"],
        out=tmp_path / "st",
        targets="top2",
        batch_size=3,
        num_workers=0,
        preprocess=PP,
        progress=False,
    )
    assert res.complete and res.stats.computed == 7
    assert [Path(f["source"]).name for f in res.failed] == ["broken0.png"]
    assert "not an image file" in res.failed[0]["error"]
    t = res.table
    assert len(t) == 7 * 2 * 2 and set(t.method) == {"gradcam", "cam"}
    # the oracle: one explain call over the same files, and localize on its maps
    ref = camlens.explain(net, [str(p) for p in paths], method=["gradcam", "cam"], targets="top2", preprocess=PP)
    by_source = {str(p): i for i, p in enumerate(paths)}
    for m, exp in ref.items():
        boxes = camlens.localize(exp.maps, 0.3)
        rows = t[t.method == m]
        for _, r in rows.iterrows():
            i, k = by_source[r.source], int(r["rank"]) - 1
            assert r.class_id == int(exp.classes[i, k]) and r["name"] == paths[i].stem
            assert r.score == pytest.approx(float(exp.scores[i, k]), abs=1e-5)
            assert r.prob == pytest.approx(float(exp.probs[i, k]), abs=1e-6)
            h, w = Image.open(paths[i]).size[::-1]
            assert (r.height, r.width) == (h, w)
            from camlens.base.localization import scale_boxes

            want = scale_boxes(boxes[i, k], (24, 24), (h, w))
            assert [r.x0, r.y0, r.x1, r.y1] == want.tolist()
            np.testing.assert_allclose(res.map(r), exp.maps[i, k].numpy(), atol=1e-5)
    assert res.maps("gradcam").shape == (8, 2, 24, 24)  # indexed by image_id (the broken file's slot stays NaN)
    assert np.isnan(res.maps("gradcam")[0]).all() and res.failed[0]["image_id"] == 0
    again = open_results(tmp_path / "st")
    assert again.run["signature"]["methods"] == ["gradcam", "cam"] and len(again) == len(t)
    assert (
        again.run["info"]["versions"]["torch"] == torch.__version__
        and len(again.run["signature"]["model_sha256"]) == 64
    )


def test_resume_skips_done_images_and_refuses_other_arguments(tmp_path):
    net = tiny_model()
    kw = dict(method="gradcam", targets="top2", batch_size=3, num_workers=0, preprocess=PP, progress=False)
    full = camlens.explain_dataset(net, Synthetic(11), out=tmp_path / "full", **kw)
    data = Synthetic(11)
    first = camlens.explain_dataset(net, data, out=tmp_path / "st", **kw)
    assert data.calls == 11 and first.stats.computed == 11
    # a crash after some chunks: remove two of them, leave a killed writer's temporary file
    chunks = sorted((tmp_path / "st" / "chunks").glob("part-*.parquet"))
    assert len(chunks) == 4
    lost = sum(
        len(set(__import__("pyarrow.parquet").parquet.read_table(c).column("image_id").to_pylist()))
        for c in chunks[1:3]
    )
    for c in chunks[1:3]:
        c.unlink()
    (tmp_path / "st" / "index.json").unlink()  # a crash comes before the index (else: chunks "missing")
    (tmp_path / "st" / "chunks" / ".part-x.parquet.123.tmp").write_bytes(b"half")
    assert len(open_results(tmp_path / "st").table) == (11 - lost) * 2  # what is committed, read from chunks
    data = Synthetic(11)
    again = camlens.explain_dataset(net, data, out=tmp_path / "st", **kw)
    assert lost == 6 and data.calls == lost and again.stats.computed == lost and again.stats.skipped == 11 - lost
    assert not list((tmp_path / "st" / "chunks").glob(".*tmp"))
    _same_store(again, full, atol=0)
    # nothing left to do: a third run reads no item at all
    data = Synthetic(11)
    assert camlens.explain_dataset(net, data, out=tmp_path / "st", **kw).stats.computed == 0 and data.calls == 0
    # other arguments are refused, naming what differs; overwrite=True starts again
    with pytest.raises(StoreMismatchError, match="methods.*--overwrite"):
        camlens.explain_dataset(net, Synthetic(11), out=tmp_path / "st", **{**kw, "method": "cam"})
    with pytest.raises(StoreMismatchError, match="n_images"):
        camlens.explain_dataset(net, Synthetic(10), out=tmp_path / "st", **kw)
    other = camlens.explain_dataset(net, Synthetic(11), out=tmp_path / "st", overwrite=True, **{**kw, "method": "cam"})
    assert other.stats.computed == 11 and set(other.table.method) == {"cam"}


def test_inputs_image_folder_csv_list_and_user_dataset(tmp_path):
    from camlens.pipeline.sources import discover

    for cls in ("cats", "dogs"):
        _images(tmp_path / "tree" / cls, 2)
    recs, _ = discover(tmp_path / "tree")
    assert [r.label for r in recs] == ["cats", "cats", "dogs", "dogs"]
    assert len({r.name for r in recs}) == 4  # same file names in two folders: prefixed by the folder
    (tmp_path / "list.csv").write_text("path,label\ntree/cats/img00.png,x\ntree/dogs/img01.png,y\n")
    recs, gt = discover(tmp_path / "list.csv")
    assert gt is None and [(Path(r.source).parent.name, r.label) for r in recs] == [("cats", "x"), ("dogs", "y")]
    res = camlens.explain_dataset(
        tiny_model(), Synthetic(5), out=tmp_path / "st", batch_size=2, num_workers=0, preprocess=PP, progress=False
    )
    assert res.table.label.tolist() == ["a", "b", "c", "a", "b"] and res.table.source.tolist()[0] == "item0"


def test_workers_and_float16_maps(tmp_path):
    _images(tmp_path / "in", 6)
    net = tiny_model()
    kw = dict(method="gradcam", batch_size=2, preprocess=PP, progress=False)
    a = camlens.explain_dataset(net, tmp_path / "in", out=tmp_path / "a", num_workers=0, **kw)
    b = camlens.explain_dataset(net, tmp_path / "in", out=tmp_path / "b", num_workers=2, map_dtype="float16", **kw)
    assert b.maps("gradcam").dtype == np.float16
    np.testing.assert_allclose(b.maps("gradcam")[:], a.maps("gradcam")[:], rtol=2e-3, atol=1e-3)
    assert a.table[["image_id", "class_id", "x0", "y1"]].equals(b.table[["image_id", "class_id", "x0", "y1"]])


@pytest.mark.slow
def test_cli_dataset_run_reports_bad_files_and_resumes(tmp_path):
    _images(tmp_path / "in", 4, bad=2)
    args = [
        "explain",
        str(tmp_path / "in"),
        "--model",
        "resnet18",
        "--weights",
        "random",
        "--method",
        "gradcam",
        "--topk",
        "1",
        "--out",
        str(tmp_path / "out"),
        "--batch-size",
        "3",
    ]
    r = CliRunner().invoke(cli_main, args, catch_exceptions=False)
    assert r.exit_code == 1, r.output  # the run completes, then exits non-zero
    assert "broken0.png" in r.stderr and "broken1.png" in r.stderr
    assert "explained 4 of 6 image(s)" in r.stdout and "2 input(s) failed" in r.stdout
    res = open_results(tmp_path / "out")
    assert len(res.table) == 4 and sorted(Path(f["source"]).name for f in res.failed) == ["broken0.png", "broken1.png"]
    assert not list((tmp_path / "out").glob("*.png"))  # a dataset run draws no figures unless asked
    r2 = CliRunner().invoke(cli_main, args, catch_exceptions=False)
    assert "(0 now, 4 already in the store)" in r2.stdout
    other = [a if a != "1" else "2" for a in args]  # --topk 2
    r3 = CliRunner().invoke(cli_main, other, catch_exceptions=False)
    assert r3.exit_code == 1 and "--overwrite" in r3.output and "targets" in r3.output
    r4 = CliRunner().invoke(cli_main, [*args, "--figures", "overlay", "--overwrite"], catch_exceptions=False)
    assert sorted(p.name for p in (tmp_path / "out" / "figures").iterdir()) == [
        f"img{i:02d}_gradcam_top1.png" for i in range(4)
    ]
    assert r4.exit_code == 1


def test_streaming_localization_metrics_equal_evaluate_maps_and_merge_exactly():
    from camlens.metrics.loceval import evaluate_maps
    from camlens.pipeline.dist import DistContext
    from camlens.pipeline.locmetrics import LocalizationAccumulator

    rng = np.random.default_rng(0)
    n, thr = 9, np.round(np.arange(0, 1, 0.05), 6)
    maps = [rng.random((16, 16)) ** 3 for _ in range(n)]
    maps[3][:] = 0  # an empty map
    gts = [np.array([[2 + i, 3, 30, 25 + i]]) for i in range(n)]
    sizes = [(32, 40)] * n
    correct = [1.0, 0.0, float("nan")] * 3
    ref = evaluate_maps(maps, gts, image_sizes=sizes, correct=correct, thresholds=thr, tolerance=4)
    one = LocalizationAccumulator(0.3, thr, 4)
    for m, g, s, c in zip(maps, gts, sizes, correct, strict=True):
        one.add(m, g, s, c)
    got = one.report()
    for k, v in ref.metrics.items():
        assert got.metrics[k] == pytest.approx(v, abs=1e-15), k
    for k, v in ref.baseline.items():
        assert got.baseline[k] == pytest.approx(v, abs=1e-15), k
    assert got.best_threshold == ref.best_threshold and np.array_equal(got.curve, ref.curve)
    # two halves merged (what the all-reduce does) give exactly the same figures in any order
    parts = [LocalizationAccumulator(0.3, thr, 4) for _ in range(2)]
    for i in (4, 0, 7, 2, 8, 1, 6, 3, 5):
        parts[i % 2].add(maps[i], gts[i], sizes[i], correct[i])

    class Fake(DistContext):  # a 2-rank reduction done by hand
        def sum_ints(self, v):
            return v

        def sum_exact(self, v):
            return v

    for a, b in zip((parts[0].mine, parts[0].base), (parts[1].mine, parts[1].base), strict=True):
        a.load(a.vector() + b.vector())
        a.iou_sum += b.iou_sum
    merged = parts[0].report()
    assert merged.metrics == got.metrics and merged.baseline == got.baseline  # exactly
    _ = Fake


# --------------------------------------------------------------------------------------------
# subprocesses: SIGKILL, torchrun, memory
# --------------------------------------------------------------------------------------------
def _job(out, n, *extra, torchrun=False, timeout=240):
    cmd = [*TORCHRUN, "--nproc-per-node=2", "--master-port", str(29500 + os.getpid() % 1000)] if torchrun else [PY]
    cmd += [str(HERE / "pipeline_job.py"), str(out), str(n), *map(str, extra)]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    # each process prints one JSON object; two torchrun ranks share the pipe, so their lines may run
    # together ("{...}{...}"): decode object after object instead of line by line
    dec, objs, i, text = json.JSONDecoder(), [], 0, p.stdout
    while (i := text.find("{", i)) >= 0:
        obj, i = dec.raw_decode(text, i)
        objs.append(obj)
    return objs


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_half_way_then_resume_equals_uninterrupted(tmp_path, sig):
    n = 24
    proc = subprocess.Popen(
        [PY, str(HERE / "pipeline_job.py"), str(tmp_path / "st"), str(n), "--sleep", "0.1", "--batch", "2"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    chunks = tmp_path / "st" / "chunks"
    t0 = time.time()
    while time.time() - t0 < 120:
        if chunks.is_dir() and len(list(chunks.glob("part-*.parquet"))) >= 4:
            break
        time.sleep(0.05)
    os.kill(proc.pid, sig)
    proc.wait(timeout=60)
    import pyarrow.parquet as pq

    done = set()
    for c in chunks.glob("part-*.parquet"):  # every committed chunk is whole
        done |= set(pq.read_table(c).column("image_id").to_pylist())
    assert 4 * 2 <= len(done) < n
    (out,) = _job(tmp_path / "st", n, "--batch", "2")
    assert out["computed"] == n - len(done) and out["items"] == n - len(done) and out["skipped"] == len(done)
    _job(tmp_path / "ref", n, "--batch", "2")
    _same_store(open_results(tmp_path / "st"), open_results(tmp_path / "ref"), atol=0)


@pytest.mark.slow
def test_torchrun_two_ranks_store_equals_single_process(tmp_path):
    _images(tmp_path / "in", 12, bad=1)
    outs = _job(tmp_path / "two", 0, "--files", tmp_path / "in", torchrun=True)
    # 13 files split 6 + 7; the broken one (sorted first) is in rank 0's block
    assert sorted(o["computed"] for o in outs) == [5, 7] and sum(o["failed"] for o in outs) == 2  # both list it
    _job(tmp_path / "one", 0, "--files", tmp_path / "in")
    two, one = open_results(tmp_path / "two"), open_results(tmp_path / "one")
    ids = two.table.loc[two.table.method == "gradcam"].groupby("image_id").size()
    assert sorted(ids.index) == list(range(1, 13)) and (ids == 2).all()  # each image once, top-2
    assert {p.name.split("-r")[1] for p in (tmp_path / "two" / "chunks").glob("*.parquet")} == {
        "0000.parquet",
        "0001.parquet",
    }
    assert [f["source"] for f in two.failed] == [f["source"] for f in one.failed] and len(two.failed) == 1
    _same_store(two, one)


@pytest.mark.slow
def test_torchrun_localization_metrics_equal_single_process_exactly(tmp_path):
    from camlens.data import synthetic

    ds = synthetic(tmp_path / "ds", 2, image_size=48, seed=5)
    base = [
        "-m",
        "camlens",
        "localize",
        "--gt",
        str(ds.csv),
        "--model",
        "resnet18",
        "--weights",
        "random",
        "--batch-size",
        "1",
        "--sweep-step",
        "0.05",
        "--method",
        "gradcam",
        "--method",
        "cam",
    ]
    port = str(29700 + os.getpid() % 200)
    for name, pre in (("one", [PY]), ("two", [*TORCHRUN, "--nproc-per-node=2", "--master-port", port])):
        cmd = [*pre, *base, "--out", str(tmp_path / name)]
        p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "localization_metrics.json").read_text())["methods"]
    two = json.loads((tmp_path / "two" / "localization_metrics.json").read_text())["methods"]
    assert one["gradcam"]["n"] == 8 and one == two  # every figure, bit for bit


@pytest.mark.slow
def test_memory_does_not_grow_with_the_number_of_images(tmp_path):
    (small,) = _job(tmp_path / "a", 100, "--batch", "8", "--size", "96")
    (large,) = _job(tmp_path / "b", 1000, "--batch", "8", "--size", "96", timeout=600)
    assert large["computed"] == 1000
    # the peak RSS is the interpreter, torch and a few batches: 10x the images must not add more than
    # a few MiB, while holding the results would add 900 x 2 methods x 2 maps x 96 x 96 x 4 B = 130 MiB
    assert large["peak_mib"] - small["peak_mib"] < 40, (small, large)


@pytest.mark.slow
def test_torchrun_evaluate_deletion_means_equal_single_process_exactly(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    from camlens.base.io import sample_image

    for name in ("chelsea", "coffee", "astronaut"):
        Image.fromarray(sample_image(name)[::4, ::4]).save(photos / f"{name}.png")
    base = [
        "-m",
        "camlens",
        "evaluate",
        str(photos),
        "--model",
        "resnet18",
        "--weights",
        "random",
        "--metrics",
        "deletion,insertion,average_drop",
        "--steps",
        "5",
        "--size",
        "64",
        "--chunk",
        "1",
        "--no-plots",
        "--quiet",
    ]
    port = str(29900 + os.getpid() % 90)
    for name, pre in (("one", [PY]), ("two", [*TORCHRUN, "--nproc-per-node=2", "--master-port", port])):
        p = subprocess.run(
            [*pre, *base, "--out", str(tmp_path / name)], env=ENV, capture_output=True, text=True, timeout=300
        )
        assert p.returncode == 0, p.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert len(one["per_image"]) == 2 * 3  # gradcam and the random baseline, three photos
    assert two["summary"] == one["summary"] and two["per_image"] == one["per_image"]  # bit for bit
    assert two["settings"]["images"] == 3 and two["settings"]["ranks"] == 2


def test_cli_named_files_keep_loose_outputs_and_overlay_limits_only_the_pngs(tmp_path):
    paths = _images(tmp_path / "in", 2)
    out = tmp_path / "out"
    args = [
        "explain",
        *map(str, paths),
        "--model",
        "resnet18",
        "--weights",
        "random",
        "--method",
        "gradcam",
        "--out",
        str(out),
        "--figures",
        "overlay",
        "-q",
        "--workers",
        "0",
    ]
    r = CliRunner().invoke(cli_main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"img{i:02d}_gradcam{s}" for i in range(2) for s in ("_top1.png", ".npy", ".json")
    )
    assert np.load(out / "img00_gradcam.npy").shape == (2, 224, 224)  # both targets kept in the maps
    assert len(json.loads((out / "img01_gradcam.json").read_text())["classes"]) == 2


@pytest.mark.slow
def test_cli_localize_eval_equals_evaluate_model(tmp_path):
    """``localize --eval`` (streamed, batches of 4, per-image GT targets) against the in-memory
    :func:`camlens.metrics.loceval.evaluate_model` on the same seeded network."""
    from camlens.data import synthetic
    from camlens.metrics.loceval import evaluate_model, read_boxes

    ds = synthetic(tmp_path / "ds", 2, image_size=48, seed=7)
    # ImageNet names for the shapes: every image is explained for its own ground-truth class
    text = Path(ds.csv).read_text()
    for shape, name in zip(
        sorted({ln.split(",")[1] for ln in text.splitlines()[1:]}), ("goldfish", "tabby cat", "tench", "jay", "ostrich")
    ):
        text = text.replace(f",{shape},", f",{name},")
    Path(ds.csv).write_text(text)
    r = CliRunner().invoke(
        cli_main,
        [
            "localize",
            "--gt",
            str(ds.csv),
            "--model",
            "resnet18",
            "--weights",
            "random",
            "--batch-size",
            "4",
            "--sweep-step",
            "0.1",
            "--out",
            str(tmp_path / "ev"),
            "--workers",
            "0",
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    got = json.loads((tmp_path / "ev" / "localization_metrics.json").read_text())["methods"]["gradcam"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = camlens.load_model("resnet18", weights="random")
    ref = evaluate_model(net, read_boxes(ds.csv), thresholds=np.round(np.arange(0, 1, 0.1), 6), batch_size=4)
    assert got["n"] == ref.n == 8
    for k, v in ref.metrics.items():
        assert (got["metrics"][k] is None and v != v) or got["metrics"][k] == pytest.approx(v, abs=1e-9), k
    np.testing.assert_allclose(got["boxacc_v2"], ref.curve, atol=1e-12)
    assert got["metrics"]["top1_loc"] is not None  # the classes were known


def test_store_never_writes_through_a_link_in_the_output_folder(tmp_path):
    """Issue 17's guarantee for the store: links planted at the store's file names are replaced,
    never followed — nothing outside the output folder is created or modified."""
    net = tiny_model()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "kept.json").write_text("precious")
    st = tmp_path / "st"
    st.mkdir()
    os.symlink(outside / "created.json", st / "index.json")  # dangling
    os.symlink(outside / "kept.json", st / "results.parquet")  # live
    kw = dict(method="gradcam", batch_size=4, num_workers=0, preprocess=PP, progress=False)
    os.symlink(outside / "created2.json", st / "run.json")  # dangling: refused like a file
    with pytest.raises(StoreMismatchError, match="--overwrite"):
        camlens.explain_dataset(net, Synthetic(5), out=st, **kw)
    (st / "run.json").unlink()
    (st / "results.parquet").unlink()
    with pytest.raises(StoreMismatchError, match="index.json"):  # only the dangling index.json is left
        camlens.explain_dataset(net, Synthetic(5), out=st, **kw)
    os.symlink(outside / "kept.json", st / "results.parquet")
    res = camlens.explain_dataset(net, Synthetic(5), out=st, overwrite=True, **kw)
    assert res.stats.computed == 5 and len(open_results(st).table) == 5
    assert sorted(p.name for p in outside.iterdir()) == ["kept.json"]
    assert (outside / "kept.json").read_text() == "precious"
    assert not (st / "index.json").is_symlink() and not (st / "results.parquet").is_symlink()


@pytest.mark.parametrize("method", ["gradcam", "saliency"])
def test_dataset_figures_equal_explain_save(tmp_path, method):
    """The store's overlays (written by the writer thread from maps moved off the compute thread:
    a layer method's small ``raw``, upsampled there) are the PNGs ``explain(...).save()`` writes,
    byte for byte — a pixel method's included (it once lost its pixel rendering on the way)."""
    paths = _images(tmp_path / "in", 5)
    net = tiny_model()
    camlens.explain_dataset(
        net, tmp_path / "in", method=method, out=tmp_path / "st", batch_size=2, num_workers=0,
        preprocess=PP, progress=False, figures="overlay",
    )  # fmt: skip
    exp = camlens.explain(net, [str(p) for p in paths], method, preprocess=PP)
    assert exp.lazy == (method == "gradcam")
    want = exp.save(tmp_path / "ref", formats=["png"], threshold=0.3)  # the store draws the box at 0.3
    got = sorted((tmp_path / "st" / "figures").iterdir())
    assert [p.name for p in got] == sorted(p.name for p in want) and len(got) == 5
    for g in got:
        a = np.asarray(Image.open(g).convert("RGB"))
        b = np.asarray(Image.open(tmp_path / "ref" / g.name).convert("RGB"))
        assert a.shape == b.shape and np.abs(a.astype(int) - b).max() <= 1, g.name  # float order: ±1 level
