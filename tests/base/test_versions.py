"""One ``versions()`` (camlens._version) for every record: model cards, store runs, figures' JSON."""

from __future__ import annotations

import ast
import platform
from pathlib import Path

import numpy as np
import torch
import torchvision

from camlens._version import __version__, versions

ROOT = Path(__file__).resolve().parents[2] / "camlens"


def test_versions_names_the_numeric_stack():
    v = versions()
    assert v["camlens"] == __version__ and v["python"] == platform.python_version()
    assert (v["torch"], v["torchvision"], v["numpy"]) == (torch.__version__, torchvision.__version__, np.__version__)


def test_no_second_versions_function():
    defs = [
        f"{p.relative_to(ROOT)}:{n.name}"
        for p in ROOT.rglob("*.py")
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
        if isinstance(n, ast.FunctionDef) and n.name.lstrip("_") == "versions"
    ]
    assert defs == ["_version.py:versions"]


def test_saved_json_and_card_record_the_same_versions(tiny, tmp_path):
    import json

    import camlens
    from camlens.models.weights import prepare_checkpoint

    exp = camlens.explain(tiny, torch.rand(1, 3, 12, 12, dtype=torch.float64), "gradcam")
    exp.save(tmp_path / "out", formats="json")
    (summary,) = (tmp_path / "out").glob("*.json")
    assert json.loads(summary.read_text())["versions"] == versions()
    prepared = prepare_checkpoint(tiny, tmp_path / "ckpt", {"architecture": "tiny"})
    assert prepared.card["versions"] == versions()
