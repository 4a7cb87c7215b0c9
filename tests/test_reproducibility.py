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
from edgeopt.intervals import Interval, ratio_interval
from edgeopt.profiles import Budgets, Gates
from edgeopt.records import CandidateOutcome, CandidateSpec
from edgeopt.reproducibility import (
    PRIOR_DF,
    RatioRecord,
    earlier_runs,
    estimate,
    pooled,
    read_history,
    record,
    sequential,
    settleable,
)
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


# --- evidence pooled over runs ---------------------------------------------------------------------


def test_earlier_runs_are_one_value_per_other_run_without_the_same_measurement() -> None:
    hist = [RatioRecord("a", "r1", 0.70, "m1"), RatioRecord("a", "r1", 0.72, "m1b", 0.2),  # r1 twice: its latest
            RatioRecord("a", "r2", 0.80, "m2"), RatioRecord("b", "r2", 1.5, "m9"),
            RatioRecord("a", "r3", 0.90, "m3"), RatioRecord("a", "now", 0.60, "m4")]
    assert sorted(earlier_runs(hist, "a", run="now")) == [(0.72, 0.2), (0.80, 0.0), (0.90, 0.0)]
    # a result served again from the cache is the same measurement: it does not count twice
    assert sorted(earlier_runs(hist, "a", run="now", measurement="m3")) == [(0.72, 0.2), (0.80, 0.0)]
    assert earlier_runs(hist, "c", run="now") == []


def test_pooled_interval_is_the_mean_of_the_runs_with_a_band_shrinking_as_one_over_root_n() -> None:
    """Three runs at log ratios 0.70, 0.80 and this one at 0.90 with s = 0.1: centre e^0.80 and half-width
    z·s/√3 (this run's own interval is narrower than the floor, so it counts with s too)."""
    s = 0.1
    this = Interval(math.exp(0.90), math.exp(0.90 - Z95 * s), math.exp(0.90 + Z95 * s), 0.95, 3)
    iv, n = pooled(this, [(0.70, 0.0), (0.80, 0.05)], sd_log=s)
    assert n == 3
    assert iv.point == pytest.approx(math.exp(0.80))
    assert iv.low == pytest.approx(math.exp(0.80 - Z95 * s / math.sqrt(3)))
    assert iv.high == pytest.approx(math.exp(0.80 + Z95 * s / math.sqrt(3)))
    # a noisy run (its own interval wider than the floor) weighs with its own variance
    wide = Interval(math.exp(0.90), math.exp(0.90 - Z95 * 0.3), math.exp(0.90 + Z95 * 0.3), 0.95, 3)
    iv_wide, _ = pooled(wide, [(0.70, 0.0), (0.80, 0.0)], sd_log=s)
    assert iv_wide.low == pytest.approx(math.exp(0.80 - Z95 * math.sqrt(2 * s * s + 0.09) / 3))
    # ...and so does an earlier run that was measured under load (its own interval stored with it)
    iv_loaded, _ = pooled(this, [(0.70, 0.3), (0.80, 0.0)], sd_log=s)
    assert iv_loaded.high == pytest.approx(math.exp(0.80 + Z95 * math.sqrt(2 * s * s + 0.09) / 3))
    # nothing earlier, no spread, or nothing measured: this run alone
    assert pooled(this, [], sd_log=s) == (this, 1)
    assert pooled(this, [(0.7, 0.0)], sd_log=0.0) == (this, 1)
    assert pooled(Interval.nan(), [(0.7, 0.0)], sd_log=s)[1] == 1


