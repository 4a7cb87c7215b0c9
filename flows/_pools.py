"""Work pools and the hosts that may serve them.

Each of the four hardware pools (``intel-cpu``, ``apple-silicon``, ``nvidia-gpu``, ``arm64``) is named
after the target profile its hosts must fit. Every deployment in ``prefect.yaml`` puts its pool's name
in the flow run's environment (``EDGEOPT_POOL``); ``refuse_wrong_host()``, called first in every flow
entrypoint a pool runs, fails the run with one clear line when this host does not fit that profile, so
an apple-silicon run picked up by a worker on x86-64 is never measured silently.

``python -m flows._pools --fitting`` prints the pools this host fits (``deployments/fleet.sh`` starts one
worker per pool it prints); ``--check`` exits 1 with the refusal when ``EDGEOPT_POOL`` does not fit;
``--deploy-args`` prints ``-n NAME`` for each deployment in ``prefect.yaml`` whose entrypoint exists here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from edgeopt.errors import ConfigError

#: the hardware work pools; each is named after the profile its hosts must fit
POOLS = ("intel-cpu", "apple-silicon", "nvidia-gpu", "arm64")
#: the flow run's pool, set by each deployment's job variables in prefect.yaml
POOL_ENV = "EDGEOPT_POOL"

__all__ = ["POOLS", "POOL_ENV", "fitting_pools", "pool_mismatches", "refuse_wrong_host"]


def pool_mismatches(pool: str, fp=None) -> list[str]:
    """What about this host does not fit ``pool``'s profile (empty when it fits)."""
    from edgeopt.hardware import fingerprint
    from edgeopt.profiles import host_mismatches, load_profile

    return host_mismatches(load_profile(pool), fp or fingerprint())


def fitting_pools(fp=None) -> list[str]:
    """The pools whose profile this host fits."""
    from edgeopt.hardware import fingerprint

    fp = fp or fingerprint()
    return [p for p in POOLS if not pool_mismatches(p, fp)]


def refuse_wrong_host(*, allow_mismatch: bool = False) -> None:
    """Raise ``ConfigError`` when this flow run came from a pool whose profile this host does not fit.

    Outside a pool (the CLI, a flow called directly; no ``EDGEOPT_POOL``) it does nothing; the flows'
    own profile checks still apply. ``allow_mismatch`` (the optimize flow's
    ``allow_hardware_mismatch``) lets a user force the run.
    """
    pool = os.environ.get(POOL_ENV, "").strip()
    if not pool or allow_mismatch:
        return
    if pool not in POOLS:
        raise ConfigError(f"{POOL_ENV}={pool!r} is not a work pool of edgeopt (pools: {', '.join(POOLS)})")
    problems = pool_mismatches(pool)
    if problems:
        import socket

        raise ConfigError(f"host {socket.gethostname()} does not fit work pool {pool} ({'; '.join(problems)}): "
                          f"refusing to run here; start this pool's worker on a host that fits profile {pool} "
                          f"(`python -m flows._pools --fitting` lists the pools a host fits)")


def _deploy_args(root: Path) -> list[str]:
    import yaml

    doc = yaml.safe_load((root / "prefect.yaml").read_text(encoding="utf-8"))
    deployments = doc.get("deployments") or []
    present = [d for d in deployments if (root / d["entrypoint"].split(":", 1)[0]).is_file()]
    if len(present) == len(deployments):
        return ["--all"]
    # a name shared with a deployment whose entrypoint is missing would select that one too
    missing = {d["name"] for d in deployments if d not in present}
    return [a for d in present if d["name"] not in missing for a in ("-n", d["name"])]


def main(argv: list[str]) -> int:
    if argv == ["--fitting"]:
        print(" ".join(fitting_pools()))
        return 0
    if argv == ["--check"]:
        try:
            refuse_wrong_host()
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    if argv == ["--deploy-args"]:
        print(" ".join(_deploy_args(Path.cwd())))
        return 0
    print("usage: python -m flows._pools --fitting | --check | --deploy-args", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
