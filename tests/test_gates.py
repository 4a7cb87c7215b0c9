"""Quality gates → verdicts: edgeopt.gates."""

from __future__ import annotations

import math

import pytest

from edgeopt.gates import evaluate_gates, memory_reduction, outcome_with_gates, speedup
from edgeopt.profiles import Budgets, Gates
from edgeopt.records import (
    BenchmarkResult,
    CandidateOutcome,
    CandidateSpec,
    EvalResult,
    Failure,
    GateVerdict,
    HardwareFingerprint,
)

# --- shared factories -------------------------------------------------------------------------

HW = HardwareFingerprint(hostname="h", os="linux", arch="x86_64", cpu_model="cpu", isa_flags=("avx2",),
                         cores_physical=4, cores_logical=8, ram_mb=16000, python="3.12")


def bench(name: str = "cand", *, p50: float = 10.0, p95: float | None = None, rss_model: float = 100.0,
          rss_peak: float = 300.0, size: int = 4_000_000) -> BenchmarkResult:
    p95 = p50 * 1.2 if p95 is None else p95
    return BenchmarkResult(
        candidate=name, samples=200, batch_size=1, latency_ms_p50=p50, latency_ms_p90=p95, latency_ms_p95=p95,
        latency_ms_p99=p95, latency_ms_mean=p50, latency_ms_std=0.1, latency_ms_min=p50, latency_ms_max=p95,
        throughput_per_s=1000.0 / p50 if p50 else 0.0, rss_peak_mb=rss_peak, rss_steady_mb=rss_model,
        rss_peak_model_mb=rss_model * 1.5, load_time_ms=5.0,
        size_bytes=size, duration_s=2.0, hardware=HW,
    )


def evaluation(name: str = "cand", *, value: float = 0.98, baseline: float = 1.0, cosine: float = 0.999,
               metric: str = "top1_accuracy") -> EvalResult:
    return EvalResult(candidate=name, metric=metric, value=value, baseline=baseline, delta=value - baseline,
                      samples=100, top1_agreement=0.99, cosine_mean=cosine, cosine_min=cosine - 0.01,
                      max_abs_error=0.1)


BASE = bench("baseline", p50=20.0, p95=40.0, rss_model=100.0, rss_peak=300.0, size=4_000_000)


def gates(**kw) -> Gates:
    defaults: dict[str, object] = {"accuracy_ratio_min": 0.95, "speedup_min": 2.0, "speedup_percentile": "p50",
                                   "memory_reduction_min": 0.5}
    return Gates(**{**defaults, **kw})


def verdicts(candidate: BenchmarkResult | None = None, ev: EvalResult | None = None, *, g: Gates | None = None,
             budgets: Budgets | None = None, no_eval: bool = False) -> dict[str, GateVerdict]:
    result = evaluate_gates(
        benchmark=candidate or bench(p50=10.0, p95=20.0, rss_model=50.0),
        evaluation=None if no_eval else (ev or evaluation()),
        baseline_benchmark=BASE,
        gates=g or gates(),
        budgets=budgets or Budgets(),
    )
    return {v.gate: v for v in result}


# --- helpers ----------------------------------------------------------------------------------


def test_speedup_is_baseline_over_candidate_at_the_percentile() -> None:
    c = bench(p50=8.0, p95=10.0)
    assert speedup(candidate_bench=c, baseline_bench=BASE, percentile="p50") == pytest.approx(2.5)
    assert speedup(candidate_bench=c, baseline_bench=BASE, percentile="p95") == pytest.approx(4.0)


def test_speedup_of_a_zero_latency_is_nan_and_fails_the_gate() -> None:
    c = bench(p50=0.0, p95=0.0)
    assert math.isnan(speedup(candidate_bench=c, baseline_bench=BASE))
    assert not verdicts(c)["speedup"].passed


def test_memory_reduction_on_steady_state_or_peak() -> None:
    assert memory_reduction(candidate_bench=bench(rss_model=25.0), baseline_bench=BASE) == pytest.approx(0.75)
    c = bench(rss_model=25.0).model_copy(update={"rss_peak_model_mb": 120.0})
    assert memory_reduction(candidate_bench=c, baseline_bench=BASE, basis="peak") == pytest.approx(1 - 120 / 150)
    v = evaluate_gates(benchmark=c, evaluation=evaluation(), baseline_benchmark=BASE,
                       gates=gates(memory_basis="peak"), budgets=Budgets())[2]
    assert "peak model memory" in v.metric and not v.passed  # 20% less at peak, 75% less at steady state
    assert verdicts(bench(rss_model=25.0))["memory"].passed


