"""Quality gates as data → verdicts with reasons.

Relative gates (``Gates``) compare a candidate with the baseline measured in the same run on the
same machine, on the same inputs, sequence shapes and thread budget (its like-for-like baseline);
absolute budgets (``Budgets``) become one gate each when set. Every verdict names its threshold,
the measured value and the margin (positive = passed by that much)::

    accuracy        quality ratio (value / baseline's)          >= gates.accuracy_ratio_min
    speedup         baseline latency / candidate's (p50 | p95)   >= gates.speedup_min       (with CI)
    memory          1 - candidate memory / baseline's             >= gates.memory_reduction_min (with CI)
                    (steady-state model memory, or the peak during load and inference: gates.memory_basis)
    cosine          mean cosine similarity to the baseline        >= gates.cosine_min      (if set)
    latency_budget  latency_ms_p95                                <= budgets.latency_ms_p95 (if set)
    memory_budget   rss_peak_mb                                   <= budgets.rss_peak_mb    (if set)
    size_budget     size_bytes / 1e6                              <= budgets.size_mb        (if set)

Speed-up and memory verdicts carry a confidence interval from the interleaved rounds
(``edgeopt.intervals``): ``pass`` when the whole interval clears the threshold, ``fail`` when
the whole interval misses it, ``uncertain`` when it straddles it (the flow re-measures those, then
the verdict stands; only settled passes are selected). A verdict without an interval (no round
samples, or a point-only figure) is settled by its point value. A speed-up's interval is at least as
wide as this host's run-to-run spread (``run_to_run_sd``, ``edgeopt.reproducibility``), so a speed-up
settles only when it would hold in another run on this host; the verdict records the spread it used.
When the same comparison was measured in earlier runs on this host (``earlier_speedups``), the
speed-up verdict is judged on all of them (``edgeopt.reproducibility.pooled``; ``runs_pooled`` and
``pooled_point`` say so), so it converges run after run instead of following each run's weather;
and a verdict the pooled evidence has settled stands as the host's decision until that evidence
settles it the other way (``edgeopt.reproducibility.sequential``; ``held_from_run`` says so).

A candidate without an evaluation fails its accuracy (and cosine) gate, and a figure that could
not be measured (NaN, or a memory figure that is not positive) fails its gate: a gate never passes
silently. A threshold met exactly passes (within a relative 1e-9, for float rounding).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from edgeopt.intervals import Interval, memory_reduction_interval, ratio_interval, split_rounds
from edgeopt.profiles import Budgets, Gates
from edgeopt.records import BenchmarkResult, CandidateOutcome, EvalResult, GateVerdict, GenerationResult
from edgeopt.reproducibility import Decision, sequential, settleable

__all__ = [
    "MemoryBasis",
    "Percentile",
    "evaluate_gates",
    "llm_verdicts",
    "memory_interval",
    "memory_reduction",
    "more_rounds_could_settle",
    "outcome_with_gates",
    "quality_ratio",
    "rounds",
    "speedup",
    "speedup_interval",
    "speedup_metric",
    "verdict",
]

log = logging.getLogger(__name__)

Percentile = Literal["p50", "p95"]
Comparator = Literal[">=", "<="]

_REL_TOLERANCE = 1e-9


def _settled(ok: bool) -> str:
    return "pass" if ok else "fail"


def verdict(*, gate: str, metric: str, comparator: Comparator, threshold: float, measured: float,
            interval: Interval | None = None, run_to_run_sd: float | None = None,
            runs_pooled: int | None = None, decision: Decision | None = None) -> GateVerdict:
    """One verdict; ``margin`` is positive by how much it passed, negative by how much it failed.

    With a finite ``interval`` the status follows the interval (see the module doc); without one
    it follows ``measured``. A non-finite measurement fails. ``decision``: the host's sequential
    decision on this comparison (``interval`` and ``runs_pooled`` are then its own); an interval that
    straddles the threshold takes the decision it holds.
    """
    if decision is not None:
        interval, runs_pooled = decision.interval, decision.runs
    margin = measured - threshold if comparator == ">=" else threshold - measured
    tol = _REL_TOLERANCE * max(1.0, abs(threshold))
    if not math.isfinite(measured):
        status = "fail"
    elif interval is not None and interval.finite:
        worst, best = (interval.low, interval.high) if comparator == ">=" else (-interval.high, -interval.low)
        bound = threshold if comparator == ">=" else -threshold
        status = "pass" if worst >= bound - tol else ("fail" if best < bound - tol else "uncertain")
        if status == "uncertain" and decision is not None and decision.held is not None:
            status = decision.held
    else:
        status = _settled(margin >= -tol)
    ci = {}
    if interval is not None and interval.finite:
        ci = {"ci_low": interval.low, "ci_high": interval.high, "confidence": interval.confidence}
    if run_to_run_sd is not None:
        ci["run_to_run_sd"] = run_to_run_sd
    if runs_pooled is not None:
        ci["runs_pooled"] = runs_pooled
        if runs_pooled > 1 and interval is not None:
            ci["pooled_point"] = interval.point
    if decision is not None and decision.held is not None and status == decision.held and math.isfinite(measured):
        ci["held_from_run"] = decision.settled_at
    return GateVerdict(gate=gate, metric=metric, comparator=comparator, threshold=threshold, measured=measured,
                       margin=margin, passed=status == "pass", status=status, **ci)


def speedup_metric(percentile: Percentile, baseline: str) -> str:
    """The speed-up verdict's metric name: its percentile and the baseline it compares with."""
    return f"speedup {percentile} vs {baseline}"


