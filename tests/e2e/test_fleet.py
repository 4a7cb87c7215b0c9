"""The fleet end to end, as a user runs it: ``deployments/fleet.sh up`` (what ``make fleet-up`` runs) in a
temporary folder starts PostgreSQL, a Prefect server on it, an MLflow tracking server on it serving its
artifacts, the work pools and one process worker; ``prefect deploy`` registers the optimize deployment
from ``prefect.yaml`` (its pull step clones this test's own clone of the repository); the deployment
runs on the worker on a reference CNN of the zoo; then the CLI against the same servers, ``edgeopt fleet
status``, and the Prefect UI's flow-run page in headless Chromium. ``fleet.sh down`` stops it all.

Everything listens on 127.0.0.1 on ports the OS hands out; every wait has a deadline.
"""

from __future__ import annotations

import socket
import time
import uuid

import pytest

from tests.conftest import write_profile
from tests.e2e.conftest import BIN, CHROMIUM, sh

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # the first one waits for the session's fleet

MODEL_NAME = "digits-tiny-fleet"

@pytest.fixture(scope="module")
def deployed_run(fleet, client):
    """The optimize deployment run on the worker: the digits-tiny CNN, one candidate, a short profile."""
    from edgeopt import zoo

    env = fleet["env"]
    entry = zoo.build("digits-tiny", out_dir=fleet["home"] / "zoo")
    profile = write_profile(fleet["tmp"] / "fleet-short.yaml", candidates=[
        {"name": "ort-int8-dynamic", "backend": "onnxruntime", "recipe": {"precision": "int8", "quantization": "dynamic"}}],
        gates={"speedup_min": 1.0, "accuracy_ratio_min": 0.9})
    r = sh([str(BIN / "prefect"), "--no-prompt", "deploy", "-n", "optimize-intel-cpu", "-n", "optimize-arm64"],
            env, 240)
    assert r.returncode == 0, r.stdout + r.stderr
    from prefect.deployments import run_deployment

    parameters = {"model": str(entry.model), "profile": str(profile), "calibration": str(entry.calibration),
                  "evaluation": str(entry.evaluation), "model_name": MODEL_NAME}
    runs = {pool: run_deployment(f"optimize/optimize-{pool}", timeout=0, parameters=parameters)
            for pool in ("intel-cpu", "arm64")}
    deadline = time.monotonic() + 300
    done = {}
    while len(done) < len(runs) and time.monotonic() < deadline:
        for pool, run in runs.items():
            fr = client.read_flow_run(run.id)
            if fr.state and fr.state.is_final():
                done[pool] = fr
        time.sleep(1)
    assert set(done) == set(runs), {p: client.read_flow_run(r.id).state for p, r in runs.items()}
    return done["intel-cpu"], done["arm64"]


def test_fleet_up_prints_the_settings_and_is_idempotent(fleet):
    up = fleet["up"]
    assert "postgres started" in up.stderr and "worker-intel-cpu started" in up.stderr, up.stderr
    again = sh(["bash", fleet["script"], "up"], fleet["env"], 240)
    assert again.returncode == 0, again.stderr
    for part in ("postgres", "prefect-server", "mlflow-server", "worker-intel-cpu"):
        assert f"{part} already running" in again.stderr, again.stderr
    assert "work pool intel-cpu: exists" in again.stderr
    assert again.stdout.strip().splitlines()[-1] == up.stdout.strip().splitlines()[-1]


def test_pools_limit_and_server_on_postgres(fleet, client):
    assert {p.name for p in client.read_work_pools()} >= {"intel-cpu", "apple-silicon", "nvidia-gpu", "arm64"}
    assert all(p.type == "process" for p in client.read_work_pools())
    assert client.read_global_concurrency_limit_by_name(f"edgeopt-benchmark-{socket.gethostname()}").limit == 1
    # the server's database is PostgreSQL: its tables exist in the `prefect` database
    psql = sh(["psql", "-h", "127.0.0.1", "-p", fleet["env"]["FLEET_PG_PORT"], "-U", "edgeopt", "-d", "prefect",
                "-tAc", "select count(*) from flow_run"], fleet["env"], 30, cwd=fleet["tmp"])
    assert psql.returncode == 0 and psql.stdout.strip().isdigit(), psql.stdout + psql.stderr


