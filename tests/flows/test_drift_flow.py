"""The drift flow on real data files, the real MLflow store and Prefect's API."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest

from flows.drift import DRIFT_EVENT, drift_flow

pytestmark = [pytest.mark.flow, pytest.mark.usefixtures("prefect_harness")]


def test_a_fresh_sample_passes_and_a_shifted_one_is_drift(mlp, tmp_path: Path) -> None:
    """The MLP's calibration inputs are standard normal: a new standard-normal sample is no drift;
    the same sample shifted by half a sigma is, and the flow emits the event the automation acts on.
    Both verdicts are MLflow runs in the model's experiment."""
    rng = np.random.default_rng(5)
    same, moved = tmp_path / "same.npz", tmp_path / "moved.npz"
    sample = rng.standard_normal((200, 256)).astype(np.float32)
    np.savez(same, x=sample)
    np.savez(moved, x=sample + np.float32(0.5))
    # the calibration file of the fixture holds 32 samples; drift needs a reference of some size
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=rng.standard_normal((400, 256)).astype(np.float32))
    kw = {"calibration": str(cal), "model": str(mlp["model"]), "model_name": "mlp-drift",
          "data_dir": str(tmp_path / "data"), "reoptimize": False}
    quiet = drift_flow(production=str(same), **kw)
    assert not quiet.drifted and quiet.event is None, quiet.summary
    assert quiet.metrics["x.psi_mean"] < 0.1
    shifted = drift_flow(production=str(moved), **kw)
    assert shifted.drifted and shifted.event == DRIFT_EVENT, shifted.summary
    assert shifted.metrics["x.psi_mean"] > 0.2 and shifted.metrics["x.ks_share"] > 0.5
    cl = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'data' / 'mlflow' / 'mlflow.db'}")
    exp = cl.get_experiment_by_name("edgeopt/mlp-drift")
    verdicts = sorted(r.data.tags["drift.verdict"] for r in cl.search_runs([exp.experiment_id]))
    assert verdicts == ["drift", "no-drift"]
