"""Pareto frontier and recommendation: edgeopt.pareto."""

from __future__ import annotations

import math

import pytest

from edgeopt.gates import outcome_with_gates
from edgeopt.pareto import dominates, nearest_misses, pareto_frontier, score, select
from edgeopt.profiles import Budgets, Gates, Objective
from edgeopt.records import (
    BenchmarkResult,
    CandidateOutcome,
    CandidateSpec,
    EvalResult,
    Failure,
    HardwareFingerprint,
)

# --- shared factories -------------------------------------------------------------------------

HW = HardwareFingerprint(hostname="h", os="linux", arch="x86_64", cpu_model="cpu", isa_flags=("avx2",),
                         cores_physical=4, cores_logical=8, ram_mb=16000, python="3.12")


def bench(name: str, *, p50: float, p95: float | None = None, rss_model: float = 40.0,
          size: int = 1_000_000) -> BenchmarkResult:
    p95 = 2 * p50 if p95 is None else p95
    return BenchmarkResult(
        candidate=name, samples=200, batch_size=1, latency_ms_p50=p50, latency_ms_p90=p95, latency_ms_p95=p95,
        latency_ms_p99=p95, latency_ms_mean=p50, latency_ms_std=0.1, latency_ms_min=p50, latency_ms_max=p95,
        throughput_per_s=1000.0 / p50, rss_peak_mb=rss_model + 200.0, rss_steady_mb=rss_model,
        rss_peak_model_mb=rss_model * 1.5, load_time_ms=5.0,
        size_bytes=size, duration_s=2.0, hardware=HW,
    )


BASELINE_ACCURACY = 0.9


def ev(name: str, acc: float) -> EvalResult:
    return EvalResult(candidate=name, metric="top1_accuracy", value=acc, baseline=BASELINE_ACCURACY,
                      delta=acc - BASELINE_ACCURACY, samples=100, top1_agreement=0.99, cosine_mean=0.999,
                      cosine_min=0.99, max_abs_error=0.1)


BASELINE = CandidateOutcome(
    spec=CandidateSpec(name="baseline-fp32", backend="onnxruntime", baseline=True),
    benchmark=bench("baseline-fp32", p50=20.0, p95=40.0, rss_model=100.0, size=4_000_000),
    evaluation=ev("baseline-fp32", BASELINE_ACCURACY),
)
GATES = Gates(accuracy_ratio_min=0.95, speedup_min=2.0, speedup_percentile="p50", memory_reduction_min=0.5)


def cand(name: str, *, p50: float, p95: float | None = None, acc: float | None = 0.9, rss_model: float = 40.0,
         size: int = 1_000_000, gates: Gates = GATES, budgets: Budgets | None = None) -> CandidateOutcome:
    """A measured candidate with its gates applied against BASELINE."""
    outcome = CandidateOutcome(
        spec=CandidateSpec(name=name, backend="onnxruntime"),
        benchmark=bench(name, p50=p50, p95=p95, rss_model=rss_model, size=size),
        evaluation=None if acc is None else ev(name, acc),
    )
    return outcome_with_gates(outcome, baseline=BASELINE, gates=gates, budgets=budgets or Budgets())


def failed(name: str) -> CandidateOutcome:
    return CandidateOutcome(spec=CandidateSpec(name=name, backend="onnxruntime"),
                            failure=Failure(stage="build", reason="unsupported-op", message="no kernel"))


# --- frontier ---------------------------------------------------------------------------------


def test_dominated_point_is_excluded() -> None:
    a = cand("a", p50=5.0, acc=0.89, rss_model=40.0, size=1_000_000)
    b = cand("b", p50=6.0, acc=0.88, rss_model=40.0, size=1_000_000)  # slower and less accurate than a
    assert dominates(a, b) and not dominates(b, a)
    assert pareto_frontier([BASELINE, b, a]) == ("baseline-fp32", "a")


def test_one_strictly_better_objective_is_enough_to_dominate() -> None:
    a = cand("a", p50=5.0, size=1_000_000)
    b = cand("b", p50=5.0, size=1_000_001)
    assert pareto_frontier([a, b]) == ("a",)