def test_a_candidate_at_the_band_edge_converges_instead_of_flipping(tmp_path: Path) -> None:
    """The issue's flip: a candidate near 2.5x against a 2x gate on a host with s = 0.12. Judged alone a
    run is uncertain (2.5 / e^(1.96·0.12) = 1.98) or not by the weather; pooled, later runs' verdicts rest
    on all the runs so far and their band narrows as 1/√n."""
    s = 0.12
    base = _bench_with(tmp_path, "baseline", BASELINE).model_copy(update={"rss_steady_mb_repeats": (100.0,) * 3})
    cand = _bench_with(tmp_path, "cand", CLEAR)
    x = math.log(next(v for v in evaluate_gates(benchmark=cand, evaluation=evaluation(), baseline_benchmark=base,
                                                gates=Gates(), budgets=Budgets()) if v.gate == "speedup").measured)

    def speed(earlier):
        return next(v for v in evaluate_gates(benchmark=cand, evaluation=evaluation(), baseline_benchmark=base,
                                              gates=Gates(), budgets=Budgets(), run_to_run_sd=s,
                                              earlier_speedups=earlier) if v.gate == "speedup")

    alone = speed([])
    assert alone.status == "uncertain" and alone.runs_pooled == 1 and alone.pooled_point is None
    # two earlier runs at this run's ratio: the band is z·s/√3 = ±15%, clear of 2x (2.5 / 1.15 = 2.18)
    v = speed([(x, 0.0), (x, 0.0)])
    assert v.runs_pooled == 3 and v.status == "pass" and v.measured == pytest.approx(math.exp(x))
    assert v.pooled_point == pytest.approx(math.exp(x)) and v.ci_low == pytest.approx(math.exp(x - Z95 * s / math.sqrt(3)))
    assert "pooled over 3 runs" in v.describe()
    # earlier runs far lower pull the pooled verdict down: the evidence, not this run alone, decides
    low = speed([(math.log(1.3), 0.0), (math.log(1.4), 0.0)])
    assert low.status == "fail" and low.pooled_point < 2.0 < low.measured
    # more rounds in this run cannot settle what lies within the pooled band
    at_edge = speed([(math.log(2.0), 0.0), (math.log(2.0), 0.0)])
    assert at_edge.status == "uncertain"
    assert not more_rounds_could_settle(CandidateOutcome(spec=CandidateSpec(name="c", backend="onnxruntime"),
                                                         verdicts=(at_edge,)))


def test_a_settled_verdict_stands_until_the_evidence_settles_the_other_way(tmp_path: Path) -> None:
    """The flicker pooling alone left (issue 7's "three identical runs"): a candidate settled as a pass by
    the runs so far must not go back to uncertain because one more run pulls the pooled mean down by a
    fraction of the band; only pooled evidence *below* the threshold reverses it."""
    s = 0.12
    base = _bench_with(tmp_path, "baseline", BASELINE).model_copy(update={"rss_steady_mb_repeats": (100.0,) * 3})
    cand = _bench_with(tmp_path, "cand", CLEAR)

    def speed(earlier):
        return next(v for v in evaluate_gates(benchmark=cand, evaluation=evaluation(), baseline_benchmark=base,
                                              gates=Gates(), budgets=Budgets(), run_to_run_sd=s,
                                              earlier_speedups=earlier) if v.gate == "speedup")

    # run 1 alone settled a pass (2.6 / e^(1.96·0.12) = 2.05); run 2 at 1.5 and this run leave the pooled
    # interval straddling 2x: the decision of run 1 holds, and the verdict says so
    held = speed([(math.log(2.6), 0.0), (math.log(1.5), 0.0)])
    assert held.ci_low < 2.0 < held.ci_high
    assert held.status == "pass" and held.passed and held.held_from_run == 1 and held.runs_pooled == 3
    assert "held: settled by the first 1 run(s)" in held.describe()
    assert not more_rounds_could_settle(CandidateOutcome(spec=CandidateSpec(name="c", backend="onnxruntime"),
                                                         verdicts=(held,)))
    # two runs at 1.3 after it settle a fail over runs 1..3 (upper bound 1.88 < 2): the pass is reversed, and the
    # fail then holds while this run's 2.5 only brings the pooled interval back across the threshold
    reversed_ = speed([(math.log(2.6), 0.0), (math.log(1.3), 0.0), (math.log(1.3), 0.0)])
    assert reversed_.ci_low < 2.0 < reversed_.ci_high
    assert reversed_.status == "fail" and not reversed_.passed and reversed_.held_from_run == 3
    # nothing settled before: straddling stays uncertain (and no decision is claimed)
    never = speed([(math.log(2.0), 0.0), (math.log(2.0), 0.0)])
    assert never.status == "uncertain" and never.held_from_run is None
    # a pooled interval that settles by itself is reported as such, not as held
    assert speed([(math.log(2.6), 0.0), (math.log(2.6), 0.0)]).held_from_run is None


