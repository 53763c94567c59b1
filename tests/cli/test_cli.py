import csv
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from camlens.base.localization import iou
from camlens.cli import main
from camlens.cli.common import expand_inputs, output_stems, parse_classes
from camlens.metrics.loceval import load_threshold, read_boxes

FAST = ["--model", "resnet18", "--weights", "random"]

# the cat photo (skimage "chelsea", 451x300): boxes drawn by hand after looking at the image
CAT_BOX = (0, 0, 390, 300)  # the cat (the right ~60 px are background)
FACE_BOX = (70, 40, 370, 290)  # eyes, nose and muzzle
LANDMARKS = [(170, 115), (318, 135), (262, 245)]  # left eye, right eye, nose (x, y)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb(path: Path, side: int = 30000) -> None:
    """A tiny PNG file whose header claims side x side pixels."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + _png_chunk(b"IEND", b"")
    )


def test_help_on_every_command():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("explain", "localize", "models", "methods", "layers"):
        assert cmd in r.output
        h = run(cmd, "--help")
        assert h.exit_code == 0 and "Usage:" in h.output, cmd


@pytest.mark.slow
def test_default_explain_writes_titled_pngs_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "camlens-out"
    r = run("explain", "--out", out, "--overwrite")  # the README's `make demo`
    assert r.exit_code == 0, r.output
    assert "Egyptian cat" in r.stdout and "tiger cat" in r.stdout and "78.8%" in r.stdout  # top-5 table
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        f"chelsea_{m}{s}" for m in ("gradcam", "cam") for s in ("_top1.png", "_top2.png", ".json", ".npy")
    )
    for m in ("gradcam", "cam"):
        for k, cls in ((1, "Egyptian cat"), (2, "tiger cat")):
            with Image.open(out / f"chelsea_{m}_top{k}.png") as im:
                im.load()
                assert im.format == "PNG" and im.size == (451, 352)  # the photo + a 30 px title band + a 22 px colorbar
                assert cls in im.text["Title"]
                px = np.asarray(im.convert("RGB"))
            assert px[40:, :].std() > 20  # an overlay, not a blank image
        js = json.loads((out / f"chelsea_{m}.json").read_text())
        assert js["class_names"] == ["Egyptian cat", "tiger cat"] and js["classes"] == [285, 282]
        assert js["model"] == "efficientnet_lite0" and js["image_size"] == [300, 451]
        assert np.load(out / f"chelsea_{m}.npy").shape == (2, 224, 224)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r2 = run("explain", "--out", out)
    assert r2.exit_code == 1 and "--overwrite" in r2.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_localize_cat_box_lies_on_the_cat(tmp_path):
    r = run("localize", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    with open(tmp_path / "boxes.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["class"] == "Egyptian cat" and rows[0]["path"] == "skimage:chelsea"
    box = [int(rows[0][k]) for k in ("x0", "y0", "x1", "y1")]
    assert iou(box, CAT_BOX) >= 0.6
    x0, y0, x1, y1 = box
    assert all(x0 <= x < x1 and y0 <= y < y1 for x, y in LANDMARKS)
    fx0, fy0, fx1, fy1 = FACE_BOX
    inter = max(0, min(x1, fx1) - max(x0, fx0)) * max(0, min(y1, fy1) - max(y0, fy0))
    assert inter / ((fx1 - fx0) * (fy1 - fy0)) >= 0.9  # covers the face
    assert (x1 - x0) * (y1 - y0) < 0.95 * 451 * 300  # and is not the whole photo
    js = json.loads((tmp_path / "boxes.json").read_text())
    assert js["images"][0]["boxes"][0]["box"] == box and js["threshold"] == 0.3
    # the drawn image: the green rectangle's left and right edges at x0 and x1 - 1
    px = np.asarray(Image.open(tmp_path / "chelsea_gradcam_boxes.png").convert("RGB"))
    assert px.shape == (300, 451, 3)
    mid = (y0 + y1) // 2
    assert tuple(px[mid, x0]) == (0, 255, 0) and tuple(px[mid, x1 - 1]) == (0, 255, 0)


def test_bad_inputs_reported_by_name_others_converted(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8), "L").save(d / "gray.png")
    Image.fromarray(rng.integers(0, 255, (40, 50, 4), dtype=np.uint8), "RGBA").save(d / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).convert("P").save(d / "palette.png")
    Image.fromarray(rng.integers(0, 65535, (32, 48), dtype=np.uint16)).save(d / "deep16.png")
    assert Image.open(d / "deep16.png").mode.startswith("I")
    (d / "notes.png").write_text("this is not an image")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.jpg")
    (d / "truncated.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:300])
    _bomb(d / "bomb.png")
    out = tmp_path / "out"
    r = run(
        "explain",
        d,
        tmp_path / "missing.jpg",
        tmp_path / "nothing*.png",
        *FAST,
        "--out",
        out,
        "--format",
        "json",
        "--method",
        "gradcam",
        "--topk",
        "1",
    )
    assert r.exit_code == 1
    err = r.stderr
    for name in ("notes.png", "truncated.jpg", "bomb.png", "missing.jpg", "nothing*.png"):
        assert name in err, name
    assert "decompression bomb" in err and "no image file matches" in err
    assert "4 of 7 image(s)" in r.stdout and "5 input(s) failed" in r.stdout
    for stem, hw in (("gray", [40, 50]), ("rgba", [40, 50]), ("palette", [30, 30]), ("deep16", [32, 48])):
        js = json.loads((out / f"{stem}_gradcam.json").read_text())
        assert js["image_size"] == hw
    assert not list(out.glob("notes*")) and not list(out.glob("bomb*"))


def test_empty_glob_and_missing_checkpoint(tmp_path):
    r = run("explain", tmp_path / "*.png", *FAST, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "no image file matches" in r.output and "no images to explain" in r.output
    assert not (tmp_path / "o").exists()
    r = run("localize", tmp_path / "nope", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "no such file or folder" in r.output
    r = run("explain", "--checkpoint", tmp_path / "no_ckpt", "--out", tmp_path / "o")
    assert r.exit_code != 0 and "no_ckpt" in r.output
    r = run("explain", "--method", "gradcamm", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "gradcam" in r.output  # a usage error that suggests the name


def test_expand_inputs_folders_globs_and_names(tmp_path):
    for sub in ("a", "b", "b/deep"):
        (tmp_path / sub).mkdir()
    for p in ("a/cat.png", "b/cat.png", "b/dog.jpg", "b/readme.txt", "b/deep/fox.png"):
        (tmp_path / p).write_bytes(b"x")
    inp = expand_inputs([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "a/cat.png")])
    assert [Path(s).name for s in inp.sources] == ["cat.png", "cat.png", "dog.jpg"]  # no txt, no dup
    assert inp.names == ["a_cat", "b_cat", "dog"] and not inp.problems
    rec = expand_inputs([str(tmp_path / "b")], recursive=True)
    assert [Path(s).name for s in rec.sources] == ["cat.png", "fox.png", "dog.jpg"]
    g = expand_inputs([str(tmp_path / "**" / "*.png")])
    assert sorted(Path(s).name for s in g.sources) == ["cat.png", "cat.png", "fox.png"]
    e = expand_inputs([str(tmp_path / "zz*.png"), str(tmp_path / "b/deep/../../none")])
    assert not e.sources and len(e.problems) == 2
    assert expand_inputs([]).sources == ["skimage:chelsea"] and expand_inputs([]).names == ["chelsea"]
    assert output_stems(["x/my photo.jpg", "y/my photo.jpg", "my photo.png"]) == [
        "x_my_photo",
        "y_my_photo",
        "my_photo",
    ]
    assert list(parse_classes(["Tiger cat", "3"], ["a", "b", "tiger cat", "d"])) == [2, 3]


@pytest.mark.slow
def test_localize_eval_calibrate_then_use_the_threshold(tmp_path):
    from camlens.data import synthetic

    ds = synthetic(tmp_path / "ds", 2, image_size=64, seed=3)
    with open(ds.csv, "a") as fh:
        fh.write("missing/gone.png,circle,1,1,10,10\n")
    out = tmp_path / "ev"
    r = run(
        "localize",
        "--gt",
        ds.csv,
        *FAST,
        "--out",
        out,
        "--calibrate",
        tmp_path / "thr.json",
        "--sweep-step",
        "0.1",
        "--tolerance",
        "0",
    )
    assert r.exit_code == 1, r.output  # the missing image is reported, the rest evaluated
    assert "gone.png" in r.stderr
    for text in ("MaxBoxAcc", "MaxBoxAccV2", "centre baseline", "pointing game", "GT-known", "8 images"):
        assert text in r.stdout, text
    m = json.loads((out / "localization_metrics.json").read_text())["methods"]["gradcam"]
    assert m["n"] == 8 and m["metrics"]["top1_loc"] is None  # ImageNet classes do not name the shapes
    assert 0 <= m["metrics"]["maxboxacc"] <= 1 and len(m["thresholds"]) == 10
    thr = load_threshold(tmp_path / "thr.json")
    assert thr == pytest.approx(m["best_threshold"])
    # the calibrated file is accepted as --threshold; the boxes CSV is a valid ground-truth file
    r2 = run(
        "localize",
        ds.root / "circle",
        *FAST,
        "--threshold",
        tmp_path / "thr.json",
        "--out",
        tmp_path / "lb",
        "--format",
        "csv,json",
        "--mode",
        "all",
    )
    assert r2.exit_code == 0, r2.output
    assert json.loads((tmp_path / "lb" / "boxes.json").read_text())["threshold"] == pytest.approx(thr)
    gt = read_boxes(tmp_path / "lb" / "boxes.csv")
    assert len(gt) == 2 and all(len(g.objects) >= 1 for g in gt)
    assert run("localize", "--gt", ds.csv, "x.png").exit_code == 2
    old = run("localize", "--eval", ds.csv, "x.png")  # the 0.2 name: a note, then the same rules
    assert old.exit_code == 2 and "--eval is now --gt" in old.output and "--gt BOXES" in old.output
    assert run("localize", "--threshold", "1.5").exit_code == 2


def test_info_commands():
    r = run("methods")
    assert r.exit_code == 0 and "Selvaraju" in r.output and "gradcam" in r.output and "Zhou" in r.output
    r = run("models", "efficientnet")
    assert r.exit_code == 0 and "efficientnet_lite0" in r.output and "bundled" in r.output
    assert run("models", "no-such-model").exit_code == 1
    r = run("layers", "resnet18")
    assert r.exit_code == 0
    rows = {ln.split()[0]: ln.split()[-1] for ln in r.output.splitlines() if ln.startswith("layer")}
    assert rows["layer1"] == "64x56x56" and rows["layer4"] == "512x7x7"  # resnet18 at 224 px
    assert "default layer: input of global pooling (avgpool)" in r.output