def test_deployment_runs_on_the_worker(fleet, client, deployed_run):
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    fr = deployed_run[0]
    assert fr.state.is_completed(), (fr.state.name, fr.state.message)
    assert fr.work_pool_name == "intel-cpu"
    deployment = client.read_deployment_by_name("optimize/optimize-intel-cpu")
    assert deployment.job_variables["env"]["EDGEOPT_POOL"] == "intel-cpu"
    arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[fr.id])))
    by_key = {a.key: a for a in arts}
    assert "optimize-fleet-short" in by_key and "ort-int8-dynamic" in by_key["optimize-fleet-short"].data
    assert "pareto-fleet-short" in by_key and by_key["pareto-fleet-short"].type == "table"
    assert f"({fleet['tracking']}/#/experiments/" in by_key["mlflow-run"].data, by_key["mlflow-run"].data
    # the run's log reached the API: phases, the candidate's verdict, the selection
    logs = "\n".join(entry.message for entry in client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[fr.id]))))
    for text in ("build: ort-int8-dynamic", "benchmark: ort-int8-dynamic", "ort-int8-dynamic: ", "selection: "):
        assert text in logs, (text, logs[-3000:])

    import mlflow

    cl = mlflow.MlflowClient(tracking_uri=fleet["tracking"])
    exp = cl.get_experiment_by_name(f"edgeopt/{MODEL_NAME}")
    assert exp is not None
    runs = cl.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{fr.id}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", runs
    # artifacts go through the tracking server (served artifacts), not a path on this machine
    assert runs[0].info.artifact_uri.startswith("mlflow-artifacts:"), runs[0].info.artifact_uri
    children = cl.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{runs[0].info.run_id}'")
    assert any("ort-int8-dynamic" in (c.info.run_name or "") for c in children), [c.info.run_name for c in children]
    # a version is registered only when a candidate passed its gates; then it carries the 'candidate' alias
    if cl.search_model_versions(f"name='{MODEL_NAME}'"):
        assert cl.get_model_version_by_alias(MODEL_NAME, "candidate") is not None


def test_a_run_on_a_host_that_does_not_fit_its_pool_is_refused(fleet, client, deployed_run):
    """The arm64 pool's worker runs on this x86-64 host: the run fails at once, saying why, and measures nothing."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    fr = deployed_run[1]
    assert fr.work_pool_name == "arm64" and fr.state.is_failed(), (fr.work_pool_name, fr.state)
    logs = "\n".join(e.message for e in client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[fr.id]))))
    assert "does not fit work pool arm64" in logs and "architecture x86_64" in logs, logs[-3000:]
    assert "benchmark: " not in logs and "build: " not in logs


def test_fleet_status_and_the_cli_against_the_servers(fleet, deployed_run, client):
    env = fleet["env"]
    status = sh([str(BIN / "edgeopt"), "fleet", "status"], env, 120)
    assert status.returncode == 0, status.stdout + status.stderr
    for text in ("intel-cpu", "optimize/optimize-intel-cpu", "Completed", socket.gethostname()):
        assert text in status.stdout, (text, status.stdout)
    # a run from the CLI with PREFECT_API_URL set: the terminal stays quiet, the log reaches the server
    model = fleet["home"] / "zoo" / "digits-tiny" / "model.onnx"
    r = sh([str(BIN / "edgeopt"), "optimize", str(model), "--profile", str(fleet["tmp"] / "fleet-short.yaml"),
             "--eval", str(model.parent / "eval.npz"), "--model-name", MODEL_NAME], env, 300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "benchmark: " not in r.stdout + r.stderr and "Finished in state" not in r.stdout + r.stderr
    run_id = r.stdout.split("Prefect flow run:")[1].split()[0]
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = "\n".join(e.message for e in client.read_logs(
        log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(run_id)]))))
    assert "selection: " in logs and "ort-int8-dynamic" in logs, logs[-2000:]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (`make browser` installs Debian's)")
def test_prefect_ui_shows_the_flow_run(fleet, deployed_run, tmp_path):
    from tests.e2e.browser import Browser

    run = deployed_run[0]
    with Browser(CHROMIUM, tmp_path) as b:
        b.goto(f"{fleet['ui']}/runs/flow-run/{run.id}")
        # the single-page app rendered the run: its name and its final state are on the page
        b.wait_for(f"(() => {{ const t = document.body ? document.body.textContent : ''; "
                   f"return t.includes({run.name!r}) && t.includes('Completed') }})()", 90,
                   what=f"flow run {run.name} and 'Completed' on its page")
        png = b.screenshot(tmp_path / "flow-run.png")
    assert png.stat().st_size > 10_000