def _quantile(percentile: Percentile) -> float:
    if percentile not in ("p50", "p95"):
        raise ValueError(f"percentile must be 'p50' or 'p95', got {percentile!r}")
    return 0.5 if percentile == "p50" else 0.95


def _latency(bench: BenchmarkResult, percentile: Percentile) -> float:
    return bench.latency_ms_p50 if _quantile(percentile) == 0.5 else bench.latency_ms_p95


def rounds(bench: BenchmarkResult) -> list[np.ndarray] | None:
    """The latency samples of each interleaved round (None when the samples file is not there)."""
    if not bench.samples_path:
        return None
    try:
        samples = np.load(bench.samples_path, allow_pickle=False)
    except OSError:
        log.warning("%s: samples file %s cannot be read; its ratios have no interval", bench.candidate,
                    bench.samples_path)
        return None
    return split_rounds(samples, bench.repeat_sample_counts)


def speedup_interval(*, candidate_bench: BenchmarkResult, baseline_bench: BenchmarkResult,
                     percentile: Percentile = "p50", confidence: float = 0.95, run_to_run_sd: float = 0.0) -> Interval:
    """Baseline latency / candidate latency at ``percentile`` over the rounds they share, with its
    interval over paired rounds (edgeopt.intervals), at least ``point · exp(±z · run_to_run_sd)`` wide;
    the point alone when there are no round samples; NaN if a latency is not positive."""
    q = _quantile(percentile)
    base_rounds, cand_rounds = rounds(baseline_bench), rounds(candidate_bench)
    if base_rounds is not None and cand_rounds is not None:
        return ratio_interval(baseline=base_rounds, candidate=cand_rounds, quantile=q, confidence=confidence,
                              floor_sd=run_to_run_sd)
    cand, base = _latency(candidate_bench, percentile), _latency(baseline_bench, percentile)
    if not (cand > 0 and base > 0 and math.isfinite(cand) and math.isfinite(base)):
        log.warning("%s: no speed-up at %s (latency %s ms, baseline %s ms)",
                    candidate_bench.candidate, percentile, cand, base)
        return Interval.nan(confidence)
    return Interval(base / cand, math.nan, math.nan, confidence, 0)


def speedup(*, candidate_bench: BenchmarkResult, baseline_bench: BenchmarkResult,
            percentile: Percentile = "p50") -> float:
    """Baseline latency / candidate latency at ``percentile`` (see ``speedup_interval``); NaN if not measurable."""
    return speedup_interval(candidate_bench=candidate_bench, baseline_bench=baseline_bench,
                            percentile=percentile).point


MemoryBasis = Literal["steady", "peak"]


def _memory_rounds(bench: BenchmarkResult, basis: MemoryBasis) -> list[float]:
    if basis == "peak":
        return [bench.rss_peak_model_mb]
    return list(bench.rss_steady_mb_repeats) or [bench.rss_steady_mb]


