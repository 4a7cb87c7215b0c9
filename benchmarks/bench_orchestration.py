"""Orchestration overhead against a Prefect server: a deployment run on a worker vs the same work without Prefect.

    .venv/bin/python benchmarks/bench_orchestration.py [--candidates ort-fp32-optimized,ort-int8-dynamic]
                        [--order direct,deployment,direct] [--out benchmarks/results/orchestration.json]

Starts a local fleet in a temporary folder (``deployments/fleet.sh up``: PostgreSQL, a Prefect server on
it, an MLflow server, a process worker for intel-cpu; loopback ports the OS hands out), deploys
``optimize/optimize-intel-cpu`` from this checkout (the worker clones its branch), then, on the reference
CNN (digits-resnet) with the intel-cpu profile trimmed to ``--candidates`` and to its ``repeats`` measuring
rounds (no extra rounds for uncertain verdicts), runs ``--order``, each run from nothing cached (its own
data folder, model name and MLflow experiment):

  * direct: ``benchmarks/orchestration_direct.py`` as a fresh process (a user's script: its imports
    included), the flow's work without Prefect: the core's phases and the same MLflow calls (the tracking
    tasks' ``.fn``) against the same MLflow server; timed from the process start to its exit, less its
    import of Prefect (which it needs only because ``tasks.tracking`` defines tasks);
  * deployment: ``run_deployment`` → the worker polls, clones, starts a flow-run process, runs the flow
    → final state; timed from the request to the final state seen by the client.

Overhead = deployment / the mean of the direct runs beside it (issue 12 target <= 1.15). Checks both sides
measured the same rounds of the same candidates, logged the same number of MLflow child runs, and that no
task run of the deployment was served from a cache. ``fleet.sh down`` at the end.
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


def _breakdown(client, fr, t0_wall: float, t_deploy: float) -> tuple[dict[str, float], dict[str, int], int]:
    """Where the deployment run's wall time went, from its state history and its task runs (server clock);
    the measuring rounds per candidate (its ``benchmark-<candidate>-<round>`` task runs) and how many task
    runs were served from a cache (state ``Cached``)."""
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
    rounds: dict[str, int] = {}
    spans: dict[str, list[float]] = {}  # first start, last end of each kind of task run, from Running
    cached = 0
    for t in tasks:
        kind = t.name.split("-")[0]
        if t.start_time and t.end_time:
            a, b = t.start_time.timestamp() - first["RUNNING"], t.end_time.timestamp() - first["RUNNING"]
            span = spans.setdefault(kind, [a, b])
            span[:] = [min(span[0], a), max(span[1], b)]
        if t.name.startswith("benchmark-"):
            cand = t.name.removeprefix("benchmark-").rsplit("-", 1)[0]
            rounds[cand] = rounds.get(cand, 0) + 1
        cached += (t.state_name or "") == "Cached"
        group = t.name.split("-")[0] if not t.name.startswith("mlflow") else "mlflow"
        by[group] = by.get(group, 0.0) + t.total_run_time.total_seconds()
        count[group] = count.get(group, 0) + 1
    pending = first.get("PENDING", first["RUNNING"])
    out = {"request -> picked up by the worker (Pending)": pending - t0_wall,
           "Pending -> Running (flow-run process start, prefect import, pull steps, flow module import)":
               first["RUNNING"] - pending,
           "Running -> Completed (the flow run)": first["COMPLETED"] - first["RUNNING"],
           "Completed -> seen by the client": t0_wall + t_deploy - first["COMPLETED"],
           "task runs (count)": float(len(tasks))}  # printed as seconds: a count
    out.update({f"task runs {k}-* ({count[k]}): sum of run times": v
                for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:10]})
    out.update({f"task runs {k}-*: from Running, first start {a:.1f} s, last end": b
                for k, (a, b) in sorted(spans.items(), key=lambda kv: kv[1][0])})
    return out, rounds, cached


def _direct(i: int, *, env: dict, tmp: Path, work: dict) -> dict:
    """One direct run: ``orchestration_direct.py`` in a fresh process, timed from its start to its exit."""
    out = tmp / f"direct-{i}.json"
    denv = {k: v for k, v in env.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    denv.update({"EDGEOPT_HOME": str(tmp / f"direct-{i}"), "PREFECT_HOME": str(tmp / f"direct-{i}-prefect")})
    args = [str(BIN / "python"), str(REPO / "benchmarks" / "orchestration_direct.py"), "--model", work["model"],
            "--profile", work["profile"], "--calibration", work["calibration"], "--evaluation", work["evaluation"],
            "--data-dir", str(tmp / f"direct-{i}"), "--model-name", f"{work['model_name']}-direct-{i}", "--out", str(out)]
    t0 = time.perf_counter()
    done = subprocess.run(args, env=denv, cwd=REPO, capture_output=True, text=True, timeout=3600, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"the direct run failed:\n{done.stderr[-4000:]}")
    r = json.loads(out.read_text(encoding="utf-8"))
    r |= {"wall_s": wall, "like_for_like_s": wall - r["prefect_import_s"]}
    return r


def _deployment(i: int, *, client, work: dict, tmp: Path) -> dict:
    """One deployment run, timed from the request to the final state seen by the client."""
    from prefect.deployments import run_deployment

    t0, t0_wall = time.perf_counter(), time.time()
    run = run_deployment("optimize/optimize-intel-cpu", timeout=0, parameters={
        "model": work["model"], "profile": work["profile"], "calibration": work["calibration"],
        "evaluation": work["evaluation"], "data_dir": str(tmp / f"deployment-{i}"),
        "model_name": f"{work['model_name']}-deployment-{i}"})
    while True:
        fr = client.read_flow_run(run.id)
        if fr.state and fr.state.is_final():
            break
        if time.perf_counter() - t0 > 1800:
            raise TimeoutError(f"the deployment run did not finish in 30 min: {fr.state}")
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    if not fr.state.is_completed():
        raise RuntimeError(f"the deployment run ended {fr.state.name}: {fr.state.message}")
    breakdown, rounds, cached = _breakdown(client, fr, t0_wall, wall)
    return {"wall_s": wall, "flow_run_total_run_time_s": fr.total_run_time.total_seconds(), "breakdown_s": breakdown,
            "rounds": rounds, "cached_task_runs": cached}


def _mlflow_record(uri: str, experiment: str) -> dict:
    """What the run left in MLflow: child runs (one per outcome) and the parent run's selection."""
    import mlflow

    cl = mlflow.MlflowClient(tracking_uri=uri)
    exp = cl.get_experiment_by_name(experiment)
    runs = cl.search_runs([exp.experiment_id], max_results=500)
    parent = next((r for r in runs if "mlflow.parentRunId" not in r.data.tags), None)
    return {"mlflow_child_runs": sum(1 for r in runs if "mlflow.parentRunId" in r.data.tags),
            "mlflow_selected": parent.data.tags.get("edgeopt.selected") if parent else None,
            "mlflow_parent_status": parent.info.status if parent else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", default="ort-fp32-optimized,ort-int8-dynamic")
    ap.add_argument("--order", default="direct,deployment,direct",
                    help="the runs, in order (each from nothing cached); each deployment is compared with the mean "
                         "of the direct runs next to it")
    ap.add_argument("--zoo", default=None, help="folder of zoo builds to reuse (default: a new one, trained here)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "orchestration.json"))
    args = ap.parse_args()
    keep = set(args.candidates.split(","))
    order = args.order.split(",")
    if set(order) - {"direct", "deployment"} or "direct" not in order or "deployment" not in order:
        ap.error(f"--order: direct and deployment, comma-separated; got {args.order!r}")

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

    from edgeopt import zoo

    entry = zoo.build("digits-resnet", out_dir=Path(args.zoo) if args.zoo else tmp / "home" / "zoo")
    work = {"model": str(entry.model), "calibration": str(entry.calibration), "evaluation": str(entry.evaluation),
            "profile": str(profile), "model_name": "digits-resnet-orchestration"}

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
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"})
    script = str(REPO / "deployments" / "fleet.sh")
    result = {}
    try:
        up = _sh(["bash", script, "up"], env, 300)
        if up.returncode != 0:
            print(up.stderr, file=sys.stderr)
            return 1
        api = f"http://127.0.0.1:{ports['FLEET_PREFECT_PORT']}/api"
        tracking_uri = f"http://127.0.0.1:{ports['FLEET_MLFLOW_PORT']}"
        env.update({"PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": tracking_uri,
                    "PREFECT_HOME": str(tmp / "fleet" / "worker")})
        dep = _sh([str(BIN / "prefect"), "--no-prompt", "deploy", "-n", "optimize-intel-cpu"], env, 300)
        if dep.returncode != 0:
            print(dep.stdout + dep.stderr, file=sys.stderr)
            return 1
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        runs = []
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            for i, side in enumerate(order):
                load = os.getloadavg()
                print(f"{side} run {i} (load average {load[0]:.2f}) ...", flush=True)
                r = (_direct(i, env=env, tmp=tmp, work=work) if side == "direct"
                     else _deployment(i, client=client, work=work, tmp=tmp))
                r |= {"side": side, "load_before": load, "load_after": os.getloadavg(),
                      **_mlflow_record(tracking_uri, f"edgeopt/{work['model_name']}-{side}-{i}")}
                runs.append(r)
                print(f"  {side}: {r['wall_s']:.1f} s" + (f" ({r['like_for_like_s']:.1f} s without Prefect's import, "
                      f"{r['prefect_import_s']:.1f} s)" if side == "direct" else
                      f" (the flow run itself {r['flow_run_total_run_time_s']:.1f} s)"), flush=True)
                for k, v in r.get("breakdown_s", {}).items():
                    print(f"    {k}: {v:.1f} s")
                for k, v in r.get("phases_s", {}).items():
                    print(f"    {k}: {v:.1f} s (from {r['phase_starts_s'][k]:.1f} s)")
        # the same work on both sides: the same outcomes measured the same rounds, nothing from a cache, the same
        # number of MLflow child runs
        same = {"rounds": [r["rounds"] for r in runs], "mlflow_child_runs": [r["mlflow_child_runs"] for r in runs],
                "cached_task_runs": [r["cached_task_runs"] for r in runs if r["side"] == "deployment"]}
        if len({json.dumps(x, sort_keys=True) for x in same["rounds"]}) != 1 or len(set(same["mlflow_child_runs"])) != 1 \
                or any(same["cached_task_runs"]):
            print(f"the two sides did not do the same work: {same}", file=sys.stderr)
        pairs = []
        for i, r in enumerate(runs):
            if r["side"] != "deployment":
                continue
            near = [runs[j]["like_for_like_s"] for j in (i - 1, i + 1) if 0 <= j < len(runs) and runs[j]["side"] == "direct"]
            direct = sum(near) / len(near)
            pairs.append({"deployment_s": r["wall_s"], "direct_s": direct, "ratio": r["wall_s"] / direct,
                          "ratio_flow_run_only": r["flow_run_total_run_time_s"] / direct})
        result = {"candidates": sorted(keep), "order": order, "same_work": same,
                  "worker_query_seconds": env.get("FLEET_WORKER_QUERY_SECONDS", "2"), "runs": runs, "pairs": pairs,
                  "hardware_cpu": _cpu()}
        for p in pairs:
            print(f"\norchestration overhead against the server: deployment {p['deployment_s']:.1f} s / direct "
                  f"{p['direct_s']:.1f} s = {p['ratio']:.3f} (target <= 1.15); the flow run alone "
                  f"{p['ratio_flow_run_only']:.3f}")
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


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
