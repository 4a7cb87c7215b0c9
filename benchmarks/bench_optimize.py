"""Performance report for the optimize workflow, measured side by side in one run.

    .venv/bin/python benchmarks/bench_optimize.py [--profile intel-cpu] [--out benchmarks/results/latest.json]

On the reference CNN (digits-resnet) and the profile, it reports:
  * every candidate's p50 / p95 speed-up against the FP32 ORT baseline (direct run and flow run);
  * orchestration overhead: the flow's wall time / the wall time of calling the same core
    functions (edgeopt.workflow) directly, both starting with nothing cached (target <= 1.10);
  * repeatability: the baseline and the selected candidate measured twice, p50 difference in %
    (target <= 5%);
  * a cached re-run with nothing changed: its wall time / the first flow run's (target <= 0.2).
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


def _direct(model: str, cal: str, ev: str, profile_name: str, work: Path) -> tuple[float, list, object]:
    """The same phases as the flow, called directly and sequentially."""
    from edgeopt import intake, workflow
    from edgeopt.errors import CandidateFailed
    from edgeopt.hardware import fingerprint
    from edgeopt.profiles import load_profile
    from edgeopt.records import CandidateOutcome

    t0 = time.perf_counter()
    prof = load_profile(profile_name)
    a = intake.assess(model)
    hw = fingerprint()
    workflow.check_data(a, calibration=cal, evaluation=ev)
    planned, _ = workflow.plan(prof, source=a, converted=a)
    specs = [prof.baseline.spec(baseline=True), *planned]
    built, failed = {}, {}
    for spec in specs:
        try:
            built[spec.name] = workflow.build(spec, assessment=a, calibration=cal, work_dir=work)
        except CandidateFailed as exc:
            failed[spec.name] = workflow.failed(spec, stage="build", error=exc)
    runs: dict[str, list] = {}
    for r in range(prof.benchmark.repeats):  # interleaved, as the flow does
        for spec in specs:
            if spec.name in built and spec.name not in failed:
                try:
                    runs.setdefault(spec.name, []).append(workflow.measure(
                        built[spec.name], profile=prof, assessment=a, hardware=hw, evaluation=ev, work_dir=work,
                        lock_path=work / "bench.lock", repeat=r))
                except CandidateFailed as exc:
                    failed[spec.name] = workflow.failed(spec, stage="benchmark", error=exc)
    outcomes, base_out = [], None
    for spec in specs:
        if spec.name in failed:
            outcomes.append(failed[spec.name])
            continue
        art = built[spec.name]
        outs = workflow.run_outputs(art, profile=prof, assessment=a, evaluation=ev, work_dir=work)
        base_out = base_out or outs
        e = workflow.evaluate(spec.name, outputs=outs, baseline_outputs=base_out, assessment=a, evaluation=ev,
                              max_samples=prof.benchmark.max_eval_samples)
        outcomes.append(CandidateOutcome(spec=spec, artifact=art, benchmark=workflow.pool(runs[spec.name]),
                                         evaluation=e))
    outcomes = workflow.with_gates(outcomes, profile=prof, kind=a.kind)
    selection = workflow.select(outcomes, profile=prof)
    return time.perf_counter() - t0, outcomes, selection


def _pct(a: float, b: float) -> float:
    return abs(a - b) / min(a, b) * 100


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="intel-cpu")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "latest.json"))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="edgeopt-bench-"))
    os.environ["EDGEOPT_HOME"] = str(tmp / "home")
    os.environ["PREFECT_HOME"] = str(tmp / "prefect")
    from flows._env import configure_embedded_defaults

    configure_embedded_defaults(quiet=True)
    from edgeopt import zoo

    zoo_dir = Path(os.environ.get("EDGEOPT_ZOO_DIR", REPO / ".edgeopt" / "zoo"))
    entry = zoo.build("digits-resnet", out_dir=zoo_dir)
    model, cal, ev = str(entry.model), str(entry.calibration), str(entry.evaluation)

    print(f"direct core calls on {entry.name} / {args.profile} ...", flush=True)
    t_direct, direct, direct_sel = _direct(model, cal, ev, args.profile, tmp / "direct-work")

    from prefect import flow

    from flows.optimize import optimize_flow

    @flow
    def warm_up() -> None:  # start the embedded API outside the timed region
        return None

    t0 = time.perf_counter()
    warm_up()
    from tasks.tracking import client

    client(str(tmp / "flow")).search_experiments()  # create the MLflow store (a nightly run finds it made)
    t_server = time.perf_counter() - t0
    print("flow run (nothing cached) ...", flush=True)
    t0 = time.perf_counter()
    first = optimize_flow(model=model, profile=args.profile, calibration=cal, evaluation=ev, data_dir=str(tmp / "flow"))
    t_flow = time.perf_counter() - t0
    print("flow re-run (nothing changed) ...", flush=True)
    t0 = time.perf_counter()
    second = optimize_flow(model=model, profile=args.profile, calibration=cal, evaluation=ev, data_dir=str(tmp / "flow"))
    t_cached = time.perf_counter() - t0

    d = {o.name: o for o in direct}
    f = {o.name: o for o in first.outcomes}
    rows = []
    for name, o in f.items():
        if not o.ok or not d.get(name) or not d[name].ok:
            rows.append({"candidate": name, "status": "failed"})
            continue
        db, fb = d[name].benchmark, o.benchmark
        bd, bf = d["baseline-fp32"].benchmark, f["baseline-fp32"].benchmark
        rows.append({
            "candidate": name + (" (selected)" if name == first.selection.selected else ""),
            "p50_ms_direct": db.latency_ms_p50, "p50_ms_flow": fb.latency_ms_p50,
            "speedup_p50_direct": bd.latency_ms_p50 / db.latency_ms_p50,
            "speedup_p95_direct": bd.latency_ms_p95 / db.latency_ms_p95,
            "speedup_p50_flow": bf.latency_ms_p50 / fb.latency_ms_p50,
            "speedup_p95_flow": bf.latency_ms_p95 / fb.latency_ms_p95,
            "p50_diff_pct_direct_vs_flow": _pct(db.latency_ms_p50, fb.latency_ms_p50),
            "samples": fb.samples,
        })
    repeat = {n: _pct(d[n].benchmark.latency_ms_p50, f[n].benchmark.latency_ms_p50)
              for n in {"baseline-fp32", first.selection.selected or "baseline-fp32"} if d[n].ok and f[n].ok}
    report = {
        "model": entry.name, "profile": args.profile,
        "hardware": first.outcomes[0].benchmark.hardware.model_dump(mode="json"),
        "selected_flow": first.selection.selected, "selected_direct": direct_sel.selected,
        "wall_s": {"direct": t_direct, "flow": t_flow, "flow_cached": t_cached, "embedded_server_start": t_server},
        "orchestration_overhead": t_flow / t_direct,
        "cached_rerun_fraction": t_cached / t_flow,
        "repeatability_p50_diff_pct": repeat,
        "cached_candidates": list(second.cached),
        "candidates": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2), encoding="utf-8")

    print(f"\n{entry.name} on {args.profile} ({report['hardware']['cpu_model']}, batch 1)\n")
    print("| candidate | p50 ms | speed-up p50 | speed-up p95 | speed-up p50 (flow) | speed-up p95 (flow) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r.get("status") == "failed":
            print(f"| {r['candidate']} | failed | | | | |")
            continue
        print(f"| {r['candidate']} | {r['p50_ms_direct']:.3f} | {r['speedup_p50_direct']:.2f}x | "
              f"{r['speedup_p95_direct']:.2f}x | {r['speedup_p50_flow']:.2f}x | {r['speedup_p95_flow']:.2f}x |")
    print(f"\norchestration overhead: flow {t_flow:.1f} s / direct {t_direct:.1f} s = "
          f"{report['orchestration_overhead']:.3f} (target <= 1.10; embedded API start and MLflow store creation, {t_server:.1f} s, excluded)")
    print(f"cached re-run: {t_cached:.1f} s / {t_flow:.1f} s = {report['cached_rerun_fraction']:.3f} (target <= 0.2); "
          f"{len(second.cached)} of {len(second.outcomes)} candidates reused")
    for n, pct in repeat.items():
        print(f"repeatability: {n} p50 measured twice (direct, flow) differs by {pct:.1f}% (target <= 5%)")
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
