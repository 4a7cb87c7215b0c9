"""Noise-aware verdicts: paired bootstrap intervals (edgeopt.intervals) and the three-state gates.

The sample sets are recorded latencies (ms) written out as arrays here: three interleaved rounds
of a baseline and of candidates, as the flow measures them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from edgeopt.gates import evaluate_gates, speedup_interval
from edgeopt.intervals import memory_reduction_interval, ratio_interval, split_rounds, t_interval
from edgeopt.profiles import Budgets, Gates
from tests.test_gates import BASE, bench, evaluation


def _rounds(medians: list[float], *, n: int = 300, jitter: float = 0.03, seed: int = 0) -> list[np.ndarray]:
    """Rounds of latency samples around each round's median (log-normal, as latencies are)."""
    rng = np.random.default_rng(seed)
    return [m * np.exp(rng.normal(0.0, jitter, n)) for m in medians]


# Recorded-style sets: the baseline at ~2.0 ms in three rounds that drifted with the machine
BASELINE = _rounds([2.00, 2.10, 1.95], seed=1)
CLEAR = _rounds([0.80, 0.84, 0.79], seed=2)        # ~2.5x in every round
STRADDLING = _rounds([0.94, 1.10, 1.02], seed=3)   # 2.13x, 1.91x, 1.91x: the run-to-run flip of the issue
CLEARLY_SLOW = _rounds([1.60, 1.70, 1.55], seed=4)  # ~1.25x


def test_split_rounds_restores_the_rounds_in_order() -> None:
    pooled = np.concatenate(BASELINE)
    back = split_rounds(pooled, [r.size for r in BASELINE])
    assert len(back) == 3 and all(np.array_equal(a, b) for a, b in zip(back, BASELINE, strict=True))
    with pytest.raises(ValueError, match="add up"):
        split_rounds(pooled, [10, 10])


def test_interval_contains_the_point_and_is_repeatable() -> None:
    a = ratio_interval(baseline=BASELINE, candidate=CLEAR)
    b = ratio_interval(baseline=BASELINE, candidate=CLEAR)
    assert a == b  # seeded: the same measurements always give the same verdict
    assert a.low <= a.point <= a.high and a.rounds == 3
    expected = np.median(np.concatenate(BASELINE)) / np.median(np.concatenate(CLEAR))
    assert a.point == pytest.approx(expected)


def test_interval_reflects_between_round_noise_not_only_sample_noise() -> None:
    """Pooled samples alone would give a very narrow interval; the round drift must widen it."""
    wide = ratio_interval(baseline=BASELINE, candidate=STRADDLING)
    steady_cand = _rounds([1.0, 1.0, 1.0], seed=5)
    steady_base = _rounds([2.0, 2.0, 2.0], seed=6)
    narrow = ratio_interval(baseline=steady_base, candidate=steady_cand)
    assert (wide.high - wide.low) > 3 * (narrow.high - narrow.low)
    per_round = [np.median(b) / np.median(c) for b, c in zip(BASELINE, STRADDLING, strict=True)]
    assert wide.low <= min(per_round) + 0.05 and wide.high >= max(per_round) - 0.05


def test_t_interval_by_hand() -> None:
    # mean 2, sd 1, three values: t(0.975, 2) = 4.3027, half-width 4.3027 / sqrt(3) = 2.4842
    low, high = t_interval([1.0, 2.0, 3.0], confidence=0.95)
    assert low == pytest.approx(2.0 - 2.4842, abs=1e-3) and high == pytest.approx(2.0 + 2.4842, abs=1e-3)
    with pytest.raises(ValueError, match="two values"):
        t_interval([1.0])


