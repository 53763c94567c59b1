"""A small dataset run used by tests/pipeline/test_pipeline.py in subprocesses (SIGKILL, torchrun, memory).

    python tests/pipeline/pipeline_job.py OUT N [--sleep S] [--batch B] [--workers W] [--files DIR] [--size S]

Explains N synthetic images (network input S x S, default 24) (or the image files in DIR) with a seeded tiny CNN
(Grad-CAM + CAM, top-2) into the store OUT and prints one JSON line: computed, skipped, failed,
items (``__getitem__`` calls in this process), peak RSS in MiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 5, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def tiny_model() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    net = Tiny()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net.eval()


class Synthetic(torch.utils.data.Dataset):
    """Deterministic random images of a few sizes, labelled ``i % 3``; counts its item reads."""

    classes = ("a", "b", "c")

    def __init__(self, n: int, sleep: float = 0.0):
        self.n, self.sleep, self.calls = n, sleep, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.calls += 1
        if self.sleep:
            time.sleep(self.sleep)
        rng = np.random.default_rng(i)
        h, w = 20 + i % 5, 24 + i % 3
        return rng.integers(0, 255, (h, w, 3), dtype=np.uint8), i % 3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("n", type=int)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--files", default=None)
    ap.add_argument("--size", type=int, default=24)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    import camlens
    from camlens.models.preprocess import Preprocess

    data = a.files if a.files else Synthetic(a.n, a.sleep)
    res = camlens.explain_dataset(
        tiny_model(),
        data,
        method=["gradcam", "cam"],
        out=a.out,
        targets="top2",
        batch_size=a.batch,
        num_workers=a.workers,
        preprocess=Preprocess(size=(a.size, a.size)),
        progress=False,
    )
    s = res.stats
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    calls = getattr(data, "calls", None)
    print(
        json.dumps(
            {"computed": s.computed, "skipped": s.skipped, "failed": len(s.failed), "items": calls, "peak_mib": peak}
        )
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
