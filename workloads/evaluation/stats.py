"""Confidence intervals and paired tests for evaluation scores.

- one model's score: ``wilson_interval`` for a proportion (0/1 per question), ``bootstrap_interval``
  for any other per-question score (VQA soft accuracy);
- two models on the same questions: ``paired_comparison`` (McNemar for 0/1 scores, paired
  bootstrap otherwise), printed by ``format_comparison``;
- an arm of a seed matrix: ``seed_summary`` (mean, std, t-interval across seeds).

Differences are always ``b - a``: ``a`` is the reference (the baseline), ``b`` the challenger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

import numpy as np

__all__ = ["Comparison", "SeedSummary", "wilson_interval", "bootstrap_interval",
           "paired_bootstrap", "mcnemar", "paired_comparison", "seed_summary",
           "format_comparison"]

MCNEMAR_EXACT_BELOW = 25
"""McNemar uses the exact binomial test when the discordant pairs are fewer than this, else the
chi-square with continuity correction (the usual rule, e.g. Wikipedia's McNemar's test)."""


@dataclass(frozen=True)
class Comparison:
    """``b - a`` on paired per-question scores: mean difference, its interval, two-sided p."""
    diff: float
    low: float
    high: float
    p: float
    test: str  # "mcnemar" or "paired_bootstrap"
    n: int


@dataclass(frozen=True)
class SeedSummary:
    mean: float
    std: float  # ddof=1; nan for one seed
    low: float  # t-interval of the mean; nan for one seed
    high: float
    n: int


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n``."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: need 0 <= successes <= n and n > 0, "
                         f"got successes={successes}, n={n}")
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def _as_array(values: Sequence[float], name: str) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name}: need a non-empty 1-D sequence of scores, got shape {x.shape}")
    return x


def _bootstrap_means(x: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of ``n_resamples`` resamples with replacement, drawn in chunks of ~2M indices."""
    rng = np.random.default_rng(seed)
    n = x.size
    rows = max(1, 2_000_000 // n)
    out = np.empty(n_resamples)
    for start in range(0, n_resamples, rows):
        stop = min(n_resamples, start + rows)
        out[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return out


def _percentiles(means: np.ndarray, confidence: float) -> tuple[float, float]:
    _z(confidence)  # validates
    alpha = 1 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_interval(values: Sequence[float], confidence: float = 0.95,
                       n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (deterministic for a seed)."""
    x = _as_array(values, "bootstrap_interval")
    return _percentiles(_bootstrap_means(x, n_resamples, seed), confidence)


def _paired(a: Sequence[float], b: Sequence[float], name: str) -> tuple[np.ndarray, np.ndarray]:
    xa, xb = _as_array(a, name), _as_array(b, name)
    if xa.shape != xb.shape:
        raise ValueError(f"{name}: the two models were scored on different numbers of questions "
                         f"({xa.size} vs {xb.size}); pair them on the same questions")
    return xa, xb


def paired_bootstrap(a: Sequence[float], b: Sequence[float], confidence: float = 0.95,
                     n_resamples: int = 2000, seed: int = 0) -> Comparison:
    """Mean of ``b - a`` over questions, its percentile-bootstrap interval (questions resampled
    together) and a two-sided p-value: the share of bootstrap means at least as far from the
    observed mean as the observed mean is from 0 (the bootstrap distribution shifted to the null),
    as ``(1 + count) / (1 + n_resamples)`` so it is never 0."""
    xa, xb = _paired(a, b, "paired_bootstrap")
    d = xb - xa
    observed = float(d.mean())
    means = _bootstrap_means(d, n_resamples, seed)
    low, high = _percentiles(means, confidence)
    extreme = int(np.sum(np.abs(means - observed) >= abs(observed) - 1e-12))
    p = min(1.0, (1 + extreme) / (1 + n_resamples))
    return Comparison(observed, low, high, p, "paired_bootstrap", int(d.size))


def _binary(x: np.ndarray) -> bool:
    return bool(np.all((x == 0) | (x == 1)))


def mcnemar(a_correct: Sequence[float], b_correct: Sequence[float]) -> float:
    """Two-sided McNemar p-value for paired 0/1 scores, from the discordant pairs
    (``a`` right and ``b`` wrong: n10; the reverse: n01). Below ``MCNEMAR_EXACT_BELOW`` discordant
    pairs: exact binomial test of n01 ~ Bin(n01 + n10, 1/2), ``min(1, 2 P(X <= min))``; else
    chi-square (1 df) of ``max(0, |n01 - n10| - 1)^2 / (n01 + n10)``. No discordant pair: 1."""
    xa, xb = _paired(a_correct, b_correct, "mcnemar")
    if not (_binary(xa) and _binary(xb)):
        raise ValueError("mcnemar: scores must be 0/1 per question; use paired_bootstrap")
    n01 = int(np.sum((xa == 0) & (xb == 1)))
    n10 = int(np.sum((xa == 1) & (xb == 0)))
    m = n01 + n10
    if m == 0:
        return 1.0
    if m < MCNEMAR_EXACT_BELOW:
        tail = sum(math.comb(m, k) for k in range(min(n01, n10) + 1))
        return min(1.0, 2 * tail / 2 ** m)
    chi2 = max(0, abs(n01 - n10) - 1) ** 2 / m
    return math.erfc(math.sqrt(chi2 / 2))  # survival function of chi-square with 1 df


def paired_comparison(a_scores: Sequence[float], b_scores: Sequence[float],
                      confidence: float = 0.95, n_resamples: int = 2000,
                      seed: int = 0) -> Comparison:
    """``b - a`` on the same questions. 0/1 scores: the p-value is McNemar's (interval still the
    paired bootstrap's); other scores: the paired bootstrap's."""
    boot = paired_bootstrap(a_scores, b_scores, confidence, n_resamples, seed)
    xa, xb = _paired(a_scores, b_scores, "paired_comparison")
    if _binary(xa) and _binary(xb):
        return Comparison(boot.diff, boot.low, boot.high, mcnemar(xa, xb), "mcnemar", boot.n)
    return boot


def seed_summary(values: Sequence[float], confidence: float = 0.95) -> SeedSummary:
    """Mean, std (ddof=1) and the Student-t interval of the mean across seeds (one arm)."""
    x = _as_array(values, "seed_summary")
    mean = float(x.mean())
    if x.size < 2:
        return SeedSummary(mean, math.nan, math.nan, math.nan, 1)
    from scipy.stats import t  # scipy comes with mlflow; imported only where used

    _z(confidence)
    std = float(x.std(ddof=1))
    half = float(t.ppf(0.5 + confidence / 2, x.size - 1)) * std / math.sqrt(x.size)
    return SeedSummary(mean, std, mean - half, mean + half, int(x.size))


def _signed(v: float) -> str:
    text = f"{abs(v):.1f}"
    return ("−" if v < 0 and text != "0.0" else "+") + text


def _p_text(p: float) -> str:
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.3f}" if p < 0.1 else f"p = {p:.2f}"


def format_comparison(name_b: str, name_a: str, comparison: Comparison, *, scale: float = 100.0,
                      unit: str = "pts", alpha: float = 0.05) -> str:
    """One line such as ``kd − baseline: +0.6 pts [−4.1, +5.3], p = 0.81 (not significant)``.
    ``scale`` 100 turns proportions into points; pass ``scale=1, unit=""`` for raw scores."""
    c = comparison
    unit = f" {unit}" if unit else ""
    verdict = "significant" if c.p < alpha else "not significant"
    return (f"{name_b} − {name_a}: {_signed(c.diff * scale)}{unit} "
            f"[{_signed(c.low * scale)}, {_signed(c.high * scale)}], {_p_text(c.p)} ({verdict})")
