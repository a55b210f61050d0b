"""Confidence intervals for triage figures: Wilson for proportions, a percentile bootstrap over studies for rates.

Findings within a study are not independent draws (one patient, one capsule, one reader), and a rate such as
false alerts per hour is a ratio of two per-study sums, so rates are resampled by study: draw as many studies
as there are, with replacement, recompute the figure, take the central `confidence` share of the draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from statistics import NormalDist

import numpy as np

DEFAULT_CONFIDENCE = 0.95
DEFAULT_BOOTSTRAP = 2000
DEFAULT_SEED = 0


def z_value(confidence: float) -> float:
    """The two-sided normal quantile: 1.959964 for 95 %."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(k: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float] | None:
    """Wilson score interval of the proportion k/n; None when n is 0.

    centre = (p + z^2/2n) / (1 + z^2/n), half-width = z * sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n). Unlike the
    normal approximation it stays inside [0, 1] and is not empty at k = 0 or k = n, where small studies live.
    """
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"{k} successes out of {n}")
    z = z_value(confidence)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(statistic: Callable[[np.ndarray], float], n_units: int, draws: int = DEFAULT_BOOTSTRAP,
              confidence: float = DEFAULT_CONFIDENCE, seed: int = DEFAULT_SEED) -> tuple[float, float] | None:
    """Percentile interval of `statistic(indices)` over `draws` resamples of `n_units` units (studies) with
    replacement; None with fewer than 2 units or no draws (nothing to resample), or when every draw is undefined
    (NaN). Deterministic for a given seed."""
    if n_units < 2 or draws < 1:
        return None
    z_value(confidence)  # validates it
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_units, size=(draws, n_units))
    values = np.array([statistic(row) for row in idx], np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    lo, hi = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def clustered_proportion_ci(k: np.ndarray, n: np.ndarray, confidence: float = DEFAULT_CONFIDENCE,
                            draws: int = DEFAULT_BOOTSTRAP) -> tuple[float, float] | None:
    """An interval for sum(k) / sum(n) where the k-of-n counts come in clusters (findings within studies, which are
    not independent: one patient's lesions are caught or missed together). The union of the Wilson interval (the
    binomial part, which also keeps the interval from collapsing where every study agrees) and the percentile
    bootstrap over clusters (the between-study part); with one cluster, Wilson alone."""
    k, n = np.asarray(k, np.float64), np.asarray(n, np.float64)
    w = wilson(int(k.sum()), int(n.sum()), confidence)
    b = bootstrap(ratio_of_sums(k, n), len(k), draws, confidence)
    if w is None or b is None:
        return w or b
    return min(w[0], b[0]), max(w[1], b[1])


def ratio_of_sums(num: np.ndarray, den: np.ndarray) -> Callable[[np.ndarray], float]:
    """sum(num[i]) / sum(den[i]) over the drawn units i (NaN when the denominator is 0)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)

    def stat(i: np.ndarray) -> float:
        d = den[i].sum()
        return float(num[i].sum() / d) if d > 0 else math.nan

    return stat


def mean_of(values: np.ndarray) -> Callable[[np.ndarray], float]:
    values = np.asarray(values, np.float64)
    return lambda i: float(values[i].mean())
