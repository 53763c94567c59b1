import json

import numpy as np
import pytest
from PIL import Image

from camlens.base.errors import InputError, OutputExistsError
from camlens.base.localization import localize
from camlens.metrics.loceval import (
    SWEEP,
    GroundTruthError,
    calibrate_threshold,
    centre_map,
    evaluate_maps,
    load_threshold,
    pointing_hit,
    read_boxes,
    save_threshold,
    sweep_components,
)


# ---------------------------------------------------------------- reading ground truth
def test_read_csv_groups_rows_per_image(tmp_path):
    (tmp_path / "boxes.csv").write_text(
        "path,class,x0,y0,x1,y1\na/img1.png,cat,1,2,10,20\na/img1.png,dog,5,5,7,9\nimg2.png,cat,0,0,4,4\n"
    )
    gt = read_boxes(tmp_path / "boxes.csv")
    assert [g.path for g in gt] == [tmp_path / "a/img1.png", tmp_path / "img2.png"]
    assert gt[0].boxes().tolist() == [[1, 2, 10, 20], [5, 5, 7, 9]]
    assert gt[0].boxes("dog").tolist() == [[5, 5, 7, 9]]
    assert gt[0].classes == ["cat", "dog"] and gt[0].main_class == "cat"  # largest box
    assert read_boxes(tmp_path / "boxes.csv", root="/data")[1].path.as_posix() == "/data/img2.png"


def test_read_csv_errors(tmp_path):
    p = tmp_path / "b.csv"
    p.write_text("file,x,y\nfoo,1,2\n")
    with pytest.raises(GroundTruthError, match="path,class,x0,y0,x1,y1"):
        read_boxes(p)
    p.write_text("path,class,x0,y0,x1,y1\nfoo,c,5,5,5,9\n")
    with pytest.raises(GroundTruthError, match="line 2: empty box"):
        read_boxes(p)
    with pytest.raises(GroundTruthError, match="not found"):
        read_boxes(tmp_path / "nope.csv")
    (tmp_path / "b.txt").write_text("x")
    with pytest.raises(GroundTruthError, match="unknown boxes format"):
        read_boxes(tmp_path / "b.txt")


VOC = """<annotation><folder>VOC</folder><filename>{name}</filename>
<size><width>500</width><height>375</height><depth>3</depth></size>
<object><name>cat</name><bndbox><xmin>11</xmin><ymin>21</ymin><xmax>100</xmax><ymax>200</ymax></bndbox></object>
<object><name>person</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>50</xmax><ymax>60</ymax></bndbox></object>
</annotation>"""


def test_read_voc_folder_one_based_inclusive(tmp_path):
    ann = tmp_path / "VOC" / "Annotations"
    ann.mkdir(parents=True)
    (tmp_path / "VOC" / "JPEGImages").mkdir()
    (tmp_path / "VOC" / "JPEGImages" / "x.jpg").write_bytes(b"")
    (ann / "x.xml").write_text(VOC.format(name="x.jpg"))
    (ann / "y.xml").write_text(VOC.format(name="y.jpg"))
    gt = read_boxes(tmp_path / "VOC")  # finds Annotations/
    assert len(gt) == 2
    # xmin=11 (1-based, inclusive) -> x0=10; xmax=100 inclusive -> x1=100 exclusive
    assert gt[0].boxes("cat").tolist() == [[10, 20, 100, 200]]
    assert gt[0].boxes("person").tolist() == [[0, 0, 50, 60]]
    assert gt[0].size == (375, 500)
    assert gt[0].path == tmp_path / "VOC" / "JPEGImages" / "x.jpg"  # resolved to the images folder
    assert read_boxes(ann / "y.xml")[0].path == ann / "y.jpg"
    (ann / "bad.xml").write_text("<annotation><filename>")
    with pytest.raises(GroundTruthError, match="not valid Pascal VOC"):
        read_boxes(ann / "bad.xml")


