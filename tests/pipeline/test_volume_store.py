"""Volumes and clips through the dataset pipeline into the result store.

Oracles: ``camlens.explain`` on each volume alone (the stored maps equal its maps, Grad-CAM and
saliency, on NIfTI scans of three shapes with rotated anisotropic affines); ``camlens.localize``
and :meth:`~camlens.base.nifti.Volume.world_box` on those maps (the table's 3-D boxes); an
uninterrupted run's store (an interrupted run resumed, and a store with a damaged map chunk run
again, equal it file for file); nibabel reading back the NIfTI export (the scan's affine and grid).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import camlens
from camlens.base.errors import InputError, StoreError
from camlens.base.nifti import read_nifti
from camlens.pipeline import open_results
from camlens.pipeline import store as store_mod
from camlens.pipeline.volumes import VolumeReader, shape_batches
from camlens.targets import Classes

nib = pytest.importorskip("nibabel")

#: (i, j, k) file shapes: two of one shape, one of another, one of a third (D, H, W differ)
SHAPES = [(16, 18, 20), (16, 18, 20), (20, 16, 18), (18, 20, 16)]
THRESHOLD = 0.5


def affine(n: int) -> np.ndarray:
    """A rotated, translated, anisotropic voxel -> mm affine, another per scan."""
    a = math.radians(15 + 10 * n)
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.8, 1.5, 3.0])
    aff[:3, 3] = [-40.0 + n, 12.5, 70.0 - 2 * n]
    return aff


def write_scans(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for n, shape in enumerate(SHAPES):
        data = rng.uniform(0, 0.3, shape).astype(np.float32)
        i, j, k = (3 + 2 * n, 4 + n, 5 + 2 * n)  # a bright blob, elsewhere in each scan
        data[i : i + 4, j : j + 5, k : k + 3] += 2.0
        p = folder / f"scan{n}.nii.gz"
        nib.Nifti1Image(data, affine(n)).to_filename(str(p))
        paths.append(p)
    return paths


def net3d() -> nn.Module:
    """A 3-D CNN with positive weights: on positive inputs every feature, gradient and map is
    positive, so Grad-CAM and saliency are far from zero on any CPU (no degenerate oracle)."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv3d(4, 5, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.05)
    return net.eval()


KW = dict(targets=Classes((0, 2)), batch_size=2, num_workers=0, progress=False, threshold=THRESHOLD)


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("scans") / "in"
    write_scans(d)
    return d


@pytest.fixture(scope="module")
def pristine(scans, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "st"
    camlens.explain_dataset(net3d(), str(scans), ["gradcam", "saliency"], out=out, **KW)
    return out


def test_stored_maps_equal_explain_per_volume_and_boxes_equal_localize(scans, pristine):
    res = open_results(pristine)
    t = res.table
    assert len(t) == len(SHAPES) * 2 * 2 and res.complete and not res.failed
    assert res.maps("gradcam").shape == (4, 2, 20, 20, 20)  # padded to the largest D, H and W
    net = net3d()
    boxes_smaller = 0
    for n, shape in enumerate(SHAPES):
        vol = read_nifti(scans / f"scan{n}.nii.gz")
        exps = camlens.explain(net, vol.tensor(), ["gradcam", "saliency"], targets=Classes((0, 2)))
        for method, exp in exps.items():
            rows = t[(t.image_id == n) & (t.method == method)].sort_values("rank")
            assert rows.class_id.tolist() == [0, 2]
            for k, (_, row) in enumerate(rows.iterrows()):
                want = exp.maps[0, k].numpy()
                got = res.map(row)
                assert got.shape == shape[::-1] and want.max() > 1e-3 * max(1.0, float(np.abs(want).max()))
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))
                assert (row.depth, row.height, row.width) == shape[::-1]
                box = camlens.localize(want, THRESHOLD, spatial_dims=3)
                assert [row[c] for c in ("x0", "y0", "z0", "x1", "y1", "z1")] == box.tolist()
                boxes_smaller += int((box[3:] - box[:3] < np.array(shape)).any())
                world = vol.world_box(box).reshape(-1)
                np.testing.assert_allclose([row[f"world_{c}"] for c in ("x0", "y0", "z0", "x1", "y1", "z1")], world)
                np.testing.assert_allclose(row.affine, affine(n).reshape(-1))
                np.testing.assert_allclose(row.spacing, [0.8, 1.5, 3.0])
                assert row.timestamps is None
    assert boxes_smaller >= 8  # the boxes are not the whole volume: the comparison is not vacuous


