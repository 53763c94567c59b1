"""Target specs resolve to the right (N, K) class table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from camlens.base.errors import TargetError
from camlens.targets import Classes, resolve_targets

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


def test_single_image_flat_list_is_deprecated_but_still_k_classes():
    """0.2 read [2, 0, 3] for one image as three classes of it: kept for 0.3, with a warning naming
    the new spelling."""
    with pytest.warns(DeprecationWarning, match=r"Classes\(2, 0, 3\)"):
        assert resolve_targets([2, 0, 3], LOGITS[:1]).classes.tolist() == [[2, 0, 3]]


def test_one_rule_a_flat_list_is_one_target_per_image():
    """The rule (Captum's and pytorch-grad-cam's): a flat list gives one target per image; Classes
    gives the same classes to every image; a nested list is the (N, K) table."""
    assert resolve_targets([2, 0], LOGITS).classes.tolist() == [[2], [0]]
    assert resolve_targets([3], LOGITS[:1]).classes.tolist() == [[3]]
    assert resolve_targets(Classes(2, 0, 3), LOGITS).classes.tolist() == [[2, 0, 3], [2, 0, 3]]
    assert resolve_targets(Classes("goldfish", 3), LOGITS, NAMES).classes.tolist() == [[1, 3], [1, 3]]
    assert resolve_targets([[2, 0, 3]], LOGITS[:1]).classes.tolist() == [[2, 0, 3]]
    with pytest.raises(TargetError, match=r"one target per image.*Classes\(2, 0, 3\)"):
        resolve_targets([2, 0, 3], LOGITS)  # three targets for two images: the fix is named
    with pytest.raises(TargetError, match="at least one"):
        Classes()
    with pytest.raises(TargetError, match="ids"):
        Classes(1.5)  # type: ignore[arg-type]
    assert list(Classes([4, 5])) == [4, 5] and len(Classes(4, 5)) == 2 and Classes(4) == Classes(4)


def test_dataset_targets_reads_the_old_spellings_with_a_warning():
    from camlens.pipeline.run import PerBatch, dataset_targets

    with pytest.warns(DeprecationWarning, match="Classes"):
        assert dataset_targets([3, 5]) == (Classes(3, 5), None)
    fn = lambda batch, x: [0] * len(batch)  # noqa: E731
    with pytest.warns(DeprecationWarning, match="PerBatch"):
        assert dataset_targets(fn) == (None, fn)
    assert dataset_targets(PerBatch(fn)) == (None, fn)
    one = lambda logits: logits[:, 0]  # noqa: E731
    assert dataset_targets(one) == (one, None)  # a logits -> scores callable, as in explain
    assert dataset_targets("top2") == ("top2", None)


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
