"""Create the automations of deployments/automations.yaml on the Prefect API in PREFECT_API_URL.

    python deployments/automations.py [--file deployments/automations.yaml]

Idempotent: an automation of the same name is replaced. An automation whose run-deployment action
names a deployment that does not exist yet (run `prefect deploy --all` first) is skipped with one line
saying so; the exit code is 0 unless the API refused one.
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


def apply(doc: dict) -> tuple[list[str], list[str], list[str]]:
    """Create each automation (replacing one of the same name); returns (created, skipped, failed)."""
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore
    from prefect.exceptions import ObjectNotFound

    created, skipped, failed = [], [], []
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
                skipped.append(f"{entry['name']} (no deployment {', '.join(missing)} yet)")
                continue
            try:
                automation = AutomationCore.model_validate(entry)
                for old in client.read_automations_by_name(automation.name):
                    client.delete_automation(old.id)
                client.create_automation(automation)
                created.append(automation.name)
            except Exception as exc:  # one bad entry does not stop the others
                failed.append(f"{entry['name']}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    return created, skipped, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=Path(__file__).with_name("automations.yaml"))
    args = parser.parse_args(argv)
    created, skipped, failed = apply(yaml.safe_load(args.file.read_text(encoding="utf-8")))
    if created:
        print(f"automations: {len(created)} created or replaced ({', '.join(created)})")
    if skipped:
        print(f"automations: {len(skipped)} skipped until their deployments exist (`prefect deploy --all`, then "
              f"run this again): {'; '.join(skipped)}")
    for f in failed:
        print(f"automations: refused: {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
