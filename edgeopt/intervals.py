"""Confidence intervals for the ratios the gates judge (speed-up, memory reduction).

Every candidate is measured in ``repeats`` fresh processes, interleaved with its baseline round by
round (round 1: baseline, A, B...; round 2 in reverse order...). Most of the noise on a shared
machine is between processes and periods (another tenant, memory-bandwidth contention, frequency,
page placement), not between the timed runs of one process, so the interval is built from the
**rounds**, paired (a candidate and its baseline measured side by side in each):

* with two rounds or more: each round gives one ratio (baseline p50 / candidate p50 of that round);
  the interval is Student's t interval of their logarithms, ``mean ± t(conf, k-1) · sd / √k``, mapped
  back. With few rounds t is large (4.30 for 3 rounds at 95%), as it must be: three values say
  little about a spread, and a bootstrap over three rounds would cover only about 75% where it
  claims 95%;
* with one round only the timed runs of that one process can be resampled: the interval covers the
  sampling noise of one process (a bootstrap, ``resamples`` draws) and the verdict says it rests on
  one round.

The point estimate is the ratio over all pooled samples of the rounds both sides have (what the
table shows); the interval is widened to contain it, and to contain ``point · exp(±z · floor_sd)``
when a run-to-run spread is given (``edgeopt.reproducibility``: what another run on the same host
could measure, which no number of rounds in this run narrows). The bootstrap's generator is seeded, so the
same measurements always give the same interval and verdict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "memory_reduction_interval", "ratio_interval", "split_rounds", "t_interval"]

DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 1000
_SEED = 20261129


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


def _bootstrap_quantile(samples: np.ndarray, q: float, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """The ``q`` quantile of ``resamples`` bootstrap draws of one round's samples."""
    return np.array([np.quantile(samples[rng.integers(0, samples.size, samples.size)], q) for _ in range(resamples)])


def ratio_interval(*, baseline: list[np.ndarray], candidate: list[np.ndarray], quantile: float = 0.5,
                   confidence: float = DEFAULT_CONFIDENCE, resamples: int = DEFAULT_RESAMPLES,
                   floor_sd: float = 0.0) -> Interval:
    """``quantile(baseline) / quantile(candidate)`` (a speed-up) with its interval over paired rounds.

    ``baseline`` and ``candidate`` are the latency samples of each round, in the order measured;
    rounds pair by index and only rounds both sides have are used. NaN when a side is empty or a
    latency is not positive and finite. ``floor_sd`` (standard deviation of the log ratio between
    runs) makes the interval at least ``point · exp(±z · floor_sd)``.
    """
    k = min(len(baseline), len(candidate))
    base, cand = [np.asarray(r, float) for r in baseline[:k]], [np.asarray(r, float) for r in candidate[:k]]
    if k == 0 or any(r.size == 0 or not np.isfinite(r).all() or (r <= 0).any() for r in base + cand):
        return Interval.nan(confidence)
    point = float(np.quantile(np.concatenate(base), quantile) / np.quantile(np.concatenate(cand), quantile))
    if k >= 2:
        per_round = [float(np.quantile(b, quantile) / np.quantile(c, quantile)) for b, c in zip(base, cand, strict=True)]
        low, high = np.exp(t_interval(np.log(per_round), confidence=confidence))
        return _floored(Interval(point, float(min(low, point)), float(max(high, point)), confidence, k), floor_sd)
    rng = np.random.default_rng(_SEED)  # one round: the sampling noise of that process only
    dist = (_bootstrap_quantile(base[0], quantile, resamples, rng)
            / _bootstrap_quantile(cand[0], quantile, resamples, rng))
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(dist, [alpha, 1.0 - alpha])
    return _floored(Interval(point, float(min(low, point)), float(max(high, point)), confidence, k), floor_sd)


def _floored(iv: Interval, floor_sd: float) -> Interval:
    """``iv`` widened to ``point · exp(±z · floor_sd)`` where it is narrower."""
    if not floor_sd > 0:
        return iv
    from scipy.stats import norm

    band = math.exp(float(norm.ppf(0.5 + iv.confidence / 2.0)) * floor_sd)
    return Interval(iv.point, min(iv.low, iv.point / band), max(iv.high, iv.point * band), iv.confidence, iv.rounds)


def t_interval(values: Sequence[float], *, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Student's t interval of the mean of ``values`` (two or more)."""
    from scipy.stats import t

    arr = np.asarray(values, dtype=np.float64)
    if arr.size < 2:
        raise ValueError(f"a t interval needs two values or more, got {arr.size}")
    half = float(t.ppf(0.5 + confidence / 2.0, arr.size - 1)) * float(arr.std(ddof=1)) / math.sqrt(arr.size)
    return float(arr.mean() - half), float(arr.mean() + half)


def memory_reduction_interval(*, baseline: Sequence[float], candidate: Sequence[float],
                              confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """``1 - median(candidate) / median(baseline)`` over paired rounds, with the t interval of the
    rounds' own reductions.

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
    low, high = t_interval(1.0 - cand / base, confidence=confidence)
    return Interval(point, float(min(low, point)), float(max(high, point)), confidence, k)