def test_read_coco(tmp_path):
    coco = {
        "images": [
            {"id": 7, "file_name": "im/a.jpg", "width": 64, "height": 48},
            {"id": 8, "file_name": "im/empty.jpg", "width": 64, "height": 48},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10.2, 5.0, 20.5, 10.0], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [0, 0, 64, 48], "iscrowd": 1},
        ],
        "categories": [{"id": 3, "name": "cup"}],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    gt = read_boxes(tmp_path / "c.json")
    assert len(gt) == 1  # images without (non-crowd) annotations are left out
    assert gt[0].path == tmp_path / "im/a.jpg" and gt[0].size == (48, 64)
    # floor(10.2)=10, ceil(10.2+20.5)=31
    assert gt[0].objects[0][0] == "cup" and gt[0].boxes().tolist() == [[10, 5, 31, 15]]
    (tmp_path / "d.json").write_text('{"x": 1}')
    with pytest.raises(GroundTruthError, match="COCO"):
        read_boxes(tmp_path / "d.json")


# ---------------------------------------------------------------- metrics on hand-built maps
def _box_map(size, box, value=1.0):
    m = np.zeros(size)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = value
    return m


def test_perfect_and_half_maps():
    gt = np.array([[10, 10, 30, 30]])
    perfect = _box_map((50, 50), gt[0])
    half = _box_map((50, 50), (10, 10, 20, 30))  # IoU 0.5 exactly
    quarter = _box_map((50, 50), (10, 10, 20, 20))  # IoU 0.25
    r = evaluate_maps([perfect, half, quarter], [gt, gt, gt], correct=[True, False, True], tolerance=0)
    assert r.per_image_iou.tolist() == pytest.approx([1.0, 0.5, 0.25])
    assert r.metrics["gt_known_loc"] == pytest.approx(2 / 3)
    assert r.metrics["top1_loc"] == pytest.approx(1 / 3)  # the half map's class was wrong
    assert r.metrics["mean_iou"] == pytest.approx(1.75 / 3)
    assert r.metrics["pointing_game"] == 1.0  # every peak lies in the box
    assert r.metrics["maxboxacc"] == pytest.approx(2 / 3)
    # V2: IoU>=0.3 -> 2/3, >=0.5 -> 2/3, >=0.7 -> 1/3
    assert r.metrics["maxboxacc_v2"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3)
    assert "centre baseline" in r.table() and "MaxBoxAccV2" in r.table()
    d = r.to_dict()
    assert d["metrics"]["gt_known_loc"] == pytest.approx(2 / 3) and len(d["thresholds"]) == len(SWEEP)


def test_maxboxacc_finds_the_right_threshold():
    # object at 1.0 inside a halo of 0.4: any cut below 0.4 of the max boxes the halo
    gt = np.array([[20, 20, 30, 30]])
    m = _box_map((60, 60), (5, 5, 55, 55), 0.4)
    m[20:30, 20:30] = 1.0
    r = evaluate_maps([m], [gt])
    assert r.metrics["gt_known_loc"] == 0.0  # default threshold 0.2 keeps the halo
    assert r.metrics["maxboxacc"] == 1.0
    assert r.best_threshold == pytest.approx(0.4)  # strict >: at 0.4 * max the halo drops out
    assert calibrate_threshold([m], [gt]) == pytest.approx(0.4)
    curve = r.curve_v1[:, 1]
    assert (curve[SWEEP < 0.4] == 0).all() and (curve[SWEEP >= 0.4] == 1).all()


def test_v2_counts_every_component_v1_only_the_largest():
    gt = np.array([[40, 40, 48, 48]])
    m = _box_map((64, 64), (0, 0, 20, 20), 1.0)  # big wrong blob
    m[40:48, 40:48] = 1.0  # small right blob
    r = evaluate_maps([m], [gt])
    assert r.metrics["maxboxacc"] == 0.0 and r.metrics["gt_known_loc"] == 0.0
    assert r.metrics["maxboxacc_v2"] == 1.0


