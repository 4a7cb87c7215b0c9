"""The nightly re-optimization flow on the real optimize and certify flows, MLflow store and harness.

One night after another on the weight-heavy MLP: the first winner (dynamic INT8) is certified and
becomes champion; the next night with nothing changed records "unchanged" without optimizing; a
changed profile brings a static INT8 challenger that is measured against the champion in the same
run, interleaved, and goes on only if its speed-up interval clears 1 (certification off here:
nothing moves either way).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from flows.nightly import nightly_flow
from tests.conftest import write_profile

pytestmark = [pytest.mark.flow, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

NAME = "mlp-nightly"
DYNAMIC = {"name": "ort-int8-dynamic", "backend": "onnxruntime",
           "recipe": {"precision": "int8", "quantization": "dynamic"}}
STATIC = {"name": "ort-int8-static", "backend": "onnxruntime",
          "recipe": {"precision": "int8", "quantization": "static", "calibration_method": "minmax"}}
LOOSE = {"speedup_min": 0.5, "memory_reduction_min": -1.0, "accuracy_ratio_min": 0.8}


def _client(data: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{data / 'mlflow' / 'mlflow.db'}")


def _nightly_runs(cl: mlflow.MlflowClient) -> list:
    exp = cl.get_experiment_by_name(f"edgeopt/{NAME}")
    return cl.search_runs([exp.experiment_id], filter_string="tags.`edgeopt.flow` = 'nightly'",
                          order_by=["attributes.start_time ASC"])


def _optimize_runs(cl: mlflow.MlflowClient) -> list:
    exp = cl.get_experiment_by_name(f"edgeopt/{NAME}")
    return [r for r in cl.search_runs([exp.experiment_id]) if r.info.run_name.startswith("optimize-")]


def test_nights_promote_only_forward(mlp, tmp_path):
    data = tmp_path / "data"
    dynamic = write_profile(tmp_path / "dynamic.yaml", gates=LOOSE, candidates=[DYNAMIC], benchmark={"repeats": 2})
    kw = {"model": str(mlp["model"]), "calibration": str(mlp["calibration"]), "evaluation": str(mlp["eval"]),
          "model_name": NAME, "data_dir": str(data), "soak_s": 4.0}

    first = nightly_flow(profile=str(dynamic), **kw)
    assert first.result == "promoted", first.reason
    assert first.champion_before is None and first.champion_after == first.challenger == "1"
    cl = _client(data)
    mv = cl.get_model_version_by_alias(NAME, "champion")
    assert str(mv.version) == "1" and mv.tags["certification.status"] == "certified"

    again = nightly_flow(profile=str(dynamic), **kw)
    assert again.result == "unchanged" and "promoted" in again.reason
    assert len(_optimize_runs(cl)) == 1, "an unchanged night does not optimize"

    static = write_profile(tmp_path / "static.yaml", gates=LOOSE, candidates=[STATIC], benchmark={"repeats": 2})
    third = nightly_flow(profile=str(static), certify=False, **kw)
    assert len(_optimize_runs(cl)) == 2, "a changed profile re-optimizes"
    assert third.challenger == "2" and third.champion_before == "1"
    d = third.duel
    assert d["duel_rounds"] == 3 and d["duel_champion_p50_ms"] > 0 and d["duel_challenger_p50_ms"] > 0
    assert d["duel_speedup_ci_low"] <= d["duel_speedup_p50"] <= d["duel_speedup_ci_high"]
    # the verdict follows the interval's lower bound, not the point
    assert third.result == ("promotable" if d["duel_speedup_ci_low"] > 1.0 else "champion-kept"), third.reason
    # accuracy of both, measured now on the same labelled inputs
    assert 0.5 < d["duel_champion_accuracy"] <= 1.0 and 0.5 < d["duel_challenger_accuracy"] <= 1.0
    # nothing moves without certification
    assert str(cl.get_model_version_by_alias(NAME, "champion").version) == "1"
    # independent checks of the duel's latencies: each side's p50 as its optimize run measured it (other
    # processes, same machine and settings) agrees within a factor of 2 (what this protects: a duel that
    # timed the wrong artifact, other inputs or another thread budget)
    for side, version in (("champion", "1"), ("challenger", "2")):
        recorded = cl.get_run(cl.get_model_version(NAME, version).run_id).data.metrics["latency_ms_p50"]
        assert 0.5 < d[f"duel_{side}_p50_ms"] / recorded < 2.0, (side, d, recorded)
    runs = _nightly_runs(cl)
    assert [r.data.tags["nightly.result"] for r in runs] == ["promoted", "unchanged", third.result]
    assert runs[-1].data.metrics["duel_speedup_p50"] == pytest.approx(d["duel_speedup_p50"])
