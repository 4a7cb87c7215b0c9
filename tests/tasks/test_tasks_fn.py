"""Tasks called through ``.fn()``: the thin wrappers without Prefect's engine, MLflow on a temp store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from edgeopt.errors import CandidateFailed, DataError
from edgeopt.profiles import load_profile
from edgeopt.records import CandidateOutcome
from tasks import phases, tracking
from tests.conftest import write_profile


@pytest.fixture()
def setup(tiny, tmp_path):
    profile = load_profile(str(write_profile(tmp_path / "p.yaml")))
    assessment = phases.assess_task.fn(str(tiny["model"]))
    return profile, assessment, str(tmp_path / "work")


def test_build_benchmark_outputs_evaluate(setup, tiny):
    profile, assessment, work = setup
    spec = profile.candidates[1].spec()  # ort-int8-dynamic
    hw = phases.fingerprint_task.fn()
    assert phases.build_stale(spec, assessment, None, work, hw)
    art = phases.build_task.fn(spec, assessment, None, work, hw)
    assert Path(art.path).is_file() and art.precision == "int8"
    assert not phases.build_stale(spec, assessment, None, work, hw)
    ev_path = str(tiny["eval"])
    bench = phases.benchmark_task.fn(art, profile, assessment, hw, ev_path, work, "group-a", 0)
    assert bench.samples >= profile.benchmark.min_runs and bench.threads == profile.hardware.threads
    assert not phases.bench_stale(art, profile, ev_path, hw, "group-a", 0, work)
    assert phases.bench_stale(art, profile, ev_path, hw, "group-a", 1, work)  # another round
    assert phases.bench_stale(art, profile, ev_path, hw, "group-b", 0, work)  # measured with other members
    assert phases.bench_stale(art, profile, None, hw, "group-a", 0, work)  # on other data
    outs = phases.outputs_task.fn(art, profile, assessment, ev_path, work, hw)
    assert not phases.outputs_stale(art, profile, ev_path, hw, work)
    ev = phases.evaluate_task.fn(spec.name, outs, outs, assessment, str(tiny["eval"]), 1000)
    assert ev.top1_agreement == 1.0 and ev.samples == 120 and ev.metric == "top1_accuracy"


def test_static_recipe_without_calibration_fails_with_reason(setup):
    profile, assessment, work = setup
    with pytest.raises(CandidateFailed) as info:
        phases.build_task.fn(profile.candidates[2].spec(), assessment, None, work, None)
    assert info.value.reason == "missing-data"


def test_check_data_rejects_mismatch(setup, tmp_path):
    import numpy as np

    _, assessment, _ = setup
    np.savez(tmp_path / "x.npz", input=np.zeros((2, 1, 9, 9), np.float32))
    with pytest.raises(DataError, match="shape"):
        phases.check_data_task.fn(assessment, str(tmp_path / "x.npz"), None)


def test_cache_keys_follow_their_inputs(setup, tiny):
    profile, assessment, work = setup
    spec = profile.candidates[0].spec()
    hw = phases.fingerprint_task.fn()
    p = {"spec": spec, "assessment": assessment, "calibration": str(tiny["calibration"]), "work_dir": work,
         "hardware": hw}
    key = phases._build_key(None, p)
    assert key == phases._build_key(None, dict(p))
    other = profile.candidates[1].spec()
    assert phases._build_key(None, {**p, "spec": other}) != key
    seq = spec.model_copy(update={"sequence": "dynamic"})
    assert phases._build_key(None, {**p, "spec": seq}) != key  # the sequence choice travels with the artifact
    other_cpu = hw.model_copy(update={"isa_flags": (*hw.isa_flags, "avx512-vnni")})
    assert phases._build_key(None, {**p, "hardware": other_cpu}) != key  # formats can depend on the CPU
    # the folder is named by the same key the cache uses
    from edgeopt import workflow

    folder = workflow.build_dir(spec, assessment=assessment, calibration=p["calibration"], work_dir=Path(work),
                                hardware=hw)
    assert key == f"build-{folder.name}"


def test_a_newer_record_schema_changes_every_key(monkeypatch) -> None:
    from edgeopt import keys

    before = keys.result_key("bench", artifact="a")
    monkeypatch.setattr(keys, "SCHEMA_VERSION", keys.SCHEMA_VERSION + 1)
    assert keys.result_key("bench", artifact="a") != before


def _logged_candidate(setup, tmp_path):
    """A parent run and the first candidate built and logged as its child run, through the tasks' ``.fn``:
    (data folder, parent run id, child run id, outcome)."""
    profile, assessment, work = setup
    hw = phases.fingerprint_task.fn()
    data_dir = str(tmp_path / "store")
    exp_id, run_id = tracking.start_parent_run.fn(
        data_dir=data_dir, experiment="edgeopt/test", run_name="r", assessment=assessment, profile_name="p",
        profile_doc=profile.model_dump(mode="json"), hardware=hw, tags={})
    spec = profile.candidates[0].spec()
    outcome = CandidateOutcome(spec=spec, artifact=phases.build_task.fn(spec, assessment, None, work, hw))
    child = tracking.log_candidate.fn(data_dir=data_dir, experiment_id=exp_id, parent_run_id=run_id, outcome=outcome)
    return data_dir, run_id, child, outcome


def test_tracking_nested_run_and_registration(setup, tmp_path):
    _data_dir, run_id, child, _outcome = _logged_candidate(setup, tmp_path)
    cl = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'store' / 'mlflow' / 'mlflow.db'}")
    run = cl.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == run_id
    assert run.data.params["recipe.graph_optimization"] == "all"
    assert [a.path for a in cl.list_artifacts(child, "model")] == ["model/artifact.json", "model/model.onnx"]
    # artifacts land under the data folder, not the working directory
    assert cl.get_run(run_id).info.artifact_uri.startswith((tmp_path / "store").as_uri())


def test_registration_is_the_retried_task_and_works_without_prefect(setup, tmp_path):
    """``register_selected`` is the ``mlflow-register`` task (retries on a transient store error); the
    signature tags it adds are a plain function, so ``.fn`` registers without any Prefect engine."""
    from prefect import Task

    from edgeopt.records import Selection

    assert isinstance(tracking.register_selected, Task) and tracking.register_selected.name == "mlflow-register"
    assert not isinstance(tracking.runs.signature_tags, Task)
    data_dir, _run_id, child, outcome = _logged_candidate(setup, tmp_path)
    version = tracking.register_selected.fn(data_dir=data_dir, model_name="m", run_id=child, outcome=outcome,
                                            selection=Selection(selected=outcome.name, message="picked"),
                                            assessment=setup[1])
    cl = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'store' / 'mlflow' / 'mlflow.db'}")
    mv = cl.get_model_version_by_alias("m", tracking.CANDIDATE_ALIAS)
    assert str(mv.version) == version
    assert mv.tags["artifact.sha256"] == outcome.artifact.sha256
    assert [t["name"] for t in json.loads(mv.tags["signature.inputs"])] == \
        [t.name for t in setup[1].inputs]
