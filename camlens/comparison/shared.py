"""Forwards the methods of one comparison share.

Deletion and insertion score the same images for every method at their ends: the clean image
(deletion with nothing removed, insertion with everything restored), the all-removed image and the
blurred one. With 4 steps that is 4 of the 10 forwards per image and method. :class:`SharedForwards`
wraps the model, keys each input row by a digest of its bytes and computes only the rows it has not
seen: the metric functions run unchanged (the comparison adds no second implementation) and their
numbers are the model's own outputs for those rows. The rows every method shares are among the
first method's, so the memo stops growing after it (:meth:`SharedForwards.freeze`): its memory is
one method's rows (32 photos x 10 rows x 1,000 logits: 1.3 MB), not every method's.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn


def row_key(row: torch.Tensor) -> bytes:
    """A digest of one input row (dtype, shape and bytes in contiguous order, whatever the layout)."""
    a = row.detach().cpu().contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{a.dtype}|{tuple(a.shape)}|".encode())
    h.update(a.numpy().tobytes())
    return h.digest()


class SharedForwards(nn.Module):
    """``model`` (its only submodule), remembering its output row for every input row it has computed
    under inference (no gradient). A batch's seen rows are read back and the others computed in one
    forward. Only tensor outputs with one row per input row are kept (a detector's list of
    dictionaries turns the memo off). The model must be deterministic in eval mode, as the metrics
    run it. ``hits`` and ``misses`` count rows; after :meth:`freeze` no new row is kept."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._memo: dict[bytes, torch.Tensor] = {}
        self.enabled = True
        self.frozen = False
        self.hits = 0
        self.misses = 0

    def freeze(self) -> None:
        """Keep the rows remembered so far and remember no more (later rows are computed each time)."""
        self.frozen = True

    def forward(self, x: Any) -> Any:
        if not self.enabled or not isinstance(x, torch.Tensor) or torch.is_grad_enabled() or x.dim() < 2:
            return self.model(x)
        keys = [row_key(r) for r in x]
        first: dict[bytes, int] = {}  # each unseen row once, even when the batch repeats it
        for i, k in enumerate(keys):
            if k not in self._memo and k not in first:
                first[k] = i
        todo = list(first.values())
        got: dict[bytes, torch.Tensor] = {}
        if todo:
            out = self.model(x if len(todo) == len(keys) else _rows(x, todo))
            if not (isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[0] == len(todo)):
                self.enabled = False
                return out if len(todo) == len(keys) else self.model(x)
            got = {keys[i]: out[j].detach() for j, i in enumerate(todo)}
            if not self.frozen:
                self._memo.update((k, v.clone()) for k, v in got.items())
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        return torch.stack([got[k] if k in got else self._memo[k] for k in keys])


def _rows(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """``x[idx]`` in ``x``'s memory layout (indexing gives a contiguous tensor; a channels-last batch
    must stay one, or the convolutions would run another algorithm than for the whole batch)."""
    sub = x[idx]
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        sub = sub.contiguous(memory_format=torch.channels_last)
    return sub