def test_ties_and_trade_offs_are_not_dominated() -> None:
    a = cand("a", p50=5.0)
    twin = cand("twin", p50=5.0)
    accurate = cand("accurate", p50=8.0, acc=0.91)
    assert not dominates(a, twin) and not dominates(twin, a)
    assert pareto_frontier([accurate, a, twin]) == ("accurate", "a", "twin")  # input order


def test_failed_outcomes_are_not_on_the_frontier() -> None:
    broken = failed("broken")
    crashed_in_eval = cand("crashed", p50=1.0, acc=0.95, rss_model=1.0, size=1).model_copy(
        update={"failure": Failure(stage="evaluate", reason="accuracy", message="NaN")})
    a = cand("a", p50=5.0, acc=0.89)  # less accurate than the baseline, so both are on the frontier
    assert pareto_frontier([BASELINE, broken, crashed_in_eval, a]) == ("baseline-fp32", "a")


def test_missing_evaluation_is_worst_quality() -> None:
    evaluated = cand("evaluated", p50=5.0, acc=0.5)
    blind = cand("blind", p50=5.0, acc=None)
    assert pareto_frontier([blind, evaluated]) == ("evaluated",)


# --- selection --------------------------------------------------------------------------------


def trade_off() -> list[CandidateOutcome]:
    fast = cand("fast", p50=5.0, p95=10.0, acc=0.86)  # 4x at p95, accuracy ratio 0.956
    accurate = cand("accurate", p50=8.0, p95=16.0, acc=0.89)  # 2.5x at p95, accuracy ratio 0.989
    return [BASELINE, fast, accurate, failed("broken")]


def test_selection_picks_by_weights() -> None:
    outcomes = trade_off()
    speed = select(outcomes, objective=Objective(latency=1.0, accuracy=0.0, memory=0.0, size=0.0))
    quality = select(outcomes, objective=Objective(latency=0.0, accuracy=1.0, memory=0.0, size=0.0))
    assert speed.selected == "fast"
    assert quality.selected == "accurate"
    assert speed.frontier == quality.frontier == ("baseline-fp32", "fast", "accurate")
    assert speed.passing == ("fast", "accurate")
    assert set(speed.scores) == {"fast", "accurate"}


def test_score_by_hand() -> None:
    sel = select(trade_off(), objective=Objective(latency=0.5, accuracy=0.3, memory=0.1, size=0.1))
    expected = 0.5 * math.log(4.0) + 0.3 * math.log(0.86 / 0.9) + 0.1 * math.log(100 / 40) + 0.1 * math.log(4.0)
    assert sel.scores["fast"] == pytest.approx(expected)
    assert sel.selected == "fast"
    assert sel.nearest_misses == ()


def test_selection_message_is_a_plain_sentence() -> None:
    sel = select(trade_off(), objective=Objective(latency=1.0, accuracy=0.0, memory=0.0, size=0.0))
    assert sel.message == "selected fast: 4.0× faster at p50, accuracy 0.860 (baseline 0.900), 60% less memory"


def test_the_selection_message_gives_the_speed_up_the_verdict_rests_on() -> None:
    """A speed-up judged on several runs here is announced as that pooled figure, this run's beside it (seen:
    a loaded run's own 1.4x announced as the winner's speed-up when twelve runs put it at 2.3x)."""
    outcomes = trade_off()
    fast = next(o for o in outcomes if o.name == "fast")
    pooled_verdicts = tuple(v.model_copy(update={"runs_pooled": 12, "pooled_point": 3.6}) if v.gate == "speedup"
                            else v for v in fast.verdicts)
    outcomes = [o.model_copy(update={"verdicts": pooled_verdicts}) if o.name == "fast" else o for o in outcomes]
    sel = select(outcomes, objective=Objective(latency=1.0, accuracy=0.0, memory=0.0, size=0.0))
    assert sel.message.startswith("selected fast: 3.6× faster at p50 over 12 runs on this host (4.0× in this run), ")


def test_ties_go_to_lower_p95_then_name() -> None:
    only_accuracy = Objective(latency=0.0, accuracy=1.0, memory=0.0, size=0.0)
    slower_p95 = cand("a-slower", p50=5.0, p95=12.0)
    faster_p95 = cand("b-faster", p50=5.0, p95=11.0, rss_model=41.0)  # not dominated: more memory
    sel = select([BASELINE, slower_p95, faster_p95], objective=only_accuracy)
    assert sel.scores["a-slower"] == sel.scores["b-faster"]
    assert sel.selected == "b-faster"
    twins = [BASELINE, cand("twin-b", p50=5.0), cand("twin-a", p50=5.0)]
    assert select(twins, objective=only_accuracy).selected == "twin-a"


