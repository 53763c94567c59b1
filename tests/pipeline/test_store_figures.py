"""Issue 24 (what users asked for): overlays drawn from a result store, ``Results.figure(i)`` and
``camlens show STORE --image N``, equal to the figure of the same explanation drawn directly."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import camlens
from camlens.cli import main as cli_main
from camlens.models.preprocess import Preprocess

pytest.importorskip("pyarrow")
pytest.importorskip("zarr")
from tests.pipeline.pipeline_job import tiny_model

PP = Preprocess(size=(24, 24))


def _panels(fig):
    return [a for a in fig.axes if a.get_visible() and a.get_label() != "<colorbar>"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("st")
    rng = np.random.default_rng(3)
    paths = []
    for i in range(3):
        p = root / "in" / f"img{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (30 + 4 * i, 40, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    net = tiny_model()
    kw = dict(method=["gradcam", "cam"], targets="top2", preprocess=PP)
    res = camlens.explain_dataset(net, root / "in", out=root / "out", batch_size=2, num_workers=0, progress=False, **kw)
    return res, net, paths, kw


def test_store_figure_equals_the_direct_figure(store):
    res, net, paths, kw = store
    row = res.table[res.table["name"] == "img1"].iloc[0]
    i = int(row["image_id"])
    direct = camlens.explain(net, [str(paths[1])], **kw)["cam"]
    want = direct.figure(shared_scale=True)
    got = res.figure(i, "cam", shared_scale=True)
    pw, pg = _panels(want), _panels(got)
    assert [a.get_title() for a in pg] == [a.get_title() for a in pw]  # photo name, "1st: 1 (..%)", "2nd: …"
    for a, b in zip(pg, pw, strict=True):
        x, y = np.asarray(a.images[0].get_array(), float), np.asarray(b.images[0].get_array(), float)
        assert x.shape == y.shape and np.abs(x - y).max() <= 1  # the same pixels (maps stored as float32)
    assert got.get_suptitle() == want.get_suptitle()
    both = res.figure(i)  # two methods stored, none named: the montage
    assert len(_panels(both)) == 2 * 3 and [a.get_ylabel() for a in _panels(both)[::3]] == ["Grad-CAM", "CAM"]
    with pytest.raises(camlens.CamlensError, match="not in the store"):
        res.figure(99)


def test_cli_show_writes_the_figure(store, tmp_path):
    res, *_ = store
    out = tmp_path / "f.png"
    r = CliRunner().invoke(cli_main, ["show", str(res.root), "--image", "0", "--method", "gradcam", "--out", str(out)])
    assert r.exit_code == 0, r.output
    with Image.open(out) as im:
        assert im.size[0] > im.size[1] > 100
    again = CliRunner().invoke(cli_main, ["show", str(res.root), "--image", "0", "--out", str(out)])
    assert again.exit_code == 1 and "--overwrite" in again.output  # nothing replaced without asking
    bad = CliRunner().invoke(cli_main, ["show", str(res.root), "--image", "7", "--out", str(tmp_path / "g.png")])
    assert bad.exit_code == 1 and "not in the store" in bad.output