@pytest.mark.parametrize("figure", [0.0, -3.0, math.nan])
def test_an_unmeasured_memory_figure_fails_the_gate_never_reads_as_100_percent_less(figure: float) -> None:
    c = bench(rss_model=figure)
    assert math.isnan(memory_reduction(candidate_bench=c, baseline_bench=BASE))
    v = verdicts(c)["memory"]
    assert not v.passed and v.status == "fail"
    base_zero = bench("baseline", rss_model=figure)
    assert math.isnan(memory_reduction(candidate_bench=bench(rss_model=25.0), baseline_bench=base_zero))


def test_memory_reduction_is_negative_when_the_candidate_uses_more() -> None:
    assert memory_reduction(candidate_bench=bench(rss_model=150.0), baseline_bench=BASE) == pytest.approx(-0.5)


# --- each gate at its boundary ----------------------------------------------------------------


def test_default_gates_and_no_budgets() -> None:
    v = verdicts()
    assert list(v) == ["accuracy", "speedup", "memory"]
    assert all(x.passed for x in v.values())


@pytest.mark.parametrize(("value", "passed"), [(0.95, True), (0.9499, False), (0.99, True)])
def test_accuracy_ratio_boundary(value: float, passed: bool) -> None:
    v = verdicts(ev=evaluation(value=value * 0.8, baseline=0.8))["accuracy"]
    assert v.passed is passed
    assert v.metric == "top1_accuracy ratio"
    assert v.comparator == ">=" and v.threshold == 0.95
    assert v.measured == pytest.approx(value)
    assert v.margin == pytest.approx(value - 0.95)
    assert (v.margin >= -1e-12) is passed


def test_accuracy_with_a_zero_baseline_uses_the_raw_value() -> None:
    v = verdicts(ev=evaluation(value=0.97, baseline=0.0))["accuracy"]
    assert v.measured == pytest.approx(0.97) and v.metric == "top1_accuracy" and v.passed


def test_missing_evaluation_fails_accuracy_and_cosine() -> None:
    v = verdicts(no_eval=True, g=gates(cosine_min=-1.0))
    assert not v["accuracy"].passed and v["accuracy"].measured == 0.0
    assert v["accuracy"].margin == pytest.approx(-0.95)
    assert not v["cosine"].passed  # even with the most permissive threshold


@pytest.mark.parametrize(("p50", "passed"), [(10.0, True), (10.001, False), (5.0, True)])
def test_speedup_boundary(p50: float, passed: bool) -> None:
    v = verdicts(bench(p50=p50, p95=20.0, rss_model=50.0))["speedup"]
    assert v.passed is passed
    assert v.metric == "speedup p50 vs baseline" and v.threshold == 2.0
    assert v.measured == pytest.approx(20.0 / p50)
    assert v.margin == pytest.approx(20.0 / p50 - 2.0)


def test_speedup_percentile_choice() -> None:
    c = bench(p50=10.0, p95=30.0, rss_model=50.0)  # 2.0x at p50, 1.33x at p95
    p50 = verdicts(c, g=gates(speedup_percentile="p50"))["speedup"]
    p95 = verdicts(c, g=gates(speedup_percentile="p95"))["speedup"]
    assert p50.passed and p50.measured == pytest.approx(2.0)
    assert not p95.passed and p95.measured == pytest.approx(40.0 / 30.0) and p95.metric == "speedup p95 vs baseline"
    assert p95.margin < 0


@pytest.mark.parametrize(("rss_model", "passed"), [(50.0, True), (50.01, False), (10.0, True)])
def test_memory_boundary(rss_model: float, passed: bool) -> None:
    v = verdicts(bench(p50=10.0, rss_model=rss_model))["memory"]
    assert v.passed is passed
    assert v.metric == "memory reduction (steady-state model memory) vs baseline"
    assert v.margin == pytest.approx(1 - rss_model / 100.0 - 0.5)


@pytest.mark.parametrize(("cosine", "passed"), [(0.99, True), (0.9899, False)])
def test_cosine_gate_only_when_set(cosine: float, passed: bool) -> None:
    ev = evaluation(cosine=cosine)
    assert "cosine" not in verdicts(ev=ev)
    v = verdicts(ev=ev, g=gates(cosine_min=0.99))["cosine"]
    assert v.passed is passed and v.measured == cosine
    assert v.margin == pytest.approx(cosine - 0.99)


