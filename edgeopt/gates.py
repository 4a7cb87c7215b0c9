"""Quality gates as data → verdicts with reasons.

Relative gates (``Gates``) compare a candidate with the FP32 baseline measured in the same run on
the same machine; absolute budgets (``Budgets``) become one gate each when set. Every verdict
names its threshold, the measured value and the margin (positive = passed by that much)::

    accuracy        quality ratio (value / baseline's)          >= gates.accuracy_ratio_min
    speedup         baseline latency / candidate's (p50 | p95)   >= gates.speedup_min
    memory          1 - candidate model RSS / baseline's          >= gates.memory_reduction_min
    cosine          mean cosine similarity to the baseline        >= gates.cosine_min      (if set)
    latency_budget  latency_ms_p95                                <= budgets.latency_ms_p95 (if set)
    memory_budget   rss_peak_mb                                   <= budgets.rss_peak_mb    (if set)
    size_budget     size_bytes / 1e6                              <= budgets.size_mb        (if set)

A candidate without an evaluation fails its accuracy (and cosine) gate: a gate never passes
silently. A threshold met exactly passes (within a relative 1e-9, for float rounding).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

from edgeopt.profiles import Budgets, Gates
from edgeopt.records import BenchmarkResult, CandidateOutcome, EvalResult, GateVerdict

__all__ = [
    "Percentile",
    "evaluate_gates",
    "memory_reduction",
    "outcome_with_gates",
    "quality_ratio",
    "speedup",
    "verdict",
]

log = logging.getLogger(__name__)

Percentile = Literal["p50", "p95"]
Comparator = Literal[">=", "<="]

_REL_TOLERANCE = 1e-9


def verdict(*, gate: str, metric: str, comparator: Comparator, threshold: float, measured: float) -> GateVerdict:
    """One verdict; ``margin`` is positive by how much it passed, negative by how much it failed.

    A non-finite measurement fails.
    """
    margin = measured - threshold if comparator == ">=" else threshold - measured
    passed = math.isfinite(measured) and margin >= -_REL_TOLERANCE * max(1.0, abs(threshold))
    return GateVerdict(gate=gate, metric=metric, comparator=comparator, threshold=threshold,
                       measured=measured, margin=margin, passed=passed)


def _latency(bench: BenchmarkResult, percentile: Percentile) -> float:
    if percentile == "p50":
        return bench.latency_ms_p50
    if percentile == "p95":
        return bench.latency_ms_p95
    raise ValueError(f"percentile must be 'p50' or 'p95', got {percentile!r}")


def speedup(*, candidate_bench: BenchmarkResult, baseline_bench: BenchmarkResult,
            percentile: Percentile = "p50") -> float:
    """Baseline latency / candidate latency at ``percentile``; NaN if either latency is not positive."""
    cand = _latency(candidate_bench, percentile)
    base = _latency(baseline_bench, percentile)
    if not (cand > 0 and base > 0 and math.isfinite(cand) and math.isfinite(base)):
        log.warning("%s: no speed-up at %s (latency %s ms, baseline %s ms)",
                    candidate_bench.candidate, percentile, cand, base)
        return math.nan
    return base / cand


def _memory_pair(candidate_bench: BenchmarkResult, baseline_bench: BenchmarkResult) -> tuple[float, float, str]:
    """(candidate MB, baseline MB, what was compared): model RSS, or peak RSS if the baseline's is not positive."""
    if baseline_bench.rss_model_mb > 0:
        return candidate_bench.rss_model_mb, baseline_bench.rss_model_mb, "model RSS"
    log.debug("baseline %s: model RSS is %.3g MB; comparing peak RSS instead",
             baseline_bench.candidate, baseline_bench.rss_model_mb)
    return candidate_bench.rss_peak_mb, baseline_bench.rss_peak_mb, "peak RSS"


def memory_reduction(*, candidate_bench: BenchmarkResult, baseline_bench: BenchmarkResult) -> float:
    """``1 - candidate / baseline`` model RSS (peak RSS if the baseline's model RSS is not positive).

    NaN when neither baseline figure is positive. Negative when the candidate uses more memory.
    """
    cand, base, _ = _memory_pair(candidate_bench, baseline_bench)
    if not base > 0:
        log.warning("baseline %s: no positive RSS figure; memory reduction undefined", baseline_bench.candidate)
        return math.nan
    return 1.0 - cand / base


def quality_ratio(evaluation: EvalResult) -> float:
    """``value / baseline`` of the evaluation's metric; the raw value when the baseline is not positive.

    (Metrics today are higher-is-better; a lower-is-better metric such as perplexity changes here.)
    """
    return evaluation.value / evaluation.baseline if evaluation.baseline > 0 else evaluation.value


