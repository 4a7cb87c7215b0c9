"""Dynamic-shape models through the optimize flow: generated data on request, several shapes per candidate."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from flows.optimize import optimize_flow
from tests.conftest import write_profile
from tests.realworld_models import make_dense_hw

pytestmark = [pytest.mark.flow, pytest.mark.usefixtures("prefect_harness")]

FAST = {"warmup_runs": 1, "min_runs": 10, "min_duration_s": 0.05, "eval_samples": 8, "max_eval_samples": 8,
        "extra_repeats": 0}
STATIC = "ort-int8-static-minmax"


def test_dense_model_at_two_resolutions_on_synthetic_data(tmp_path):
    """One run, two features: ``--synthetic-data`` (calibration and evaluation generated only when asked,
    said in the report and MLflow) and two ``--shape`` values as two settings, each against its own baseline."""
    profile = write_profile(tmp_path / "p.yaml", benchmark=FAST, candidates=[
        {"name": STATIC, "backend": "onnxruntime",
         "recipe": {"precision": "int8", "quantization": "static", "calibration_method": "minmax"}}],
        gates={"speedup_min": 0.0, "memory_reduction_min": -1.0, "accuracy_ratio_min": 0.5})
    # (without --synthetic-data and without data, the static recipe fails with missing-data, as before)
    report = optimize_flow(model=str(make_dense_hw(tmp_path / "dense.onnx")), profile=str(profile),
                           shapes=["image=1x3x32x32", "image=1x3x48x40"], synthetic_data=True,
                           data_dir=str(tmp_path / "data"))
    assert report.synthetic_data == ("calibration", "evaluation")
    rows = {o.name: o for o in report.outcomes}
    assert list(rows) == ["baseline-fp32", "baseline-fp32-1x3x48x40", STATIC, f"{STATIC}-1x3x48x40"]
    assert report.shape_settings == ("1x3x48x40",)
    for name, shape, base in [("baseline-fp32", (1, 3, 32, 32), None),
                              ("baseline-fp32-1x3x48x40", (1, 3, 48, 40), None),
                              (STATIC, (1, 3, 32, 32), "baseline-fp32"),  # calibrated on generated images
                              (f"{STATIC}-1x3x48x40", (1, 3, 48, 40), "baseline-fp32-1x3x48x40")]:
        assert rows[name].failure is None, rows[name].failure
        assert rows[name].benchmark.input_shapes == {"image": shape}, name  # measured at its setting's shape
        assert rows[name].baseline == base, name
    # masks compared pixel by pixel with the baseline's at the same shape, on as many generated images
    images = rows[STATIC].evaluation.samples / (32 * 32)
    assert images >= 1 and rows[f"{STATIC}-1x3x48x40"].evaluation.samples == images * 48 * 40
    # the candidate's verdict includes its other setting; only the candidate itself is up for selection
    every = next(v for v in rows[STATIC].verdicts if v.gate == "every-shape")
    assert (every.measured, every.threshold, every.status) == (2.0, 2.0, "pass")
    assert report.selection.passing == (STATIC,)

    cl = mlflow.MlflowClient(tracking_uri=report.tracking_uri)
    assert cl.get_run(report.mlflow_run_id).data.tags["edgeopt.synthetic_data"] == "calibration,evaluation"
    md = Path(cl.download_artifacts(report.mlflow_run_id, "report.md", str(tmp_path))).read_text()
    assert "**Synthetic data**: calibration and evaluation on generated inputs (--synthetic-data" in md
    assert "its rows -1x3x48x40 (image=1x3x48x40) at the other shapes" in md