def memory_interval(*, candidate_bench: BenchmarkResult, baseline_bench: BenchmarkResult,
                    basis: MemoryBasis = "steady", confidence: float = 0.95) -> Interval:
    """``1 - candidate / baseline`` memory on ``basis`` over paired rounds, with its interval.

    NaN when either figure is not positive or not finite: an unmeasured memory never reads as
    "100% less memory". Negative when the candidate uses more memory.
    """
    cand, base = _memory_rounds(candidate_bench, basis), _memory_rounds(baseline_bench, basis)
    result = memory_reduction_interval(baseline=base, candidate=cand, confidence=confidence)
    if not result.finite:
        log.warning("%s: memory (%s) %s MB vs baseline %s MB: not measurable, the memory gate fails",
                    candidate_bench.candidate, basis, cand, base)
    return result


def memory_reduction(*, candidate_bench: BenchmarkResult, baseline_bench: BenchmarkResult,
                     basis: MemoryBasis = "steady") -> float:
    """``1 - candidate / baseline`` memory on ``basis`` (see ``memory_interval``); NaN if not measurable."""
    return memory_interval(candidate_bench=candidate_bench, baseline_bench=baseline_bench, basis=basis).point


def quality_ratio(evaluation: EvalResult) -> float:
    """``value / baseline`` of the evaluation's metric; the raw value when the baseline is not positive.

    (Metrics today are higher-is-better; a lower-is-better metric such as perplexity changes here.)
    """
    return evaluation.value / evaluation.baseline if evaluation.baseline > 0 else evaluation.value


def _accuracy_verdict(evaluation: EvalResult | None, gates: Gates) -> GateVerdict:
    if evaluation is None:
        v = verdict(gate="accuracy", metric="accuracy ratio (not evaluated)", comparator=">=",
                    threshold=gates.accuracy_ratio_min, measured=0.0)
        return v.model_copy(update={"passed": False, "status": "fail"})
    metric = f"{evaluation.metric} ratio" if evaluation.baseline > 0 else evaluation.metric
    return verdict(gate="accuracy", metric=metric, comparator=">=",
                   threshold=gates.accuracy_ratio_min, measured=quality_ratio(evaluation))


def _cosine_verdict(evaluation: EvalResult | None, threshold: float) -> GateVerdict:
    if evaluation is None:
        v = verdict(gate="cosine", metric="cosine mean (not evaluated)", comparator=">=",
                    threshold=threshold, measured=-1.0)
        return v.model_copy(update={"passed": False, "status": "fail"})
    return verdict(gate="cosine", metric="cosine mean", comparator=">=", threshold=threshold,
                   measured=evaluation.cosine_mean)


