"""Target specs resolve to the right (N, K) class table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from camlens.errors import TargetError
from camlens.targets import resolve_targets

LOGITS = torch.tensor([[0.1, 3.0, 2.0, -1.0], [5.0, 1.0, 4.0, 0.0]])
NAMES = ["tench", "goldfish", "great white shark", "tiger shark"]


@pytest.mark.parametrize(
    "spec, expected",
    [
        (None, [[1], [0]]),
        ("top1", [[1], [0]]),
        ("top3", [[1, 2, 0], [0, 2, 1]]),
        ("TOP-2", [[1, 2], [0, 2]]),
        (2, [[2], [2]]),
        (np.int64(3), [[3], [3]]),
        ([3, 0], [[3], [0]]),
        (torch.tensor([3, 0]), [[3], [0]]),
        ([[1, 2], [3, 0]], [[1, 2], [3, 0]]),
        (np.array([[1, 2], [3, 0]]), [[1, 2], [3, 0]]),
        ("Goldfish", [[1], [1]]),
        (["goldfish", "tench"], [[1], [0]]),
        ([["goldfish", "tench"], ["tiger shark", "tench"]], [[1, 0], [3, 0]]),
    ],
)
def test_specs(spec, expected):
    assert resolve_targets(spec, LOGITS, NAMES).classes.tolist() == expected


def test_single_image_list_means_k_classes():
    assert resolve_targets([2, 0, 3], LOGITS[:1]).classes.tolist() == [[2, 0, 3]]


def test_scores_gather_and_callable():
    t = resolve_targets("top2", LOGITS)
    assert t.scores(LOGITS).tolist() == [[3.0, 2.0], [5.0, 4.0]]
    c = resolve_targets(lambda z: z[:, 0] - z[:, 3], LOGITS)
    assert c.classes.tolist() == [[-1], [-1]]
    torch.testing.assert_close(c.scores(LOGITS), torch.tensor([[1.1], [5.0]]))


@pytest.mark.parametrize(
    "spec, match",
    [
        ([1, 2, 3], "3 targets for 2 images"),
        ("dolphin", "unknown class name 'dolphin'"),
        ("goldfis", "Closest: 'goldfish'"),
        ([[1, 2]], "1 rows for 2 images"),
        ([0.5, 1.0], "integer class indices"),
        (True, "not a bool"),
        (np.zeros((2, 1, 1), dtype=int), "at most 2-D"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(TargetError, match=match):
        resolve_targets(spec, LOGITS, NAMES)


def test_names_without_class_names():
    with pytest.raises(TargetError, match="no class names"):
        resolve_targets("tench", LOGITS, None)


def test_callable_with_wrong_shape():
    t = resolve_targets(lambda z: z, LOGITS)
    with pytest.raises(TargetError, match=r"one score per image, shape \(2,\)"):
        t.scores(LOGITS)
