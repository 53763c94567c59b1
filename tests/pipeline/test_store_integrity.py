"""The result store under damage, links, concurrent runs and hostile inputs (issue 28).

Oracle: an uninterrupted run's store. Every damaged store is either repaired by the same call
again into a store equal to it (table and maps, bit for bit) or refused with a clear error, and
:func:`camlens.open_results` on a damaged store raises :class:`camlens.base.errors.StoreError` instead of
returning NaN maps or a codec or pyarrow traceback.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import camlens
from camlens.base.errors import CamlensError, InputError, StoreBusyError, StoreError, WriteError
from camlens.models.preprocess import Preprocess
from camlens.pipeline import StoreMismatchError, open_results

HERE = Path(__file__).parent
from tests.pipeline.pipeline_job import Synthetic, tiny_model  # noqa: E402

PP = Preprocess(size=(24, 24))
N = 8
KW = dict(method=["gradcam", "cam"], targets="top2", batch_size=3, num_workers=0, preprocess=PP, progress=False)


def _run(out, data=None, **kw):
    return camlens.explain_dataset(tiny_model(), data if data is not None else Synthetic(N), out=out, **{**KW, **kw})


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "st"
    _run(out)
    return out


def _copy(pristine, tmp_path) -> Path:
    st = tmp_path / "st"
    shutil.copytree(pristine, st, symlinks=True)
    return st


def _equal(a, b) -> None:
    """The same table (every column, exactly) and the same maps of every row."""
    ta, tb = a.table, b.table
    assert ta.equals(tb)
    for m in ta.method.unique():
        ids = sorted(ta.loc[ta.method == m, "image_id"].unique())
        np.testing.assert_array_equal(a.maps(m)[ids], b.maps(m)[ids])


def _reads_or_refuses(st: Path, ref) -> str:
    """open_results on a (damaged) store: a StoreError, or exactly the reference's table and maps."""
    try:
        res = open_results(st)
        _equal(res, ref)
        for i in range(len(res.table)):
            assert not np.isnan(res.map(i)).any()
    except StoreError as exc:
        assert "again" in str(exc)  # the fix: the same command again
        return "refused"
    return "read"


def _map_chunk(st: Path, method: str, i: int) -> Path:
    return st / "maps.zarr" / method / "c" / str(i) / "0" / "0" / "0"


def _damage(path: Path, how: str) -> None:
    if how == "deleted":
        path.unlink()
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        data = path.read_bytes()
        path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, max(16, len(data)), dtype=np.uint8)))
    elif how == "zero":
        path.write_bytes(b"")
    elif how == "list":
        path.write_text("[1, 2]")
    elif how == "reshaped":
        meta = json.loads(path.read_text())
        meta["shape"][0] += 1
        path.write_text(json.dumps(meta))
    else:  # pragma: no cover
        raise AssertionError(how)


def _first_chunk(st: Path) -> Path:
    return sorted((st / "chunks").glob("part-*.parquet"))[1]  # images 3..5


# (file kind, damage, images recomputed by the rerun: None = not checked)
CASES = [
    *[("table chunk", how, 3) for how in ("deleted", "truncated", "garbage", "zero")],
    *[("map chunk", how, 3) for how in ("deleted", "truncated", "garbage")],
    *[("zarr.json", how, N) for how in ("deleted", "garbage", "reshaped")],
    ("maps.zarr", "deleted", N),
    *[("index", how, 0) for how in ("deleted", "truncated", "garbage", "list")],
    *[("run signature", how, 0) for how in ("deleted", "truncated", "garbage", "list")],
    *[("merged table", how, 0) for how in ("deleted", "truncated", "garbage")],
]