def test_a_nifti_export_lies_in_the_scans_space(scans, pristine, tmp_path):
    res = open_results(pristine)
    t = res.table
    row = t[(t.image_id == 2) & (t.method == "gradcam")].iloc[0]
    p = res.to_nifti(row, tmp_path / "m.nii.gz")
    img = nib.load(str(p))
    assert img.shape == SHAPES[2]
    np.testing.assert_allclose(img.affine, affine(2), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(img.dataobj), res.map(row).transpose(2, 1, 0))
    with pytest.raises(camlens.CamlensError, match="overwrite"):
        res.to_nifti(row, p)


def _files(store: Path) -> dict[str, bytes]:
    skip = {"run.json", "index.json"}  # times and the runs' history
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def _same_store(a: Path, b: Path) -> None:
    ra, rb = open_results(a), open_results(b)
    assert ra.table.equals(rb.table)
    for m in ("gradcam", "saliency"):
        np.testing.assert_array_equal(ra.maps(m)[:], rb.maps(m)[:])
    fa, fb = _files(a), _files(b)
    maps_a = {k: v for k, v in fa.items() if k.startswith("maps.zarr")}
    assert maps_a == {k: v for k, v in fb.items() if k.startswith("maps.zarr")}  # bit for bit
    assert fa["results.parquet"] == fb["results.parquet"]


def test_an_interrupted_run_resumed_equals_the_uninterrupted_store(scans, pristine, tmp_path, monkeypatch):
    out = tmp_path / "st"
    real = store_mod.atomic_write_bytes
    calls = []

    def killed_at_the_second_commit(path, data, **kw):
        if path.name.startswith("part-"):
            calls.append(path.name)
            if len(calls) == 2:  # its maps are written, its table chunk is not: a crash mid-batch
                raise KeyboardInterrupt
        return real(path, data, **kw)

    monkeypatch.setattr(store_mod, "atomic_write_bytes", killed_at_the_second_commit)
    with pytest.raises(KeyboardInterrupt):
        camlens.explain_dataset(net3d(), str(scans), ["gradcam", "saliency"], out=out, **KW)
    monkeypatch.setattr(store_mod, "atomic_write_bytes", real)
    assert len(list((out / "chunks").glob("part-*"))) == 1
    res = camlens.explain_dataset(net3d(), str(scans), ["gradcam", "saliency"], out=out, **KW)
    assert res.stats.skipped == 2 and res.stats.computed == 2
    _same_store(out, pristine)


def test_a_damaged_map_chunk_is_refused_then_recomputed(scans, pristine, tmp_path):
    import shutil

    out = tmp_path / "st"
    shutil.copytree(pristine, out)
    chunk = out / "maps.zarr" / "saliency" / "c" / "3" / "0" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:20])
    res = open_results(out)
    with pytest.raises(StoreError, match="again"):
        res.map(len(res.table) - 1)  # image 3's saliency row
    again = camlens.explain_dataset(net3d(), str(scans), ["gradcam", "saliency"], out=out, **KW)
    assert again.stats.computed == 1 and again.stats.skipped == 3
    _same_store(out, pristine)


