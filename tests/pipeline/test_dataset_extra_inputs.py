"""Datasets whose items carry the model's other inputs: ``(image, extra[, label])`` with
``explain_dataset(..., extra_inputs=True)``.

Oracle: the maps the pipeline stores, batch by batch (batch 3 over 7 items: a last partial batch),
equal one :func:`camlens.explain` call over all images with ``forward_args=(metas,)`` — so every
image was explained with its own ``meta`` in every forward, RISE's masked copies included.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import camlens
from camlens.pipeline.sources import UserDataset, collate

N = 7
CHEAP = {"n_masks": 16, "batch_size": 8}


class WithMeta(nn.Module):
    """A CNN whose metadata scales the first features (FiLM) and adds to the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.film = nn.Linear(2, 6)
        self.conv2 = nn.Conv2d(6, 5, 3, stride=2, padding=1)
        self.meta_head = nn.Linear(2, 4)
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x)) * (1 + self.film(meta))[:, :, None, None]
        h = torch.relu(self.conv2(h))
        return self.fc(h.mean((2, 3))) + 3 * self.meta_head(meta)


class Items(Dataset):
    def __init__(self, images: torch.Tensor, extras: list, labels: bool = True) -> None:
        self.images, self.extras, self.labels = images, extras, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        if self.labels:
            return self.images[i], self.extras[i], i % 4
        return self.images[i], self.extras[i]


def _data() -> tuple[WithMeta, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return WithMeta().eval(), torch.randn(N, 3, 32, 32), torch.randn(N, 2) * 2


@pytest.mark.parametrize("labels", [True, False])
def test_stored_maps_equal_explain_with_forward_args(tmp_path, labels):
    net, images, metas = _data()
    ds = Items(images, list(metas), labels)
    res = camlens.explain_dataset(
        net, ds, ["gradcam", "rise"], out=tmp_path / "st", layer="conv2", batch_size=3, num_workers=0,
        extra_inputs=True, progress=False, explain_options=CHEAP,
    )  # fmt: skip
    assert res.complete and res.stats.computed == N and not res.failed
    ref = camlens.explain(net, images, method=["gradcam", "rise"], layer="conv2", forward_args=(metas,), **CHEAP)
    for m in ("gradcam", "rise"):
        got = np.asarray(res.maps(m)[:])
        assert got.shape == tuple(ref[m].maps.shape)
        np.testing.assert_allclose(got, ref[m].maps.numpy(), atol=1e-5)
    # the metadata matters: explained with every image given image 0's meta, the maps differ
    wrong = camlens.explain(net, images, method="gradcam", layer="conv2", forward_args=(metas[:1].expand(N, -1),))
    assert not np.allclose(np.asarray(res.maps("gradcam")[:]), wrong.maps.numpy(), atol=1e-4)
    if labels:
        assert list(res.table.drop_duplicates("image_id").label) == [str(i % 4) for i in range(N)]


def test_dict_extra_becomes_forward_kwargs(tmp_path):
    net, images, metas = _data()
    res = camlens.explain_dataset(
        net, Items(images, [{"meta": m} for m in metas]), "gradcam", out=tmp_path / "st", layer="conv2",
        batch_size=3, num_workers=0, extra_inputs=True, progress=False,
    )  # fmt: skip
    ref = camlens.explain(net, images, method="gradcam", layer="conv2", forward_kwargs={"meta": metas})
    np.testing.assert_allclose(np.asarray(res.maps("gradcam")[:]), ref.maps.numpy(), atol=1e-5)


def test_extra_shapes_that_differ_fail_those_items_by_name():
    _, images, metas = _data()
    extras = [m for m in metas[:3]]
    extras[1] = torch.zeros(3)
    ds = UserDataset(Items(images[:3], extras), extra_inputs=True)
    b = collate([ds[i] for i in range(3)])
    assert b.indices == [0, 2] and b.x is not None and b.x.shape[0] == 2
    assert b.forward_args[0].shape == (2, 2)
    assert [f[0] for f in b.failed] == [1]
    msg = b.failed[0][2]
    assert "(3,)" in msg and "(2,)" in msg and "same shapes" in msg


def test_items_without_extra_are_a_clear_error_and_plain_datasets_unchanged():
    _, images, metas = _data()
    for bad in ([images[0]], [(images[0], metas[0], 1, "x")], [(images[0], "a string")]):
        item = UserDataset(bad, extra_inputs=True)[0]
        assert "x" not in item and (
            "(image, extra) or (image, extra, label)" in item["error"] or "a str" in item["error"]
        )
    # without the option a (image, label, other) item is what it always was
    triple = UserDataset([(images[0], 3, torch.zeros(5))])[0]
    assert "error" not in triple and triple["label"] == "3" and "extra" not in triple
    b = collate([triple])
    assert b.forward_args == () and b.forward_kwargs == {}


def test_extra_inputs_and_forward_args_together_are_refused(tmp_path):
    net, images, metas = _data()
    with pytest.raises(camlens.CamlensError, match="do not also pass forward_args"):
        camlens.explain_dataset(
            net, Items(images, list(metas)), "gradcam", out=tmp_path / "st", layer="conv2", num_workers=0,
            extra_inputs=True, progress=False, forward_args=(metas,),
        )  # fmt: skip
