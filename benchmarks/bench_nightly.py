"""The nightly flow's cost when nothing changed, against a full night, measured in one run.

    .venv/bin/python benchmarks/bench_nightly.py [--profile intel-cpu] [--soak-s 10]
                                                [--out benchmarks/results/nightly.json]

On the reference CNN (a fresh data folder, nothing cached): night 1 runs in full (optimize every
candidate, certify the winner, make it champion); night 2 with nothing changed must record
"unchanged" in at most 5% of night 1's wall time (issue: "Nightly with nothing changed: ≤ 5% of a
full run's wall time"). Both nights run in this one process, so the embedded Prefect API's start
is paid before night 1 and counted in neither.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="intel-cpu")
    ap.add_argument("--soak-s", type=float, default=10.0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "nightly.json"))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="edgeopt-nightly-"))
    os.environ["EDGEOPT_HOME"] = str(tmp / "home")
    os.environ["PREFECT_HOME"] = str(tmp / "prefect")
    from flows._env import configure_embedded_defaults, ensure_prefect_api

    configure_embedded_defaults(quiet=True)
    ensure_prefect_api()
    from edgeopt import zoo
    from flows.nightly import nightly_flow

    entry = zoo.build("digits-resnet", out_dir=Path(os.environ.get("EDGEOPT_ZOO_DIR", REPO / ".edgeopt" / "zoo")))
    kw = {"model": str(entry.model), "profile": args.profile, "calibration": str(entry.calibration),
          "evaluation": str(entry.evaluation), "data_dir": str(tmp / "data"), "soak_s": args.soak_s}
    nights = []
    for night in (1, 2):
        print(f"night {night} ...", flush=True)
        t0 = time.perf_counter()
        rep = nightly_flow(**kw)
        wall = time.perf_counter() - t0
        nights.append({"night": night, "wall_s": wall, "result": rep.result, "reason": rep.reason})
        print(f"night {night}: {wall:.1f} s, {rep.result}: {rep.reason}", flush=True)
    ratio = nights[1]["wall_s"] / nights[0]["wall_s"]
    print(f"\nunchanged night / full night: {nights[1]['wall_s']:.1f} s / {nights[0]['wall_s']:.1f} s = "
          f"{ratio:.3f} (target <= 0.05)")
    out = {"nights": nights, "unchanged_over_full": ratio, "profile": args.profile, "soak_s": args.soak_s}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1), encoding="utf-8")
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