def test_large_volumes_are_chunked_in_slabs_and_checked_slab_by_slab(scans, tmp_path, monkeypatch):
    assert store_mod.MAX_CHUNK_BYTES == 64 * 2**20
    assert store_mod.map_chunks((4, 2, 20, 18, 20), 4) == (1, 2, 20, 18, 20)
    assert store_mod.map_chunks((4, 2, 20, 18, 20), 4, limit=2 * 18 * 20 * 4 * 3) == (1, 2, 3, 18, 20)
    assert store_mod.map_chunks((4, 2, 18, 20), 4, limit=1) == (1, 2, 18, 20)  # images: one chunk each
    whole = camlens.explain_dataset(net3d(), str(scans), "gradcam", out=tmp_path / "whole", **KW)
    monkeypatch.setattr(store_mod, "MAX_CHUNK_BYTES", 2 * 20 * 20 * 4 * 6)  # 6 slices of 2 maps
    ref = tmp_path / "slabs"
    camlens.explain_dataset(net3d(), str(scans), "gradcam", out=ref, **KW)
    slabs = sorted((ref / "maps.zarr" / "gradcam" / "c" / "1" / "0").iterdir())
    assert [p.name for p in slabs] == ["0", "1", "2", "3"]  # ceil(20 / 6) slabs along D
    st = open_results(ref)
    assert st.maps("gradcam").chunks == (1, 2, 6, 20, 20)
    for i in range(len(st.table)):  # the same maps as one chunk per volume
        np.testing.assert_array_equal(st.map(i), whole.map(i))
    (slabs[3] / "0" / "0").write_bytes(b"garbage")
    with pytest.raises(StoreError, match="again"):
        open_results(ref).maps("gradcam")[1]
    again = camlens.explain_dataset(net3d(), str(scans), "gradcam", out=ref, **KW)
    assert again.stats.computed == 2  # the batch of images 0 and 1 (one shape), as a 2-D store does
    np.testing.assert_array_equal(again.maps("gradcam")[:], whole.maps("gradcam")[:])


def test_volumes_of_one_shape_share_a_batch_others_get_their_own():
    keys = [(1, 2, 3), (1, 2, 3), (1, 2, 3), (2, 2, 2), (1, 2, 3)]
    assert shape_batches(keys, 2) == [[0, 1], [2], [3], [4]]


class Volumes(torch.utils.data.Dataset):
    """``(C, D, H, W)`` tensors with labels; item 3 has another shape when ``odd``."""

    def __init__(self, odd: bool = False):
        g = torch.Generator().manual_seed(1)
        self.x = [torch.rand(1, 12, 10, 14, generator=g) for _ in range(4)]
        if odd:
            self.x[3] = torch.rand(1, 12, 10, 10, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], i % 2


def test_a_dataset_of_volume_tensors(tmp_path):
    net = net3d()
    res = camlens.explain_dataset(net, Volumes(), "gradcam", out=tmp_path / "st", **KW)
    want = camlens.explain(net, torch.stack(Volumes().x), "gradcam", targets=Classes((0, 2))).maps
    got = res.maps("gradcam")[:]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-7)
    t = res.table
    assert t.label.tolist()[:2] == ["0", "0"] and (t.depth == 12).all() and t.affine.isna().all()
    assert t.world_x0.isna().all()
    odd = camlens.explain_dataset(net, Volumes(odd=True), "gradcam", out=tmp_path / "odd", **KW)
    assert [f["image_id"] for f in odd.failed] == [3] and "first item's" in odd.failed[0]["error"]
    with pytest.raises(InputError, match="affine"):
        res.to_nifti(0, tmp_path / "x.nii.gz")


def test_volume_reader_is_part_of_the_run_signature(scans, pristine, tmp_path):
    import shutil

    out = tmp_path / "st"
    shutil.copytree(pristine, out)
    with pytest.raises(camlens.pipeline.StoreMismatchError, match="volumes"):
        camlens.explain_dataset(
            net3d(), str(scans), ["gradcam", "saliency"], out=out, volume_reader=VolumeReader(window="brain"), **KW
        )


def write_clip(path: Path, n_frames: int, fps: int = 10) -> None:
    """A white 6x6 square moving right 3 px per frame over black, 48x64, lossless (FFV1 in .mp4)."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv444p"
        for t in range(n_frames):
            img = np.zeros((48, 64, 3), np.uint8)
            img[20:26, 4 + 3 * t : 10 + 3 * t] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def r3d_like() -> nn.Module:
    """A tiny r3d-shaped video classifier: 3x3x3 stem, a (1, 2, 2)-strided block, GAP, linear."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv3d(4, 6, 3, stride=(1, 2, 2), padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )
    with torch.no_grad():
        net[2].bias.fill_(0.1)
        net[6].weight.abs_()
    return net.eval()


