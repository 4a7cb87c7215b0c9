"""Benchmark harness: every measurement in a fresh, supervised subprocess.

Public surface::

    BenchSettings                      how a latency measurement runs (runs, durations, limits)
    measure(*, artifact, settings, signature, hardware, out_dir, data_path=None, lock_path=None)
        -> BenchmarkResult             latency percentiles, throughput, RSS, load time, size
    infer(*, artifact, signature, out_path, data_path=None, batch_size=1, max_samples=None,
          timeout_s=300.0) -> Path     every sample's outputs in an .npz, for the evaluators
    combine(results, *, out_path) -> BenchmarkResult     pool repeated measurements, with their spread
    summarize(samples_ms) -> LatencySummary, relative_spread(values) -> float

A worker that crashes, hangs, runs out of memory or produces non-finite outputs makes these raise
``CandidateFailed`` with a classified reason (see ``edgeopt.bench.harness``).
"""

from edgeopt.bench.harness import BenchSettings, artifact_size_bytes, combine, infer, measure
from edgeopt.bench.stats import LatencySummary, min_samples_for, relative_spread, summarize

__all__ = [
    "BenchSettings",
    "LatencySummary",
    "artifact_size_bytes",
    "combine",
    "infer",
    "measure",
    "min_samples_for",
    "relative_spread",
    "summarize",
]