def test_sweep_matches_localize_at_every_threshold():
    rng = np.random.default_rng(0)
    import torch
    import torch.nn.functional as F

    for seed in range(3):
        m = (
            F.interpolate(
                torch.rand(1, 1, 5, 5, generator=torch.Generator().manual_seed(seed)), size=(40, 30), mode="bilinear"
            )[0, 0]
            .double()
            .numpy()
        )
        m = m - 0.3 * rng.random()  # some negative values
        ts = SWEEP[::7]
        boxes, tidx, largest = sweep_components(m, ts)
        for j, t in enumerate(ts):
            want = localize(m, t, mode="all")
            got = boxes[tidx == j]
            assert sorted(got.tolist()) == sorted(r for r in want.tolist() if r != [-1] * 4)
            lg = boxes[(tidx == j) & largest]
            assert lg.tolist() == ([localize(m, t).tolist()] if want[0, 0] >= 0 else [])


def test_empty_maps_and_scaling_to_the_image():
    gt = [np.array([[10, 4, 30, 12]]), np.array([[0, 0, 5, 5]])]
    m = _box_map((10, 10), (5, 2, 10, 6))  # x2 horizontally, x2 vertically -> (10,4,20,12)
    r = evaluate_maps([m, np.zeros((10, 10))], gt, image_sizes=[(20, 20), (20, 20)])
    assert r.per_image_iou.tolist() == pytest.approx([80 / 160, 0.0])
    r2 = evaluate_maps([_box_map((10, 10), (5, 2, 10, 6))], [np.array([[20, 4, 40, 12]])], image_sizes=[(20, 40)])
    assert r2.per_image_iou.tolist() == [1.0]


def test_pointing_game_tolerance():
    box = np.array([[10, 10, 20, 20]])
    assert pointing_hit((15, 15), box, 0)
    # pixel column 30 vs the box's last column 19: 11 px, a hit only strictly below the tolerance
    assert not pointing_hit((30, 15), box, 11) and pointing_hit((30, 15), box, 11.5)
    # pixel (23, 24) vs the corner pixel (19, 19): 4 and 5 px, sqrt(41) = 6.4 px
    assert pointing_hit((23, 24), box, 6.5) and not pointing_hit((23, 24), box, 6.4)
    m = np.zeros((40, 40))
    m[15, 32] = 1.0  # peak centre (32.5, 15.5): 12.5 px right of the box
    assert evaluate_maps([m], [box], tolerance=15).metrics["pointing_game"] == 1.0
    assert evaluate_maps([m], [box], tolerance=10).metrics["pointing_game"] == 0.0


def test_centre_baseline_is_centre_box_at_default_threshold():
    c = centre_map((60, 80))
    assert localize(c).tolist() == [20, 15, 60, 45]  # the central half of each side
    gt = [np.array([[20, 15, 60, 45]]), np.array([[0, 0, 10, 10]])]
    r = evaluate_maps([np.ones((60, 80)), np.ones((60, 80))], gt, correct=[True, True], tolerance=0)
    assert r.baseline["gt_known_loc"] == 0.5 and r.baseline["top1_loc"] == 0.5
    assert r.baseline["pointing_game"] == 0.5  # the centre is in the first box only
    assert r.baseline["maxboxacc"] == 0.5