@pytest.mark.parametrize(("kind", "how", "recomputed"), CASES, ids=[f"{k}-{h}" for k, h, _ in CASES])
def test_damaged_store_is_refused_when_read_and_repaired_by_a_rerun(pristine, tmp_path, kind, how, recomputed):
    st = _copy(pristine, tmp_path)
    ref = open_results(pristine)
    target = {
        "table chunk": _first_chunk(st),
        "map chunk": _map_chunk(st, "gradcam", 4),
        "zarr.json": st / "maps.zarr" / "cam" / "zarr.json",
        "maps.zarr": st / "maps.zarr",
        "index": st / "index.json",
        "run signature": st / "run.json",
        "merged table": st / "results.parquet",
    }[kind]
    if kind == "maps.zarr":
        shutil.rmtree(target)
    else:
        _damage(target, how)
    got = _reads_or_refuses(st, ref)
    # a read store is exactly the reference (checked above): the merged table still holds a damaged
    # table chunk's rows, and without the index the chunks (all verified) are read instead
    readable = (kind == "table chunk" and how != "deleted") or (kind in ("merged table", "index") and how == "deleted")
    assert got == ("read" if readable else "refused")  # never NaN maps, never a codec or pyarrow traceback
    notes: list[str] = []
    data = Synthetic(N)
    res = _run_noting(st, data, notes)
    assert res.stats.computed == recomputed and data.calls == recomputed, notes
    _equal(open_results(st), ref)
    assert open_results(st).complete
    if recomputed and kind != "maps.zarr":
        assert any("damaged" in n and f"computes {recomputed} image(s) again" in n for n in notes), notes


def _run_noting(st, data, notes):
    from camlens.api.explainer import ExplainRequest
    from camlens.pipeline import dist
    from camlens.pipeline.run import StoreOptions, StreamOptions, run_store
    from camlens.pipeline.sources import as_dataset

    ds, _ = as_dataset(data, PP)
    request = ExplainRequest(methods=tuple(KW["method"]), targets="top2", preprocess=PP)
    loop = StreamOptions(batch_size=3, num_workers=0, progress=False, on_error=notes.append)
    res, stats = run_store(
        tiny_model(), ds, st, request, loop=loop, store_options=StoreOptions(0.3), ctx=dist.DistContext()
    )
    res.stats = stats
    return res


def test_stray_files_are_named_not_parsed(pristine, tmp_path):
    st = _copy(pristine, tmp_path)
    (st / "chunks" / "part-garbage.parquet").write_bytes(b"not parquet")
    (st / "chunks" / "notes.txt").write_text("mine")
    assert len(open_results(st).table) == len(open_results(pristine).table)
    notes: list[str] = []
    res = _run_noting(st, Synthetic(N), notes)
    assert res.stats.computed == 0 and any("stray" in n and "part-garbage.parquet" in n for n in notes), notes
    assert (st / "chunks" / "notes.txt").read_text() == "mine"  # named, left alone


