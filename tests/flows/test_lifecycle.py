"""A registered version's way to production, run as a user runs it (the `edgeopt` command in a
subprocess, its own data folder, Prefect's embedded API, a real MLflow store):

optimize → cross-validate → certify → approve → rollback → verify, and every refusal on the way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tests.conftest import make_mlp, write_profile
from tests.test_cli import EDGEOPT, run

pytestmark = [pytest.mark.slow]

NAME = "mlp-life"


def _client(home: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")


def _alias(cl, alias: str) -> str | None:
    try:
        return str(cl.get_model_version_by_alias(NAME, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


@pytest.fixture(scope="module")
def life(tmp_path_factory, mlp):
    """Two registered versions of one model name (two MLPs), each selected by the real optimize flow."""
    home = tmp_path_factory.mktemp("life-home")
    env = {**os.environ, "EDGEOPT_HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
           "COLUMNS": "200", "NO_COLOR": "1"}
    for key in [k for k in env if k.startswith(("PREFECT_LOGGING", "MLFLOW_LOGGING", "PREFECT_RESULTS_LOCAL",
                                                 "PREFECT_LOCAL_STORAGE"))]:
        env.pop(key)
    d = home / "inputs"
    d.mkdir()
    profile = write_profile(
        d / "loose.yaml", gates={"speedup_min": 1.2, "memory_reduction_min": 0.0, "accuracy_ratio_min": 0.8},
        candidates=[{"name": "ort-int8-dynamic", "backend": "onnxruntime",
                     "recipe": {"precision": "int8", "quantization": "dynamic"}}],
        benchmark={"repeats": 3})
    second = make_mlp(d / "mlp2.onnx", seed=1)
    versions = []
    for model in (mlp["model"], second):
        r = run(env, "optimize", model, "--profile", profile, "--eval", mlp["eval"], "--model-name", NAME)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "registered:" in r.stdout, r.stdout
        versions.append(r.stdout.split("registered:")[1].split("version")[1].split()[0])
    assert versions == ["1", "2"]
    return {"env": env, "home": home, "eval": mlp["eval"], "calibration": mlp["calibration"], "dir": d}


def _certify(life, version: str, *extra) -> subprocess.CompletedProcess:
    return run(life["env"], "certify", NAME, "--version", version, "--eval", life["eval"],
               "--calibration", life["calibration"], "--soak-s", "4", "--stress-s", "2", *extra)


def test_refusals_before_anything_runs(life):
    env = life["env"]
    for args, words in [
        (("certify", "no-such-model", "--version", "1", "--eval", life["eval"]), ["no registered model", NAME]),
        (("certify", NAME, "--version", "9", "--eval", life["eval"]), ["no version 9", "versions: 1, 2"]),
        (("certify", NAME, "--version", "1"), ["needs evaluation data"]),
        (("approve", NAME, "--version", "1"), ["not certified", "never been certified", "edgeopt certify"]),
        (("rollback", NAME), ["no 'previous-champion'"]),
        (("verify", f"{NAME}:1"), ["no certification to verify"]),
    ]:
        r = run(env, *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        line = r.stderr.strip()
        assert len(line.splitlines()) == 1 and "Traceback" not in line, line
        for w in words:
            assert w in line, (w, line)
    cl = _client(life["home"])
    assert _alias(cl, "champion") is None
    assert "certification.status" not in cl.get_model_version(NAME, "1").tags


def test_cross_validate_matrix(life):
    r = run(life["env"], "cross-validate", NAME, "--version", "1", "--eval", life["eval"], "--rounds", "2")
    assert r.returncode in (0, 3), r.stdout + r.stderr
    assert "onnxruntime" in r.stdout and "openvino" in r.stdout, r.stdout
    mv = _client(life["home"]).get_model_version(NAME, "1")
    assert mv.tags["crossval.verdict"] in ("pass", "not-reproducible", "fail")
    assert (r.returncode == 0) == (mv.tags["crossval.verdict"] == "pass")
    run_ = _client(life["home"]).get_run(mv.tags["crossval.run_id"])
    assert run_.data.tags["mlflow.parentRunId"] == mv.run_id
    assert run_.info.status == "FINISHED"


def test_certify_approve_rollback_verify(life, tmp_path):
    env, cl = life["env"], _client(life["home"])
    for version in ("1", "2"):
        r = _certify(life, version)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "CERTIFIED" in r.stdout
        mv = cl.get_model_version(NAME, version)
        assert mv.tags["certification.status"] == "certified"
        cert_run = cl.get_run(mv.tags["certification.run_id"])
        assert cert_run.data.tags["mlflow.parentRunId"] == mv.run_id
        arts = {a.path for a in cl.list_artifacts(cert_run.info.run_id)}
        assert {"report", "bundle"} <= arts
        report = {a.path for a in cl.list_artifacts(cert_run.info.run_id, "report")}
        assert "report/certification.html" in report and "report/certification.json" in report
    doc = json.loads(Path(cl.download_artifacts(cl.get_model_version(NAME, "2").tags["certification.run_id"],
                                                "report/certification.json", str(tmp_path))).read_text())
    assert {c["check"] for c in doc["checks"]} >= {
        "data-quality", "accuracy", "robustness", "stress", "soak", "power", "provenance"}

    r = run(env, "approve", NAME, "--version", "1")
    assert r.returncode == 0, r.stderr
    assert _alias(cl, "champion") == "1" and _alias(cl, "previous-champion") is None
    r = run(env, "approve", NAME, "--version", "2")
    assert r.returncode == 0 and "version 1 is now 'previous-champion'" in r.stdout, r.stdout
    assert (_alias(cl, "champion"), _alias(cl, "previous-champion")) == ("2", "1")
    r = run(env, "rollback", NAME)
    assert r.returncode == 0, r.stderr
    assert (_alias(cl, "champion"), _alias(cl, "previous-champion")) == ("1", "2")

    # the signed bundle: verified from the registry and from a folder; one changed byte is refused
    r = run(env, "verify", f"{NAME}@champion")
    assert r.returncode == 0 and "signature valid" in r.stdout, r.stdout + r.stderr
    bundle = Path(cl.download_artifacts(cl.get_model_version(NAME, "1").tags["certification.run_id"], "bundle",
                                        str(tmp_path / "b")))
    assert run(env, "verify", bundle).returncode == 0
    model = next(p for p in (bundle / "artifact").rglob("*") if p.is_file())
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    r = run(env, "verify", bundle)
    assert r.returncode == 3, r.stdout + r.stderr
    assert model.name in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_failing_data_suite_fails_certification_and_blocks_approval(life, tmp_path):
    ev = dict(np.load(life["eval"]))
    ev["x"] = ev["x"] * 5.0 + 3.0  # shifted far from the calibration data
    ev["x"][1] = ev["x"][0]         # and a duplicated sample
    bad = tmp_path / "shifted.npz"
    np.savez(bad, **ev)
    before = _alias(_client(life["home"]), "champion")
    r = run(life["env"], "certify", NAME, "--version", "2", "--eval", bad, "--calibration", life["calibration"],
            "--soak-s", "4", "--stress-s", "1")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "NOT CERTIFIED" in r.stdout and "data-quality" in r.stdout
    cl = _client(life["home"])
    assert cl.get_model_version(NAME, "2").tags["certification.status"] == "not-certified"
    r = run(life["env"], "approve", NAME, "--version", "2")
    assert r.returncode == 2 and "last certification failed" in r.stderr and "data-quality" in r.stderr
    assert _alias(cl, "champion") == before


def test_killed_certification_changes_nothing_and_the_next_run_starts_clean(life):
    cl = _client(life["home"])
    champion, tags_before = _alias(cl, "champion"), dict(cl.get_model_version(NAME, "2").tags)
    started = time.time()
    proc = subprocess.Popen([EDGEOPT, "certify", NAME, "--version", "2", "--eval", str(life["eval"]),
                             "--calibration", str(life["calibration"]), "--soak-s", "120", "--stress-s", "1"],
                            env=life["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    soak = life["home"] / "certify" / NAME / "2" / "run" / "soak"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        stress = soak.parent / "stress"
        if stress.is_dir() and any(p.stat().st_mtime > started for p in stress.iterdir()):  # this run's stress
            time.sleep(4)  # well into the 120 s soak
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert _alias(cl, "champion") == champion
    assert dict(cl.get_model_version(NAME, "2").tags) == tags_before
    killed = cl.search_runs([cl.get_run(cl.get_model_version(NAME, "2").run_id).info.experiment_id],
                            "tags.`edgeopt.flow` = 'certify' and attributes.status = 'RUNNING'")
    assert killed, "the killed certification's run is left unfinished, never FINISHED"
    r = _certify(life, "2")
    # the next run starts clean and runs every check to a verdict: certified (0), or not certified on what
    # it measured (3: this run's short soak of a 0.1 ms model can read a p99 drift above +50% on a busy
    # host; the verdict is the soak's, not a leftover of the killed run)
    assert r.returncode in (0, 3), r.stdout + r.stderr
    assert "soak" in r.stdout and "Traceback" not in r.stdout + r.stderr
    if r.returncode == 3:
        assert "NOT CERTIFIED: failed soak" in r.stdout or "NOT CERTIFIED: failed stress" in r.stdout, r.stdout
    series = [p for p in soak.iterdir() if p.suffix == ".json"]
    assert series and all(p.stat().st_mtime > time.time() - 600 for p in series)


def test_changed_registered_files_are_refused(life):
    cl = _client(life["home"])
    mv = cl.get_model_version(NAME, "1")
    root = Path(cl.get_run(mv.run_id).info.artifact_uri.removeprefix("file://")) / "model"
    model = next(p for p in root.iterdir() if p.suffix == ".onnx")
    original = model.read_bytes()
    try:
        model.write_bytes(original[:-1] + bytes([original[-1] ^ 0x01]))
        r = _certify(life, "1")
        assert r.returncode == 2, r.stdout + r.stderr
        assert "changed since registration" in r.stderr and "version 1" in r.stderr
        model.unlink()
        r = _certify(life, "1")
        assert r.returncode == 2 and "gone" in r.stderr, r.stderr
    finally:
        model.write_bytes(original)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cross_validate_fans_out_to_a_work_pool(life, tmp_path):
    """A real Prefect server, the deployment from prefect.yaml (its git_clone step clones this
    repository's current branch), a process worker on the intel-cpu pool: `--pool intel-cpu` runs the
    flow there and gathers the matrix through result storage."""
    import urllib.request

    repo = Path(__file__).resolve().parents[2]
    branch = subprocess.run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=repo, capture_output=True,
                            text=True, check=False).stdout.strip()
    if not branch or branch == "HEAD":
        pytest.skip("the deployment clones a branch; this checkout has none (detached HEAD)")
    port = _free_port()
    env = {**life["env"], "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "EDGEOPT_GIT_URL": str(repo), "EDGEOPT_GIT_BRANCH": branch}
    prefect = str(Path(EDGEOPT).parent / "prefect")
    procs = [subprocess.Popen([prefect, "server", "start", "--port", str(port)], env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the Prefect server did not start"
                time.sleep(1)
        for cmd in (["work-pool", "create", "intel-cpu", "--type", "process"],
                    ["--no-prompt", "deploy", "--name", "cross-validate-intel-cpu"]):
            r = subprocess.run([prefect, *cmd], env=env, cwd=repo, capture_output=True, text=True, timeout=180,
                               check=False)
            assert r.returncode == 0, r.stdout + r.stderr
        procs.append(subprocess.Popen([prefect, "worker", "start", "--pool", "intel-cpu"], env=env, cwd=tmp_path,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        r = run(env, "cross-validate", NAME, "--version", "1", "--eval", life["eval"], "--rounds", "2",
                "--pool", "intel-cpu", timeout=900)
        assert r.returncode in (0, 3), r.stdout + r.stderr
        assert "onnxruntime" in r.stdout and "openvino" in r.stdout, r.stdout
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            runs = client.read_flow_runs()
            pooled = [fr for fr in runs if fr.work_pool_name == "intel-cpu"]
        assert pooled and all(fr.state.is_completed() for fr in pooled), [(fr.name, fr.state) for fr in runs]
    finally:
        for p in reversed(procs):  # the worker before the server
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:  # a worker once outlived its 20 s (left running after CI)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=20)