def test_slower_than_baseline_is_never_selected_even_with_permissive_gates() -> None:
    permissive = Gates(accuracy_ratio_min=0.5, speedup_min=0.0, speedup_percentile="p95", memory_reduction_min=0.0)
    # slower than the baseline at p50 (25 ms vs 20 ms) but faster at p95, more accurate and smaller
    sneaky = cand("sneaky", p50=25.0, p95=30.0, acc=0.9, rss_model=10.0, size=100_000, gates=permissive)
    assert sneaky.passed and sneaky.speedup_p50 < 1.0
    alone = select([BASELINE, sneaky], objective=Objective())
    assert alone.selected is None
    assert "slower than the baseline at p50" in alone.message
    assert "nothing is registered" in alone.message
    assert alone.passing == ("sneaky",) and alone.scores == {}

    honest = cand("honest", p50=15.0, p95=35.0, acc=0.85, rss_model=90.0, size=3_000_000, gates=permissive)
    sel = select([BASELINE, sneaky, honest], objective=Objective())
    assert sel.selected == "honest"
    assert "sneaky" not in sel.scores


def test_a_passing_candidate_dominated_only_by_a_failing_one_stays_eligible() -> None:
    passing = cand("passing", p50=8.0, p95=20.0, acc=0.89)
    over_budget = cand("over-budget", p50=9.0, p95=19.0, acc=0.89, budgets=Budgets(latency_ms_p95=18.0))
    assert dominates(over_budget, passing) and not over_budget.passed
    sel = select([BASELINE, passing, over_budget], objective=Objective())
    assert "passing" not in sel.frontier
    assert sel.selected == "passing"


def test_nothing_passes() -> None:
    outcomes = [BASELINE, cand("slow", p50=15.0, acc=0.89), failed("broken")]
    sel = select(outcomes, objective=Objective())
    assert sel.selected is None
    assert sel.passing == () and sel.scores == {}
    assert sel.frontier == ("baseline-fp32", "slow")
    assert sel.message == "no candidate passed its gates (1 failed to build or measure); nothing is registered"
    assert sel.nearest_misses == ("slow: speedup 1.33 < 2.00 (short by 0.67)",)


def test_nearest_misses_are_ordered_and_limited_to_three() -> None:
    outcomes = [
        BASELINE,
        cand("far", p50=20.0),  # 1 gate, short by half the threshold
        cand("two", p50=20.0 / 1.9, rss_model=55.0),  # 2 gates, each slightly short
        cand("four", p50=20.0, acc=0.5, rss_model=90.0, budgets=Budgets(size_mb=0.5)),  # 4 gates
        cand("near", p50=20.0 / 1.9),  # 1 gate, short by 5%
    ]
    sel = select(outcomes, objective=Objective())
    assert sel.selected is None
    assert sel.nearest_misses == (
        "near: speedup 1.90 < 2.00 (short by 0.10)",
        "far: speedup 1.00 < 2.00 (short by 1.00)",
        "two: speedup 1.90 < 2.00 (short by 0.10); memory 0.45 < 0.50 (short by 0.05)",
    )


def test_nearest_miss_lines_for_budgets_and_missing_evaluation() -> None:
    over = cand("over", p50=5.0, p95=12.0, budgets=Budgets(latency_ms_p95=10.0))
    blind = cand("blind", p50=5.0, acc=None)
    lines = nearest_misses([BASELINE, over, blind])
    # one failed gate each; relative shortfall 2/10 before 0.95/0.95
    assert lines == ("over: latency_budget 12.00 > 10.00 (over by 2.00)", "blind: accuracy not evaluated")


def test_close_numbers_get_enough_decimals_to_differ() -> None:
    almost = cand("almost", p50=20.0 / 1.9999)
    assert nearest_misses([almost]) == ("almost: speedup 1.9999 < 2.0000 (short by 0.00)",)


