"""Set up the Prefect API in PREFECT_API_URL for edgeopt's fleet (``deployments/setup.sh`` runs this).

    python deployments/setup.py [--host HOSTNAME ...] [--file deployments/automations.yaml]

1. the four work pools (process workers): intel-cpu, apple-silicon, nvidia-gpu, arm64;
2. one benchmark slot per measuring host: the global concurrency limit ``edgeopt-benchmark-<host>``
   (default: this host; name every measuring host of the fleet);
3. the automations of ``deployments/automations.yaml``: one of the same name is kept when it is the same,
   else replaced; one whose run-deployment action names a deployment that does not exist yet is skipped
   with one line saying so (run this again after ``prefect deploy --all``).

Idempotent; one process (a ``prefect`` command per object would take a few seconds each). Exit code 0
unless the API refused something (1), PREFECT_API_URL is not set (2) or no server answers there (4).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import yaml


def expand(doc: dict) -> list[dict]:
    """One automation per pool for each entry that mentions ``{pool}``; the others once."""
    out = []
    for entry in doc.get("automations") or []:
        text = yaml.safe_dump(entry, sort_keys=False)
        if "{pool}" not in text:
            out.append(copy.deepcopy(entry))
            continue
        out += [yaml.safe_load(text.replace("{pool}", pool)) for pool in doc.get("pools") or []]
    return out


def _canonical(value):
    """A dumped automation without the ids the server or the schema generated."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items() if k != "id"}
    if isinstance(value, list):  # sets (e.g. a trigger's expected events) come back in any order
        items = [_canonical(v) for v in value]
        return sorted(items) if all(isinstance(v, str) for v in items) else items
    return value


def _same(existing, automation) -> bool:
    fields = set(type(automation).model_fields)
    return _canonical(existing.model_dump(mode="json", include=fields)) == _canonical(automation.model_dump(mode="json"))


def apply(doc: dict) -> tuple[list[str], list[str], list[str], list[str]]:
    """Create each automation (replacing one of the same name that differs); returns (created, unchanged,
    skipped, failed)."""
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore
    from prefect.exceptions import ObjectNotFound

    created, unchanged, skipped, failed = [], [], [], []
    with get_client(sync_client=True) as client:
        for entry in expand(doc):
            missing = []
            for action in entry.get("actions") or []:
                name = action.pop("deployment", None)
                if name is None:
                    continue
                try:
                    action["deployment_id"] = str(client.read_deployment_by_name(name).id)
                except ObjectNotFound:
                    missing.append(name)
            if missing:
                skipped.append(f"{entry['name']} (needs {', '.join(missing)})")
                continue
            try:
                automation = AutomationCore.model_validate(entry)
                olds = client.read_automations_by_name(automation.name)
                if len(olds) == 1 and _same(olds[0], automation):
                    # kept, not replaced: a new automation would forget what its trigger has seen (the
                    # heartbeats of a run that is about to be declared lost)
                    unchanged.append(automation.name)
                    continue
                for old in olds:
                    client.delete_automation(old.id)
                client.create_automation(automation)
                created.append(automation.name)
            except Exception as exc:  # noqa: BLE001 - one bad entry does not stop the others
                failed.append(f"{entry['name']}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    return created, unchanged, skipped, failed


POOLS = ("intel-cpu", "apple-silicon", "nvidia-gpu", "arm64")


def ensure_pools_and_limits(hosts: list[str]) -> None:
    """Create the pools and the hosts' benchmark limits that do not exist yet; print one line each."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for pool in POOLS:
            try:
                client.read_work_pool(pool)
                print(f"work pool {pool}: exists")
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
                print(f"work pool {pool}: created (process)")
        for host in hosts:
            name = f"edgeopt-benchmark-{host}"
            try:
                client.read_global_concurrency_limit_by_name(name)
                print(f"benchmark limit {name}: exists")
            except ObjectNotFound:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
                print(f"benchmark limit {name}: created (1 slot)")


def main(argv: list[str] | None = None) -> int:
    import os
    import socket

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", action="append", help="a measuring host (repeatable; default: this host)")
    parser.add_argument("--file", type=Path, default=Path(__file__).with_name("automations.yaml"))
    args = parser.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            print("setup: set PREFECT_API_URL to the Prefect server first", file=sys.stderr)
            return 2
    from flows._env import PrefectAPIUnavailable, ensure_prefect_api

    try:  # an unreachable server is one line naming its URL, not a traceback half-way through
        ensure_prefect_api()
    except PrefectAPIUnavailable as exc:
        print(f"setup: {exc}", file=sys.stderr)
        return PrefectAPIUnavailable.exit_code
    ensure_pools_and_limits(args.host or [socket.gethostname()])
    created, unchanged, skipped, failed = apply(yaml.safe_load(args.file.read_text(encoding="utf-8")))
    if created:
        print(f"automations: {len(created)} created or replaced ({', '.join(created)})")
    if unchanged:
        print(f"automations: {len(unchanged)} unchanged ({', '.join(unchanged)})")
    if skipped:
        print(f"automations: {len(skipped)} waiting for their deployments (`prefect deploy --all`, then run this "
              f"again): {'; '.join(skipped)}")
    for f in failed:
        print(f"automations: refused: {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