def test_few_rounds_give_an_honestly_wide_interval() -> None:
    """Three rounds say little about the spread between processes: the interval is wider than their
    range (a bootstrap over three rounds would be about their range, and cover ~75%, not 95%)."""
    iv = ratio_interval(baseline=BASELINE, candidate=STRADDLING)
    per_round = [np.median(b) / np.median(c) for b, c in zip(BASELINE, STRADDLING, strict=True)]
    assert iv.low < min(per_round) and iv.high > max(per_round)
    one = ratio_interval(baseline=BASELINE[:1], candidate=STRADDLING[:1])  # one process: sampling noise only
    assert one.rounds == 1 and one.high - one.low < iv.high - iv.low


@pytest.mark.parametrize("bad", [[np.array([])], [np.array([1.0, math.nan])], [np.array([0.0, 1.0])]])
def test_unmeasurable_ratios_are_nan(bad: list[np.ndarray]) -> None:
    assert not ratio_interval(baseline=BASELINE, candidate=bad).finite


def test_memory_interval_over_rounds_and_nan_for_failed_figures() -> None:
    r = memory_reduction_interval(baseline=[100.0, 102.0, 98.0], candidate=[30.0, 31.0, 29.0])
    assert r.point == pytest.approx(0.7) and r.low <= 0.7 <= r.high
    assert not memory_reduction_interval(baseline=[100.0, 100.0], candidate=[0.0, 30.0]).finite


# --- verdicts on recorded sample sets ------------------------------------------------------------
def _bench_with(tmp_path: Path, name: str, rounds: list[np.ndarray]):
    path = tmp_path / f"{name}.npy"
    pooled = np.concatenate(rounds)
    np.save(path, pooled)
    return bench(name, p50=float(np.median(pooled)), rss_model=40.0).model_copy(
        update={"samples_path": str(path), "repeat_sample_counts": tuple(r.size for r in rounds),
                "rss_steady_mb_repeats": (40.0, 40.5, 39.5)})


@pytest.mark.parametrize(("rounds", "status"), [(CLEAR, "pass"), (STRADDLING, "uncertain"), (CLEARLY_SLOW, "fail")])
def test_speedup_verdict_follows_the_interval(tmp_path: Path, rounds: list[np.ndarray], status: str) -> None:
    base = _bench_with(tmp_path, "baseline", BASELINE).model_copy(update={"rss_steady_mb_repeats": (100.0,) * 3})
    cand = _bench_with(tmp_path, "cand", rounds)
    v = {x.gate: x for x in evaluate_gates(benchmark=cand, evaluation=evaluation(), baseline_benchmark=base,
                                           gates=Gates(), budgets=Budgets())}["speedup"]
    assert v.status == status and v.passed is (status == "pass")
    assert v.ci_low is not None and v.ci_low <= v.measured <= v.ci_high and v.confidence == 0.95
    if status == "uncertain":
        assert v.ci_low < 2.0 <= v.ci_high and "UNCERTAIN" in v.describe()


def test_uncertain_is_not_a_pass_for_selection(tmp_path: Path) -> None:
    from edgeopt.gates import outcome_with_gates
    from edgeopt.records import CandidateOutcome, CandidateSpec

    base = _bench_with(tmp_path, "baseline", BASELINE).model_copy(update={"rss_steady_mb_repeats": (100.0,) * 3})
    baseline = CandidateOutcome(spec=CandidateSpec(name="baseline", backend="onnxruntime", baseline=True),
                                benchmark=base)
    o = CandidateOutcome(spec=CandidateSpec(name="cand", backend="onnxruntime"),
                         benchmark=_bench_with(tmp_path, "cand", STRADDLING), evaluation=evaluation())
    gated = outcome_with_gates(o, baseline=baseline, gates=Gates(), budgets=Budgets())
    assert gated.uncertain and not gated.passed and gated.baseline == "baseline"


def test_without_round_samples_the_point_settles_the_verdict() -> None:
    iv = speedup_interval(candidate_bench=bench(p50=8.0), baseline_bench=BASE)
    assert iv.point == pytest.approx(2.5) and math.isnan(iv.low)
