"""Measurement integrity in the optimize flow: like-for-like baselines, one key for files and caches,
comparison groups measured together, uncertain verdicts re-measured, registration last."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import numpy as np
import pytest

from edgeopt import report as report_module
from flows.optimize import optimize_flow
from tests.conftest import write_profile

pytestmark = [pytest.mark.flow, pytest.mark.usefixtures("prefect_harness")]

DYNAMIC = {"name": "ort-int8-dynamic", "backend": "onnxruntime", "recipe": {"precision": "int8", "quantization": "dynamic"}}


def _client(data_dir: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{data_dir / 'mlflow' / 'mlflow.db'}")


def _by_name(report) -> dict:
    return {o.name: o for o in report.outcomes}


def test_a_dynamic_sequence_candidate_is_gated_against_a_dynamic_sequence_baseline(tiny_bert, tmp_path):
    """The candidate runs each sentence at its real length; so does the baseline it is compared with.
    A two-thread recipe is compared with a two-thread baseline."""
    profile = write_profile(tmp_path / "p.yaml", candidates=[
        {**DYNAMIC, "name": "int8-seq-dynamic", "sequence": "dynamic"},
        {**DYNAMIC, "name": "int8-2-threads", "recipe": {**DYNAMIC["recipe"], "intra_op_threads": 2}},
        DYNAMIC,
    ], benchmark={"repeats": 2, "extra_repeats": 0})
    report = optimize_flow(model=str(tiny_bert["model"]), profile=str(profile), evaluation=str(tiny_bert["eval"]),
                           data_dir=str(tmp_path / "data"))
    o = _by_name(report)
    assert [n for n in o if o[n].spec.baseline] == ["baseline-fp32", "baseline-fp32-seq-dynamic", "baseline-fp32-t2"]
    fixed, dyn_base = o["baseline-fp32"].benchmark, o["baseline-fp32-seq-dynamic"].benchmark
    cand = o["int8-seq-dynamic"]
    assert cand.baseline == "baseline-fp32-seq-dynamic" and dyn_base.sequence == "dynamic"
    assert dyn_base.seq_len_mean == pytest.approx(cand.benchmark.seq_len_mean) and dyn_base.seq_len_mean < 64
    assert fixed.seq_len_mean == 64
    # the ratio uses the dynamic baseline's own latency (same rounds), not the padded one's
    assert cand.speedup_p50 == pytest.approx(dyn_base.latency_ms_p50 / cand.benchmark.latency_ms_p50, rel=1e-9)
    assert f"vs {dyn_base.candidate}" in next(v for v in cand.verdicts if v.gate == "speedup").metric
    two = o["int8-2-threads"]
    assert two.baseline == "baseline-fp32-t2" and o["baseline-fp32-t2"].benchmark.threads == 2
    assert two.benchmark.threads == 2
    assert o["ort-int8-dynamic"].baseline == "baseline-fp32" and o["ort-int8-dynamic"].benchmark.threads == 1
    # every baseline variant keeps the FP32 model's outputs
    assert o["baseline-fp32-seq-dynamic"].evaluation.cosine_mean > 0.9999


def _other_eval(tiny: dict, tmp_path: Path) -> Path:
    data = np.load(tiny["eval"])
    rng = np.random.default_rng(7)
    path = tmp_path / "eval-b.npz"
    np.savez(path, input=rng.standard_normal(data["input"].shape).astype(np.float32) * 3.0, labels=data["labels"])
    return path


def test_eval_a_then_b_then_a_reproduces_a(tiny, tmp_path):
    profile = write_profile(tmp_path / "p.yaml", candidates=[DYNAMIC], benchmark={"extra_repeats": 0})
    kw = {"model": str(tiny["model"]), "profile": str(profile), "data_dir": str(tmp_path / "data")}
    first = optimize_flow(**kw, evaluation=str(tiny["eval"]))
    second = optimize_flow(**kw, evaluation=str(_other_eval(tiny, tmp_path)))
    third = optimize_flow(**kw, evaluation=str(tiny["eval"]))
    a, b, c = (_by_name(r)["ort-int8-dynamic"] for r in (first, second, third))
    assert b.evaluation != a.evaluation and b.benchmark.samples_path != a.benchmark.samples_path
    assert c.evaluation == a.evaluation  # A's outputs, not B's left in a shared folder
    assert c.benchmark == a.benchmark and set(third.cached) == {"baseline-fp32", "ort-int8-dynamic"}
    # A's files were never overwritten by B's: the stamp still matches what they hold
    from edgeopt.keys import stamp_ok

    folder = Path(c.benchmark.samples_path).parent
    assert stamp_ok(Path(a.benchmark.samples_path).parent, Path(a.benchmark.samples_path).parent.name.split("-")[-1])
    assert folder.is_dir()


def test_a_changed_result_file_is_not_reused(tiny, tmp_path):
    profile = write_profile(tmp_path / "p.yaml", candidates=[DYNAMIC], benchmark={"extra_repeats": 0})
    kw = {"model": str(tiny["model"]), "profile": str(profile), "evaluation": str(tiny["eval"]),
          "data_dir": str(tmp_path / "data")}
    first = optimize_flow(**kw)
    samples = Path(_by_name(first)["ort-int8-dynamic"].benchmark.samples_path)
    rounds = sorted(samples.parent.parent.glob("ort-int8-dynamic-*/latency_ms.npy"))
    np.save(rounds[0], np.load(rounds[0]) * 0.01)  # a result file edited behind edgeopt's back
    second = optimize_flow(**kw)
    assert not second.cached and set(second.remeasured) == {"baseline-fp32", "ort-int8-dynamic"}


def test_adding_a_candidate_re_measures_the_baseline_with_it(tiny, tmp_path):
    fp32 = {"name": "ort-fp32-optimized", "backend": "onnxruntime", "recipe": {"graph_optimization": "all"}}
    kw = {"model": str(tiny["model"]), "evaluation": str(tiny["eval"]), "data_dir": str(tmp_path / "data")}
    first = optimize_flow(**kw, profile=str(write_profile(tmp_path / "a.yaml", candidates=[DYNAMIC],
                                                          benchmark={"extra_repeats": 0})))
    second = optimize_flow(**kw, profile=str(write_profile(tmp_path / "b.yaml", candidates=[DYNAMIC, fp32],
                                                           benchmark={"extra_repeats": 0})))
    assert first.cached == ()
    assert second.cached == ()  # the group changed: every member measured again, together
    assert set(second.remeasured) == {"baseline-fp32", "ort-int8-dynamic", "ort-fp32-optimized"}
    assert _by_name(second)["baseline-fp32"].benchmark != _by_name(first)["baseline-fp32"].benchmark
    # with --candidate, the comparison is that candidate and its baseline, measured again together
    only = optimize_flow(**kw, profile=str(write_profile(tmp_path / "b.yaml", candidates=[DYNAMIC, fp32],
                                                         benchmark={"extra_repeats": 0})), candidates=["ort-fp32-optimized"])
    assert set(only.remeasured) == {"baseline-fp32", "ort-fp32-optimized"} and only.cached == ()


def test_an_uncertain_verdict_is_re_measured_before_it_is_final(mlp, tmp_path, monkeypatch):
    """A candidate whose rounds disagree (fault injection: the FP32 model's work done once per run in its
    1st, 3rd... measuring process, four times in its 2nd, 4th...) has a speed-up interval that straddles
    a threshold set between ~1x and ~0.25x: its verdict is uncertain, so it gets the extra rounds,
    interleaved with its baseline, until the budget (max_repeats) is spent; a candidate whose verdict
    settled in the first rounds is not measured again; an uncertain verdict is never selected."""
    monkeypatch.setenv("EDGEOPT_BENCH_FAULT", "alternating")
    monkeypatch.setenv("EDGEOPT_BENCH_FAULT_CANDIDATE", "noisy")
    monkeypatch.setenv("EDGEOPT_BENCH_FAULT_STATE", str(tmp_path / "fault-state"))
    noisy = {"name": "noisy", "backend": "onnxruntime", "recipe": {"precision": "fp32", "graph_optimization": "all"}}
    steady = {"name": "steady", "backend": "onnxruntime", "recipe": {"precision": "int8", "quantization": "dynamic"}}
    profile = write_profile(tmp_path / "p.yaml", candidates=[noisy, steady],
                            gates={"speedup_min": 0.5, "memory_reduction_min": -1.0,
                                   "accuracy_ratio_min": 0.5, "confidence": 0.6},
                            benchmark={"repeats": 2, "extra_repeats": 1, "max_repeats": 4})
    # the weight-heavy MLP (~1 ms): stable enough that each round's ratio stays near 1x or near 0.25x
    report = optimize_flow(model=str(mlp["model"]), profile=str(profile), evaluation=str(mlp["eval"]),
                           data_dir=str(tmp_path / "data"))
    o = _by_name(report)
    assert o["noisy"].benchmark.repeats == 4 and o["baseline-fp32"].benchmark.repeats == 4, o["noisy"].verdicts
    # INT8 weights on the memory-bound MLP: ~1.5-3x, far above 0.5x whatever the round (60% intervals)
    assert [v.status for v in o["steady"].verdicts if v.gate == "speedup"] == ["pass"], o["steady"].verdicts
    assert o["steady"].benchmark.repeats == 2, "a settled verdict is not measured again"
    p50s = o["noisy"].benchmark.latency_ms_p50_repeats
    assert max(p50s) > 2.5 * min(p50s)  # the injected rounds, as measured
    v = next(v for v in o["noisy"].verdicts if v.gate == "speedup")
    assert v.status == "uncertain" and v.ci_low < v.threshold <= v.ci_high
    assert report.selection.selected == "steady", "the settled pass is selected, never the uncertain one"


def test_an_uncertain_verdict_within_the_hosts_run_to_run_spread_is_not_re_measured(mlp, tmp_path, monkeypatch):
    """The same noisy candidate on a host whose run-to-run spread is ±100%: at 95% another run could
    measure anything within ×/÷3.9 of its point (which lies between ~0.25x and ~1x, where its rounds
    are), the 0.5x threshold included, and no number of rounds narrows that: it stays uncertain
    without the extra rounds, nothing is selected, and this run's fresh speed-up goes into the host's
    history."""
    monkeypatch.setenv("EDGEOPT_BENCH_FAULT", "alternating")
    monkeypatch.setenv("EDGEOPT_BENCH_FAULT_CANDIDATE", "noisy")
    monkeypatch.setenv("EDGEOPT_BENCH_FAULT_STATE", str(tmp_path / "fault-state"))
    noisy = {"name": "noisy", "backend": "onnxruntime", "recipe": {"precision": "fp32", "graph_optimization": "all"}}
    profile = write_profile(tmp_path / "p.yaml", candidates=[noisy],
                            gates={"speedup_min": 0.5, "memory_reduction_min": -1.0, "accuracy_ratio_min": 0.5},
                            benchmark={"repeats": 2, "extra_repeats": 1, "max_repeats": 4,
                                       "run_to_run_spread": 1.0})
    report = optimize_flow(model=str(mlp["model"]), profile=str(profile), evaluation=str(mlp["eval"]),
                           data_dir=str(tmp_path / "data"))
    o = _by_name(report)
    v = next(v for v in o["noisy"].verdicts if v.gate == "speedup")
    assert v.status == "uncertain" and v.run_to_run_sd == pytest.approx(np.log(2.0)), v
    assert o["noisy"].benchmark.repeats == 2, "no rounds are spent on a verdict they cannot settle"
    assert report.selection.selected is None
    lines = [ln for f in (tmp_path / "data" / "hosts").glob("*.jsonl") for ln in f.read_text().splitlines()]
    assert len(lines) == 1, "one fresh speed-up per comparison of this run"


def test_a_re_measured_comparison_is_judged_on_every_run_of_it_on_this_host(mlp, tmp_path):
    """Run 1 measures a candidate; run 2 re-measures it (refresh): its speed-up verdict pools both runs,
    centred on their geometric mean; run 3 serves run 2's measurement from the cache: that is the same
    measurement, so it pools the same two runs (not three)."""
    fp32 = {"name": "ort-fp32", "backend": "onnxruntime", "recipe": {"precision": "fp32", "graph_optimization": "all"}}
    profile = write_profile(tmp_path / "p.yaml", candidates=[fp32],
                            gates={"speedup_min": 0.5, "memory_reduction_min": -1.0, "accuracy_ratio_min": 0.5},
                            benchmark={"repeats": 2, "extra_repeats": 0, "run_to_run_spread": 0.2})

    reports = []

    def run(refresh: bool):
        reports.append(optimize_flow(model=str(mlp["model"]), profile=str(profile), evaluation=str(mlp["eval"]),
                                     data_dir=str(tmp_path / "data"), refresh=refresh))
        return next(v for v in _by_name(reports[-1])["ort-fp32"].verdicts if v.gate == "speedup")

    first, second, third = run(False), run(True), run(False)
    # what the table and the report say
    row = next(r for r in report_module.rows(reports[1].outcomes) if r["candidate"] == "ort-fp32")
    assert row["speed-up CI"].endswith("(2 runs)")
    assert "judged on all those runs" in report_module.spread_note(reports[1].outcomes)
    assert first.runs_pooled == 1 and first.pooled_point is None
    assert second.runs_pooled == 2
    assert second.pooled_point == pytest.approx(math.sqrt(first.measured * second.measured), rel=1e-9)
    assert second.ci_low < second.pooled_point < second.ci_high
    assert third.runs_pooled == 2 and third.measured == second.measured
    # the same two runs' centre (the band may differ: run 2's spread went into the host's estimate)
    assert third.pooled_point == pytest.approx(second.pooled_point, rel=1e-12) and third.status == second.status
    lines = [ln for f in (tmp_path / "data" / "hosts").glob("*.jsonl") for ln in f.read_text().splitlines()]
    assert len(lines) == 2, "the cached run is not recorded again"


def test_a_fresh_clone_on_the_same_host_pools_what_the_host_measured_before(mlp, tmp_path, monkeypatch):
    """Two project folders (e.g. two clones) with the default data folder on one host: the second's fresh
    measurement of the same comparison is judged on both runs, as a re-run in the first folder would be."""
    fp32 = {"name": "ort-fp32", "backend": "onnxruntime", "recipe": {"precision": "fp32", "graph_optimization": "all"}}
    profile = write_profile(tmp_path / "p.yaml", candidates=[fp32],
                            gates={"speedup_min": 0.5, "memory_reduction_min": -1.0, "accuracy_ratio_min": 0.5},
                            benchmark={"repeats": 2, "extra_repeats": 0, "run_to_run_spread": 0.2})
    monkeypatch.delenv("EDGEOPT_HOME", raising=False)
    monkeypatch.delenv("EDGEOPT_HOST_STATE", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    verdicts = []
    for clone in ("clone-a", "clone-b"):
        (tmp_path / clone).mkdir()
        monkeypatch.chdir(tmp_path / clone)
        report = optimize_flow(model=str(mlp["model"]), profile=str(profile), evaluation=str(mlp["eval"]))
        verdicts.append(next(v for v in _by_name(report)["ort-fp32"].verdicts if v.gate == "speedup"))
        assert (tmp_path / clone / ".edgeopt" / "work").is_dir(), "each clone builds and measures in its own folder"
    first, second = verdicts
    assert first.runs_pooled == 1 and second.runs_pooled == 2
    assert second.pooled_point == pytest.approx(math.sqrt(first.measured * second.measured), rel=1e-9)
    lines = [ln for f in (tmp_path / "state" / "edgeopt" / "hosts").glob("*.jsonl") for ln in f.read_text().splitlines()]
    assert len(lines) == 2 and not list((tmp_path / "clone-a" / ".edgeopt").glob("hosts/*.jsonl"))


def _loose(tmp_path: Path) -> Path:
    return write_profile(tmp_path / "loose.yaml",
                         gates={"speedup_min": 1.0, "memory_reduction_min": 0.0, "accuracy_ratio_min": 0.8,
                                "confidence": 0.6},
                         candidates=[DYNAMIC], benchmark={"extra_repeats": 0})


def test_a_failure_after_the_gates_registers_nothing_and_surfaces(mlp, tmp_path, monkeypatch):
    import flows.optimize as flow_module

    def broken(*_a, **_k):
        raise RuntimeError("injected: report rendering failed")

    def broken_end(*_a, **_k):
        raise OSError("injected: the tracking store went away")

    monkeypatch.setattr(flow_module.report, "markdown", broken)
    monkeypatch.setattr(flow_module.tracking, "end_parent_run", broken_end)
    with pytest.raises(RuntimeError, match="injected: report rendering failed"):
        optimize_flow(model=str(mlp["model"]), profile=str(_loose(tmp_path)), evaluation=str(mlp["eval"]),
                      data_dir=str(tmp_path / "data"), model_name="mlp-broken")
    cl = _client(tmp_path / "data")
    assert cl.search_registered_models() == [] and cl.search_model_versions("name = 'mlp-broken'") == []
