"""The fleet's configuration without a server: prefect.yaml covers every flow on every pool with
parameters its flow accepts, a pool refuses a host that does not fit it, the automations validate
against Prefect's schema, and the CLI's one-line answers when no server is set or it cannot be reached."""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from edgeopt.errors import ConfigError
from flows._pools import POOLS, fitting_pools, refuse_wrong_host

REPO = Path(__file__).resolve().parent.parent
EDGEOPT = str(Path(sys.executable).parent / "edgeopt")
FLOWS = {"optimize", "cross-validate", "certify", "nightly", "drift", "notify"}
# the nightly and drift flows' parameters (flows/nightly.py, flows/drift.py)
NIGHTLY = {"model", "profile", "calibration", "evaluation", "model_name", "candidates", "data_dir", "certify", "soak_s"}
DRIFT = {"production", "calibration", "model", "profile", "model_name", "evaluation", "psi_threshold", "ks_pvalue",
         "data_dir", "reoptimize"}


def _deployments() -> list[dict]:
    return yaml.safe_load((REPO / "prefect.yaml").read_text(encoding="utf-8"))["deployments"]


def _flow_params(entrypoint: str) -> set[str] | None:
    path, fn = entrypoint.split(":")
    if fn == "nightly_flow":
        return NIGHTLY
    if fn == "drift_flow":
        return DRIFT
    if not (REPO / path).is_file():
        return None
    import importlib

    flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), fn)
    return set(inspect.signature(flow.fn).parameters)


def test_every_flow_on_every_pool():
    seen = {(next(t for t in d["tags"] if t in FLOWS), d["work_pool"]["name"]) for d in _deployments()}
    assert seen == {(f, p) for f in FLOWS for p in POOLS}
    for d in _deployments():
        pool = d["work_pool"]["name"]
        assert d["work_pool"]["job_variables"]["env"]["EDGEOPT_POOL"] == pool, d["name"]
        assert pool in d["tags"] and "edgeopt" in d["tags"] and d["description"].strip(), d["name"]
        params = _flow_params(d["entrypoint"])
        if params is not None:
            assert set(d.get("parameters") or {}) <= params, (d["name"], set(d["parameters"]) - params)
        if d["entrypoint"].endswith(":nightly_flow"):
            (schedule,) = d["schedules"]
            assert schedule["cron"] and schedule["timezone"], d["name"]
            assert d["parameters"]["profile"] == pool


def test_pools_refuse_a_host_that_does_not_fit(monkeypatch):
    fitting = fitting_pools()
    wrong = next(p for p in POOLS if p not in fitting)
    monkeypatch.setenv("EDGEOPT_POOL", wrong)
    with pytest.raises(ConfigError, match=f"does not fit work pool {wrong}") as info:
        refuse_wrong_host()
    assert socket.gethostname() in str(info.value)
    refuse_wrong_host(allow_mismatch=True)
    # every flow entrypoint a pool runs refuses first, before it reads a model or the registry
    from flows.certify import certify_flow, cross_validate_flow
    from flows.optimize import optimize_flow

    for call in (lambda: optimize_flow.fn(model="/nonexistent.onnx"),
                 lambda: certify_flow.fn(model_name="x", version="1", evaluation="/nonexistent.npz"),
                 lambda: cross_validate_flow.fn(model_name="x", version="1")):
        with pytest.raises(ConfigError, match="does not fit work pool"):
            call()
    r = subprocess.run([sys.executable, "-m", "flows._pools", "--check"], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "EDGEOPT_POOL": wrong}, timeout=60, check=False)
    assert r.returncode == 1 and "does not fit work pool" in r.stderr, r.stderr
    monkeypatch.setenv("EDGEOPT_POOL", "no-such-pool")
    with pytest.raises(ConfigError, match="not a work pool"):
        refuse_wrong_host()
    for pool in fitting:
        monkeypatch.setenv("EDGEOPT_POOL", pool)
        refuse_wrong_host()
    monkeypatch.delenv("EDGEOPT_POOL")
    refuse_wrong_host()  # outside a pool: nothing to refuse


