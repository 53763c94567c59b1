"""Whole datasets: a streaming pipeline (DataLoader workers, batches across files, a writer
thread), a resumable Parquet + Zarr result store, and ``torchrun`` sharding.

    camlens.explain_dataset(model, "val/", method="gradcam", out="store", batch_size=32, num_workers=4)
    res = camlens.open_results("store"); res.table  # pandas; res.map(0) -> the first row's map
"""

from camlens.pipeline.run import DatasetConfig, PerBatch, explain_dataset
from camlens.pipeline.store import Results, StoreMismatchError, open_results

__all__ = ["DatasetConfig", "PerBatch", "Results", "StoreMismatchError", "explain_dataset", "open_results"]
