"""Dynamic-shape models through the optimize flow: generated data on request, several shapes per candidate."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from flows.optimize import optimize_flow
from tests.conftest import write_profile
from tests.realworld_models import make_dense_hw

pytestmark = [pytest.mark.flow, pytest.mark.usefixtures("prefect_harness")]

FAST = {"warmup_runs": 1, "min_runs": 10, "min_duration_s": 0.05}
STATIC = {"name": "ort-int8-static-minmax", "backend": "onnxruntime",
          "recipe": {"precision": "int8", "quantization": "static", "calibration_method": "minmax"}}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense-flow")
    return {"model": str(make_dense_hw(d / "dense.onnx")),
            "profile": str(write_profile(d / "p.yaml", candidates=[STATIC], benchmark=FAST))}


def test_synthetic_data_only_when_asked_and_said_everywhere(dense, tmp_path):
    # (without --synthetic-data and without data, the static recipe fails with missing-data, as before)
    report = optimize_flow(model=dense["model"], profile=dense["profile"], shapes=["image=1x3x32x32"],
                           synthetic_data=True, data_dir=str(tmp_path / "data"))
    assert report.synthetic_data == ("calibration", "evaluation")
    static = next(o for o in report.outcomes if o.name == STATIC["name"])
    assert static.failure is None, static.failure  # calibrated on generated 1x3x32x32 images
    assert static.benchmark.input_shapes == {"image": (1, 3, 32, 32)}
    assert static.evaluation.samples == 32  # evaluated against the baseline on 32 generated images
    cl = mlflow.MlflowClient(tracking_uri=report.tracking_uri)
    run = cl.get_run(report.mlflow_run_id)
    assert run.data.tags["edgeopt.synthetic_data"] == "calibration,evaluation"
    md = Path(cl.download_artifacts(report.mlflow_run_id, "report.md", str(tmp_path))).read_text()
    assert "**Synthetic data**: calibration and evaluation on generated inputs (--synthetic-data" in md