def test_automations_validate_against_prefect():
    sys.path.insert(0, str(REPO / "deployments"))
    try:
        import setup as fleet_setup
    finally:
        sys.path.pop(0)
    from prefect.events.schemas.automations import AutomationCore

    doc = yaml.safe_load((REPO / "deployments" / "automations.yaml").read_text(encoding="utf-8"))
    entries = fleet_setup.expand(doc)
    lost = [e for e in entries if e["name"] == "edgeopt-flow-run-lost"]
    entries = [e for e in entries if e not in lost]
    assert sorted(e["name"] for e in entries) == sorted(
        f"edgeopt-{kind}-{p}" for kind in ("nightly-failed", "drift") for p in POOLS)
    # a run whose heartbeats stop is marked Crashed (which the nightly-failed automations report): after
    # more than two missed heartbeats of every deployment's run
    assert len(lost) == 1
    zombie = AutomationCore.model_validate(lost[0])
    assert zombie.trigger.posture == "Proactive" and zombie.actions[0].type == "change-flow-run-state"
    assert zombie.actions[0].state.value == "CRASHED"
    for d in _deployments():
        beat = int(d["work_pool"]["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])
        assert 30 <= beat and zombie.trigger.within.total_seconds() > 2 * beat, d["name"]
    deployments = {f"{next(t for t in d['tags'] if t in FLOWS)}/{d['name']}" for d in _deployments()}
    for e in entries:
        for action in e["actions"]:
            assert action.pop("deployment") in deployments, e["name"]
            action["deployment_id"] = str(uuid.uuid4())
        automation = AutomationCore.model_validate(e)
        pool = e["name"].rsplit("-", 1)[-1] if not e["name"].endswith("-silicon") else "apple-silicon"
        assert pool in str(automation.trigger.model_dump()), e["name"]
        assert "{{ event." in str(automation.actions[0].parameters)


def test_quiet_console_still_logs_to_the_api(tmp_path):
    from flows._env import _quiet_logging_config

    config = yaml.safe_load(_quiet_logging_config(tmp_path).read_text(encoding="utf-8"))
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        assert config["loggers"][name] == {"level": "INFO", "handlers": ["api"], "propagate": False}
    assert config["root"]["handlers"] == ["console"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_one_line_naming_the_url(tiny, tmp_path):
    """PREFECT_API_URL set, nothing listening: one line naming the URL, exit 4, no embedded API instead."""
    url = f"http://127.0.0.1:{_free_port()}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_LOGGING", "MLFLOW_LOGGING"))}
    env.update({"PREFECT_API_URL": url, "EDGEOPT_HOME": str(tmp_path / "home"), "PREFECT_HOME": str(tmp_path / "p"),
                "COLUMNS": "200", "NO_COLOR": "1"})
    for args in (["fleet", "status"], ["optimize", str(tiny["model"]), "--profile", "intel-cpu",
                                       "--allow-hardware-mismatch"],
                 ["certify", "m", "--version", "1", "--eval", str(tiny["eval"])],
                 ["nightly", str(tiny["model"]), "--eval", str(tiny["eval"])],
                 ["drift", str(tiny["eval"]), "--calibration", str(tiny["eval"]), "--model", str(tiny["model"])],
                 [sys.executable, str(REPO / "deployments" / "setup.py")]):
        cmd = args if args[0] == sys.executable else [EDGEOPT, *args]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, check=False)
        assert r.returncode == 4, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and url in lines[0] and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "p" / "prefect.db").exists()
    assert not (tmp_path / "home" / "mlflow").exists()
    env.pop("PREFECT_API_URL")
    r = subprocess.run([EDGEOPT, "fleet", "status"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and "PREFECT_API_URL is not set" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_setup_keeps_an_automation_that_did_not_change():
    """Replacing an unchanged automation would make its trigger forget what it has seen (the heartbeats of
    a run about to be declared lost); one that changed is replaced."""
    sys.path.insert(0, str(REPO / "deployments"))
    try:
        import setup as fleet_setup
    finally:
        sys.path.pop(0)
    from prefect.events.schemas.automations import Automation, AutomationCore

    doc = yaml.safe_load((REPO / "deployments" / "automations.yaml").read_text(encoding="utf-8"))
    entry = next(e for e in fleet_setup.expand(doc) if e["name"] == "edgeopt-flow-run-lost")
    core = AutomationCore.model_validate(entry)
    dumped = core.model_dump(mode="json")
    dumped["trigger"]["expect"] = sorted(dumped["trigger"]["expect"], reverse=True)  # a set, in another order
    stored = Automation.model_validate({**dumped, "id": str(uuid.uuid4())})
    assert fleet_setup._same(stored, core)
    changed = AutomationCore.model_validate({**entry, "trigger": {**entry["trigger"], "within": 120}})
    assert not fleet_setup._same(stored, changed)
