"""Confidence intervals for the ratios the gates judge (speed-up, memory reduction).

Every candidate is measured in ``repeats`` fresh processes, interleaved with its baseline round by
round (round 1: baseline, A, B...; round 2: ...). Most of the noise on a shared machine is between
processes and periods (another tenant, frequency, page placement), not between the timed runs of
one process, so a bootstrap over the pooled samples alone would be far too narrow. The interval
here is a **paired, two-level bootstrap**:

1. draw R rounds with replacement (R = rounds both sides have), the *same* round indices for the
   candidate and its baseline (they were measured side by side);
2. inside each drawn round, draw that round's timed runs with replacement;
3. compute the statistic (e.g. baseline p50 / candidate p50 over the drawn samples).

The interval is the percentile interval of ``resamples`` such draws (95% by default). With one
round only step 2 remains, and the interval covers only the sampling noise of one process (the
gate's verdict says how many rounds it rests on). The random generator is seeded, so the same
measurements always give the same interval and verdict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "memory_reduction_interval", "ratio_interval", "split_rounds"]

DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 1000
_SEED = 20261129
_CHUNK = 100  # bootstrap draws evaluated at once (memory: _CHUNK x pooled samples)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval (NaN everywhere when it cannot be formed)."""

    point: float
    low: float
    high: float
    confidence: float
    rounds: int

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.point, self.low, self.high))

    @classmethod
    def nan(cls, confidence: float = DEFAULT_CONFIDENCE) -> Interval:
        return cls(math.nan, math.nan, math.nan, confidence, 0)


def split_rounds(samples: np.ndarray, counts: Sequence[int]) -> list[np.ndarray]:
    """Pooled samples (one round after another) cut back into rounds; one round if ``counts`` is empty."""
    arr = np.asarray(samples, dtype=np.float64).ravel()
    if not counts:
        return [arr]
    if sum(counts) != arr.size:
        raise ValueError(f"round sizes {list(counts)} add up to {sum(counts)}, the samples hold {arr.size}")
    return [part for part in np.split(arr, np.cumsum(counts)[:-1])]


def _draw(rounds: list[np.ndarray], picks: np.ndarray, q: float, rng: np.random.Generator) -> np.ndarray:
    """The ``q`` quantile of each bootstrap draw; ``picks`` is (draws, R) round indices."""
    out = np.empty(picks.shape[0])
    for i, row in enumerate(picks):
        parts = [rounds[j][rng.integers(0, rounds[j].size, rounds[j].size)] for j in row]
        out[i] = np.quantile(np.concatenate(parts), q)
    return out


def ratio_interval(*, baseline: list[np.ndarray], candidate: list[np.ndarray], quantile: float = 0.5,
                   confidence: float = DEFAULT_CONFIDENCE, resamples: int = DEFAULT_RESAMPLES) -> Interval:
    """``quantile(baseline) / quantile(candidate)`` (a speed-up) with its paired bootstrap interval.

    ``baseline`` and ``candidate`` are the latency samples of each round, in the order measured;
    rounds pair by index and only rounds both sides have are used. NaN when a side is empty or a
    latency is not positive and finite.
    """
    k = min(len(baseline), len(candidate))
    base, cand = [np.asarray(r, float) for r in baseline[:k]], [np.asarray(r, float) for r in candidate[:k]]
    if k == 0 or any(r.size == 0 or not np.isfinite(r).all() or (r <= 0).any() for r in base + cand):
        return Interval.nan(confidence)
    point = float(np.quantile(np.concatenate(base), quantile) / np.quantile(np.concatenate(cand), quantile))
    rng = np.random.default_rng(_SEED)
    ratios = []
    for start in range(0, resamples, _CHUNK):
        n = min(_CHUNK, resamples - start)
        picks = rng.integers(0, k, (n, k)) if k > 1 else np.zeros((n, 1), dtype=int)
        ratios.append(_draw(base, picks, quantile, rng) / _draw(cand, picks, quantile, rng))
    dist = np.concatenate(ratios)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(dist, [alpha, 1.0 - alpha])
    return Interval(point, float(min(low, point)), float(max(high, point)), confidence, k)


def memory_reduction_interval(*, baseline: Sequence[float], candidate: Sequence[float],
                              confidence: float = DEFAULT_CONFIDENCE,
                              resamples: int = DEFAULT_RESAMPLES) -> Interval:
    """``1 - median(candidate) / median(baseline)`` over paired rounds, with a bootstrap over rounds.

    Each value is one round's memory figure (MB). A value that is not positive and finite is a
    failed measurement: the result is NaN (and the memory gate fails), never "100% less memory".
    """
    k = min(len(baseline), len(candidate))
    base, cand = np.asarray(baseline[:k], float), np.asarray(candidate[:k], float)
    if k == 0 or not (np.isfinite(base).all() and np.isfinite(cand).all() and (base > 0).all() and (cand > 0).all()):
        return Interval.nan(confidence)
    point = float(1.0 - np.median(cand) / np.median(base))
    if k == 1:
        return Interval(point, point, point, confidence, 1)
    rng = np.random.default_rng(_SEED)
    picks = rng.integers(0, k, (resamples, k))
    dist = 1.0 - np.median(cand[picks], axis=1) / np.median(base[picks], axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(dist, [alpha, 1.0 - alpha])
    return Interval(point, float(min(low, point)), float(max(high, point)), confidence, k)
