"""Stress, soak and power checks, through the real onnxruntime backend and real worker processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from edgeopt.bench.faults import FAULT_ENV
from edgeopt.certify.records import CheckResult
from edgeopt.certify.stress import RSS_GROWTH_MIN_MB, power_check, soak_check, stress_check
from edgeopt.certify.stress_worker import STRESS_FAULT_ENV, EnergyMeter
from edgeopt.errors import ConfigError
from edgeopt.records import Artifact, TensorSpec

pytest.importorskip("onnxruntime")

SIG = (TensorSpec(name="input", dtype="float32", shape=("batch", 1, 8, 8)),)
SERIES_KEYS = {"start_s", "end_s", "calls", "p50_ms", "p99_ms", "rss_mb", "freq_mhz", "temp_c", "energy_j",
               "warmup"}


def _artifact(path: Path) -> Artifact:
    return Artifact(candidate="tiny", backend="onnxruntime", path=str(path), sha256="0" * 64,
                    size_bytes=path.stat().st_size if path.exists() else 0, parent_sha256="0" * 64,
                    precision="fp32", runtime={"intra_op_threads": 1})


def _jsonable(result: CheckResult) -> None:
    json.dumps(result.evidence, allow_nan=False)
    for f in result.files:
        assert Path(f).is_file(), f


# ------------------------------------------------------------------------------------------ stress
def test_stress_passes_with_concurrent_callers(tiny, tmp_path):
    r = stress_check(artifact=_artifact(tiny["model"]), signature=SIG, evaluation_path=str(tiny["eval"]),
                     out_dir=tmp_path, callers=3, duration_s=1.5)
    assert r.check == "stress" and r.status == "pass", r.reason
    ev = r.evidence
    conc, single = ev["concurrent"], ev["single"]
    assert conc["throughput_per_s"] > 0 and single["throughput_per_s"] > 0
    assert len(conc["calls_per_caller"]) == 3 and min(conc["calls_per_caller"]) > 0
    assert conc["latency_ms_p99"] >= conc["latency_ms_p50"] > 0
    assert ev["errors"] == ev["nonfinite"] == ev["mismatches"] == 0
    assert ev["distinct_inputs"] == 64 and ev["settings"]["callers"] == 3
    assert "3 callers" in r.summary and "p99" in r.summary and r.duration_s > 1.5
    _jsonable(r)
    with np.load(tmp_path / "stress_latency_ms.npz") as data:
        assert data["concurrent_ms"].size == conc["samples"] == sum(conc["calls_per_caller"])
        assert data["single_ms"].size == single["samples"]
        assert set(np.unique(data["concurrent_caller"])) == {0, 1, 2}
        assert np.isclose(np.percentile(data["concurrent_ms"], 99), conc["latency_ms_p99"])


def test_stress_counts_errors_of_concurrent_calls(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(STRESS_FAULT_ENV, "race")  # a session that raises when two calls overlap
    r = stress_check(artifact=_artifact(tiny["model"]), signature=SIG, evaluation_path=str(tiny["eval"]),
                     out_dir=tmp_path, callers=4, duration_s=1.0)
    assert r.status == "fail" and r.evidence["errors"] > 0
    assert "calls raised" in r.reason and "concurrent call" in r.evidence["first_error"]


def test_stress_fails_on_a_crash(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "segfault")
    r = stress_check(artifact=_artifact(tiny["model"]), signature=SIG, evaluation_path=None, out_dir=tmp_path,
                     duration_s=0.5)
    assert r.status == "fail" and r.reason.startswith("crash:") and "SIGSEGV" in r.reason


def test_stress_fails_on_non_finite_outputs_of_some_inputs(tiny, tmp_path):
    """Sqrt is NaN for the negative values of the evaluation data: a real model, no fault injection."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, 8, 8])
    graph = helper.make_graph([helper.make_node("Sqrt", ["input"], ["y"])], "sqrt", [x], [y])
    path = tmp_path / "sqrt.onnx"
    path.write_bytes(helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17)])
                     .SerializeToString())
    r = stress_check(artifact=_artifact(path), signature=SIG, evaluation_path=str(tiny["eval"]),
                     out_dir=tmp_path / "out", duration_s=0.5)
    assert r.status == "fail" and r.reason.startswith("accuracy:") and "NaN" in r.reason


def test_stress_p99_threshold(tiny, tmp_path):
    r = stress_check(artifact=_artifact(tiny["model"]), signature=SIG, evaluation_path=str(tiny["eval"]),
                     out_dir=tmp_path, callers=2, duration_s=0.5, p99_max_ms=1e-6)
    assert r.status == "fail" and "p99 under load" in r.reason and "> 1e-06 ms" in r.reason
    assert r.evidence["thresholds"]["p99_max_ms"] == 1e-6 and "(max 1e-06 ms)" in r.summary


