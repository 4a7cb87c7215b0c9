"""Latency statistics: one summary of raw samples, and the spread of repeated measurements."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["LatencySummary", "min_samples_for", "relative_spread", "summarize"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencySummary:
    """Summary of per-run latencies in milliseconds (percentiles by linear interpolation)."""

    samples: int
    latency_ms_p50: float
    latency_ms_p90: float
    latency_ms_p95: float
    latency_ms_p99: float
    latency_ms_mean: float
    latency_ms_std: float
    latency_ms_min: float
    latency_ms_max: float
    timed_s: float

    def throughput_per_s(self, *, batch_size: int) -> float:
        """Items per second over the timed runs: ``batch_size * samples / total timed seconds``."""
        return batch_size * self.samples / self.timed_s if self.timed_s > 0 else 0.0


def min_samples_for(percentile: float) -> int:
    """Fewest samples for which at least one sample lies above ``percentile`` (e.g. 100 for p99)."""
    if not 0 < percentile < 100:
        raise ValueError(f"percentile must be in (0, 100), got {percentile}")
    return int(np.ceil(100.0 / (100.0 - percentile) - 1e-9))


def summarize(samples_ms: np.ndarray) -> LatencySummary:
    """Summarize raw latencies (ms). Raises ``ValueError`` on an empty or non-finite array."""
    arr = np.asarray(samples_ms, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError("no latency samples to summarize")
    if not np.isfinite(arr).all():
        raise ValueError("latency samples contain NaN or inf")
    p50, p90, p95, p99 = np.percentile(arr, [50, 90, 95, 99], method="linear")
    if arr.size < min_samples_for(99):
        log.warning("p99 from %d samples is interpolated (needs >= %d for a tail sample)",
                    arr.size, min_samples_for(99))
    return LatencySummary(
        samples=int(arr.size),
        latency_ms_p50=float(p50),
        latency_ms_p90=float(p90),
        latency_ms_p95=float(p95),
        latency_ms_p99=float(p99),
        latency_ms_mean=float(arr.mean()),
        latency_ms_std=float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        latency_ms_min=float(arr.min()),
        latency_ms_max=float(arr.max()),
        timed_s=float(arr.sum()) / 1000.0,
    )


def relative_spread(values: Sequence[float]) -> float:
    """Spread of repeated measurements of one figure: ``(max - min) / median`` (0 for one value)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no values")
    median = float(np.median(arr))
    return float((arr.max() - arr.min()) / median) if median > 0 else 0.0
