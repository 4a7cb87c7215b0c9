"""Orchestration overhead against a Prefect server: a deployment run on a worker vs direct core calls.

    .venv/bin/python benchmarks/bench_orchestration.py [--candidates ort-fp32-optimized,ort-int8-dynamic]
                                                       [--out benchmarks/results/orchestration.json]

Starts a local fleet in a temporary folder (``deployments/fleet.sh up``: PostgreSQL, a Prefect server on
it, an MLflow server, a process worker for intel-cpu; loopback ports the OS hands out), deploys
``optimize/optimize-intel-cpu`` from this checkout (the worker clones its branch), then, on the reference
CNN (digits-resnet) with the intel-cpu profile trimmed to ``--candidates`` and to its ``repeats`` measuring rounds (no extra rounds for
uncertain verdicts, which the direct path does not do), nothing cached either time:

  * direct: the optimize flow's phases called directly (``benchmarks/bench_optimize.py``'s ``_direct``:
    intake, plan, build, interleaved measurement, outputs, evaluation, gates, selection; no MLflow);
  * deployment: ``run_deployment`` → the worker polls, clones, starts a flow-run process, runs the flow
    (MLflow server, Prefect API, artifacts, registration) → final state; timed from the request to the
    final state seen by the client.

Overhead = deployment / direct (issue 12 target <= 1.15). ``fleet.sh down`` at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sh(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


def _breakdown(client, fr, t0_wall: float, t_deploy: float) -> dict[str, float]:
    """Where the deployment run's wall time went, from its state history and its task runs (server clock)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    states = sorted(client.read_flow_run_states(fr.id), key=lambda s: s.timestamp)
    first = {}
    for st in states:
        first.setdefault(st.type.value, st.timestamp.timestamp())
    subs = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(
        any_=[fr.id])))
    tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id, *[s.id for s in subs]])),
                                  limit=200)
    by: dict[str, float] = {}
    count: dict[str, int] = {}
    for t in tasks:
        group = t.name.split("-")[0] if not t.name.startswith("mlflow") else "mlflow"
        by[group] = by.get(group, 0.0) + t.total_run_time.total_seconds()
        count[group] = count.get(group, 0) + 1
    pending = first.get("PENDING", first["RUNNING"])
    out = {"request -> picked up by the worker (Pending)": pending - t0_wall,
           "Pending -> Running (flow-run process start, prefect import, pull steps, flow module import)":
               first["RUNNING"] - pending,
           "Running -> Completed (the flow run)": first["COMPLETED"] - first["RUNNING"],
           "Completed -> seen by the client": t0_wall + t_deploy - first["COMPLETED"],
           "task runs (count)": float(len(tasks))}
    out.update({f"task runs {k}-* ({count[k]}): sum of run times": v
                for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:10]})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", default="ort-fp32-optimized,ort-int8-dynamic")
    ap.add_argument("--zoo", default=None, help="folder of zoo builds to reuse (default: a new one, trained here)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "orchestration.json"))
    args = ap.parse_args()
    keep = set(args.candidates.split(","))

    tmp = Path(tempfile.mkdtemp(prefix="edgeopt-orch-"))
    os.chmod(tmp, 0o755)  # PostgreSQL runs as `postgres` when we are root
    doc = yaml.safe_load((REPO / "profiles" / "intel-cpu.yaml").read_text(encoding="utf-8"))
    doc["candidates"] = [c for c in doc["candidates"] if c["name"] in keep]
    # the same work on both sides: the flow adds measuring rounds while a verdict is uncertain, the direct
    # path measures `repeats` rounds only; with no extra rounds both measure the same rounds
    doc.setdefault("benchmark", {})["extra_repeats"] = 0
    (tmp / "profiles").mkdir()
    profile = tmp / "profiles" / "intel-cpu.yaml"  # same name: same keys, same profile but the candidates
    profile.write_text(yaml.safe_dump(doc), encoding="utf-8")

    os.environ["EDGEOPT_HOME"] = str(tmp / "direct-home")
    from flows._env import configure_embedded_defaults

    configure_embedded_defaults(quiet=True)
    from bench_optimize import _direct

    from edgeopt import zoo

    entry = zoo.build("digits-resnet", out_dir=Path(args.zoo) if args.zoo else tmp / "home" / "zoo")
    model, cal, ev = str(entry.model), str(entry.calibration), str(entry.evaluation)
    print(f"direct core calls: {sorted(keep)} ...", flush=True)
    t_direct, outcomes, _ = _direct(model, cal, ev, str(profile), tmp / "direct-work")
    print(f"direct: {t_direct:.1f} s ({len(outcomes)} outcomes)", flush=True)
    from edgeopt.profiles import load_profile

    direct_rounds = len(outcomes) * load_profile(str(profile)).benchmark.repeats

    branch = subprocess.run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.strip()
    clone = tmp / "repo"
    subprocess.run(["git", "clone", "--quiet", "--branch", branch, str(REPO), str(clone)], check=True)
    ports = {"FLEET_PG_PORT": _port(), "FLEET_PREFECT_PORT": _port(), "FLEET_MLFLOW_PORT": _port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "EDGEOPT_"))}
    env.update({k: str(v) for k, v in ports.items()})
    env.update({"FLEET_DIR": str(tmp / "fleet"), "FLEET_BIN": str(BIN), "FLEET_POOLS": "intel-cpu",
                "FLEET_DEPLOY": "0", "EDGEOPT_HOME": str(tmp / "home"), "EDGEOPT_GIT_URL": str(clone),
                "EDGEOPT_GIT_BRANCH": branch, "PATH": f"{BIN}:{env.get('PATH', '')}",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"})
    script = str(REPO / "deployments" / "fleet.sh")
    result = {}
    try:
        up = _sh(["bash", script, "up"], env, 300)
        if up.returncode != 0:
            print(up.stderr, file=sys.stderr)
            return 1
        api = f"http://127.0.0.1:{ports['FLEET_PREFECT_PORT']}/api"
        env.update({"PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['FLEET_MLFLOW_PORT']}",
                    "PREFECT_HOME": str(tmp / "fleet" / "worker")})
        dep = _sh([str(BIN / "prefect"), "--no-prompt", "deploy", "-n", "optimize-intel-cpu"], env, 300)
        if dep.returncode != 0:
            print(dep.stdout + dep.stderr, file=sys.stderr)
            return 1
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            print("deployment run ...", flush=True)
            t0, t0_wall = time.perf_counter(), time.time()
            run = run_deployment("optimize/optimize-intel-cpu", timeout=0, parameters={
                "model": model, "profile": str(profile), "calibration": cal, "evaluation": ev,
                "model_name": "digits-resnet-orchestration"})
            while True:
                fr = client.read_flow_run(run.id)
                if fr.state and fr.state.is_final():
                    break
                if time.perf_counter() - t0 > 1800:
                    raise TimeoutError(f"the deployment run did not finish in 30 min: {fr.state}")
                time.sleep(0.5)
            t_deploy = time.perf_counter() - t0
            breakdown = _breakdown(client, fr, t0_wall, t_deploy) if fr.state.is_completed() else {}
        if not fr.state.is_completed():
            print(f"the deployment run ended {fr.state.name}: {fr.state.message}", file=sys.stderr)
            return 1
        t_flow = fr.total_run_time.total_seconds()
        print(f"deployment: {t_deploy:.1f} s from the request to Completed (the flow itself: {t_flow:.1f} s)")
        for k, v in breakdown.items():
            print(f"  {k}: {v:.1f} s")
        rounds = next((int(k.split("(")[1].split(")")[0]) for k in breakdown if k.startswith("task runs benchmark-")), 0)
        print(f"measuring rounds: direct {direct_rounds}, deployment {rounds}")
        result = {"candidates": sorted(keep), "measuring_rounds": {"direct": direct_rounds, "deployment": rounds}, "worker_query_seconds": env.get("FLEET_WORKER_QUERY_SECONDS", "2"),
                  "breakdown_s": breakdown,
                  "wall_s": {"direct": t_direct, "deployment": t_deploy, "flow_run_total_run_time": t_flow},
                  "overhead": t_deploy / t_direct, "overhead_flow_only": t_flow / t_direct,
                  "load_average": os.getloadavg()}
        print(f"\norchestration overhead against the server: deployment {t_deploy:.1f} s / direct {t_direct:.1f} s"
              f" = {result['overhead']:.3f} (target <= 1.15); the flow run alone {result['overhead_flow_only']:.3f}")
    finally:
        down = _sh(["bash", script, "down"], env, 180)
        if down.returncode != 0:
            print(down.stderr, file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
