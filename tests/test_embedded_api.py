"""Prefect's API failing to start (or not being there) is one line, exit code 4, and nothing written.

The CLI runs in a subprocess with its own data folder; the failures are real: the embedded server
is given 1 s to start (it needs several: importing the server and migrating a fresh database), or
PREFECT_API_URL points at a local port nobody listens on.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

EDGEOPT = str(Path(sys.executable).parent / "edgeopt")
EXIT_PREFECT_API = 4


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "EDGEOPT_HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
           "COLUMNS": "200", "NO_COLOR": "1"}
    for key in [k for k in env if k.startswith(("PREFECT_LOGGING", "MLFLOW_LOGGING", "PREFECT_RESULTS",
                                                "PREFECT_LOCAL_STORAGE", "PREFECT_SERVER_EPHEMERAL"))]:
        env.pop(key)
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def _start(model: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen([EDGEOPT, "optimize", str(model), "--profile", "intel-cpu",
                             "--candidate", "ort-fp32-optimized", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path, str]]:
    """The three failing runs, started together (each spends its seconds importing Prefect)."""
    url = f"http://127.0.0.1:{_closed_port()}/api"
    cases = {
        "quiet": ({"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}, ()),
        "verbose": ({"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}, ("--verbose",)),
        "api-url": ({"PREFECT_API_URL": url}, ()),
    }
    started = {}
    for name, (extra_env, args) in cases.items():
        home = tmp_path_factory.mktemp(f"home-{name}")
        started[name] = (_start(tiny["model"], _env(home, **extra_env), *args), home)
    done = {}
    for name, (proc, home) in started.items():
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        done[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), home, url)
    return done


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _assert_nothing_left(home: Path) -> None:
    """No server process left running, no MLflow run (the flow creates its parent run only after
    Prefect's API is up)."""
    import psutil

    servers = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "uvicorn" in (proc.info["cmdline"] or []) and \
                    proc.environ().get("PREFECT_HOME") == str(home / "prefect"):
                servers.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    assert servers == []
    db = home / "mlflow" / "mlflow.db"
    if not db.exists():
        return
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    exps = [e.experiment_id for e in client.search_experiments()]
    assert not exps or client.search_runs(exps) == []


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_embedded_api_that_does_not_start_is_one_line(runs, verbose):
    r, home, _ = runs["verbose" if verbose else "quiet"]
    assert r.returncode == EXIT_PREFECT_API, r.stdout + r.stderr
    assert r.stdout == ""
    lines = _lines(r.stderr)
    error = ("error: Prefect's embedded API did not start within 1 s (timed out; the machine may be busy); "
             "nothing was run. Retry, raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (now 1), or start a "
             "server (`prefect server start`) and set PREFECT_API_URL")
    if verbose:
        # the details: Prefect's own exception and where it came from, then the same one line
        assert "Traceback (most recent call last)" in r.stderr
        assert "RuntimeError: Timed out while attempting to connect to ephemeral Prefect API server" in r.stderr
        assert lines[-1] == error
    else:
        assert lines == [error + " (--verbose shows details)"], r.stderr
    _assert_nothing_left(home)


def test_api_url_with_no_server_names_the_url(runs):
    r, home, url = runs["api-url"]
    assert r.returncode == EXIT_PREFECT_API, r.stdout + r.stderr
    assert r.stdout == ""
    lines = _lines(r.stderr)
    assert len(lines) == 1, r.stderr
    # e.g. "ConnectError: [Errno 111] Connection refused" (the errno differs between systems)
    assert lines[0].startswith(f"error: no Prefect API answers at {url} (PREFECT_API_URL): ConnectError: ")
    assert "Connection refused" in lines[0]
    assert lines[0].endswith("; nothing was run. Start that server (`prefect server start`), fix "
                             "PREFECT_API_URL, or unset it to use the embedded API (--verbose shows details)")
    _assert_nothing_left(home)