def test_stress_missing_artifact_and_bad_settings(tmp_path):
    r = stress_check(artifact=_artifact(tmp_path / "gone.onnx"), signature=SIG, evaluation_path=None,
                     out_dir=tmp_path, duration_s=0.5)
    assert r.status == "fail" and "does not exist" in r.reason
    with pytest.raises(ConfigError, match="callers >= 1"):
        stress_check(artifact=_artifact(tmp_path / "gone.onnx"), signature=SIG, evaluation_path=None,
                     out_dir=tmp_path, callers=0)
    with pytest.raises(ConfigError, match="duration_s >= 4"):
        soak_check(artifact=_artifact(tmp_path / "gone.onnx"), signature=SIG, evaluation_path=None,
                   out_dir=tmp_path, duration_s=3.0, window_s=1.0)


# -------------------------------------------------------------------------------------------- soak
def _series(path: Path) -> tuple[dict, list[dict]]:
    series = json.loads(path.read_text())  # strict JSON: NaN would not parse in a browser
    return series, [w for w in series["windows"] if not w["warmup"]]


def _polyfit_slope(kept: list[dict], key: str) -> float:
    return float(np.polyfit([w["start_s"] / 60.0 for w in kept], [w[key] for w in kept], 1)[0])


def test_soak_writes_the_documented_series(tiny, tmp_path):
    # p99 of 1 s windows on a shared machine is noisy: the drift threshold is not what this test is about
    r = soak_check(artifact=_artifact(tiny["model"]), signature=SIG, evaluation_path=str(tiny["eval"]),
                   out_dir=tmp_path, duration_s=6.0, window_s=1.0, p99_drift_max=100.0)
    assert r.check == "soak" and r.status == "pass", r.reason
    _jsonable(r)
    series, kept = _series(tmp_path / "soak_series.json")
    assert str(tmp_path / "soak_series.json") in r.files
    assert len(series["windows"]) == 6 and series["windows"][0]["warmup"] and len(kept) == 5
    assert all(set(w) == SERIES_KEYS for w in series["windows"])
    no_sensor = r.evidence["energy"]["source"] is None
    for w in series["windows"]:
        assert w["calls"] > 0 and w["p99_ms"] >= w["p50_ms"] > 0 and w["rss_mb"] > 0
        assert (w["energy_j"] is None) == no_sensor
    starts = [w["start_s"] for w in series["windows"]]
    assert starts == sorted(starts) and starts[-1] < 6.0
    ev = r.evidence
    # no leak by the documented rule: a slope above 5 MB/min counts only when the growth it fits over the kept
    # windows is above RSS_GROWTH_MIN_MB (on 5 s, half a MB of allocator pages extrapolates to 6 MB/min)
    span_min = (kept[-1]["start_s"] - kept[0]["start_s"]) / 60.0
    assert ev["rss_growth_mb"] == pytest.approx(ev["rss_slope_mb_per_min"] * span_min, rel=1e-6, abs=1e-9)
    assert np.isfinite(ev["rss_slope_mb_per_min"])
    assert ev["rss_slope_mb_per_min"] < 5.0 or ev["rss_growth_mb"] <= RSS_GROWTH_MIN_MB, ev
    assert ev["rss_slope_mb_per_min"] == pytest.approx(_polyfit_slope(kept, "rss_mb"), rel=1e-6, abs=1e-9)
    assert ev["p99_slope_ms_per_min"] == pytest.approx(_polyfit_slope(kept, "p99_ms"), rel=1e-6, abs=1e-9)
    assert series["rss_slope_mb_per_min"] == ev["rss_slope_mb_per_min"]
    assert ev["thresholds"] == series["thresholds"] and ev["thresholds"]["rss_slope_max_mb_per_min"] == 5.0
    # a third of 5 windows is 1 window: the drift is last / first - 1
    assert ev["p99_drift"] == pytest.approx(kept[-1]["p99_ms"] / kept[0]["p99_ms"] - 1)
    assert ev["energy"]["calls"] == sum(w["calls"] for w in kept)


def test_soak_fails_on_a_leak(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(STRESS_FAULT_ENV, "leak:120")  # ~2 MB/s of touched memory kept by the session
    r = soak_check(artifact=_artifact(tiny["model"]), signature=SIG, evaluation_path=None, out_dir=tmp_path,
                   duration_s=5.0, window_s=1.0, p99_drift_max=100.0)
    assert r.status == "fail" and "RSS slope" in r.reason and "a leak" in r.reason
    _, kept = _series(tmp_path / "soak_series.json")
    independent = _polyfit_slope(kept, "rss_mb")
    assert r.evidence["rss_slope_mb_per_min"] == pytest.approx(independent, rel=1e-6)
    assert 60.0 < independent < 240.0  # 120 MB/min leaked, give or take the machine


# ------------------------------------------------------------------------------------------- power
def test_power_not_applicable_without_a_sensor(tmp_path):
    if EnergyMeter().available is not None:
        pytest.skip("this host exposes a power sensor")
    r = power_check(out_dir=tmp_path, duration_s=0.1)
    assert r.check == "power" and r.status == "not-applicable" and r.passed
    assert "rapl:" in r.reason and "nvml:" in r.reason and "powermetrics:" in r.reason
    assert json.loads((tmp_path / "power.json").read_text())["source"] is None
    stress = CheckResult(check="stress", status="pass", summary="x")
    with pytest.raises(ConfigError, match="soak check"):
        power_check(out_dir=tmp_path, soak=stress)