def test_stale_temporary_files_of_dead_runs_are_removed(pristine, tmp_path):
    st = _copy(pristine, tmp_path)
    stale = [st / ".results.parquet.99999.tmp", st / "chunks" / ".part-000000000-000000002-r0000.parquet.x1.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    _run(st)
    assert not any(p.exists() for p in stale)


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    from camlens.pipeline.integrity import StoreLock

    st = tmp_path / "st"
    st.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        rec = {"pid": sleeper.pid, "host": socket.gethostname(), "started": None, "since": 0}
        (st / ".lock").write_text(json.dumps(rec))
        with pytest.raises(StoreBusyError, match=f"process {sleeper.pid} on host"):
            _run(st)
        assert not (st / "run.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    res = _run(st)  # its process is gone: a stale lock, taken over
    assert res.stats.computed == N and not (st / ".lock").exists()
    (st / ".lock").write_text("garbage")
    with pytest.raises(StoreBusyError, match="not a camlens lock"):
        StoreLock(st).acquire()


def _rows_unique_and_equal(st: Path, ref) -> None:
    t = open_results(st).table
    assert not t.duplicated(["image_id", "method", "rank"]).any()
    r = ref.table
    assert t.drop(columns=["score", "prob"]).equals(r.drop(columns=["score", "prob"]))
    np.testing.assert_allclose(t[["score", "prob"]].to_numpy(), r[["score", "prob"]].to_numpy(), atol=1e-5)


@pytest.mark.slow
def test_two_concurrent_runs_with_other_batch_sizes_write_no_duplicate_row(tmp_path):
    """Two processes at once into one store (batch sizes 2 and 3), 10 trials (issue 28): one is
    refused by the lock (or they run one after the other); never a duplicate row."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    job = [sys.executable, str(HERE / "pipeline_job.py")]
    subprocess.run([*job, str(tmp_path / "ref"), "12"], env=env, check=True, capture_output=True, timeout=240)
    ref = open_results(tmp_path / "ref")
    for trial in range(10):
        st = tmp_path / f"st{trial}"
        procs = [
            subprocess.Popen([*job, str(st), "12", "--batch", b, "--sleep", "0.02"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for b in ("2", "3")
        ]  # fmt: skip
        outs = [p.communicate(timeout=240) for p in procs]
        codes = [p.returncode for p in procs]
        assert 0 in codes, outs
        for code, (_, err) in zip(codes, outs, strict=True):
            assert code == 0 or "being written by another run" in err, err[-2000:]
        _rows_unique_and_equal(st, ref)


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("where", ["maps.zarr", "chunks", "figures", "maps.zarr/gradcam", "maps.zarr/gradcam/c/4"])
def test_a_link_planted_in_any_store_folder_is_refused_nothing_written_outside(pristine, tmp_path, where):
    st = _copy(pristine, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    if where == "figures":
        elsewhere.mkdir()
        (elsewhere / "keep.png").write_bytes(b"x")
    else:
        shutil.move(st / where, elsewhere)
    os.symlink(elsewhere, st / where)
    for c in sorted((st / "chunks").glob("part-*.parquet"))[:1] if where != "chunks" else []:
        c.unlink()  # something to recompute
    before = _listing(elsewhere)
    with pytest.raises(StoreError, match="symbolic link"):
        _run(st, figures="overlay")
    assert _listing(elsewhere) == before
    if where.startswith("maps"):
        with pytest.raises(StoreError):  # a link, or the chunk deleted above: never NaN maps
            open_results(st).maps("gradcam")[:]
    assert _listing(elsewhere) == before


@pytest.mark.parametrize("where", ["maps", "table"])
def test_a_full_disk_in_the_writer_thread_is_a_clean_write_error(tmp_path, monkeypatch, where):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "maps":
        import zarr.storage._local as local

        monkeypatch.setattr(local, "_put", full)
    else:
        import camlens.base.fsio as fsio

        monkeypatch.setattr(fsio, "_write_all", full)
    with pytest.raises(WriteError, match="no space left on the device"):
        _run(tmp_path / "st")
    assert not (tmp_path / "st" / ".lock").exists()  # released


def test_float16_overflow_is_said_and_counted(tmp_path):
    net = tiny_model()
    with torch.no_grad():
        net.fc.weight.mul_(1e5)  # CAM values far beyond float16's 65504
    notes: list[str] = []
    from camlens.api.explainer import ExplainRequest
    from camlens.pipeline import dist
    from camlens.pipeline.run import StoreOptions, StreamOptions, run_store
    from camlens.pipeline.sources import as_dataset

    ds, _ = as_dataset(Synthetic(4), PP)
    request = ExplainRequest(methods=("cam",), targets="top1", preprocess=PP)
    loop = StreamOptions(batch_size=4, num_workers=0, progress=False, on_error=notes.append)
    store = StoreOptions(threshold=0.3, map_dtype="float16")
    run_store(net, ds, tmp_path / "st", request, loop=loop, store_options=store, ctx=dist.DistContext())
    res = open_results(tmp_path / "st")
    n_inf = int(np.isinf(res.maps("cam")[:]).sum())
    assert n_inf > 0 and res.index["float16_overflow"] == n_inf
    assert any("float16" in n and "float32" in n for n in notes), notes


def test_a_non_utf8_list_file_is_a_clear_error(tmp_path):
    from camlens.pipeline.sources import discover

    (tmp_path / "list.txt").write_bytes("caf\xe9.png\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8.*save it as UTF-8"):
        discover(tmp_path / "list.txt")


def test_relative_and_absolute_paths_to_the_same_data_are_one_run(tmp_path, monkeypatch):
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (20, 22, 3), dtype=np.uint8)).save(d / f"a{i}.png")
    _run(tmp_path / "st", d)
    monkeypatch.chdir(tmp_path)
    assert _run(tmp_path / "st", "in").stats.computed == 0
    (d / "a9.png").write_bytes((d / "a0.png").read_bytes())  # another image: refused, said in words
    with pytest.raises(StoreMismatchError, match="n_images: 4 then, 5 now"):
        _run(tmp_path / "st", "in")


def test_out_inside_the_data_folder_never_counts_the_stores_own_figures(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 22, 3), dtype=np.uint8)).save(d / f"a{i}.png")
    first = _run(d / "st", d, figures="overlay")
    assert len(list((d / "st" / "figures").glob("*.png"))) == 6  # 3 images x 2 methods
    again = _run(d / "st", d, figures="overlay")
    assert again.stats.computed == 0 and len(again.table) == len(first.table)


def test_one_nan_item_of_a_user_dataset_is_skipped_and_reported(tmp_path):
    class WithNaN(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            x = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(i))
            if i == 2:
                x[0, 3, 3] = float("nan")
            return x, 0

    notes: list[str] = []
    from camlens.api.explainer import ExplainRequest
    from camlens.pipeline import dist
    from camlens.pipeline.run import StoreOptions, StreamOptions, run_store
    from camlens.pipeline.sources import as_dataset

    ds, _ = as_dataset(WithNaN(), PP)
    request = ExplainRequest(methods=("gradcam",), targets="top1", preprocess=PP)
    loop = StreamOptions(batch_size=5, num_workers=0, progress=False, on_error=notes.append)
    st = tmp_path / "st"
    res, stats = run_store(
        tiny_model(), ds, st, request, loop=loop, store_options=StoreOptions(0.3), ctx=dist.DistContext()
    )
    assert stats.computed == 4 and [f["image_id"] for f in res.failed] == [2]
    assert "NaN" in res.failed[0]["error"] and any("item 2" in n for n in notes), notes
    assert sorted(res.table.image_id) == [0, 1, 3, 4]


def test_figures_asked_of_a_finished_store_are_drawn_from_its_maps(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (20, 22, 3), dtype=np.uint8)).save(d / f"a{i}.png")
    _run(tmp_path / "st", d)
    _run(tmp_path / "ref", d, figures="overlay")
    net = tiny_model()
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    kw = {**KW, "figures": "overlay", "batch_size": 2}  # result-neutral settings: not another run
    res = camlens.explain_dataset(net, d, out=tmp_path / "st", **kw)
    assert res.stats.computed == 0 and not calls  # the model never ran
    got = sorted(p.name for p in (tmp_path / "st" / "figures").iterdir())
    assert got == sorted(p.name for p in (tmp_path / "ref" / "figures").iterdir()) and len(got) == 8
    for name in got:
        a = np.asarray(Image.open(tmp_path / "st" / "figures" / name).convert("RGB")).astype(int)
        b = np.asarray(Image.open(tmp_path / "ref" / "figures" / name).convert("RGB")).astype(int)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1, name
    _ = CamlensError


def test_other_images_are_refused_naming_the_paths_not_hashes(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 22, 3), dtype=np.uint8)).save(d / f"a{i}.png")
    _run(tmp_path / "st", d)
    (d / "a0.png").rename(d / "z0.png")  # as many images, other files
    with pytest.raises(StoreMismatchError, match=r"image 0 was '.*a0\.png' then, '.*a1\.png' now") as err:
        _run(tmp_path / "st", d)
    assert "sha256" not in str(err.value)


def test_cli_full_disk_in_the_writer_thread_is_one_clean_line(tmp_path, monkeypatch):
    import zarr.storage._local as local
    from click.testing import CliRunner

    from camlens.cli import main as cli_main

    d = tmp_path / "in"
    d.mkdir()
    for i in range(2):
        Image.fromarray(np.full((20, 22, 3), 40 * i, np.uint8)).save(d / f"a{i}.png")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local, "_put", full)
    args = ["explain", str(d), "--model", "resnet18", "--weights", "random", "--method", "gradcam", "--topk", "1",
            "--out", str(tmp_path / "st"), "--workers", "0", "-q"]  # fmt: skip
    r = CliRunner().invoke(cli_main, args)
    assert (r.exit_code == 1 and r.exception is None) or isinstance(r.exception, SystemExit), r.output
    assert "no space left on the device" in r.output and "Traceback" not in r.output, r.output


def test_a_store_with_rows_written_twice_is_refused_when_read_and_repaired(pristine, tmp_path):
    """What two unlocked runs left (issue 28: every row twice): the reader refuses, the rerun keeps
    one copy of each image's rows."""
    st = _copy(pristine, tmp_path)
    c = _first_chunk(st)
    shutil.copy(c, c.with_name(c.name.replace("-r0000", "-r0001")))
    with pytest.raises(StoreError, match="two chunks"):
        _ = open_results(st).table
    notes: list[str] = []
    assert _run_noting(st, Synthetic(N), notes).stats.computed == 0
    _equal(open_results(st), open_results(pristine))
    assert any("already in another chunk" in n for n in notes), notes
