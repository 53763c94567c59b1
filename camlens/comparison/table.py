"""Per-image values -> the table (mean and bootstrap 95 % interval over images), the normalized gain
over the random map, the ranking and a plain-language verdict per method."""

from __future__ import annotations

import numpy as np
import pandas as pd

from camlens.comparison.config import FAITHFULNESS, METRICS, CompareConfig

Values = dict[tuple[str, str], np.ndarray]


def _stat(v: np.ndarray, idx: np.ndarray | None) -> np.ndarray:
    """The statistic of per-image values over each resample ``idx`` ``(B, N)``; BoxAccV2 curves
    ``(N, T, 3)`` give MaxBoxAccV2 (mean over images, max over thresholds, mean over IoUs)."""
    if v.ndim == 3:
        sel = v[None] if idx is None else v[idx]  # (B, N, T, 3)
        return sel.mean(1).max(1).mean(-1)
    sel = v[None] if idx is None else v[idx]
    return sel.mean(-1)


def _gain(m: np.ndarray, r: np.ndarray, best: float | np.ndarray) -> np.ndarray:
    den = best - r
    return np.where(np.abs(den) > 1e-12, (m - r) / np.where(np.abs(den) > 1e-12, den, 1.0), 0.0)


def build_table(values: Values, n_boot: int, seed: int, clean: np.ndarray | None = None) -> pd.DataFrame:
    """One row per (method, metric): ``mean`` over images, ``low``/``high`` the 2.5/97.5 percentiles
    of ``n_boot`` bootstrap resamples of the images (the same resamples for every row: paired), and
    ``faithfulness_gain`` per method: the mean of ``(m - r) / (best - r)`` over deletion, insertion,
    ROAD MoRF and LeRF, with ``r`` the random map on the same resample and ``best`` 0 (deletion,
    MoRF) or 1 (insertion, LeRF: a probability's best). ``clean``: the unperturbed images' scores
    when they are not probabilities (a target object's score): then ``best`` of insertion and LeRF
    is their mean on the same resample (of the same first images, for a metric measured on fewer)."""
    rng = np.random.default_rng(seed)
    n_max = max(v.shape[0] for v in values.values())
    draws = rng.random((max(n_boot, 1), n_max))

    def top(n: int) -> float | np.ndarray:
        """The best score of the first ``n`` images (a metric on fewer images, ROAD, uses the first)
        on the same resamples as their values."""
        if clean is None:
            return 1.0
        c = clean[:n]
        idx = (draws[:, :n] * n).astype(int) if n > 1 and n_boot > 0 else None
        return np.concatenate([[c.mean()], c[idx].mean(-1) if idx is not None else [c.mean()]])

    rows = []
    boots: dict[tuple[str, str], np.ndarray] = {}
    for (method, metric), v in values.items():
        n = v.shape[0]
        idx = (draws[:, :n] * n).astype(int) if n > 1 and n_boot > 0 else None
        mean = float(_stat(v, None)[0])
        b = _stat(v, idx) if idx is not None else np.array([mean])
        boots[method, metric] = np.concatenate([[mean], b])
        rows.append(_row(method, metric, mean, b, n))
    for method in dict.fromkeys(m for m, _ in values):
        parts = []
        for metric in FAITHFULNESS:
            if (method, metric) in boots and ("random", metric) in boots:
                best = top(values[method, metric].shape[0]) if METRICS[metric].better == "higher" else 0.0
                parts.append(_gain(boots[method, metric], boots["random", metric], best))
        if parts and method != "random":
            g = np.mean(parts, axis=0)
            rows.append(_row(method, "faithfulness_gain", float(g[0]), g[1:] if len(g) > 1 else g, n_max))
    return pd.DataFrame(rows, columns=["method", "metric", "mean", "low", "high", "better", "n"])


def _row(method: str, metric: str, mean: float, boot: np.ndarray, n: int) -> dict:
    lo, hi = np.percentile(boot, [2.5, 97.5]) if len(boot) > 1 else (mean, mean)
    return {
        "method": method,
        "metric": metric,
        "mean": mean,
        "low": float(lo),
        "high": float(hi),
        "better": METRICS[metric].better,
        "n": n,
    }


def _mean(table: pd.DataFrame, method: str, metric: str) -> float | None:
    hit = table[(table["method"] == method) & (table["metric"] == metric)]
    return None if hit.empty else float(hit["mean"].iloc[0])


def verdict(table: pd.DataFrame, method: str, flags: dict[str, str], cfg: CompareConfig) -> str:
    """A plain-language verdict from the faithfulness gain, the sanity flag, robustness and truth."""
    gain = _mean(table, method, "faithfulness_gain")
    parts = []
    if gain is not None:
        parts.append(
            "faithful on this model"
            if gain >= 0.25
            else "somewhat faithful on this model"
            if gain >= 0.05
            else "no more faithful than a random map on this model"
        )
    sim = _mean(table, method, "randomization_similarity")
    if method in flags:
        parts.append("insensitive to the model's weights — do not use for this model")
    elif sim is not None:
        parts.append("changes when the model's weights are randomized (passes the sanity check)")
    sens = _mean(table, method, "max_sensitivity")
    if sens is not None and sens > 1.0:
        parts.append("unstable under small input noise")
    if cfg.truth:
        p = _mean(table, method, "top_k_precision")
        pr, ps = _mean(table, "random", "top_k_precision"), _mean(table, "sobel", "top_k_precision")
        if p is not None and pr is not None and p <= pr:
            parts.append("does not find the true signal better than a random map")
        elif p is not None and ps is not None and p <= ps:
            parts.append("finds the true signal no better than an edge detector")
    return "; ".join(parts) or "not enough measurements for a verdict"


def rank_and_verdicts(
    table: pd.DataFrame, methods: list[str], flags: dict[str, str], cfg: CompareConfig
) -> tuple[list[str], dict[str, str]]:
    """Methods best first: unflagged before flagged, then by faithfulness gain (by top-k precision
    first when the true masks are known)."""

    def key(m: str) -> tuple:
        truth = _mean(table, m, "top_k_precision") if cfg.truth else None
        gain = _mean(table, m, "faithfulness_gain")
        return (m in flags, -(truth or 0.0), -(gain if gain is not None else -np.inf), m)

    ranking = sorted(methods, key=key)
    return ranking, {m: verdict(table, m, flags, cfg) for m in ranking}