def _accuracy_verdict(evaluation: EvalResult | None, gates: Gates) -> GateVerdict:
    if evaluation is None:
        v = verdict(gate="accuracy", metric="accuracy ratio (not evaluated)", comparator=">=",
                    threshold=gates.accuracy_ratio_min, measured=0.0)
        return v.model_copy(update={"passed": False})
    metric = f"{evaluation.metric} ratio" if evaluation.baseline > 0 else evaluation.metric
    return verdict(gate="accuracy", metric=metric, comparator=">=",
                   threshold=gates.accuracy_ratio_min, measured=quality_ratio(evaluation))


def _cosine_verdict(evaluation: EvalResult | None, threshold: float) -> GateVerdict:
    if evaluation is None:
        v = verdict(gate="cosine", metric="cosine mean (not evaluated)", comparator=">=",
                    threshold=threshold, measured=-1.0)
        return v.model_copy(update={"passed": False})
    return verdict(gate="cosine", metric="cosine mean", comparator=">=", threshold=threshold,
                   measured=evaluation.cosine_mean)


def evaluate_gates(
    *,
    benchmark: BenchmarkResult,
    evaluation: EvalResult | None,
    baseline_benchmark: BenchmarkResult,
    gates: Gates,
    budgets: Budgets,
) -> tuple[GateVerdict, ...]:
    """Verdicts of every gate of the profile, then one per budget set, in the order of the module doc."""
    pct = gates.speedup_percentile
    _, _, memory_basis = _memory_pair(benchmark, baseline_benchmark)
    verdicts = [
        _accuracy_verdict(evaluation, gates),
        verdict(gate="speedup", metric=f"speedup {pct}", comparator=">=", threshold=gates.speedup_min,
                measured=speedup(candidate_bench=benchmark, baseline_bench=baseline_benchmark, percentile=pct)),
        verdict(gate="memory", metric=f"memory reduction ({memory_basis})", comparator=">=",
                threshold=gates.memory_reduction_min,
                measured=memory_reduction(candidate_bench=benchmark, baseline_bench=baseline_benchmark)),
    ]
    if gates.cosine_min is not None:
        verdicts.append(_cosine_verdict(evaluation, gates.cosine_min))
    if budgets.latency_ms_p95 is not None:
        verdicts.append(verdict(gate="latency_budget", metric="latency_ms_p95", comparator="<=",
                                threshold=budgets.latency_ms_p95, measured=benchmark.latency_ms_p95))
    if budgets.rss_peak_mb is not None:
        verdicts.append(verdict(gate="memory_budget", metric="rss_peak_mb", comparator="<=",
                                threshold=budgets.rss_peak_mb, measured=benchmark.rss_peak_mb))
    if budgets.size_mb is not None:
        verdicts.append(verdict(gate="size_budget", metric="size_mb", comparator="<=",
                                threshold=budgets.size_mb, measured=benchmark.size_bytes / 1e6))
    failed = [v.gate for v in verdicts if not v.passed]
    log.debug("%s: %d gate(s), failed: %s", benchmark.candidate, len(verdicts), ", ".join(failed) or "none")
    return tuple(verdicts)


def outcome_with_gates(
    outcome: CandidateOutcome, *, baseline: CandidateOutcome, gates: Gates, budgets: Budgets
) -> CandidateOutcome:
    """A copy of ``outcome`` with speed-ups, memory reduction and gate verdicts filled in.

    A failed outcome (no benchmark, or a failure) is returned unchanged. The baseline must have a
    benchmark (``ValueError`` otherwise: without it nothing can be compared).
    """
    if not outcome.ok or outcome.benchmark is None:
        return outcome
    if not baseline.ok or baseline.benchmark is None:
        raise ValueError(
            f"baseline {baseline.name} has no benchmark ({baseline.failure.reason if baseline.failure else 'not run'});"
            " candidates cannot be compared with it"
        )
    bench, base = outcome.benchmark, baseline.benchmark
    return outcome.model_copy(update={
        "speedup_p50": speedup(candidate_bench=bench, baseline_bench=base, percentile="p50"),
        "speedup_p95": speedup(candidate_bench=bench, baseline_bench=base, percentile="p95"),
        "memory_reduction": memory_reduction(candidate_bench=bench, baseline_bench=base),
        "verdicts": evaluate_gates(benchmark=bench, evaluation=outcome.evaluation, baseline_benchmark=base,
                                   gates=gates, budgets=budgets),
    })
