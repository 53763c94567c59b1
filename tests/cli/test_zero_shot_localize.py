"""`camlens localize --gt BOXES` on a zero-shot classifier (a tiny random CLIP with the boxes
file's classes as its names): it runs, evaluates every image, and reports what
:func:`camlens.metrics.loceval.evaluate_model` gives for the same model and boxes."""

from __future__ import annotations

import json

import pytest

from camlens.data.synthetic import DEFAULT_CLASSES
from camlens.metrics.loceval import evaluate_model, read_boxes
from camlens.models.imagetext import ImageText, zero_shot
from tests.targets.test_text import tiny_clip, tiny_tokenizer

pytest.importorskip("transformers")


def test_localize_gt_runs_on_zero_shot_clip(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import camlens.cli.localize as L
    from camlens.cli import main
    from camlens.data import synthetic

    ds = synthetic(tmp_path / "ds", 2, image_size=32, seed=3)  # 8 images, 4 classes
    gt = read_boxes(ds.csv)
    clf = zero_shot(ImageText(tiny_clip(), tiny_tokenizer()), list(DEFAULT_CLASSES))
    monkeypatch.setattr(L, "load_model_seeded", lambda *a, **k: clf)
    args = ["localize", "--gt", str(ds.csv), "--model", "x", "--batch-size", "3", "--workers", "0"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "ev")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    cli = json.loads((tmp_path / "ev" / "localization_metrics.json").read_text())["methods"]["gradcam"]
    ref = evaluate_model(clf, gt, batch_size=3).to_dict()
    assert cli["n"] == ref["n"] == len(gt) == 8
    assert cli["metrics"]["top1_loc"] is not None  # every GT class is one of the zero-shot names
    assert cli["metrics"] == pytest.approx(ref["metrics"], abs=1e-6)