def _with_ci(o: CandidateOutcome, low: float, high: float) -> CandidateOutcome:
    verdicts = tuple(v.model_copy(update={"ci_low": low, "ci_high": high, "confidence": 0.95}) if v.gate == "speedup"
                     else v for v in o.verdicts)
    return o.model_copy(update={"verdicts": verdicts})


def test_candidates_the_intervals_cannot_tell_apart_tie_to_the_name() -> None:
    """Two equivalent builds (same size and accuracy, memory within 0.3%), one measured faster in this
    run: their speed-up intervals overlap, so the recommendation does not follow the noise."""
    b_fast = _with_ci(cand("b-int8", p50=6.0, p95=12.0), 2.9, 3.9)  # 3.33x
    a_slow = _with_ci(cand("a-int8", p50=7.0, p95=14.0, rss_model=39.9), 2.5, 3.2)  # 2.86x
    assert select([BASELINE, b_fast, a_slow], objective=Objective()).selected == "a-int8"
    assert select([BASELINE, a_slow, b_fast], objective=Objective()).selected == "a-int8"
    # intervals far apart: the faster one is better beyond the noise, and wins
    clear = _with_ci(cand("b-int8", p50=4.0, p95=8.0), 4.8, 5.2)  # 5x
    narrow = _with_ci(cand("a-int8", p50=7.0, p95=14.0, rss_model=39.9), 2.8, 2.9)
    assert select([BASELINE, clear, narrow], objective=Objective()).selected == "b-int8"


def _pooled_over(o: CandidateOutcome, point: float, low: float, high: float, runs: int) -> CandidateOutcome:
    verdicts = tuple(v.model_copy(update={"ci_low": low, "ci_high": high, "confidence": 0.95, "runs_pooled": runs,
                                          "pooled_point": point}) if v.gate == "speedup" else v for v in o.verdicts)
    return o.model_copy(update={"verdicts": verdicts})


def test_the_ranking_follows_the_pooled_evidence_not_this_runs_weather() -> None:
    """Issue 7: the verdict pools this host's earlier runs of a comparison; the choice among passing
    candidates must use the same evidence. In this run a-int8 measured 4x and b-int8 2.9x, but over
    three runs a-int8 averages 2.5x and b-int8 3.4x, with intervals that do not overlap."""
    a = cand("a-int8", p50=5.0, p95=10.0)  # 4.0x in this run
    b = cand("b-int8", p50=20.0 / 2.9, p95=40.0 / 2.9)  # 2.9x in this run
    assert select([BASELINE, a, b], objective=Objective()).selected == "a-int8"  # this run alone
    a_pooled = _pooled_over(a, 2.5, 2.3, 2.7, runs=3)
    b_pooled = _pooled_over(b, 3.4, 3.2, 3.6, runs=3)
    chosen = select([BASELINE, a_pooled, b_pooled], objective=Objective())
    assert chosen.selected == "b-int8"
    # the latency term is this run's p95 speed-up moved by the factor pooling moved the gated p50 one
    lat, objective = Objective().latency, Objective()
    assert score(a_pooled, baseline=BASELINE, objective=objective) - score(b_pooled, baseline=BASELINE,
                                                                         objective=objective) == pytest.approx(
        lat * (math.log(4.0 * 2.5 / 4.0) - math.log(2.9 * 3.4 / 2.9)), abs=1e-9)


def test_a_run_alone_or_a_missing_pooled_point_leaves_the_ranking_to_this_run() -> None:
    a = _pooled_over(cand("a-int8", p50=5.0, p95=10.0), 2.5, 2.3, 2.7, runs=1)  # runs=1: nothing pooled
    b = _pooled_over(cand("b-int8", p50=20.0 / 2.9, p95=40.0 / 2.9), 3.4, 3.2, 3.6, runs=1)
    assert select([BASELINE, a, b], objective=Objective()).selected == "a-int8"


def test_a_candidate_slower_than_the_baseline_over_pooled_runs_is_not_recommended() -> None:
    fast_now = _pooled_over(cand("a-int8", p50=18.0, gates=GATES.model_copy(update={"speedup_min": 0.5})),
                            0.9, 0.85, 0.95, runs=4)  # 1.11x in this run, 0.9x over four runs
    chosen = select([BASELINE, fast_now], objective=Objective())
    assert chosen.selected is None and "slower than the baseline" in chosen.message