# --- budgets ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budgets", "gate", "at_limit", "over"),
    [
        (Budgets(latency_ms_p95=20.0), "latency_budget", bench(p50=10.0, p95=20.0, rss_model=50.0),
         bench(p50=10.0, p95=20.5, rss_model=50.0)),
        (Budgets(rss_peak_mb=150.0), "memory_budget", bench(p50=10.0, rss_model=50.0, rss_peak=150.0),
         bench(p50=10.0, rss_model=50.0, rss_peak=151.0)),
        (Budgets(size_mb=2.0), "size_budget", bench(p50=10.0, rss_model=50.0, size=2_000_000),
         bench(p50=10.0, rss_model=50.0, size=2_000_001)),
    ],
)
def test_budget_boundaries(budgets: Budgets, gate: str, at_limit: BenchmarkResult, over: BenchmarkResult) -> None:
    ok = verdicts(at_limit, budgets=budgets)
    bad = verdicts(over, budgets=budgets)
    assert set(ok) == {"accuracy", "speedup", "memory", gate}  # only the budget that is set
    assert ok[gate].passed and ok[gate].margin == pytest.approx(0.0) and ok[gate].comparator == "<="
    assert not bad[gate].passed and bad[gate].margin < 0


def test_budget_margin_is_threshold_minus_measured() -> None:
    v = verdicts(bench(p50=10.0, p95=15.0, rss_model=50.0, size=1_500_000),
                 budgets=Budgets(latency_ms_p95=20.0, rss_peak_mb=400.0, size_mb=1.0))
    assert v["latency_budget"].margin == pytest.approx(5.0) and v["latency_budget"].passed
    assert v["memory_budget"].margin == pytest.approx(100.0)
    assert v["size_budget"].measured == pytest.approx(1.5)
    assert v["size_budget"].margin == pytest.approx(-0.5) and not v["size_budget"].passed
    assert list(v)[3:] == ["latency_budget", "memory_budget", "size_budget"]


# --- outcomes ---------------------------------------------------------------------------------


def outcome(name: str, b: BenchmarkResult | None, ev: EvalResult | None = None, *, baseline: bool = False,
            failure: Failure | None = None) -> CandidateOutcome:
    return CandidateOutcome(spec=CandidateSpec(name=name, backend="onnxruntime", baseline=baseline),
                            benchmark=b, evaluation=ev, failure=failure)


def test_outcome_with_gates_fills_speedups_memory_and_verdicts() -> None:
    base = outcome("baseline", BASE, evaluation("baseline", value=1.0), baseline=True)
    cand = outcome("cand", bench(p50=8.0, p95=10.0, rss_model=40.0), evaluation())
    done = outcome_with_gates(cand, baseline=base, gates=gates(), budgets=Budgets(size_mb=10.0))
    assert done is not cand and cand.verdicts == ()
    assert done.speedup_p50 == pytest.approx(2.5) and done.speedup_p95 == pytest.approx(4.0)
    assert done.memory_reduction == pytest.approx(0.6)
    assert [v.gate for v in done.verdicts] == ["accuracy", "speedup", "memory", "size_budget"]
    assert done.passed


def test_outcome_with_gates_leaves_failed_outcomes_unchanged() -> None:
    base = outcome("baseline", BASE, baseline=True)
    failed = outcome("broken", None, failure=Failure(stage="build", reason="crash", message="segfault"))
    assert outcome_with_gates(failed, baseline=base, gates=gates(), budgets=Budgets()) is failed


def test_outcome_with_gates_needs_a_measured_baseline() -> None:
    base = outcome("baseline", None, baseline=True, failure=Failure(stage="benchmark", reason="oom", message="x"))
    with pytest.raises(ValueError, match="baseline"):
        outcome_with_gates(outcome("cand", bench()), baseline=base, gates=gates(), budgets=Budgets())


def test_a_failing_gate_makes_the_outcome_not_passed() -> None:
    base = outcome("baseline", BASE, baseline=True)
    slow = outcome_with_gates(outcome("slow", bench(p50=15.0, rss_model=40.0), evaluation()),
                              baseline=base, gates=gates(), budgets=Budgets())
    assert not slow.passed
    assert [v.gate for v in slow.verdicts if not v.passed] == ["speedup"]