def test_threshold_save_load(tmp_path):
    p = save_threshold(tmp_path / "cal" / "thr.json", 0.35, method="gradcam", metrics={"maxboxacc": 0.9})
    assert json.loads(p.read_text())["method"] == "gradcam"
    assert load_threshold(p) == 0.35 and load_threshold("0.25") == 0.25 and load_threshold(0.1) == 0.1
    with pytest.raises(OutputExistsError, match="overwrite"):
        save_threshold(p, 0.5)
    save_threshold(p, 0.5, overwrite=True)
    assert load_threshold(str(p)) == 0.5
    with pytest.raises(InputError):
        load_threshold("1.5")
    with pytest.raises(InputError, match="neither a number"):
        load_threshold(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(InputError, match="threshold"):
        load_threshold(tmp_path / "x.json")


def test_bad_arguments():
    with pytest.raises(InputError):
        evaluate_maps(np.zeros((2, 5, 5)), [np.zeros((1, 4))])
    with pytest.raises(InputError):
        evaluate_maps(np.zeros((5, 5)), [np.zeros((1, 4))])
    with pytest.raises(InputError):
        evaluate_maps([], [])


# ---------------------------------------------------------------- a purpose-trained CNN
@pytest.fixture
def one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threads only add overhead on a shared machine
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _train_tiny_cnn(arr, pp, epochs=10, seed=1):
    import torch
    from torch import nn

    torch.manual_seed(seed)

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

    net = nn.Sequential(
        block(3, 8),
        nn.MaxPool2d(2),
        block(8, 16),
        nn.MaxPool2d(2),
        block(16, 32),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, len(arr.classes)),
    )
    x, y = pp(list(arr.images)), torch.from_numpy(arr.labels)
    opt = torch.optim.Adam(net.parameters(), 5e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 32):
            idx = perm[i : i + 32]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@pytest.mark.slow
def test_cam_and_gradcam_localize_synthetic_objects_better_than_the_centre(tmp_path, one_thread):
    """A GAP + linear CNN trained on shape classes (48 px, ~10 s on one core) localizes the shapes
    with CAM and Grad-CAM far better than the centre baseline."""
    import torch

    import camlens
    from camlens.data import synthetic, synthetic_arrays
    from camlens.models.preprocess import Preprocess
    from camlens.models.zoo import ModelCard, attach_card

    pp = Preprocess(size=(48, 48), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), name="tiny")
    train = synthetic_arrays(768, image_size=48, seed=1)
    test = synthetic_arrays(128, image_size=48, seed=2)
    net = _train_tiny_cnn(train, pp)
    xt = pp(list(test.images))
    with torch.no_grad():
        pred = net(xt).argmax(1).numpy()
    accuracy = float((pred == test.labels).mean())
    assert accuracy >= 0.6, accuracy
    gt = [b[None] for b in test.boxes]
    reports = {}
    for method in ("cam", "gradcam"):
        exp = camlens.explain(net, xt, method=method, targets=test.labels.tolist())
        rep = evaluate_maps(exp.maps[:, 0], gt, correct=pred == test.labels, tolerance=0, name=method)
        reports[method] = rep
        print(f"\naccuracy {accuracy:.1%}\n{rep.table()}")
        m, b = rep.metrics, rep.baseline
        assert m["maxboxacc"] >= b["maxboxacc"] + 0.3
        assert m["gt_known_loc"] >= b["gt_known_loc"] + 0.15  # IoU >= 0.5 at the default threshold
        assert m["pointing_game"] >= b["pointing_game"] + 0.4
        assert m["maxboxacc_v2"] >= b["maxboxacc_v2"] + 0.2
        assert m["mean_iou"] > b["mean_iou"]
        assert m["top1_loc"] <= m["gt_known_loc"]
    # for a GAP + linear head Grad-CAM is CAM (up to ReLU and a positive scale): same boxes
    assert reports["cam"].metrics["maxboxacc"] == pytest.approx(reports["gradcam"].metrics["maxboxacc"], abs=0.03)

    # end to end from files: the written dataset, its boxes.csv, class names matched to the model's
    attach_card(net, ModelCard("tiny", pp, list(train.classes)))
    ds = synthetic(tmp_path / "val", 4, image_size=48, seed=5)
    files = read_boxes(ds.csv)
    rep = camlens.metrics.loceval.evaluate_model(net, files, method="cam", tolerance=0, batch_size=7)
    imgs = [np.array(Image.open(p)) for p in ds.paths]
    ids = [train.classes.index(ds.classes[lab]) for lab in ds.labels]
    exp = camlens.explain(net, imgs, method="cam", targets=ids)
    with torch.no_grad():
        top1 = net(pp(imgs)).argmax(1).numpy()
    direct = evaluate_maps(exp.maps[:, 0], [b[None] for b in ds.boxes], correct=top1 == np.array(ids), tolerance=0)
    assert rep.n == 16
    for k in direct.metrics:
        assert rep.metrics[k] == pytest.approx(direct.metrics[k]), k


