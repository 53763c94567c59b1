"""Layer 0, base: errors, file and image I/O, array helpers, boxes from heatmaps, progress.

Nothing here imports torch at module level except where a helper works on tensors, and nothing
here imports any other camlens layer.
"""
