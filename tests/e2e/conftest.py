"""The local fleet the end-to-end tests run against, started and stopped as a user does it.

``fleet`` (one per pytest session: the smoke and the heavy modules share it): ``deployments/fleet.sh up``
in a temporary folder with PostgreSQL, a Prefect server on it, an MLflow tracking server, the work pools
and one process worker (pool ``intel-cpu``; ``arm64`` too, to show the refusal on a host that does not
fit); ``fleet.sh down`` at the end, which must leave no process behind (any process with the fleet's
``FLEET_DIR`` in its environment still running after it fails the session, and is killed). The
deployments clone this test's own clone of the repository at its branch. Everything listens on 127.0.0.1 on ports the OS hands out; every wait has a deadline.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PG = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports the OS hands out (all bound at once, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def leftovers(fleet_dir: Path) -> list[str]:
    """Processes still running with this fleet's FLEET_DIR in their environment (anything the fleet started:
    servers, workers, their flow-run processes and what those started), each killed; their descriptions."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.environ().get("FLEET_DIR") == str(fleet_dir):
                found.append(f"{p.pid}: {' '.join(p.info['cmdline'] or [])[:200]}")
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def sh(args: list[str], env: dict, timeout: float, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def fleet(request):
    if PG is None:
        pytest.skip("PostgreSQL is not installed (no initdb on PATH or under /usr/lib/postgresql): "
                    "apt-get install postgresql")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root needs runuser to start PostgreSQL as the postgres user")
    from flows._pools import fitting_pools

    if "intel-cpu" not in fitting_pools():
        pytest.skip("this host does not fit the intel-cpu pool (x86-64 with AVX2); the test runs its worker")
    branch = sh(["git", "rev-parse", "--abbrev-ref", "HEAD"], dict(os.environ), 30).stdout.strip()
    if not branch or branch == "HEAD":
        pytest.skip("the deployment clones a branch; this checkout has none (detached HEAD)")
    # not under pytest's base folder: another pytest session of this user resets that folder to 0700,
    # and PostgreSQL, which runs as `postgres` when we are root, then loses its data folder mid-run
    tmp = Path(tempfile.mkdtemp(prefix="edgeopt-e2e-fleet-"))
    os.chmod(tmp, 0o755)
    clone = tmp / "repo"
    r = sh(["git", "clone", "--quiet", "--branch", branch, str(REPO), str(clone)], dict(os.environ), 120)
    assert r.returncode == 0, r.stderr
    home = tmp / "home"
    ports = dict(zip(("FLEET_PG_PORT", "FLEET_PREFECT_PORT", "FLEET_MLFLOW_PORT"), free_ports(3), strict=True))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_TRACKING", "EDGEOPT_"))}
    env.update({k: str(v) for k, v in ports.items()})
    env.update({"FLEET_DIR": str(tmp / "fleet"), "FLEET_BIN": str(BIN), "FLEET_POOLS": "intel-cpu arm64",
                "FLEET_DEPLOY": "0", "EDGEOPT_HOME": str(home), "EDGEOPT_GIT_URL": str(clone),
                "EDGEOPT_GIT_BRANCH": branch, "PATH": f"{BIN}:{env.get('PATH', '')}",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "COLUMNS": "200",
                "NO_COLOR": "1"})
    script = str(REPO / "deployments" / "fleet.sh")
    # the heavy tests' reference CNN trains while the fleet starts (mostly waiting on servers)
    training = None
    if any(item.get_closest_marker("heavy") for item in request.session.items):
        from edgeopt import zoo

        training = ThreadPoolExecutor(1).submit(zoo.build, "digits-resnet", out_dir=home / "zoo")
    try:
        started = time.monotonic()
        up = sh(["bash", script, "up"], env, 300)
        print(f"fleet up: {time.monotonic() - started:.0f} s", flush=True)
        assert up.returncode == 0, up.stdout + up.stderr
        if training is not None:
            training.result(timeout=900)
            print(f"fleet up and digits-resnet trained: {time.monotonic() - started:.0f} s", flush=True)
        api = f"http://127.0.0.1:{ports['FLEET_PREFECT_PORT']}/api"
        tracking = f"http://127.0.0.1:{ports['FLEET_MLFLOW_PORT']}"
        assert f"export PREFECT_API_URL={api} MLFLOW_TRACKING_URI={tracking}" in up.stdout, up.stdout
        env.update({"PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": tracking,
                    "PREFECT_HOME": str(tmp / "fleet" / "worker")})
        yield {"env": env, "tmp": tmp, "home": home, "api": api, "tracking": tracking, "up": up,
               "ui": f"http://127.0.0.1:{ports['FLEET_PREFECT_PORT']}", "script": script}
    finally:
        if training is not None:
            training.cancel() or training.exception(timeout=900)  # never leave it writing into tmp
        started = time.monotonic()
        down = sh(["bash", script, "down"], env, 180)
        print(f"fleet down: {time.monotonic() - started:.0f} s: {' | '.join(down.stderr.splitlines())}", flush=True)
        pids = list((tmp / "fleet" / "pids").glob("*.pid")) if (tmp / "fleet" / "pids").is_dir() else []
        left = leftovers(tmp / "fleet")
        if down.returncode == 0 and not pids and not left:
            shutil.rmtree(tmp, ignore_errors=True)
        assert down.returncode == 0 and not pids and not left, (
            down.stdout + down.stderr, pids, "still running after fleet.sh down (now killed):", left,
            f"left for a look: {tmp}")


@pytest.fixture(scope="session")
def client(fleet):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: fleet["api"]}), get_client(sync_client=True) as c:
        yield c