def evaluate_gates(
    *,
    benchmark: BenchmarkResult,
    evaluation: EvalResult | None,
    baseline_benchmark: BenchmarkResult,
    gates: Gates,
    budgets: Budgets,
    run_to_run_sd: float = 0.0,
    earlier_speedups: Sequence[tuple[float, float]] = (),
) -> tuple[GateVerdict, ...]:
    """Verdicts of every gate of the profile, then one per budget set, in the order of the module doc.

    ``run_to_run_sd``: this host's run-to-run spread of log speed-up, the floor of the speed-up interval.
    ``earlier_speedups``: (log speed-up, its run's own sd) of the same comparison in earlier runs on this host, pooled
    with this run's for the speed-up verdict (``edgeopt.reproducibility.pooled``).
    """
    pct, basis = gates.speedup_percentile, gates.memory_basis
    own = speedup_interval(candidate_bench=benchmark, baseline_bench=baseline_benchmark, percentile=pct,
                           confidence=gates.confidence, run_to_run_sd=run_to_run_sd)
    speed = sequential(own, list(earlier_speedups), sd_log=run_to_run_sd, threshold=gates.speedup_min)
    memory = memory_interval(candidate_bench=benchmark, baseline_bench=baseline_benchmark, basis=basis,
                             confidence=gates.confidence)
    basis_name = "steady-state model memory" if basis == "steady" else "peak model memory"
    verdicts = [
        _accuracy_verdict(evaluation, gates),
        verdict(gate="speedup", metric=speedup_metric(pct, baseline_benchmark.candidate), comparator=">=",
                threshold=gates.speedup_min, measured=own.point, run_to_run_sd=run_to_run_sd, decision=speed),
        verdict(gate="memory", metric=f"memory reduction ({basis_name}) vs {baseline_benchmark.candidate}",
                comparator=">=", threshold=gates.memory_reduction_min, measured=memory.point, interval=memory),
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


def more_rounds_could_settle(outcome: CandidateOutcome) -> bool:
    """Whether an ``uncertain`` outcome is worth more rounds: some uncertain verdict of it is not
    within the host's run-to-run band of its threshold, which no number of rounds narrows."""
    for v in outcome.verdicts:
        if v.status != "uncertain":
            continue
        if v.gate != "speedup" or not v.run_to_run_sd:
            return True
        point = v.pooled_point if v.pooled_point is not None else v.measured
        if settleable(point=point, threshold=v.threshold, sd_log=v.run_to_run_sd,
                      confidence=v.confidence or 0.95, runs=v.runs_pooled or 1):
            return True
    return False


def outcome_with_gates(
    outcome: CandidateOutcome, *, baseline: CandidateOutcome, gates: Gates, budgets: Budgets,
    run_to_run_sd: float = 0.0,
    earlier_speedups: Sequence[tuple[float, float]] = (),
) -> CandidateOutcome:
    """A copy of ``outcome`` with speed-ups, memory reduction and gate verdicts filled in, against
    ``baseline`` (its like-for-like baseline, named in ``outcome.baseline``).

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
    verdicts = evaluate_gates(benchmark=bench, evaluation=outcome.evaluation, baseline_benchmark=base,
                              gates=gates, budgets=budgets, run_to_run_sd=run_to_run_sd,
                              earlier_speedups=earlier_speedups)
    by_gate = {v.gate: v for v in verdicts}
    speed_p50 = by_gate["speedup"].measured if gates.speedup_percentile == "p50" else speedup(
        candidate_bench=bench, baseline_bench=base, percentile="p50")
    speed_p95 = by_gate["speedup"].measured if gates.speedup_percentile == "p95" else speedup(
        candidate_bench=bench, baseline_bench=base, percentile="p95")
    return outcome.model_copy(update={
        "baseline": baseline.name,
        "speedup_p50": speed_p50,
        "speedup_p95": speed_p95,
        "memory_reduction": by_gate["memory"].measured,
        "verdicts": verdicts,
    })


def llm_verdicts(*, candidate: GenerationResult, baseline: GenerationResult, perplexity: float,
                 baseline_perplexity: float, kld_mean: float, gates: Gates) -> tuple[GateVerdict, ...]:
    """A language model's gates against its F16 reference, measured side by side (NaN fails its gate).

    Perplexity ratio (``perplexity_ratio_max``, default 1.05), mean KLD (``kld_mean_max``, default 0.01),
    generation speed-up (tokens/s ratio, ``speedup_min``) and memory reduction (the RSS the loaded model
    added, ``memory_reduction_min``)."""
    ratio_max = gates.perplexity_ratio_max if gates.perplexity_ratio_max is not None else 1.05
    kld_max = gates.kld_mean_max if gates.kld_mean_max is not None else 0.01
    ratio = perplexity / baseline_perplexity if baseline_perplexity > 0 else math.nan
    speed = candidate.gen_tps / baseline.gen_tps if baseline.gen_tps > 0 else math.nan
    mem = 1 - candidate.rss_model_mb / baseline.rss_model_mb if baseline.rss_model_mb > 0 else math.nan
    return (
        verdict(gate="perplexity", metric="perplexity_ratio", comparator="<=", threshold=ratio_max, measured=ratio),
        verdict(gate="kld", metric="kld_mean", comparator="<=", threshold=kld_max, measured=kld_mean),
        verdict(gate="speedup", metric="generation_speedup", comparator=">=", threshold=gates.speedup_min,
                measured=speed),
        verdict(gate="memory", metric="memory_reduction", comparator=">=", threshold=gates.memory_reduction_min,
                measured=mem),
    )