def _shape_model():
    """A tiny CNN that knows the synthetic shapes' class names (so every GT class is known)."""
    import torch

    from camlens.data.synthetic import DEFAULT_CLASSES
    from camlens.models.card import ModelCard, attach_card
    from camlens.models.preprocess import Preprocess
    from tests.conftest import TinyCNN

    torch.manual_seed(0)
    net = TinyCNN(classes=4).eval()
    card = ModelCard("shapes", preprocess=Preprocess(size=(48, 48)), class_names=list(DEFAULT_CLASSES))
    return attach_card(net, card)


def _two_pass_reference(net, gt, batch_size):
    """The 0.1 algorithm, written here: predict() for the top-1 class, then explain() the GT class."""
    import camlens
    from camlens.base.io import load_image
    from camlens.metrics.loceval import evaluate_maps

    names = net.camlens.class_names
    maps, gts, sizes, correct = [], [], [], []
    for s in range(0, len(gt), batch_size):
        chunk = gt[s : s + batch_size]
        imgs = [load_image(g.path) for g in chunk]
        top1 = [p[0][0] for p in camlens.predict(net, imgs, topk=1)]
        cids = [names.index(g.main_class) for g in chunk]
        exp = camlens.explain(net, imgs, "gradcam", targets=cids, layer="act2")
        for j, g in enumerate(chunk):
            maps.append(exp.map(j, 0).numpy())
            gts.append(g.boxes(g.main_class))
            sizes.append(imgs[j].shape[:2])
        correct += [float(c == t) for c, t in zip(cids, top1)]
    return evaluate_maps(maps, gts, image_sizes=sizes, correct=correct, name="gradcam")


def test_localization_eval_needs_one_forward_per_batch(tmp_path, monkeypatch):
    """evaluate_model and `camlens localize --gt` take top-1 correctness from the explaining
    forward's logits when every GT class is known: one model forward per batch (was two), and
    the same report as the two-pass reference."""
    from click.testing import CliRunner

    from camlens.cli import main
    from camlens.data import synthetic
    from camlens.metrics.loceval import evaluate_model

    ds = synthetic(tmp_path / "ds", 3, image_size=48, seed=5)  # 12 images, 4 classes
    gt = read_boxes(ds.csv)
    net = _shape_model()
    ref = _two_pass_reference(net, gt, 5).to_dict()
    calls: list[int] = []
    hook = net.register_forward_hook(lambda m, i, o: calls.append(int(i[0].shape[0])))
    try:
        rep = evaluate_model(net, gt, batch_size=5, layer="act2").to_dict()
        assert calls == [5, 5, 2]
        calls.clear()
        import camlens.cli.localize as L

        monkeypatch.setattr(L, "load_model_seeded", lambda *a, **k: net)
        args = ["localize", "--gt", str(ds.csv), "--model", "x", "--layer", "act2", "--batch-size", "5"]
        r = CliRunner().invoke(main, [*args, "--workers", "0", "--out", str(tmp_path / "ev")], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        assert sorted(calls) == [2, 5, 5]
    finally:
        hook.remove()
    cli = json.loads((tmp_path / "ev" / "localization_metrics.json").read_text())["methods"]["gradcam"]
    assert ref["metrics"]["top1_loc"] is not None  # the known-class path was taken
    for got in (rep, cli):
        assert got["n"] == ref["n"] == 12
        assert got["metrics"] == pytest.approx(ref["metrics"], abs=1e-9)
