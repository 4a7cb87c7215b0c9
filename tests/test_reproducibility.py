"""The host's run-to-run spread under every speed-up interval (edgeopt.reproducibility).

What it protects: a speed-up verdict that settles in one run must not flip in the next run on the
same host (the registered winner changing with the weather). So a ratio inside the host's
run-to-run band of its threshold stays ``uncertain`` however tight its own rounds are, and the flow
does not spend rounds on it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from edgeopt.gates import evaluate_gates, more_rounds_could_settle, verdict
from edgeopt.intervals import ratio_interval
from edgeopt.profiles import Budgets, Gates
from edgeopt.records import CandidateOutcome, CandidateSpec
from edgeopt.reproducibility import PRIOR_DF, RatioRecord, estimate, read_history, record, settleable
from tests.test_gates import evaluation
from tests.test_intervals import BASELINE, CLEAR, _bench_with

Z95 = 1.959963984540054  # the normal quantile for a two-sided 95% interval


def test_no_history_gives_the_profile_prior() -> None:
    s = estimate([], prior=0.10)
    assert s.df == 0 and s.relative == pytest.approx(0.10) and "prior" in s.describe()


def test_history_pools_each_comparisons_deviation_from_its_own_mean() -> None:
    """Two comparisons measured in several runs contribute their within-comparison spread (not the gap
    between comparisons, which is the candidates differing); a comparison seen once contributes nothing."""
    a = [0.70, 0.78, 0.74]          # log speed-ups of one comparison in three runs
    b = [1.10, 1.00]                # another comparison, two runs
    hist = ([RatioRecord("a", f"r{i}", v) for i, v in enumerate(a)]
            + [RatioRecord("b", f"r{i}", v) for i, v in enumerate(b)]
            + [RatioRecord("c", "r0", 5.0)])
    s = estimate(hist, prior=0.10)
    ss = np.var(a) * len(a) + np.var(b) * len(b)
    expected = math.sqrt((PRIOR_DF * math.log(1.1) ** 2 + ss) / (PRIOR_DF + 3))
    assert s.df == 3 and s.comparisons == 2 and s.sd_log == pytest.approx(expected)
    # a quiet host narrows the floor below the prior, a noisy one widens it
    quiet = [RatioRecord(k, f"r{i}", 0.7 + 1e-4 * i) for k in "xyz" for i in range(4)]
    noisy = [RatioRecord(k, f"r{i}", 0.7 + 0.2 * (i % 2)) for k in "xyz" for i in range(4)]
    assert estimate(quiet, prior=0.10).relative < 0.06
    assert estimate(noisy, prior=0.10).relative > 0.10


def test_one_run_recorded_twice_counts_once() -> None:
    hist = [RatioRecord("a", "r1", 0.7), RatioRecord("a", "r1", 0.7), RatioRecord("a", "r1", 0.7)]
    assert estimate(hist, prior=0.1).df == 0


def test_bad_prior_is_refused() -> None:
    with pytest.raises(ValueError, match="prior"):
        estimate([], prior=math.nan)


def test_history_file_round_trip_skips_what_cannot_count(tmp_path: Path, caplog) -> None:
    path = tmp_path / "hosts" / "h.jsonl"
    assert record(path, run="r1", ratios={"a": 2.0, "b": math.nan, "c": 0.0, "d": 1.5}) == 2
    with open(path, "a") as fh:
        fh.write("{not json\n")
    assert record(path, run="r2", ratios={"a": 2.2}) == 1
    with caplog.at_level(logging.WARNING):
        back = read_history(path)
    assert [(r.key, r.run) for r in back] == [("a", "r1"), ("d", "r1"), ("a", "r2")]
    assert back[0].log_ratio == pytest.approx(math.log(2.0))
    assert "1 unreadable line" in caplog.text
    assert all("at" in json.loads(line) for line in path.read_text().splitlines()[:2])


def test_the_floor_widens_a_tight_interval_to_the_run_to_run_band() -> None:
    tight = ratio_interval(baseline=BASELINE, candidate=CLEAR)
    floored = ratio_interval(baseline=BASELINE, candidate=CLEAR, floor_sd=0.15)
    assert floored.point == tight.point
    assert floored.low == pytest.approx(tight.point / math.exp(Z95 * 0.15))
    assert floored.high == pytest.approx(tight.point * math.exp(Z95 * 0.15))
    assert tight.high - tight.low < floored.high - floored.low
    # a floor narrower than the rounds' own interval changes nothing
    assert ratio_interval(baseline=BASELINE, candidate=CLEAR, floor_sd=1e-4) == tight


def test_a_settled_pass_in_one_run_is_uncertain_within_the_hosts_spread(tmp_path: Path) -> None:
    """~2.5x in three tight rounds passes a 2x gate on one run's evidence; with a ±16% run-to-run
    spread (2.5 / e^(1.96·0.15) = 1.86) another run could measure below 2x, so it is uncertain,
    and more rounds could not settle it."""
    base = _bench_with(tmp_path, "baseline", BASELINE).model_copy(update={"rss_steady_mb_repeats": (100.0,) * 3})
    cand = _bench_with(tmp_path, "cand", CLEAR)

    def speed(sd: float):
        return next(v for v in evaluate_gates(benchmark=cand, evaluation=evaluation(), baseline_benchmark=base,
                                              gates=Gates(), budgets=Budgets(), run_to_run_sd=sd)
                    if v.gate == "speedup")

    assert speed(0.0).status == "pass"
    v = speed(0.15)
    assert v.status == "uncertain" and v.run_to_run_sd == 0.15 and v.ci_low < 2.0 < v.measured
    outcome = CandidateOutcome(spec=CandidateSpec(name="cand", backend="onnxruntime"), verdicts=(v,))
    assert not more_rounds_could_settle(outcome)
    assert speed(0.05).status == "pass"  # 2.5 / e^(1.96·0.05) = 2.27: clear of 2x on another run too


def test_settleable_is_whether_the_threshold_lies_outside_the_band() -> None:
    assert not settleable(point=2.1, threshold=2.0, sd_log=0.1, confidence=0.95)
    assert settleable(point=2.6, threshold=2.0, sd_log=0.1, confidence=0.95)
    assert settleable(point=1.5, threshold=2.0, sd_log=0.1, confidence=0.95)  # clearly below: rounds may settle a fail
    # an uncertain memory verdict has no run-to-run band: more rounds may settle it
    mem = verdict(gate="memory", metric="memory reduction", comparator=">=", threshold=0.5, measured=0.5)
    mem = mem.model_copy(update={"status": "uncertain", "passed": False})
    assert more_rounds_could_settle(CandidateOutcome(spec=CandidateSpec(name="c", backend="onnxruntime"),
                                                     verdicts=(mem,)))
