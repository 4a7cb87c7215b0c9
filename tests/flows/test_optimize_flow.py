"""The optimize flow under Prefect's test harness with a temporary MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from edgeopt.errors import ConfigError, DataError, ModelError
from edgeopt.intake import assess
from flows.optimize import optimize_flow
from tests.conftest import write_profile

pytestmark = [pytest.mark.flow, pytest.mark.usefixtures("prefect_harness")]


def _client(data_dir: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{data_dir / 'mlflow' / 'mlflow.db'}")


def _children(cl: mlflow.MlflowClient, report) -> dict[str, mlflow.entities.Run]:
    runs = cl.search_runs([report.experiment_id], f"tags.mlflow.parentRunId = '{report.mlflow_run_id}'")
    return {r.info.run_name: r for r in runs}


def test_nothing_passes_registers_nothing(tiny, tmp_path):
    """Gates out of reach: every candidate is measured, logged and rejected; nothing is registered."""
    profile = write_profile(tmp_path / "strict.yaml", gates={"speedup_min": 50.0})
    report = optimize_flow(model=str(tiny["model"]), profile=str(profile), calibration=str(tiny["calibration"]),
                           evaluation=str(tiny["eval"]), data_dir=str(tmp_path / "data"))
    assert report.selection.selected is None
    assert "nothing is registered" in report.selection.message
    assert report.selection.nearest_misses, "the nearest misses are listed"
    assert "speedup" in report.selection.nearest_misses[0]
    names = [o.name for o in report.outcomes]
    assert names == ["baseline-fp32", "ort-fp32-optimized", "ort-int8-dynamic", "ort-int8-static-minmax"]
    for o in report.outcomes:
        assert o.ok, o.failure
        assert o.benchmark.samples >= 30
        assert o.evaluation is not None and o.evaluation.metric == "top1_accuracy"
    baseline = report.outcomes[0]
    assert baseline.evaluation.value == pytest.approx(0.9, abs=0.02)  # labels built with 1 in 10 changed
    assert all(not any(v.passed for v in o.verdicts if v.gate == "speedup") for o in report.outcomes[1:])

    cl = _client(tmp_path / "data")
    parent = cl.get_run(report.mlflow_run_id)
    assert parent.data.params["model.sha256"] == baseline.artifact.parent_sha256
    assert parent.data.params["hardware.arch"] == "x86_64"
    assert parent.info.status == "FINISHED"
    children = _children(cl, report)
    assert set(children) == set(names)
    child = children["ort-int8-static-minmax"]
    assert child.data.params["recipe.calibration_method"] == "minmax"
    assert child.data.metrics["latency_ms_p95"] >= child.data.metrics["latency_ms_p50"] > 0
    assert child.data.tags["edgeopt.status"] == "rejected"
    assert "FAIL" in child.data.tags["gate.speedup"]
    artifacts = {a.path for a in cl.list_artifacts(child.info.run_id)}
    assert {"model", "latency"} <= artifacts
    assert cl.search_registered_models() == []

    # the Prefect API holds the flow run, its report artifact and the link to the MLflow run
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(UUID(report.flow_run_id))
        assert fr.state.is_completed()
        assert fr.name == "optimize-strict"  # the profile file by its stem, not its path
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(report.flow_run_id)])))
    by_key = {a.key: a for a in arts}
    assert "baseline-fp32" in by_key["optimize-strict"].data and "Nearest misses" in by_key["optimize-strict"].data
    assert report.mlflow_run_id in by_key["mlflow-run"].data


def test_passing_candidate_is_registered_with_alias(mlp, tmp_path):
    """A profile with its own (reachable) gates: the winner becomes a model version aliased 'candidate'."""
    profile = write_profile(
        tmp_path / "loose.yaml",
        gates={"speedup_min": 1.2, "memory_reduction_min": 0.0, "accuracy_ratio_min": 0.8},
        candidates=[{"name": "ort-int8-dynamic", "backend": "onnxruntime",
                     "recipe": {"precision": "int8", "quantization": "dynamic"}}],
        benchmark={"repeats": 3},  # 3 rounds: a t interval over 2 would be 12.7 standard errors wide
    )
    report = optimize_flow(model=str(mlp["model"]), profile=str(profile), evaluation=str(mlp["eval"]),
                           data_dir=str(tmp_path / "data"), model_name="mlp-test")
    chosen = report.outcomes[1]
    rounds = chosen.benchmark.repeats  # 3, or 6 when the verdict was uncertain after 3 (more rounds)
    assert rounds in (3, 6) and len(chosen.benchmark.latency_ms_p50_repeats) == rounds
    assert report.outcomes[0].benchmark.repeats == rounds  # the baseline measured in the same rounds
    assert chosen.benchmark.samples >= rounds * 30
    assert chosen.speedup_p50 and chosen.speedup_p50 >= 1.2, chosen.verdicts
    assert report.selection.selected == "ort-int8-dynamic"
    assert report.registered_version == "1"
    cl = _client(tmp_path / "data")
    mv = cl.get_model_version_by_alias("mlp-test", "candidate")
    assert str(mv.version) == "1"
    assert mv.tags["edgeopt.candidate"] == "ort-int8-dynamic"
    assert "pass" in mv.tags["gate.speedup"]
    assert mv.run_id in {r.info.run_id for r in _children(cl, report).values()}
    # the version carries the model's signature; the parent run the selection's figures and the report
    inputs = json.loads(mv.tags["signature.inputs"])
    assert [(t["name"], t["dtype"]) for t in inputs] == [(t.name, t.dtype) for t in assess(mlp["model"]).inputs]
    assert json.loads(mv.tags["signature.outputs"]) and "signature.measured_shapes" in mv.tags
    parent = cl.get_run(report.mlflow_run_id)
    assert parent.data.metrics["selected_speedup_p50"] == pytest.approx(chosen.speedup_p50)
    assert parent.data.metrics["selected_latency_ms_p50"] == pytest.approx(chosen.benchmark.latency_ms_p50)
    assert parent.data.metrics["candidates_passing"] == len(report.selection.passing)
    assert report.selection.message in parent.data.tags["mlflow.note.content"]
    # the same artifact selected again keeps its version instead of registering a duplicate
    again = optimize_flow(model=str(mlp["model"]), profile=str(profile), evaluation=str(mlp["eval"]),
                          data_dir=str(tmp_path / "data"), model_name="mlp-test")
    assert again.cached and again.registered_version == "1"
    assert len(cl.search_model_versions("name = 'mlp-test'")) == 1


def test_failed_candidate_is_recorded_and_flow_goes_on(tiny, tmp_path):
    """Static INT8 without calibration data is skipped with its reason; the others are measured."""
    profile = write_profile(tmp_path / "p.yaml")
    report = optimize_flow(model=str(tiny["model"]), profile=str(profile), evaluation=str(tiny["eval"]),
                           data_dir=str(tmp_path / "data"))
    by_name = {o.name: o for o in report.outcomes}
    static = by_name["ort-int8-static-minmax"]
    assert static.failure is not None and static.failure.reason == "missing-data"
    assert "--calibration" in static.failure.message
    assert by_name["ort-int8-dynamic"].ok
    children = _children(_client(tmp_path / "data"), report)
    assert children["ort-int8-static-minmax"].data.tags["edgeopt.failure.reason"] == "missing-data"
    assert children["ort-int8-static-minmax"].info.status == "FAILED"


def test_rerun_with_nothing_changed_uses_the_cache(tiny, tmp_path):
    profile = write_profile(tmp_path / "p.yaml", candidates=[
        {"name": "ort-int8-dynamic", "backend": "onnxruntime", "recipe": {"precision": "int8", "quantization": "dynamic"}}])
    kwargs = {"model": str(tiny["model"]), "profile": str(profile), "evaluation": str(tiny["eval"]),
              "data_dir": str(tmp_path / "data")}
    first = optimize_flow(**kwargs)
    second = optimize_flow(**kwargs)
    for a, b in zip(first.outcomes, second.outcomes, strict=True):
        assert a.benchmark == b.benchmark  # the same measurement, not a new one
        assert a.artifact == b.artifact
    children = _children(_client(tmp_path / "data"), second)
    assert children["ort-int8-dynamic"].data.tags["edgeopt.cached"] == "true"
    third = optimize_flow(**kwargs, refresh=True)
    assert third.outcomes[1].benchmark.latency_ms_p50 != first.outcomes[1].benchmark.latency_ms_p50


@pytest.mark.parametrize("bad", ["missing", "not-onnx", "truncated"])
def test_bad_model_fails_before_anything_is_logged(bad, tiny, tmp_path):
    path = tmp_path / "model.onnx"
    if bad == "not-onnx":
        path.write_text("this is not a model\n")
    elif bad == "truncated":
        path.write_bytes(tiny["model"].read_bytes()[:300])
    with pytest.raises(ModelError, match="model .*model.onnx"):
        optimize_flow(model=str(path), profile=str(write_profile(tmp_path / "p.yaml")),
                      data_dir=str(tmp_path / "data"))
    assert not (tmp_path / "data" / "mlflow").exists()


def test_bad_data_and_profile_fail_cleanly(tiny, tmp_path):
    import numpy as np

    nan = tmp_path / "nan.npz"
    cal = np.load(tiny["calibration"])["input"].copy()
    cal[3, 0, 0, 0] = np.nan
    np.savez(nan, input=cal)
    with pytest.raises(DataError, match="NaN"):
        optimize_flow(model=str(tiny["model"]), profile=str(write_profile(tmp_path / "p.yaml")),
                      calibration=str(nan), data_dir=str(tmp_path / "data"))
    with pytest.raises(ConfigError, match="unknown profile 'no-such-profile'"):
        optimize_flow(model=str(tiny["model"]), profile="no-such-profile", data_dir=str(tmp_path / "data"))
    assert not (tmp_path / "data" / "mlflow").exists()
