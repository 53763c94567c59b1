"""Datasets for tests, demos and fine-tuning: synthetic shapes with known class, box and mask."""

from .synthetic import (
    SHAPES,
    SyntheticArrays,
    SyntheticDataset,
    shape_mask,
    split_seed,
    synthetic,
    synthetic_arrays,
)

__all__ = [
    "SHAPES",
    "SyntheticArrays",
    "SyntheticDataset",
    "shape_mask",
    "split_seed",
    "synthetic",
    "synthetic_arrays",
]