def test_the_recorded_demo_sequence_no_longer_flickers() -> None:
    """This run's own speed-ups of ort-int8-static-entropy in the seven consecutive demo runs
    (benchmarks/results/demo-consecutive.json: 2.31, 2.32, 2.17, 2.21, 1.96, 2.48, 2.44x), each with a run's
    own ±24% interval, on a host spread of 0.08: pooled alone the verdicts went uncertain, uncertain, pass,
    pass, uncertain, pass, pass; the sequential decision goes uncertain twice, then pass for good."""
    sd, s = 0.11, 0.08
    pooled_only, decided, earlier = [], [], []
    for x in (2.31, 2.32, 2.17, 2.21, 1.96, 2.48, 2.44):
        this = Interval(x, x * math.exp(-Z95 * sd), x * math.exp(Z95 * sd), 0.95, 3)
        d = sequential(this, list(earlier), sd_log=s, threshold=2.0)
        v = verdict(gate="speedup", metric="speedup p50", comparator=">=", threshold=2.0, measured=x,
                    run_to_run_sd=s, decision=d)
        pooled_only.append(verdict(gate="speedup", metric="speedup p50", comparator=">=", threshold=2.0,
                                   measured=x, interval=d.interval).status)
        decided.append(v.status)
        earlier.append((math.log(x), sd))
    assert pooled_only == ["uncertain", "uncertain", "pass", "pass", "uncertain", "pass", "pass"]
    assert decided == ["uncertain", "uncertain", "pass", "pass", "pass", "pass", "pass"]


def test_history_lines_carry_the_measurement(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    record(path, run="r1", ratios={"a": 2.0}, measurements={"a": "m1"}, sds={"a": 0.07})
    back = read_history(path)[0]
    assert back.measurement == "m1" and back.sd_log == 0.07


def test_the_hosts_evidence_is_shared_by_project_folders_unless_a_data_folder_is_chosen(tmp_path: Path,
                                                                                          monkeypatch) -> None:
    """Two clones on one host, each with the default ``./.edgeopt``, read and write one history (the
    run-to-run spread is the host's); ``$EDGEOPT_HOME`` or another folder keeps its own; ``$EDGEOPT_HOST_STATE``
    wins over both."""
    from edgeopt.settings import host_state_dir

    monkeypatch.delenv("EDGEOPT_HOME", raising=False)
    monkeypatch.delenv("EDGEOPT_HOST_STATE", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    shared = tmp_path / "state" / "edgeopt" / "hosts"
    for clone in ("clone-a", "clone-b"):
        (tmp_path / clone).mkdir()
        monkeypatch.chdir(tmp_path / clone)
        assert host_state_dir() == shared
        assert host_state_dir(Path(".edgeopt")) == shared
    assert host_state_dir(tmp_path / "data") == tmp_path / "data" / "hosts"  # a folder chosen by the caller
    monkeypatch.setenv("EDGEOPT_HOME", str(tmp_path / "home"))
    assert host_state_dir() == tmp_path / "home" / "hosts"
    assert host_state_dir(Path(".edgeopt")) == tmp_path / "clone-b" / ".edgeopt" / "hosts"
    monkeypatch.setenv("EDGEOPT_HOST_STATE", str(tmp_path / "mine"))
    assert host_state_dir(tmp_path / "data") == tmp_path / "mine"
