"""Decode only what the model sees: the scaled decode against the full decode, on phone-sized photos.

    python -m benchmarks.decode                  # the bundled photos as 4032x3024 JPEGs, quality 90
    python -m benchmarks.decode --rounds 7

The bundled scikit-image photos are upscaled (bicubic) to 4032 x 3024 and written as JPEG quality 90
(``plain``), and once more with per-pixel Gaussian noise (sigma 8 grey levels) added before
encoding (``noisy``: fine detail, as a phone sensor's, is where resampling paths differ most); a
PNG copy of two of them checks the ``Image.reduce`` path. For each file:

* the decode + preprocess time, full decode (``exact_decode=True``) against the scaled decode
  (:func:`camlens.base.io.decode_image` with the preprocessing's ``min_decode_size``), medians of
  interleaved rounds;
* the mean and largest absolute difference of the two preprocessed tensors, in [0, 1] pixel units;
* with EfficientNet-Lite0 (its ImageNet weights): whether the top-1 class agrees, and the Pearson
  correlation of the two Grad-CAM maps (and the largest difference of the min-max normalised maps).

Prints one JSON object; :data:`camlens.base.io.SCALED_DECODE_MAD` and ``tests/base/test_scaled_decode.py``
hold the bound measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .tasks import pearson_whole

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
PHONE = (3024, 4032)  #: (H, W) of a 12 MP phone photo


def phone_photo(name: str, path: Path, *, noise: float = 0.0, seed: int = 0, size=PHONE, quality: int = 90) -> Path:
    """Bundled photo ``name`` upscaled (bicubic) to ``size`` ``(H, W)``, optional Gaussian noise of
    ``noise`` grey levels, written to ``path`` (JPEG quality ``quality``, or PNG by suffix)."""
    from PIL import Image

    from camlens.base.io import sample_image

    img = Image.fromarray(sample_image(name)).resize((size[1], size[0]), Image.Resampling.BICUBIC)
    if noise:
        a = np.asarray(img, dtype=np.float32) + np.random.default_rng(seed).normal(0, noise, (*size, 3))
        img = Image.fromarray(a.clip(0, 255).round().astype(np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":
        img.save(path, compress_level=1)
    else:
        img.save(path, quality=quality)
    return path


def make_phone_photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` distinct 4032x3024 JPEG photos (quality 90) from the bundled ones: a random crop of 85-100 %
    of a bundled photo (flipped on odd indices) upscaled bicubically, so that no two files are equal."""
    from PIL import Image

    from camlens.base.io import sample_image

    folder.mkdir(parents=True, exist_ok=True)
    have = sorted(folder.glob("phone*.jpg"))
    if len(have) >= n:
        return have[:n]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = sample_image(PHOTOS[i % len(PHOTOS)])
        h, w = a.shape[:2]
        f = rng.uniform(0.85, 1.0)
        ch, cw = int(h * f), int(w * f)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = a[y : y + ch, x : x + cw][:, :: -1 if i % 2 else 1]
        img = Image.fromarray(np.ascontiguousarray(crop)).resize((PHONE[1], PHONE[0]), Image.Resampling.BICUBIC)
        img.save(folder / f"phone{i:05d}.jpg", quality=90)
        out.append(folder / f"phone{i:05d}.jpg")
    return out


def preprocessed(path: Path, pp: Any, exact: bool) -> torch.Tensor:
    """``(3, h, w)`` in [0, 1] pixel units (before normalisation), decoded in full or scaled."""
    from camlens.base.io import decode_image

    d = decode_image(path, None if exact else pp.min_decode_size)
    return pp.resize_image(d.rgb) / 255.0


def compare_file(path: Path, model: torch.nn.Module, rounds: int) -> dict[str, Any]:
    """Times, tensor differences, top-1 and Grad-CAM agreement of one file (see the module doc)."""
    import camlens
    from camlens.base.ops import minmax
    from camlens.models.zoo import card_of

    pp = card_of(model).preprocess
    times: dict[str, list[float]] = {"exact": [], "scaled": []}
    for _ in range(rounds):
        for mode in ("exact", "scaled"):
            t0 = time.perf_counter()
            preprocessed(path, pp, mode == "exact")
            times[mode].append(time.perf_counter() - t0)
    full, scaled = preprocessed(path, pp, True), preprocessed(path, pp, False)
    d = (full - scaled).abs()
    e_full = camlens.explain(model, str(path), "gradcam", exact_decode=True)
    e_scaled = camlens.explain(model, str(path), "gradcam")
    mm = [minmax(e.maps) for e in (e_full, e_scaled)]
    return {
        "decoded_size": list(e_scaled.images[0].shape[:2]),
        "seconds_exact": statistics.median(times["exact"]),
        "seconds_scaled": statistics.median(times["scaled"]),
        "speedup": statistics.median(times["exact"]) / statistics.median(times["scaled"]),
        "mad": float(d.mean()),
        "max_abs_diff": float(d.max()),
        "top1_same": bool(int(e_full.classes[0, 0]) == int(e_scaled.classes[0, 0])),
        "gradcam_pearson": pearson_whole(e_full.maps, e_scaled.maps),
        "gradcam_minmax_max_diff": float((mm[0] - mm[1]).abs().max()),
    }


def run(folder: Path, rounds: int) -> dict[str, Any]:
    import camlens

    model = camlens.load_model("efficientnet_lite0")
    rows: dict[str, Any] = {}
    for name in PHOTOS:
        for kind, noise in (("plain", 0.0), ("noisy", 8.0)):
            p = phone_photo(name, folder / f"{name}_{kind}.jpg", noise=noise)
            rows[f"{name} {kind} jpg"] = compare_file(p, model, rounds)
    for name in PHOTOS[:2]:
        p = phone_photo(name, folder / f"{name}.png")
        rows[f"{name} plain png"] = compare_file(p, model, max(1, rounds // 2))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="bench-decode")
    a = ap.parse_args(argv)
    load = os.getloadavg()
    rows = run(Path(a.out), a.rounds)
    jpg = [r for k, r in rows.items() if k.endswith("jpg")]
    summary = {
        "mad_max": max(r["mad"] for r in rows.values()),
        "top1_agreement": sum(r["top1_same"] for r in rows.values()) / len(rows),
        "gradcam_pearson_min": min(r["gradcam_pearson"] for r in rows.values()),
        "jpeg_speedup_median": statistics.median(r["speedup"] for r in jpg),
    }
    meta = {"rounds": a.rounds, "threads": torch.get_num_threads(), "load_average": [load, os.getloadavg()]}
    print(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
