"""What a new user meets on the command line (issue 12 items 3-7, 12, 13)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import camlens
from camlens.cli import main
from camlens.cli.common import parse_method_options

FAST = ["--model", "resnet18", "--weights", "random"]


def run(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


# ------------------------------------------------------------------------------------------ item 3
@pytest.mark.parametrize("device", ["gpu", "cuda:7", "meta"])
@pytest.mark.parametrize("command", ["explain", "evaluate", "localize", "finetune"])
def test_bad_device_names_the_devices(command, device, tmp_path, monkeypatch):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    monkeypatch.chdir(tmp_path)
    args = [command, *(["."] if command == "finetune" else []), "--device", device]
    res = run(*args)  # catch_exceptions=False: a raw traceback fails the test
    assert res.exit_code == 2, res.output
    assert "--device" in res.output and "devices on this machine: cpu" in res.output


def test_load_model_bad_device_is_a_camlens_error():
    with pytest.raises(camlens.CamlensError, match="devices on this machine"):
        camlens.load_model("resnet18", weights="random", device="gpu")


# ------------------------------------------------------------------------------------------ item 4
def test_option_typed_by_the_method_signature():
    got = parse_method_options(
        ["max_channels=16", "dedupe=false", "weighting=logit", "batch_size=none"], ["gradcam", "scorecam"]
    )
    assert got == {"max_channels": 16, "dedupe": False, "weighting": "logit", "batch_size": None}
    assert parse_method_options(["noise_level=0.3", "n_samples=4"], ["smoothgrad"]) == {
        "noise_level": 0.3,
        "n_samples": 4,
    }
    assert parse_method_options(["check-head=0"], ["cam"]) == {"check_head": False}


def test_option_errors_are_usage_errors(tmp_path):
    res = run("explain", *FAST, "--method", "scorecam", "--option", "max_channels=many", "--out", tmp_path)
    assert res.exit_code == 2 and "max_channels='many'" in res.output and "int" in res.output
    res = run("explain", *FAST, "--method", "gradcam", "--option", "max_channels=4", "--out", tmp_path)
    assert res.exit_code == 2
    assert "unknown option(s) max_channels for gradcam; valid options: grad_norm, relu" in res.output
    res = run("explain", *FAST, "--option", "oops", "--out", tmp_path)
    assert res.exit_code == 2 and "KEY=VALUE" in res.output
    assert not any(tmp_path.iterdir())


def test_option_reaches_the_method(tmp_path, monkeypatch):
    import importlib

    run_mod = importlib.import_module("camlens.pipeline.run")  # each batch is one run_request of the request
    real = run_mod.run_request
    seen = []

    def spy(model, x, request):
        res = real(model, x, request)
        seen.append((request, res))
        return res

    monkeypatch.setattr(run_mod, "run_request", spy)
    res = run(
        "explain", *FAST, "--method", "scorecam", "--option", "max_channels=3", "--topk", "1", "--out", tmp_path, "-q"
    )
    assert res.exit_code == 0, res.output
    ((request, out),) = seen
    assert request.options["max_channels"] == 3
    assert out["scorecam"].extras["forwards"][0] <= 3  # 3 channels: at most 3 masked forwards


def test_quiet_hides_every_progress_bar(tmp_path, monkeypatch):
    """-q: "only errors and the final line" — no pipeline bar and no method bar (a method with its
    own bar gets progress=False unless the user set it)."""
    import importlib

    import numpy as np
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(folder / f"im{i}.png")
    run_mod = importlib.import_module("camlens.pipeline.run")  # each batch: one run_request(model, x, request)
    real = run_mod.run_request
    seen = []
    monkeypatch.setattr(run_mod, "run_request", lambda m, x, r: seen.append(r.options) or real(m, x, r))
    args = ["explain", str(folder), *FAST, "--method", "scorecam", "--option", "max_channels=2", "--topk", "1"]
    loud = run(*args, "--out", tmp_path / "a")
    assert loud.exit_code == 0, loud.output
    assert "explain:" in loud.stderr and all("progress" not in k for k in seen)
    seen.clear()
    quiet = run(*args, "--out", tmp_path / "b", "-q")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == "" and seen and all(k["progress"] is False for k in seen)
    assert quiet.stdout.startswith("explained 5 of 5 image(s)")
    seen.clear()
    mine = run(*args, "--option", "progress=true", "--out", tmp_path / "c", "-q")  # the user's choice stands
    assert mine.exit_code == 0 and all(k["progress"] is True for k in seen)
    gc = run("explain", str(folder), *FAST, "--method", "gradcam", "--out", tmp_path / "d", "-q")
    assert gc.exit_code == 0 and gc.stderr == ""
    # a method option named like the pipeline's own (Score-CAM's batch_size: masked images per
    # forward) reaches the method; the pipeline keeps --batch-size (was: a TypeError)
    seen.clear()
    both = run(*args, "--option", "batch_size=3", "--batch-size", "5", "--out", tmp_path / "e", "-q")
    assert both.exit_code == 0, both.output
    assert [k["batch_size"] for k in seen] == [3] and len(seen) == 1  # one call: all 5 images at once
    import camlens

    seen.clear()
    camlens.explain_dataset(
        camlens.load_model("resnet18", weights="random"), folder, "scorecam",
        out=tmp_path / "f", batch_size=5, progress=False, num_workers=0, max_channels=2,
        explain_options={"batch_size": 2, "progress": False},
    )  # fmt: skip
    assert [(k["batch_size"], k["progress"], k["max_channels"]) for k in seen] == [(2, False, 2)]


# ------------------------------------------------------------------------------------------ item 5
def test_layer_typo_is_raised_before_any_image_is_read(tmp_path, monkeypatch):
    import importlib

    sources = importlib.import_module("camlens.pipeline.sources")

    def no_read(*a, **k):
        raise AssertionError("an image was read before the layer was checked")

    monkeypatch.setattr(sources, "ImageFiles", no_read)
    res = run("explain", "--layer", "layer4", "--out", tmp_path)  # EfficientNet-Lite0 has no layer4
    assert res.exit_code == 2, res.output
    assert "no layer named 'layer4'" in res.output and "Blocks near the output: " in res.output
    assert "_blocks.15" in res.output and "input(s) failed" not in res.output


# ------------------------------------------------------------------------------------------ item 6
def test_bench_writes_into_the_current_folder(tmp_path, monkeypatch):
    import camlens.cli.bench as bench

    seen = {}

    class Runner:
        @staticmethod
        def main(argv, log):
            seen["argv"] = argv
            return 0

    monkeypatch.setattr(bench, "_benchmarks_runner", lambda: Runner)
    monkeypatch.chdir(tmp_path)
    res = run("bench", "--quick")
    assert res.exit_code == 0
    out = Path(seen["argv"][seen["argv"].index("--out") + 1])
    assert out.parent == tmp_path and out.name.startswith("camlens-bench-") and out.suffix == ".json"


# ------------------------------------------------------------------------------------------ item 7
def test_finetune_prints_cross_entropy_and_l2_apart(tmp_path):
    from tests.train.test_finetune import FAST as FT_FAST
    from tests.train.test_finetune import make_folder, tiny_net

    folder = make_folder(tmp_path / "data", {"a": 6, "b": 6})
    lines: list[str] = []
    res = camlens.train.finetune(folder, model=tiny_net(), out=tmp_path / "o", epochs=1, log=lines.append, **FT_FAST)
    row = res.history[0]
    (line,) = [s for s in lines if s.startswith("epoch 1/1")]
    assert f"train CE {row['train_ce']:.4f} + L2 {row['train_loss'] - row['train_ce']:.4f}" in line
    assert f"val CE {row['val_loss']:.4f}" in line and "train loss" not in line
    assert row["train_loss"] > row["train_ce"]  # the L2 term is there, and printed apart


def test_vgg16_weights_error_says_how_to_get_them(tmp_path):
    with pytest.raises(camlens.CamlensError, match=r"torchvision.models.vgg16\(weights='IMAGENET1K_V1'\).*hub cache"):
        camlens.load_model("vgg16_cam", tmp_path / "vgg16.pth")


# ------------------------------------------------------------------------------------------ item 12
def test_scorecam_progress_counts_masked_forwards(tiny, tiny_x, monkeypatch):
    import importlib

    sc = importlib.import_module("camlens.attribution.scorecam")  # camlens.attribution is also a function

    bars = []

    class Bar:
        def __init__(self, total, desc, unit, disable, **kw):
            self.total, self.desc, self.unit, self.disable, self.n = total, desc, unit, disable, 0
            bars.append(self)

        def update(self, k):
            self.n += k

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return None

    monkeypatch.setattr(sc, "tqdm", Bar)
    camlens.explain(tiny, tiny_x, method="scorecam", progress=True, dedupe=False)
    (bar,) = bars
    assert (bar.desc, bar.unit, bar.total, bar.n, bar.disable) == ("scorecam", "fwd", 15, 15, False)  # 3 x 5 ch
    camlens.explain(tiny, tiny_x, method="scorecam")  # 15 forwards: too few for a bar by default
    assert bars[1].disable


@pytest.mark.slow
def test_evaluate_writes_rows_as_it_goes(tmp_path, monkeypatch):
    """An interrupted evaluate keeps per_image.csv of the chunks it finished."""
    from camlens.metrics import runner

    real = runner.deletion_curve
    calls = {"n": 0}

    def deletion_then_interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second chunk
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(runner, "deletion_curve", deletion_then_interrupt)
    out = tmp_path / "ev"
    res = CliRunner().invoke(
        main,
        [
            "evaluate",
            *FAST,
            "--no-baseline",
            "--metrics",
            "deletion",
            "--steps",
            "2",
            "--chunk",
            "1",
            "--no-plots",
            "--quiet",
            "--out",
            str(out),
            "--size",
            "64",
        ],
    )
    assert res.exit_code != 0  # interrupted
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert [r["image"] for r in rows if r["method"] == "gradcam"] == ["chelsea"]
    assert rows[0]["deletion"] != ""
    assert not (out / "summary.csv").exists()


@pytest.mark.parametrize("rank", ["0", "1"])
def test_refusal_under_torchrun_said_once_without_traceback(tmp_path, monkeypatch, rank):
    """Under torchrun every rank met the same refusal: it was printed once per rank (issue 24). Now
    rank 0 says it once, the others are silent, and every rank keeps the error's status."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", rank)
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "Traceback" not in r.output  # click's usage-error status, kept
    said = r.output
    if rank == "0":
        assert said.count("Error:") == 1 and "rank 0" in said
    else:
        assert said == ""
    monkeypatch.delenv("WORLD_SIZE")
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0  # a single process keeps its status
