"""Certification cost: the wall time of `edgeopt certify` on the demo's registered version, and each check's share.

    make demo                                    # registers digits-resnet-intel-cpu (alias candidate)
    .venv/bin/python benchmarks/bench_certify.py [--model-name digits-resnet-intel-cpu] [--alias candidate]
                                                 [--soak-s 60] [--out benchmarks/results/certify.json]

Runs the command as a user does (a subprocess, the embedded Prefect API, the project's data folder),
then reads each check's own wall time from the report it wrote (``certification.json``). The issue's
target: under 5 minutes with a 60-second soak on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-name", default="digits-resnet-intel-cpu")
    ap.add_argument("--alias", default="candidate")
    ap.add_argument("--soak-s", type=float, default=60.0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "certify.json"))
    args = ap.parse_args()

    from edgeopt.hardware import fingerprint
    from edgeopt.settings import data_dir

    zoo = data_dir() / "zoo" / "digits-resnet"
    cmd = [str(Path(sys.executable).parent / "edgeopt"), "certify", args.model_name, "--alias", args.alias,
           "--eval", str(zoo / "eval.npz"), "--calibration", str(zoo / "calibration.npz"),
           "--soak-s", str(args.soak_s)]
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, check=False)
    wall = time.perf_counter() - start
    print(r.stdout)
    if r.returncode not in (0, 3):
        print(r.stderr, file=sys.stderr)
        return r.returncode
    report = next(line.split("report: ", 1)[1].strip() for line in r.stdout.splitlines() if line.startswith("report: "))
    doc = json.loads(Path(report).with_suffix(".json").read_text(encoding="utf-8"))
    checks = {c["check"]: {"status": c["status"], "duration_s": c["duration_s"]}
              for c in doc["checks"]}
    accounted = sum(c["duration_s"] or 0.0 for c in checks.values())
    hw = fingerprint()
    result = {"model_name": args.model_name, "alias": args.alias, "soak_s": args.soak_s,
              "wall_s": wall, "checks": checks, "outside_checks_s": wall - accounted,
              "certified": doc["certified"], "hardware": {"cpu": hw.cpu_model, "cores": hw.cores_logical,
                                                          "isa": [f for f in hw.isa_flags if f.startswith(("avx", "amx"))]}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")
    print("\n| check | verdict | wall s | share |\n|---|---|---|---|")
    for name, c in checks.items():
        print(f"| {name} | {c['status']} | {c['duration_s']:.1f} | {c['duration_s'] / wall:.0%} |")
    print(f"| (Prefect start, MLflow, download, report) | | {wall - accounted:.1f} | {(wall - accounted) / wall:.0%} |")
    print(f"| **total** | {'CERTIFIED' if doc['certified'] else 'NOT CERTIFIED'} | {wall:.1f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
