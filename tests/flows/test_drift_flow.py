"""The drift flow on real data files, the real MLflow store and Prefect's API."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest

from flows.drift import DRIFT_EVENT, drift_flow
from tests.conftest import write_profile

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


def test_text_is_compared_through_the_models_embeddings(tiny_bert, tmp_path: Path) -> None:
    """Sentences are token ids, not numbers to compare: the flow runs the FP32 model on both samples
    and compares its pooled outputs. More English prose from the same source is no drift; digit
    strings are, and their embedding shift is larger."""
    from edgeopt.text import default_sentences

    prose = default_sentences(count=680, seed=9)
    cal, same, digits = tmp_path / "cal.txt", tmp_path / "same.txt", tmp_path / "digits.txt"
    cal.write_text("\n".join(prose[:340]) + "\n", encoding="utf-8")
    same.write_text("\n".join(prose[340:]) + "\n", encoding="utf-8")
    rng = np.random.default_rng(3)
    digits.write_text("\n".join(" ".join(str(rng.integers(0, 10**6)) for _ in range(8)) for _ in range(400)) + "\n",
                      encoding="utf-8")
    profile = write_profile(tmp_path / "p.yaml", benchmark={"seq_len": 64})  # the tiny BERT's positions
    kw = {"calibration": str(cal), "model": str(tiny_bert["model"]), "model_name": "bert-drift",
          "profile": str(profile), "data_dir": str(tmp_path / "data"), "reoptimize": False}
    quiet = drift_flow(production=str(same), **kw)
    loud = drift_flow(production=str(digits), **kw)
    assert "embedding.psi_mean" in quiet.metrics and "input_ids.psi_mean" not in quiet.metrics
    assert not quiet.drifted, quiet.summary
    assert loud.drifted, loud.summary
    assert loud.metrics["embedding_shift"] > quiet.metrics["embedding_shift"]
