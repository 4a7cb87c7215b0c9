"""Measurement integrity, recorded in one run through the optimize flow itself.

    .venv/bin/python benchmarks/bench_integrity.py [--models digits-resnet,minilm] [--runs 3]
                                                   [--out benchmarks/results/integrity.json]

For each reference model on the intel-cpu profile (nothing cached, a fresh data folder):
  * every candidate's speed-up against its like-for-like baseline (the ``vs`` column: same inputs,
    sequence shapes and threads, measured interleaved with it), with its 95% interval and verdict;
  * steady-state and peak model memory beside the figure edgeopt gated on before (``old``: peak
    RSS minus the RSS after loading the data, which counted load-time transients and the runtime's
    own libraries), medians over the rounds;
and for the first model, ``--runs`` consecutive runs of the demo, each re-measured from scratch
(``refresh``), with every candidate's verdict per run: they must all be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _old_figures(work: Path) -> dict[str, float]:
    """Median over rounds of the worker's ``rss_model_mb_v1`` per candidate (from each round's result.json)."""
    found: dict[str, list[float]] = {}
    for result in (work / "bench").glob("*/result.json"):
        job = json.loads((result.parent / "job.json").read_text())
        payload = json.loads(result.read_text())
        if payload.get("ok") and "rss_model_mb_v1" in payload:
            found.setdefault(job["artifact"]["candidate"], []).append(float(payload["rss_model_mb_v1"]))
    return {k: statistics.median(v) for k, v in found.items()}


def _rows(report, old: dict[str, float]) -> list[dict]:
    from edgeopt import report as rep

    rows = []
    for o, r in zip(report.outcomes, rep.rows(report.outcomes, report.selection), strict=True):
        b = o.benchmark
        speed = next((v for v in o.verdicts if v.gate == "speedup"), None)
        rows.append({
            "candidate": o.name, "vs": o.baseline, "tokens": r["tokens"], "runs_as": r["runs as"],
            "p50_ms": b.latency_ms_p50 if b else None, "repeats": b.repeats if b else None,
            "speedup_p50": o.speedup_p50, "speedup_ci": [speed.ci_low, speed.ci_high] if speed else None,
            "run_to_run_sd": speed.run_to_run_sd if speed else None,
            "memory_reduction": o.memory_reduction,
            "steady_mb": b.rss_steady_mb if b else None, "peak_model_mb": b.rss_peak_model_mb if b else None,
            "old_model_mb": old.get(o.name), "memory_source": b.memory_source if b else None,
            "accuracy": r["accuracy"], "verdict": rep.verdict(o, report.selection),
            "failure": o.failure.message if o.failure else None,
        })
    return rows


def _print(name: str, rows: list[dict], selected: str | None) -> None:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    print(f"\n{name}: selected {selected}\n")
    print("| candidate | vs | tokens | p50 ms | speed-up p50 [95% CI] | steady MB | peak MB | old MB | accuracy | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ci = r["speedup_ci"]
        speed = "1.00x" if r["vs"] is None and r["p50_ms"] else (
            f"{f(r['speedup_p50'], '.2f')}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and ci[0] is not None else ""))
        print(f"| {r['candidate']} | {r['vs'] or ''} | {r['tokens']} | {f(r['p50_ms'], '.3f')} | {speed} | "
              f"{f(r['steady_mb'], '.1f')} | {f(r['peak_model_mb'], '.1f')} | {f(r['old_model_mb'], '.1f')} | "
              f"{r['accuracy']} | {r['verdict']} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits-resnet,minilm")
    ap.add_argument("--runs", type=int, default=3, help="consecutive re-measured runs of the first model")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "integrity.json"))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="edgeopt-integrity-"))
    os.environ["EDGEOPT_HOME"] = str(tmp / "home")
    os.environ["PREFECT_HOME"] = str(tmp / "prefect")
    from flows._env import configure_embedded_defaults

    configure_embedded_defaults(quiet=True)
    from edgeopt import zoo
    from flows.optimize import optimize_flow

    zoo_dir = Path(os.environ.get("EDGEOPT_ZOO_DIR", REPO / ".edgeopt" / "zoo"))
    out: dict = {"models": {}}
    for i, model_name in enumerate(args.models.split(",")):
        entry = zoo.build(model_name, out_dir=zoo_dir)
        data = tmp / model_name
        if model_name == "minilm":  # from its checkpoint, with sentences (as the README runs it)
            model, cal, ev = entry.folder / "hf", entry.folder / "calibration.txt", entry.folder / "eval.txt"
        else:
            model, cal, ev = entry.model, entry.calibration, entry.evaluation
        kw = {"model": str(model), "profile": "intel-cpu", "calibration": str(cal), "evaluation": str(ev),
              "data_dir": str(data)}
        runs, verdicts = [], []
        for run in range(args.runs if i == 0 else 1):
            print(f"{model_name}: run {run + 1} ...", flush=True)
            t0 = time.perf_counter()
            report = optimize_flow(**kw, refresh=True)
            wall = time.perf_counter() - t0
            rows = _rows(report, _old_figures(data / "work"))
            runs.append({"wall_s": wall, "selected": report.selection.selected, "rows": rows})
            verdicts.append({r["candidate"]: r["verdict"] for r in rows})
            if run == 0:
                _print(model_name, rows, report.selection.selected)
                hw = report.outcomes[0].benchmark.hardware
                out["hardware"] = {"cpu": hw.cpu_model, "isa": list(hw.isa_flags), "cores": hw.cores_logical}
        same = all(v == verdicts[0] for v in verdicts)
        out["models"][model_name] = {"runs": runs, "verdicts_identical": same}
        if len(verdicts) > 1:
            print(f"\n{model_name}: verdicts of {len(verdicts)} consecutive re-measured runs "
                  f"({'identical' if same else 'DIFFERENT'}):")
            for name in verdicts[0]:
                print(f"  {name}: " + " | ".join(v.get(name, "-") for v in verdicts))
            print("  selected: " + " | ".join(str(r["selected"]) for r in runs))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str), encoding="utf-8")
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
