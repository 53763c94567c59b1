import csv
import hashlib

import numpy as np
import pytest
from PIL import Image

from camlens.base.errors import CamlensError, InputError, OutputExistsError
from camlens.data import SHAPES, shape_mask, split_seed, synthetic, synthetic_arrays


def test_arrays_shapes_dtypes_and_balanced_labels():
    a = synthetic_arrays(10, image_size=64, seed=3)
    assert a.images.shape == (10, 64, 64, 3) and a.images.dtype == np.uint8
    assert a.masks.shape == (10, 64, 64) and a.masks.dtype == bool
    assert a.boxes.shape == (10, 4) and np.issubdtype(a.boxes.dtype, np.integer)
    assert a.classes == ["circle", "square", "triangle", "cross"]
    assert a.labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert len(a) == 10


def test_deterministic_from_seed():
    a, b = synthetic_arrays(6, seed=7), synthetic_arrays(6, seed=7)
    c = synthetic_arrays(6, seed=8)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.boxes, b.boxes)
    assert not np.array_equal(a.images, c.images)


def test_box_is_tight_bounding_rectangle_of_mask():
    a = synthetic_arrays(20, seed=1)
    for m, (x0, y0, x1, y1) in zip(a.masks, a.boxes, strict=True):
        ys, xs = np.nonzero(m)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert m[y0:y1, x0:x1].sum() == m.sum()
        # inside the image, with the size range promised (22%..45% of the side)
        assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
        assert 0.2 * 96 <= max(x1 - x0, y1 - y0) <= 0.46 * 96


def test_object_clearly_distinct_from_background():
    a = synthetic_arrays(16, seed=2)
    for img, m in zip(a.images.astype(float), a.masks, strict=True):
        obj, bg = img[m].mean(0), img[~m].mean(0)
        assert np.linalg.norm(obj - bg) > 100


def test_untextured_background_is_flat():
    a = synthetic_arrays(2, seed=0, textured=False)
    for img, m in zip(a.images, a.masks, strict=True):
        bg = img[~m]
        assert (bg == bg[0]).all()
        assert len(np.unique(img[m], axis=0)) == 1


def test_shape_masks_closed_form():
    # pixel centres inside the shape; areas against the continuous formulas
    s, size = 40.0, 100
    assert abs(shape_mask("circle", size, 50, 50, s).sum() - np.pi * 20**2) < 0.02 * np.pi * 400
    sq = shape_mask("square", size, 50, 50, s)
    assert sq.sum() == 40 * 40 and sq[30:70, 30:70].all()
    assert abs(shape_mask("triangle", size, 50, 50, s).sum() - 0.5 * s * s) < 0.05 * 0.5 * s * s
    assert abs(shape_mask("diamond", size, 50, 50, s).sum() - 0.5 * s * s) < 0.08 * 0.5 * s * s
    cross = shape_mask("cross", size, 50, 50, s)
    arm = s / 3
    assert abs(cross.sum() - (2 * s * arm - arm * arm)) < 0.1 * cross.sum()
    # triangle points up: the top rows are narrower than the bottom rows
    tri = shape_mask("triangle", size, 50, 50, s)
    rows = tri.sum(1)[rows_nz := tri.any(1)]
    assert rows[0] < rows[-1] and rows_nz.sum() in (39, 40)
    for name in SHAPES:
        assert shape_mask(name, 64, 32, 32, 20).any()


def test_classes_subset_and_errors():
    a = synthetic_arrays(4, classes=("ring", "hbar"), seed=0)
    assert a.classes == ["ring", "hbar"] and a.labels.tolist() == [0, 1, 0, 1]
    with pytest.raises(InputError, match="unknown synthetic shape"):
        synthetic_arrays(2, classes=("blob",))
    with pytest.raises(InputError, match="duplicates"):
        synthetic_arrays(2, classes=("circle", "circle"))
    with pytest.raises(CamlensError, match="image_size"):
        synthetic_arrays(2, image_size=8)


def test_written_dataset_matches_arrays(tmp_path):
    root = tmp_path / "ds"
    info = synthetic(root, 3, image_size=48, seed=5)
    arr = synthetic_arrays(12, image_size=48, seed=split_seed(5, "ds"))
    # ImageFolder layout, class order sorted like torchvision's ImageFolder
    assert info.classes == ["circle", "cross", "square", "triangle"]
    assert sorted(p.name for p in root.iterdir()) == ["boxes.csv", "circle", "cross", "square", "triangle"]
    assert len(info) == 12 and (root / "circle" / "circle_00002.png").exists()
    with open(info.csv) as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "class", "x0", "y0", "x1", "y1"]
    for i, row in enumerate(rows):
        png = np.asarray(Image.open(root / row["path"]))
        assert np.array_equal(png, arr.images[i])  # lossless
        assert row["class"] == arr.classes[arr.labels[i]] == info.classes[info.labels[i]]
        assert row["path"].startswith(row["class"] + "/")
        assert [int(row[k]) for k in ("x0", "y0", "x1", "y1")] == arr.boxes[i].tolist()
        assert info.paths[i] == (root / row["path"]).resolve()
    assert np.array_equal(info.boxes, arr.boxes)


def test_written_dataset_not_overwritten(tmp_path):
    synthetic(tmp_path, 1, image_size=32)
    before = (tmp_path / "circle" / "circle_00000.png").read_bytes()
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        synthetic(tmp_path, 1, image_size=32, seed=9)
    assert (tmp_path / "circle" / "circle_00000.png").read_bytes() == before
    synthetic(tmp_path, 1, image_size=32, seed=9, overwrite=True)
    assert (tmp_path / "circle" / "circle_00000.png").read_bytes() != before


def _md5s(root):
    return {hashlib.md5(p.read_bytes()).hexdigest(): p for p in sorted(root.rglob("*.png"))}


def test_splits_never_share_an_image(tmp_path):
    """The README's calls with the default seed: the validation split was a copy of the first
    training images (equal md5 for val/circle/circle_00004.png and shapes/circle/circle_00004.png)."""
    shapes = _md5s(synthetic(tmp_path / "shapes", 10, image_size=32).root)
    val = _md5s(synthetic(tmp_path / "val", 5, image_size=32).root)
    test = _md5s(synthetic(tmp_path / "test", 5, image_size=32, seed=0).root)
    assert len(shapes) == 40 and len(val) == 20 and len(test) == 20  # no duplicate inside a split either
    assert not set(shapes) & set(val) and not set(shapes) & set(test) and not set(val) & set(test)
    # the name, not the place, decides: the same split written elsewhere is the same data
    again = _md5s(synthetic(tmp_path / "elsewhere" / "val", 5, image_size=32).root)
    assert set(again) == set(val)


def test_overwrite_leaves_exactly_the_new_dataset(tmp_path):
    root = tmp_path / "shapes"
    synthetic(root, 10, image_size=32)
    (root / "circle" / "notes.txt").write_text("mine")  # not a generated name: kept
    ds = synthetic(root, 4, classes=("circle", "square"), image_size=32, overwrite=True)
    pngs = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    assert pngs == sorted(p.relative_to(root.resolve()).as_posix() for p in ds.paths) and len(pngs) == 8
    assert sorted(p.name for p in root.iterdir()) == ["boxes.csv", "circle", "square"]
    assert (root / "circle" / "notes.txt").read_text() == "mine"
    with open(ds.csv) as fh:
        assert len(list(csv.DictReader(fh))) == 8
