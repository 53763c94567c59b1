"""Datasets for tests, demos and fine-tuning: synthetic shapes with known class, box and mask, and the
tetromino benchmark with a known signal (XAI-TRIS style)."""

from camlens.data.synthetic import (
    SHAPES,
    SyntheticArrays,
    SyntheticDataset,
    shape_mask,
    split_seed,
    synthetic,
    synthetic_arrays,
)
from camlens.data.tetromino import TetrominoArrays, TetrominoDataset, tetromino, tetromino_arrays

__all__ = [
    "SHAPES",
    "SyntheticArrays",
    "SyntheticDataset",
    "TetrominoArrays",
    "TetrominoDataset",
    "shape_mask",
    "split_seed",
    "synthetic",
    "synthetic_arrays",
    "tetromino",
    "tetromino_arrays",
]