def test_a_folder_of_clips_keeps_timestamps_and_boxes_in_the_videos_pixels(tmp_path):
    from camlens.base.localization import scale_boxes
    from camlens.base.video import read_clip

    d = tmp_path / "clips"
    d.mkdir()
    write_clip(d / "a.mp4", 12)
    write_clip(d / "b.mp4", 12)
    write_clip(d / "short.mp4", 5)
    reader = VolumeReader(frames=8, stride=1, size=(24, 32))
    res = camlens.explain_dataset(r3d_like(), str(d), ["gradcam", "saliency"], out=tmp_path / "st",
                                  volume_reader=reader, **KW)  # fmt: skip
    t = res.table
    assert res.maps("gradcam").shape == (3, 2, 8, 24, 32) and not res.failed
    net = r3d_like()
    for n, name in enumerate(["a", "b", "short"]):
        clip = read_clip(d / f"{name}.mp4", frames=8)
        exps = camlens.explain(net, clip.tensor(size=(24, 32)), ["gradcam", "saliency"], targets=Classes((0, 2)))
        for method, exp in exps.items():
            rows = t[(t.image_id == n) & (t.method == method)].sort_values("rank")
            for k, (_, row) in enumerate(rows.iterrows()):
                want = exp.maps[0, k].numpy()
                assert float(want.max()) > 0
                np.testing.assert_allclose(res.map(row), want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))
                assert (row.depth, row.height, row.width) == (len(clip.frames), 48, 64)
                np.testing.assert_allclose(row.timestamps, clip.timestamps)
                b = camlens.localize(want, THRESHOLD, spatial_dims=3)
                xy = scale_boxes(b[[0, 1, 3, 4]], (24, 32), (48, 64))
                assert [row[c] for c in ("x0", "y0", "x1", "y1")] == xy.tolist()
                assert (row.z0, row.z1) == (b[2], b[5])
                assert np.isnan(row.world_x0) and row.affine is None
    assert (t[t.image_id == 2].depth == 5).all()  # the short clip: 5 frames, stored padded to 8
    assert np.isnan(res.maps("gradcam")[2][:, 5:]).all()


