"""``edgeopt fleet status``: the work pools, their workers, the deployments with their last run, and the
registry's champion and candidate per model, in one table.

Registered on the ``edgeopt`` app by ``flows.cli``. It reads the Prefect server in ``PREFECT_API_URL``
and the MLflow tracking store (``MLFLOW_TRACKING_URI``, else the local one); without a server it says
so in one line (exit 2), with an unreachable one it names the URL (exit 4).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import typer
from rich.table import Table

from flows.cli import _fail, app, out

fleet_app = typer.Typer(no_args_is_help=True, help="The fleet on a Prefect server: pools, workers, deployments.")
app.add_typer(fleet_app, name="fleet")

#: seconds since a worker's last heartbeat after which it no longer counts as online
ONLINE_S = 90


def _model_name(parameters: dict) -> str | None:
    """The registered model a deployment's runs write to (the optimize flow's default when not given)."""
    if parameters.get("model_name"):
        return str(parameters["model_name"])
    model, profile = parameters.get("model"), parameters.get("profile")
    if not model or not profile:
        return None
    p = Path(str(model))
    stem = p.stem if p.suffix else p.name
    if stem in ("model", "hf", "checkpoint", ""):
        stem = p.parent.name
    return f"{stem}-{Path(str(profile)).stem}"


def _ago(when: datetime | None) -> str:
    if when is None:
        return "-"
    s = (datetime.now(UTC) - when).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.0f} {unit} ago"
    return f"{max(s, 0):.0f} s ago"


def _prefect_state() -> tuple[list, dict, list, dict]:
    """(pools, {pool: [online worker names]}, deployments, {deployment id: last flow run or None})."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        pools = client.read_work_pools()
        online: dict[str, list[str]] = {}
        now = datetime.now(UTC)
        for pool in pools:
            workers = client.read_workers_for_work_pool(pool.name)
            online[pool.name] = sorted(w.name for w in workers if w.last_heartbeat_time is not None
                                       and (now - w.last_heartbeat_time).total_seconds() < ONLINE_S)
        deployments = client.read_deployments()
        flows = {f.id: f.name for f in client.read_flows()}
        for d in deployments:
            d.__dict__["flow_name"] = flows.get(d.flow_id, "?")
        last = {}
        for d in deployments:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[d.id])),
                                         sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=5)
            started = [r for r in runs if r.state is not None and not r.state.is_scheduled()]
            last[d.id] = started[0] if started else None
    return pools, online, deployments, last


@fleet_app.command("status")
def status() -> None:
    """Pools, workers online, deployments and their last run, champion/candidate per registered model."""
    from flows._env import configure_embedded_defaults

    configure_embedded_defaults()
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        _fail(RuntimeError("no Prefect server: PREFECT_API_URL is not set (`make fleet-up` prints the export line; "
                           "see deployments/README.md)"), 2)
    from flows._env import PrefectAPIUnavailable, ensure_prefect_api

    try:
        ensure_prefect_api()
        pools, online, deployments, last = _prefect_state()
    except PrefectAPIUnavailable as exc:
        _fail(exc, PrefectAPIUnavailable.exit_code)
    except Exception as exc:  # noqa: BLE001 - the server went away between the check and the reads
        _fail(PrefectAPIUnavailable(f"reading the Prefect API at {url} failed: {type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''}"), PrefectAPIUnavailable.exit_code)
    registry, registry_note = _registry()

    table = Table(title=f"edgeopt fleet on {url}")
    for c in ("pool", "workers online", "deployment", "schedule", "last run", "model", "champion", "candidate"):
        table.add_column(c)
    by_pool: dict[str, list] = {}
    for d in deployments:
        by_pool.setdefault(d.work_pool_name or "-", []).append(d)
    names = [p.name for p in sorted(pools, key=lambda p: p.name)] + sorted(set(by_pool) - {p.name for p in pools})
    for pool in names:
        workers = ", ".join(online.get(pool, [])) or "none"
        deps = sorted(by_pool.get(pool, []), key=lambda d: (d.flow_name, d.name))
        if not deps:
            table.add_row(pool, workers, "-", "", "", "", "", "")
        for i, d in enumerate(deps):
            run = last.get(d.id)
            ran = f"{run.state.name} {_ago(run.start_time or run.expected_start_time)}" if run else "never"
            sched = ", ".join(f"{s.schedule.cron} {s.schedule.timezone or ''}".strip() for s in (d.schedules or [])
                              if getattr(s.schedule, "cron", None)) or "-"
            model = _model_name(d.parameters or {})
            aliases = registry.get(model, {}) if model else {}
            table.add_row(pool if i == 0 else "", workers if i == 0 else "", f"{d.flow_name}/{d.name}", sched, ran,
                          model or "-", aliases.get("champion", "-") if model in registry else "not registered"
                          if model and registry_note is None else "-", aliases.get("candidate", "-"))
    out.print(table)
    if registry_note:
        out.print(registry_note, highlight=False, soft_wrap=True)


def _registry() -> tuple[dict[str, dict[str, str]], str | None]:
    """The registry's aliases, or ({}, one line saying why not)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from edgeopt.settings import data_dir, mlflow_tracking_uri
    from tasks.tracking.fleet import model_aliases

    try:
        return model_aliases(data_dir=str(data_dir())), None
    except Exception as exc:  # noqa: BLE001 - the table is still worth printing
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return {}, (f"registry: MLflow at {mlflow_tracking_uri(data_dir())} could not be read "
                    f"({type(exc).__name__}: {first})")


