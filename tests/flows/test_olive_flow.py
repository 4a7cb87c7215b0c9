"""Olive candidates in the optimize flow: a failing one is a failed candidate, and the flow goes on."""

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


def test_a_failing_olive_pass_fails_its_candidate_and_the_flow_goes_on(tiny, tmp_path):
    """An Olive candidate whose pass fails (ONNX Runtime's BERT fusion asserts on a CNN with 7 hidden units
    over 3 heads; Olive exits 0 without a model) fails with a classified reason and Olive's log and config
    in its MLflow run; the baseline is measured and the flow completes. (A successful Olive
    candidate through the flow and the command line: tests/test_cli.py::test_demo_on_the_reference_cnn.)"""
    profile = write_profile(tmp_path / "p.yaml", candidates=[
        {"name": "olive-broken", "backend": "olive", "recipe": {"passes": [
            {"type": "transformer-optimization", "options": {"model_type": "bert", "num_heads": 3, "hidden_size": 7}}]}},
    ])
    data = tmp_path / "data"
    report = optimize_flow(model=str(tiny["model"]), profile=str(profile), calibration=str(tiny["calibration"]),
                           evaluation=str(tiny["eval"]), data_dir=str(data))
    by_name = {o.name: o for o in report.outcomes}
    assert list(by_name) == ["baseline-fp32", "olive-broken"]
    assert by_name["baseline-fp32"].ok and by_name["baseline-fp32"].benchmark.samples >= 30
    broken = by_name["olive-broken"]
    assert broken.failure.stage == "build" and broken.failure.reason == "build-error"
    assert "pass 'transformer-optimization' failed" in broken.failure.message
    assert {Path(e).name for e in broken.failure.evidence} >= {"olive.log", "olive_config.json"}

    cl = mlflow.MlflowClient(tracking_uri=f"sqlite:///{data / 'mlflow' / 'mlflow.db'}")
    runs = cl.search_runs([report.experiment_id], f"tags.mlflow.parentRunId = '{report.mlflow_run_id}'")
    children = {r.info.run_name: r for r in runs}
    logged = {a.path for a in cl.list_artifacts(children["olive-broken"].info.run_id, "build")}
    assert {"build/olive_config.json", "build/olive.log"} <= logged
    assert children["olive-broken"].data.tags["edgeopt.failure.reason"] == "build-error"
