"""Olive candidates in the optimize flow: built offline from our data, measured, gated, in one table."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from edgeopt import backends
from flows.optimize import optimize_flow
from tests.conftest import write_profile

pytestmark = [pytest.mark.flow, pytest.mark.usefixtures("prefect_harness"),
              pytest.mark.skipif(not backends.get("olive").available(),
                                 reason="olive-ai is not installed (extra 'olive')")]


def test_olive_candidates_are_measured_and_gated_beside_the_others(tiny, tmp_path):
    """One Olive candidate builds (static INT8 on our calibration data), one has a pass that fails (ONNX
    Runtime's BERT fusion asserts on a CNN with 7 hidden units over 3 heads; Olive exits 0 without a
    model): the first is measured and gated in the same table as ONNX Runtime's, the second fails with
    a classified reason and Olive's log in its MLflow run, and the flow completes."""
    profile = write_profile(tmp_path / "p.yaml", candidates=[
        {"name": "ort-int8-dynamic", "backend": "onnxruntime", "recipe": {"precision": "int8", "quantization": "dynamic"}},
        {"name": "olive-int8", "backend": "olive", "recipe": {"calibration_samples": 32, "passes": [
            {"type": "quantize-static", "options": {"per_channel": True}}]}},
        {"name": "olive-broken", "backend": "olive", "recipe": {"passes": [
            {"type": "transformer-optimization", "options": {"model_type": "bert", "num_heads": 3, "hidden_size": 7}}]}},
    ])
    data = tmp_path / "data"
    report = optimize_flow(model=str(tiny["model"]), profile=str(profile), calibration=str(tiny["calibration"]),
                           evaluation=str(tiny["eval"]), data_dir=str(data))
    by_name = {o.name: o for o in report.outcomes}
    assert list(by_name) == ["baseline-fp32", "ort-int8-dynamic", "olive-int8", "olive-broken"]
    olive = by_name["olive-int8"]
    assert olive.ok and olive.artifact.backend == "olive" and olive.artifact.precision == "int8"
    assert olive.benchmark.samples >= 30 and olive.evaluation.metric == "top1_accuracy"
    assert olive.evaluation.value >= 0.8  # the baseline is ~0.9 (labels with 1 in 10 changed)
    assert {v.gate for v in olive.verdicts} == {v.gate for v in by_name["ort-int8-dynamic"].verdicts} != set()
    broken = by_name["olive-broken"]
    assert broken.failure.stage == "build" and broken.failure.reason == "build-error"
    assert "pass 'transformer-optimization' failed" in broken.failure.message
    assert {Path(e).name for e in broken.failure.evidence} >= {"olive.log", "olive_config.json"}

    cl = mlflow.MlflowClient(tracking_uri=f"sqlite:///{data / 'mlflow' / 'mlflow.db'}")
    runs = cl.search_runs([report.experiment_id], f"tags.mlflow.parentRunId = '{report.mlflow_run_id}'")
    children = {r.info.run_name: r for r in runs}
    logged = {name: {a.path for a in cl.list_artifacts(children[name].info.run_id, "build")}
              for name in ("olive-int8", "olive-broken")}
    assert {"build/olive_config.json", "build/olive.log"} <= logged["olive-int8"]
    assert "build/olive.log" in logged["olive-broken"]
    assert children["olive-broken"].data.tags["edgeopt.failure.reason"] == "build-error"
