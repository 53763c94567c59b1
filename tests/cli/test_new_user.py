"""What a new user met (issue 24 item 10): file names that sort, messages that say why and how,
no stray folders, no torch warnings for too many workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import camlens
from camlens.base._util import numbered, rank_tags
from camlens.base.errors import WeightsNotFoundError
from camlens.cli import main
from camlens.cli.common import cap_workers, cli_message, usable_cpus
from camlens.core.inputs import prepare_inputs
from camlens.data import synthetic
from camlens.metrics.loceval import evaluate_maps
from camlens.viz import output_paths


def test_rank_and_image_numbers_are_padded_so_files_sort():
    """`top1, top10, top11, …, top2` sorted by name; tensor inputs `image0_…`."""
    assert rank_tags(3) == ["top1", "top2", "top3"]  # K < 10: the names users know
    tags = rank_tags(12)
    assert tags[0] == "top01" and tags[-1] == "top12" and sorted(tags) == tags
    assert len(rank_tags(100)[0]) == len("top001")
    plan = output_paths("o", ["a"], "gradcam", [[f"c{j}" for j in range(12)]], ("png",))
    names = [p.name for p in plan[0]["png"]]
    assert names == sorted(names) and names[0] == "a_gradcam_top01.png"
    assert numbered("image", 10)[-1] == "image9" and numbered("image", 11) == [f"image{i:02d}" for i in range(11)]
    _, _, got = prepare_inputs(torch.zeros(12, 3, 8, 8), torch.nn.Identity(), None)
    assert got == sorted(got) and got[0] == "image00"


def test_explain_docstring_has_an_example():
    doc = camlens.explain.__doc__
    assert "Example::" in doc and ">>> exp = camlens.explain(model" in doc


def test_top1_loc_na_says_why():
    maps = [np.ones((8, 8))]
    rep = evaluate_maps(maps, [np.array([[0, 0, 4, 4]])], correct=[None])
    assert np.isnan(rep.metrics["top1_loc"])
    assert "top-1 loc. n/a: no ground-truth class is one of the model's classes" in rep.table()
    rep = evaluate_maps(maps, [np.array([[0, 0, 4, 4]])], correct=[True])
    assert "n/a:" not in rep.table()


def test_workers_capped_to_the_cpus_in_one_line(capsys):
    cpus = usable_cpus()
    assert cap_workers(None, None, None) is None and cap_workers(None, None, cpus) == cpus
    assert cap_workers(None, None, cpus + 3) == cpus
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--workers {cpus + 3} capped to {cpus}" in err


def test_cli_messages_name_the_flags():
    exc = WeightsNotFoundError("get them, or pass weights=PATH to a file you have (weights='random' for …)")
    assert cli_message(exc) == "get them, or pass --weights PATH to a file you have (--weights random for …)"
    assert cli_message(ValueError("pass overwrite=True (--overwrite) to replace")) == "pass --overwrite to replace"


def test_finetune_without_vgg16_weights_says_weights_flag_and_leaves_nothing(tmp_path, monkeypatch):
    """`camlens finetune shapes/ --model vgg16_cam` said `pass weights=PATH` and left an empty
    runs/shapes/ behind."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no weights cached here
    data = synthetic(tmp_path / "shapes", 5, image_size=32).root
    out = tmp_path / "runs" / "shapes"
    r = CliRunner().invoke(main, ["finetune", str(data), "--model", "vgg16_cam", "--epochs", "1", "--out", str(out)])
    assert r.exit_code != 0
    assert "--weights" in r.output and "weights=PATH" not in r.output and "weights=None" not in r.output
    assert not out.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flag", ["--overwrite"])
def test_flag_spelling_table_is_consistent(flag):
    assert cli_message(ValueError(f"x overwrite=True ({flag}) y")) == f"x {flag} y"


def test_ctrl_c_in_a_dataset_run_says_what_was_kept_and_how_to_resume(tmp_path, monkeypatch):
    """Ctrl-C printed only `Aborted!`."""
    import camlens.pipeline.run as run

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "run_store", interrupted)
    data = synthetic(tmp_path / "val", 1, image_size=32).root
    r = CliRunner().invoke(
        main, ["explain", str(data), "--model", "resnet18", "--weights", "random", "--out", str(tmp_path / "st")]
    )
    assert r.exit_code == 130
    assert "interrupted: the images finished so far are kept in the store" in r.output
    assert "run the same command again to resume" in r.output and "Aborted!" not in r.output
