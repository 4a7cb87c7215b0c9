"""Benchmark harness: every measurement in a fresh, supervised subprocess.

Public surface::

    BenchSettings                      how a latency measurement runs (runs, durations, limits)
    measure(*, artifact, settings, signature, hardware, out_dir, data_path=None, lock_path=None)
        -> BenchmarkResult             latency percentiles, throughput, memory (steady, peaks), load time,
                                       size, the audit's captured outputs and repeat ratio
    infer(*, artifact, signature, out_path, data_path=None, batch_size=1, max_samples=None,
          timeout_s=300.0) -> Path     every sample's outputs in an .npz, for the evaluators
    check_outputs(*, benchmark, outputs_path, rtol=AUDIT_RTOL) -> None
                                       the timed loop's outputs against the evaluation run's (audit)
    combine(results, *, out_path) -> BenchmarkResult     pool repeated measurements, with their spread
    interleaved_rounds(*, artifacts, reference, rounds, ...) -> (samples per name and round, failures)
                                       a reference and others measured in alternating-order rounds
    summarize(samples_ms) -> LatencySummary, relative_spread(values) -> float

A worker that crashes, hangs, runs out of memory or produces non-finite outputs makes these raise
``CandidateFailed`` with a classified reason (see ``edgeopt.bench.supervise``); ``measure`` and
``check_outputs`` raise it with reason ``audit`` when results look cached or the timed runs computed
something other than the evaluation run (see ``edgeopt.bench.audit``). Memory figures are described in
``edgeopt.bench.memory``.
"""

from edgeopt.bench.audit import AUDIT_RTOL, check_outputs
from edgeopt.bench.harness import (
    AUDIT_REPEAT_RATIO_MIN,
    BenchSettings,
    artifact_size_bytes,
    combine,
    infer,
    measure,
)
from edgeopt.bench.rounds import interleaved_rounds
from edgeopt.bench.stats import LatencySummary, min_samples_for, relative_spread, summarize

__all__ = [
    "AUDIT_REPEAT_RATIO_MIN",
    "AUDIT_RTOL",
    "BenchSettings",
    "LatencySummary",
    "artifact_size_bytes",
    "check_outputs",
    "combine",
    "infer",
    "interleaved_rounds",
    "measure",
    "min_samples_for",
    "relative_spread",
    "summarize",
]
