"""Which map should I trust? :func:`compare` ranks the methods on the user's own model and data."""

from camlens.comparison.config import DEFAULT_BUDGETS, METRICS, CompareConfig, CompareResult, MetricInfo
from camlens.comparison.run import compare, sobel_maps

__all__ = ["DEFAULT_BUDGETS", "METRICS", "CompareConfig", "CompareResult", "MetricInfo", "compare", "sobel_maps"]
