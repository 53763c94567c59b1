"""3-D localization evaluation (camlens.metrics.loceval3d): 3-D IoU and MaxBoxAcc(V2) against hand
computations, the threshold sweep's boxes against a ``scipy.ndimage.label`` reference on synthetic
blobs (touching the border, several components), the pointing and energy games in voxels, the
readers of 3-D boxes (CSV, JSON) and masks (.npy, NIfTI)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from camlens.base.errors import InputError
from camlens.metrics.loceval import GroundTruthError, sweep_components
from camlens.metrics.loceval3d import (
    GTVolume,
    VolumeEvalConfig,
    centre_volume,
    evaluate_volume_model,
    evaluate_volumes,
    mask_boxes,
    read_volume_boxes,
    read_volume_mask,
)
from tests.base.test_localize_3d import blobs, reference_box

SHAPE = (12, 12, 12)


def cube(m: np.ndarray, box, value: float) -> None:
    """Set the voxels of box ``(x0, y0, z0, x1, y1, z1)`` to ``value``."""
    x0, y0, z0, x1, y1, z1 = box
    m[z0:z1, y0:y1, x0:x1] = value


def test_3d_iou_equals_a_hand_computation():
    m = np.zeros(SHAPE)
    cube(m, (1, 2, 0, 5, 6, 3), 1.0)  # 4 x 4 x 3 = 48 voxels
    gt = np.array([[2, 2, 1, 6, 6, 4]])  # 48 voxels; overlap x 2..4, y 2..5, z 1..2: 3*4*2 = 24
    far = np.array([[8, 8, 8, 12, 12, 12]])
    rep = evaluate_volumes(m[None], [np.concatenate([far, gt])], thresholds=(0.5,))
    assert rep.metrics["mean_iou"] == pytest.approx(24 / (48 + 48 - 24))
    assert rep.metrics["gt_known_loc"] == 0.0
    assert rep.per_image_iou.tolist() == pytest.approx([1 / 3])
    same = evaluate_volumes(torch.from_numpy(m)[None], [np.array([1, 2, 0, 5, 6, 3])], thresholds=(0.5,))
    assert same.metrics["mean_iou"] == 1.0 and same.metrics["gt_known_loc"] == 1.0


def maxboxacc_set():
    """Three volumes whose boxes at τ = 0.1, 0.5, 0.8 are known by construction (see the test)."""
    a, b, c = np.zeros(SHAPE), np.zeros(SHAPE), np.zeros(SHAPE)
    cube(a, (0, 0, 0, 4, 4, 4), 0.3)  # a 4^3 shell at 0.3 ...
    cube(a, (1, 1, 1, 3, 3, 3), 1.0)  # ... around the 2^3 object at 1.0
    gt_a = [1, 1, 1, 3, 3, 3]
    cube(b, (4, 4, 4, 8, 8, 8), 0.6)  # the 4^3 object at 0.6 ...
    cube(b, (5, 5, 5, 7, 7, 7), 1.0)  # ... with a 2^3 core at 1.0
    gt_b = [4, 4, 4, 8, 8, 8]
    cube(c, (0, 0, 0, 4, 4, 4), 1.0)  # a large wrong blob (64 voxels) ...
    cube(c, (8, 8, 8, 10, 10, 11), 0.9)  # ... and a small blob (12 voxels) inside the object's box (20)
    gt_c = [8, 8, 6, 10, 10, 11]
    return np.stack([a, b, c]), [np.array(gt_a), np.array(gt_b), np.array(gt_c)]


def test_maxboxacc_and_v2_equal_a_hand_computation():
    maps, gts = maxboxacc_set()
    rep = evaluate_volumes(maps, gts, thresholds=(0.1, 0.5, 0.8))
    # IoU of the largest component's box (V1) per tau = 0.1, 0.5, 0.8:
    #   a: 8/64, 1, 1     b: 1, 1, 8/64     c: 0, 0, 0 (the wrong blob is the largest)
    # BoxAcc(tau, 0.5) = 1/3, 2/3, 1/3  ->  MaxBoxAcc = 2/3 at tau = 0.5
    assert rep.metrics["maxboxacc"] == pytest.approx(2 / 3)
    assert rep.best_threshold == 0.5
    assert rep.curve_v1[:, 1].tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 3])
    # V2, the best box of any component: c's small blob proposes IoU 12/20 = 0.6 at every tau:
    #   delta 0.3 and 0.5: max over tau of (1/3 + 1/3 + 1/3 at tau 0.5) = 1
    #   delta 0.7: tau 0.1: b only = 1/3; 0.5: a, b = 2/3; 0.8: a only = 1/3  ->  2/3
    assert rep.metrics["maxboxacc_v2"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert rep.curve[:, 2].tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 3])
    # the fixed threshold 0.3 is not in the sweep: a's box is the object (0.3 is not > 0.3), b's too
    assert rep.per_image_iou.tolist() == pytest.approx([1.0, 1.0, 0.0])


@pytest.mark.parametrize("seed", range(6))
def test_sweep_boxes_equal_a_scipy_label_reference(seed):
    m = blobs(seed)
    taus = np.array([0.0, 0.2, 0.45, 0.7, 0.9])
    boxes, tidx, largest = sweep_components(m, taus)
    assert boxes.shape[1] == 6
    for k, t in enumerate(taus):
        assert [tuple(b) for b in boxes[(tidx == k) & largest]] == [reference_box(m, t)]
        labels, n = ndimage.label(m > t * m.max(), structure=np.ones((3, 3, 3)))
        want = set()
        for i in range(1, n + 1):
            z, y, x = np.nonzero(labels == i)
            want.add((x.min(), y.min(), z.min(), x.max() + 1, y.max() + 1, z.max() + 1))
        assert {tuple(b) for b in boxes[tidx == k]} == want


def test_pointing_energy_and_the_centre_baseline_in_voxels():
    maps = np.zeros((3, *SHAPE))
    maps[0, 11, 5, 5] = 1.0  # 4 voxels beyond the object in z
    maps[1, 11, 5, 5] = maps[1, 6, 6, 6] = 1.0  # tied maxima, one on the object: a hit
    maps[2] = 0.25  # constant: points nowhere, its energy is the object's volume fraction
    box = np.array([4, 4, 4, 8, 8, 8])
    gts = [box, box, box]
    assert evaluate_volumes(maps, gts).metrics["pointing_game"] == pytest.approx(1 / 3)  # default tolerance 0
    assert evaluate_volumes(maps, gts, tolerance=4).metrics["pointing_game"] == pytest.approx(1 / 3)  # strict
    rep = evaluate_volumes(maps, gts, tolerance=4.01)
    assert rep.metrics["pointing_game"] == pytest.approx(2 / 3)
    assert rep.metrics["energy_pointing"] == pytest.approx((0 + 1 / 2 + 64 / 12**3) / 3)
    # the centre of a 12^3 volume lies in the object: the baseline always hits
    assert rep.baseline["pointing_game"] == 1.0
    assert mask_boxes(centre_volume(SHAPE) > 0.3).tolist() == [[3, 3, 3, 9, 9, 9]]  # half of each side
    assert "volumes" in rep.table() and "tol. 4.01 voxels" in rep.table() and "energy pointing" in rep.table()
    assert rep.to_dict()["spatial_dims"] == 3


def test_masks_as_ground_truth():
    m = np.zeros(SHAPE)
    cube(m, (2, 2, 2, 5, 5, 5), 1.0)
    mask = np.zeros(SHAPE, bool)
    cube(mask, (2, 2, 2, 5, 5, 5), True)
    cube(mask, (9, 9, 9, 12, 12, 10), True)  # a second component touching the border
    assert mask_boxes(mask).tolist() == [[2, 2, 2, 5, 5, 5], [9, 9, 9, 12, 12, 10]]
    rep = evaluate_volumes(m[None], [mask])
    assert rep.metrics["mean_iou"] == 1.0 and rep.metrics["pointing_game"] == 1.0
    assert rep.metrics["energy_pointing"] == 1.0
    gtv = GTVolume(path=None, mask=mask)  # type: ignore[arg-type]
    assert evaluate_volumes(m[None], [gtv]).to_dict()["metrics"] == rep.to_dict()["metrics"]
    with pytest.raises(InputError, match="grid"):
        evaluate_volumes(m[None, :6], [mask])
    with pytest.raises(InputError, match="empty ground truth"):
        evaluate_volumes(m[None], [np.zeros(SHAPE, bool)])
    with pytest.raises(InputError, match=r"\(N, D, H, W\)"):
        evaluate_volumes(m, [mask])


def test_readers_of_3d_boxes_and_masks(tmp_path):
    (tmp_path / "gt.csv").write_text(
        "path,class,x0,y0,z0,x1,y1,z1\na.nii.gz,tumour,1,2,3,4,5,6\na.nii.gz,cyst,0,0,0,2,2,2\nb.nii.gz,,3,3,3,9,9,9\n"
    )
    gts = read_volume_boxes(tmp_path / "gt.csv")
    assert [g.path.name for g in gts] == ["a.nii.gz", "b.nii.gz"]
    assert gts[0].path.parent == tmp_path
    assert gts[0].boxes().tolist() == [[1, 2, 3, 4, 5, 6], [0, 0, 0, 2, 2, 2]]
    assert gts[0].boxes("cyst").tolist() == [[0, 0, 0, 2, 2, 2]]
    rows = [{"path": "a.nii.gz", "class": "tumour", "box": [1, 2, 3, 4, 5, 6]}]
    (tmp_path / "gt.json").write_text(json.dumps(rows))
    assert read_volume_boxes(tmp_path / "gt.json")[0].objects[0][0] == "tumour"
    (tmp_path / "keyed.json").write_text(json.dumps({"a.nii.gz": [[1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 1, 1]]}))
    assert read_volume_boxes(tmp_path / "keyed.json")[0].boxes().shape == (2, 6)
    (tmp_path / "bad.csv").write_text("path,x0,y0,x1,y1\na.png,1,2,3,4\n")
    with pytest.raises(GroundTruthError, match="z0"):
        read_volume_boxes(tmp_path / "bad.csv")
    (tmp_path / "empty.csv").write_text("path,x0,y0,z0,x1,y1,z1\na,4,4,4,4,5,5\n")
    with pytest.raises(GroundTruthError, match="x1 > x0"):
        read_volume_boxes(tmp_path / "empty.csv")
    mask = np.zeros((4, 5, 6), np.uint8)
    mask[1:3, 2:4, 0:5] = 1
    np.save(tmp_path / "m.npy", mask)
    assert np.array_equal(read_volume_mask(tmp_path / "m.npy"), mask != 0)
    nib = pytest.importorskip("nibabel")
    nib.save(
        nib.Nifti1Image(mask.transpose(2, 1, 0).astype(np.float32), np.diag([2.0, 1.0, 3.0, 1.0])),
        tmp_path / "m.nii.gz",
    )
    assert np.array_equal(read_volume_mask(tmp_path / "m.nii.gz"), mask != 0)  # file (i, j, k) -> (D, H, W)
    np.save(tmp_path / "flat.npy", mask[0])
    with pytest.raises(GroundTruthError, match="3-D"):
        read_volume_mask(tmp_path / "flat.npy")


def identity_cam_net() -> torch.nn.Module:
    """conv 1x1x1 (weight 1) -> ReLU -> GAP -> linear (1, -1): class 0's Grad-CAM is the scan itself
    (scaled), so the map's boxes are the scan's bright regions."""
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 1, 1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool3d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(1, 2),
    )
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()
        net[4].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net[4].bias.zero_()
    return net.eval()


def test_evaluate_a_model_on_nifti_scans_with_their_file_axes(tmp_path):
    nib = pytest.importorskip("nibabel")
    hit = np.zeros((8, 7, 9), np.float32)  # file axes (i, j, k) = (x, y, z)
    hit[2:5, 1:4, 3:7] = 1.0
    miss = np.zeros((8, 7, 9), np.float32)
    miss[5:8, 4:7, 0:2] = 1.0
    for name, data in (("hit.nii.gz", hit), ("miss.nii.gz", miss)):
        nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0])), tmp_path / name)
    (tmp_path / "gt.csv").write_text(
        "path,class,x0,y0,z0,x1,y1,z1\nhit.nii.gz,lesion,2,1,3,5,4,7\nmiss.nii.gz,lesion,2,1,3,5,4,7\n"
    )
    gts = read_volume_boxes(tmp_path / "gt.csv")
    rep = evaluate_volume_model(
        identity_cam_net(), gts, VolumeEvalConfig(thresholds=(0.5,)), class_names=["lesion", "none"]
    )
    assert rep.per_image_iou.tolist() == [1.0, 0.0]
    assert rep.metrics["pointing_game"] == 0.5 and rep.metrics["top1_loc"] == 0.5
    assert rep.metrics["energy_pointing"] == pytest.approx(0.5) and rep.metrics["maxboxacc"] == 0.5
    # the same scan with a mask ground truth in (D, H, W) = file (k, j, i) order
    np.save(tmp_path / "mask.npy", hit.transpose(2, 1, 0) > 0)
    masked = GTVolume(tmp_path / "hit.nii.gz", mask=read_volume_mask(tmp_path / "mask.npy"))
    rep = evaluate_volume_model(identity_cam_net(), [masked], VolumeEvalConfig(method="cam", thresholds=(0.5,)))
    assert rep.metrics["mean_iou"] == 1.0 and rep.metrics["pointing_game"] == 1.0
    assert np.isnan(rep.metrics["top1_loc"])  # no class given: explained for the top-1 class
