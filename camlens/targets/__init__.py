"""Resolve ``targets=``: which class scores to explain, as an ``(N, K)`` table of class ids.

Accepted forms (``N`` images, ``num_classes`` logits):

* ``None`` -> the top-1 class of each image (``K = 1``);
* ``int`` -> that class for every image;
* ``"topK"`` (``"top1"``, ``"top5"``…) -> the K highest logits of each image, best first;
* a class name or a list of names (needs the model's class names);
* a flat list (or 1-D array) -> **one target per image**: its length must be ``N`` (the
  convention of Captum and pytorch-grad-cam); ``[3, 5]`` for two images explains class 3 in the
  first and class 5 in the second;
* :class:`Classes` ``(3, 5)`` -> the same classes (ids or names) for every image, ``K = 2``;
* an ``(N, K)`` array / tensor / nested list of ints (``[[3, 5]]`` for one image: classes 3 and 5);
* a callable ``logits -> (N,)`` scores (multi-label sums, margins, regression…) -> ``K = 1``,
  with class id ``-1`` in :attr:`Explanation.classes`;
* a **target object** (:class:`Target` protocol): the model's *raw* output -> ``(N, K)`` scores,
  for models that are not classifiers: :class:`Detection` (boxes of a detector),
  :class:`Segmentation` (a region of a segmenter's logits), :class:`Similarity` (an embedding's
  cosine with a reference).

One module per kind: ``base`` (the :class:`Target` protocol), ``classes`` (classifier targets),
``detection``, ``segmentation``, ``similarity`` and ``text`` (image–text prompts). This package
re-exports their public names.
"""

from __future__ import annotations

from camlens.targets.base import Target, check_scores, is_target_object, output_batch_size, take_rows
from camlens.targets.classes import (
    Classes,
    Targets,
    TargetSpec,
    bind_target,
    deprecated_flat_list,
    flat_list_for_one_image,
    resolve_targets,
)
from camlens.targets.detection import Detection, InstanceMask, box_iou
from camlens.targets.segmentation import Segmentation
from camlens.targets.similarity import Similarity
from camlens.targets.text import Text

__all__ = [
    "Classes",
    "Detection",
    "InstanceMask",
    "Segmentation",
    "Similarity",
    "Target",
    "TargetSpec",
    "Targets",
    "Text",
    "bind_target",
    "box_iou",
    "check_scores",
    "deprecated_flat_list",
    "flat_list_for_one_image",
    "is_target_object",
    "output_batch_size",
    "resolve_targets",
    "take_rows",
]
