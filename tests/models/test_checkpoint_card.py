"""Checkpoint cards: a schema with bounds checked against the weights' own shapes before anything is
built, and a checksum covering card + weights (issues 17.7 and 12.19).

Each hostile card is saved *consistently* (re-sealed, embedded in the weights too, as a careful
attacker or another program would), so only the schema and the shape checks can stop it; an edit
that is not re-sealed must fail the checksum. Oracle: the error type and the field it names; a valid
card loads the very same tensors."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

import camlens
from camlens.base.errors import CheckpointError
from camlens.models import weights as W


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint of a random MobileNetV3-small with a 3-class head, as finetune writes it."""
    from camlens.models.heads import replace_classifier

    torch.manual_seed(0)
    net = camlens.load_model("mobilenet_v3_small", weights="random")
    name = replace_classifier(net, 3)
    card = {
        "name": "mobilenet_v3_small-finetuned",
        "architecture": {"base": "mobilenet_v3_small", "base_class": None, "num_classes": 3, "head": "replace"}
        | {"head_modules": [name]},
        "class_names": ["cat", "dog", "fish"],
        "preprocess": {**camlens.models.IMAGENET.to_dict(), "size": [32, 32]},
        "image_size": [32, 32],
        "layer": None,
        "capture": "output",
        "epoch": 1,
        "metrics": {"val_acc": 0.5},
    }
    root = tmp_path_factory.mktemp("card")
    W.save_checkpoint(net, root / "good", card)
    return root, net.state_dict(), card


def _save(root, state, card, stem="bad"):
    W.save_checkpoint(state, root / stem, card)
    return root / stem


def test_valid_card_round_trips(saved):
    root, state, _ = saved
    m = camlens.load_model(checkpoint=root / "good")
    assert m.camlens.class_names == ["cat", "dog", "fish"] and m.camlens.preprocess.size == (32, 32)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
    card = json.loads((root / "good.json").read_text())
    assert card["checksum"] == W.card_checksum(card) and len(card["weights_sha256"]) == 64


HOSTILE = [
    ("architecture.base", ["architecture", "base"], 5),
    ("architecture.num_classes", ["architecture", "num_classes"], -1),
    ("architecture.num_classes", ["architecture", "num_classes"], 10**12),
    ("architecture.num_classes", ["architecture", "num_classes"], 5),  # fits the bounds, not the weights
    ("architecture.num_classes", ["architecture", "num_classes"], "3"),
    ("architecture.head", ["architecture", "head"], "evil"),
    ("architecture.head_modules", ["architecture", "head_modules"], "fc"),
    ("layer", ["layer"], 7),
    ("capture", ["capture"], "evil"),
    ("preprocess.size[0]", ["preprocess", "size"], [0, 0]),
    ("preprocess.size[0]", ["preprocess", "size"], [100000, 100000]),
    ("preprocess.size", ["preprocess", "size"], [32]),
    ("preprocess.mean[0]", ["preprocess", "mean"], ["a", 0.4, 0.4]),
    ("preprocess.mean[0]", ["preprocess", "mean"], [float("nan"), 0.4, 0.4]),
    ("preprocess.std", ["preprocess", "std"], [0, 0, 0]),
    ("preprocess.std", ["preprocess", "std"], [1, 1]),
    ("preprocess.channel_order", ["preprocess", "channel_order"], "XYZ"),
    ("preprocess", ["preprocess"], "imagenet"),
    ("class_names", ["class_names"], "ab"),
    ("class_names", ["class_names"], ["a", "b"]),
    ("class_names", ["class_names"], [1, 2, 3]),
    ("image_size[1]", ["image_size"], [32, 10**6]),
    ("epoch", ["epoch"], -3),
    ("architecture", ["architecture"], None),
]


def _set(card, path, value):
    d = card
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


@pytest.mark.parametrize("field, path, value", HOSTILE, ids=[f"{h[0]}={h[2]!r:.20}" for h in HOSTILE])
def test_hostile_field_is_named(saved, field, path, value):
    root, state, card = saved
    bad = copy.deepcopy(card)
    _set(bad, path, value)
    stem = _save(root, state, bad, "bad")
    with pytest.raises(CheckpointError) as info:
        camlens.load_model(checkpoint=stem)
    assert field in str(info.value), str(info.value)


def test_an_edit_that_is_not_resealed_fails_the_checksum(saved, tmp_path):
    root, state, card = saved
    stem = _save(tmp_path, state, card, "c")
    js = json.loads((tmp_path / "c.json").read_text())
    js["class_names"] = ["dog", "cat", "fish"]  # valid, plausible and wrong
    (tmp_path / "c.json").write_text(json.dumps(js))
    with pytest.raises(CheckpointError, match="checksum"):
        camlens.load_model(checkpoint=stem)
    # the weights changed under an intact card
    _save(tmp_path, state, card, "d")
    other = {k: v.clone() for k, v in state.items()}
    next(t for t in other.values() if t.is_floating_point()).add_(1e-3)
    W.atomic_write(
        tmp_path / "d.safetensors",
        W.with_metadata(W.safetensors_bytes(other), {W.CARD_KEY: (tmp_path / "d.json").read_text()}),
        overwrite=True,
    )
    with pytest.raises(CheckpointError, match="do not match the checksum"):
        camlens.load_model(checkpoint=tmp_path / "d")
    # a .json from another save beside the weights
    _save(tmp_path, state, {**card, "epoch": 2}, "e")
    (tmp_path / "e.json").write_text((root / "good.json").read_text().replace("good.safetensors", "e.safetensors"))
    with pytest.raises(CheckpointError):
        camlens.load_model(checkpoint=tmp_path / "e")


def _mutations(rng: random.Random, card: dict, n: int):
    values = [
        None,
        -1,
        0,
        1,
        3,
        10**12,
        -(10**9),
        2.5,
        float("inf"),
        "",
        "x",
        "evil",
        [],
        [0],
        [1, 2],
        [10**6, 10**6],
        {},
        {"a": 1},
        True,
        ["a", "b", "c"],
    ]
    paths = []

    def walk(d, prefix):
        for k, v in d.items():
            paths.append([*prefix, k])
            if isinstance(v, dict):
                walk(v, [*prefix, k])

    walk(card, [])
    for _ in range(n):
        bad = copy.deepcopy(card)
        _set(bad, rng.choice(paths), rng.choice(values))
        yield bad


def test_random_mutations_give_checkpoint_errors_or_load(saved, tmp_path):
    """40 random field mutations (re-sealed): each loads or raises CheckpointError, nothing else."""
    _, state, card = saved
    outcomes = {"loaded": 0, "refused": 0}
    for i, bad in enumerate(_mutations(random.Random(0), card, 40)):
        stem = _save(tmp_path, state, bad, f"m{i}")
        try:
            camlens.load_model(checkpoint=stem)
            outcomes["loaded"] += 1
        except CheckpointError:
            outcomes["refused"] += 1
    assert outcomes["refused"] >= 20, outcomes


def test_nan_weights_in_a_checkpoint_are_refused(saved, tmp_path):
    _, state, card = saved
    bad = {k: v.clone() for k, v in state.items()}
    name = next(k for k, v in bad.items() if v.is_floating_point() and v.dim() == 4)
    bad[name].view(-1)[0] = float("nan")
    W.save_checkpoint(bad, tmp_path / "nan", card)  # consistently sealed: only the finiteness check stops it
    with pytest.raises(CheckpointError, match=rf"NaN/Inf values \({name}"):
        camlens.load_model(checkpoint=tmp_path / "nan")