def test_a_folder_of_dicom_series_each_with_its_affine_and_window(tmp_path):
    pytest.importorskip("pydicom")
    from camlens.base.dicom import read_dicom_series
    from tests.base.test_dicom import write_series

    d = tmp_path / "dicom"
    d.mkdir()
    write_series(d / "patient1")
    write_series(d / "patient2")
    reader = VolumeReader(window=(-1000.0, -700.0))
    res = camlens.explain_dataset(net3d(), str(d), "gradcam", out=tmp_path / "st", volume_reader=reader, **KW)
    t = res.table
    assert sorted(Path(s).name for s in t.source.unique()) == ["patient1", "patient2"] and not res.failed
    net = net3d()
    for n in range(2):
        vol = read_dicom_series(t[t.image_id == n].source.iloc[0])
        want = camlens.explain(net, vol.tensor(window=(-1000.0, -700.0)), "gradcam", targets=Classes((0, 2))).maps
        rows = t[t.image_id == n].sort_values("rank")
        for k, (_, row) in enumerate(rows.iterrows()):
            np.testing.assert_allclose(res.map(row), want[0, k].numpy(), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(row.affine, vol.affine.reshape(-1))
            box = [row[c] for c in ("x0", "y0", "z0", "x1", "y1", "z1")]
            np.testing.assert_allclose([row[f"world_{c}"] for c in ("x0", "y0", "z0", "x1", "y1", "z1")],
                                       vol.world_box(box).reshape(-1))  # fmt: skip


def test_cli_explains_a_folder_of_scans_into_a_store_with_nifti_maps(scans, pristine, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import camlens.cli.volume as cli_volume
    from camlens.cli import main as cli_main

    monkeypatch.setattr(cli_volume, "load_model_seeded", lambda *a, **k: net3d())
    out = tmp_path / "st"
    args = ["explain", str(scans), "--model", "tiny3d", "--method", "gradcam", "--method", "saliency"]
    args += ["--class", "0", "--class", "2", "--threshold", str(THRESHOLD), "--batch-size", "2", "--out", str(out)]
    args += ["--format", "store,nii"]
    r = CliRunner().invoke(cli_main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "explained 4 of 4 volume(s)" in r.output and "16 NIfTI map(s)" in r.output
    res = open_results(out)
    ref = open_results(pristine)
    assert res.table.drop(columns="source").equals(ref.table.drop(columns="source"))
    saved = nib.load(str(out / "nifti" / "scan3_saliency_top2.nii.gz"))
    np.testing.assert_allclose(saved.affine, affine(3), atol=1e-5)
    row = ref.table[(ref.table.image_id == 3) & (ref.table.method == "saliency")].iloc[1]
    np.testing.assert_array_equal(np.asarray(saved.dataobj), ref.map(row).transpose(2, 1, 0))
    again = CliRunner().invoke(cli_main, args)  # a rerun resumes the store but refuses to overwrite the NIfTI maps
    assert again.exit_code != 0 and "overwrite" in again.output
    bad = CliRunner().invoke(cli_main, [*args[:-2], "--format", "png"])
    assert bad.exit_code != 0 and "'nii'" in bad.output


@pytest.mark.slow  # four montages: about 1.5 s of matplotlib each
def test_figures_of_a_volume_run_are_slice_montages_drawn_from_the_store(tmp_path):
    res = camlens.explain_dataset(net3d(), Volumes(), "gradcam", out=tmp_path / "st", figures="overlay",
                                  **{**KW, "batch_size": 4})  # fmt: skip
    pngs = sorted(p.name for p in (tmp_path / "st" / "figures").iterdir())
    assert pngs == [f"item{i}_gradcam_top1.png" for i in range(4)] and res.complete


def test_a_volume_stores_figure_is_the_slice_montage_over_the_scan(pristine, tmp_path):
    res = open_results(pristine)
    fig = res.figure(2, "gradcam", target=1)
    axes = [a for a in fig.axes if a.get_visible() and a.get_title()]
    assert len(axes) == 15  # three views x five slices
    assert "(peak)" in " ".join(a.get_title() for a in axes)
    from click.testing import CliRunner

    from camlens.cli import main as cli_main

    r = CliRunner().invoke(cli_main, ["show", str(pristine), "--image", "1", "--out", str(tmp_path / "s.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s.png").stat().st_size > 10_000


def test_folders_of_scans_series_and_clips_are_told_from_image_folders_cheaply(scans, tmp_path):
    from PIL import Image

    from camlens.pipeline.volumes import holds_volumes, volume_sources

    imgs = tmp_path / "imgs" / "cat"
    imgs.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(imgs / "a.png")
    assert not holds_volumes(tmp_path / "imgs") and volume_sources(str(tmp_path / "imgs")) is None
    assert holds_volumes(scans) and len(volume_sources([str(scans)]) or []) == 4
    with pytest.raises(InputError, match="not both"):
        volume_sources([str(scans), str(imgs / "a.png")])


def test_out_inside_the_scans_folder_never_reads_the_stores_nifti_maps(tmp_path):
    data = tmp_path / "in"
    write_scans(data)
    out = data / "store"
    res = camlens.explain_dataset(net3d(), str(data), "gradcam", out=out, **KW)
    from camlens.pipeline.volumes import export_nifti

    assert len(export_nifti(res, out / "nifti")) == 8
    again = camlens.explain_dataset(net3d(), str(data), "gradcam", out=out, **KW)  # resumes: the same 4 scans
    assert again.stats.skipped == 4 and again.stats.computed == 0


def test_an_unreadable_scan_is_reported_by_name_and_the_others_stored(tmp_path):
    data = tmp_path / "in"
    write_scans(data)
    (data / "broken.nii.gz").write_bytes(b"not a scan")
    res = camlens.explain_dataset(net3d(), str(data), "gradcam", out=tmp_path / "st", **KW)
    assert [Path(f["source"]).name for f in res.failed] == ["broken.nii.gz"]
    assert "not a readable NIfTI file" in res.failed[0]["error"] and len(res.table) == 8
