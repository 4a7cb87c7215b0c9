"""Every optimization route on the reference models, side by side in one run, at 1 and 2 threads.

    .venv/bin/python benchmarks/bench_routes.py [--models minilm,digits-resnet] [--threads 1,2]
                                                [--repeats 2] [--out benchmarks/results/routes.json]

For each zoo model (all-MiniLM-L6-v2 from its Hugging Face checkpoint; the digits ResNet as ONNX)
it builds the intel-cpu profile's candidates for that kind of model with the core functions
(``edgeopt.workflow``, as the flow does), measures every artifact in fresh processes at each thread
count (the repeats interleaved across candidates and thread counts), evaluates each against the FP32
baseline, applies the profile's gates and selects at the profile's own thread count. Per candidate:
what it runs as, the token length it ran at, p50/p95 and speed-up at each thread count, peak and
model RSS, size, fidelity and the verdict.

The issue's target is checked on the same inputs: the selected candidate's p50 against the fastest
*fixed-shape* candidate that keeps the fidelity bar (encoders: mean cosine >= 0.99; CNNs: top-1
agreement >= 0.99), i.e. the best result of a single tool at the given input shape.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FIDELITY_MIN = {"encoder": ("cosine_mean", 0.99), "cnn": ("top1_agreement", 0.99)}


def _with(prof: Any, *, threads: int | None = None, repeats: int | None = None) -> Any:
    update: dict[str, Any] = {}
    if threads is not None:
        update["hardware"] = prof.hardware.model_copy(update={"threads": threads})
    if repeats is not None:
        update["benchmark"] = prof.benchmark.model_copy(update={"repeats": repeats})
    return prof.model_copy(update=update)


def run_model(name: str, *, profile_name: str, threads: list[int], repeats: int, work: Path) -> dict[str, Any]:
    from edgeopt import workflow, zoo
    from edgeopt.errors import CandidateFailed
    from edgeopt.hardware import fingerprint
    from edgeopt.profiles import load_profile
    from edgeopt.records import CandidateOutcome

    zoo_dir = Path(os.environ.get("EDGEOPT_ZOO_DIR", REPO / ".edgeopt" / "zoo"))
    entry = zoo.build(name, out_dir=zoo_dir)
    given = entry.folder / "hf" if (entry.folder / "hf").is_dir() else entry.model
    prof = _with(load_profile(profile_name), repeats=repeats)
    hw = fingerprint()
    source, converted = workflow.prepare_model(str(given), work_dir=work)
    cal, ev = str(entry.calibration), str(entry.evaluation)
    workflow.check_data(converted, calibration=cal, evaluation=ev)
    planned, skipped = workflow.plan(prof, source=source, converted=converted)
    specs = [prof.baseline.spec(baseline=True), *planned]

    built, failed, build_s = {}, {}, {}
    for spec in specs:
        print(f"  build {spec.name}", flush=True)
        t0 = time.perf_counter()
        try:
            built[spec.name] = workflow.build(spec, assessment=workflow.build_input(spec, source=source,
                                                                                     converted=converted),
                                              calibration=cal, work_dir=work)
        except CandidateFailed as exc:
            failed[spec.name] = workflow.failed(spec, stage="build", error=exc)
        build_s[spec.name] = time.perf_counter() - t0

    runs: dict[tuple[str, int], list] = {}
    for r in range(repeats):  # interleaved: every candidate and thread count once per round
        for t in threads:
            prof_t = _with(prof, threads=t)
            for spec in specs:
                if spec.name not in built or spec.name in failed:
                    continue
                try:
                    runs.setdefault((spec.name, t), []).append(workflow.measure(
                        built[spec.name], profile=prof_t, assessment=converted, hardware=hw, evaluation=ev,
                        work_dir=work, lock_path=work / "bench.lock", repeat=r))
                except CandidateFailed as exc:
                    failed[spec.name] = workflow.failed(spec, stage="benchmark", error=exc)
        print(f"  measured round {r + 1}/{repeats}", flush=True)

    gated: dict[int, list] = {}
    base_out = workflow.run_outputs(built["baseline-fp32"], profile=prof, assessment=converted, evaluation=ev,
                                    work_dir=work)
    evaluations = {}
    for spec in specs:
        if spec.name in built and spec.name not in failed:
            outs = workflow.run_outputs(built[spec.name], profile=prof, assessment=converted, evaluation=ev,
                                        work_dir=work)
            evaluations[spec.name] = workflow.evaluate(spec.name, outputs=outs, baseline_outputs=base_out,
                                                       assessment=converted, evaluation=ev,
                                                       max_samples=prof.benchmark.max_eval_samples)
    for t in threads:
        outcomes = [failed[s.name] if s.name in failed else
                    CandidateOutcome(spec=s, artifact=built[s.name], benchmark=workflow.pool(runs[(s.name, t)]),
                                     evaluation=evaluations[s.name]) for s in specs]
        gated[t] = workflow.with_gates(outcomes, profile=prof, kind=converted.kind)
    main_t = prof.hardware.threads if prof.hardware.threads in threads else threads[0]
    selection = workflow.select(gated[main_t], profile=prof)
    return _rows(name, converted.kind, specs, gated, selection, main_t, skipped, build_s)


def _rows(name: str, kind: str, specs: list, gated: dict[int, list], selection: Any, main_t: int,
          skipped: list[str], build_s: dict[str, float]) -> dict[str, Any]:
    from edgeopt import report

    metric, bar = FIDELITY_MIN.get(kind, ("top1_agreement", 0.99))
    by_t = {t: {o.name: o for o in outs} for t, outs in gated.items()}
    rows = []
    for spec in specs:
        o = by_t[main_t][spec.name]
        row: dict[str, Any] = {"candidate": spec.name, "backend": spec.backend, "sequence": spec.sequence,
                               "build_s": round(build_s.get(spec.name, 0.0), 1)}
        if o.failure:
            row.update(status=f"failed ({o.failure.reason})", message=o.failure.message)
            rows.append(row)
            continue
        b, e = o.benchmark, o.evaluation
        row.update(runs_as=o.artifact.precision, tokens=report.rows([o])[0]["tokens"],
                   rss_peak_mb=b.rss_peak_mb, rss_model_mb=b.rss_model_mb, size_mb=b.size_bytes / 1e6,
                   cosine_mean=e.cosine_mean, cosine_min=e.cosine_min, top1_agreement=e.top1_agreement,
                   accuracy=e.value if e.metric == "top1_accuracy" else None,
                   fidelity_ok=getattr(e, metric) >= bar, verdict=report.verdict(o, selection))
        for t, outs in by_t.items():
            ot = outs[spec.name]
            row[f"p50_ms_t{t}"] = ot.benchmark.latency_ms_p50
            row[f"p95_ms_t{t}"] = ot.benchmark.latency_ms_p95
            row[f"spread_pct_t{t}"] = ot.benchmark.latency_p50_spread_pct
            row[f"speedup_p50_t{t}"] = 1.0 if spec.baseline else ot.speedup_p50
        rows.append(row)
    ok = [r for r in rows if "status" not in r]
    fixed = [r for r in ok if r["sequence"] == "fixed" and r["fidelity_ok"] and r["candidate"] != "baseline-fp32"]
    best_fixed = min(fixed, key=lambda r: r[f"p50_ms_t{main_t}"]) if fixed else None
    chosen = next((r for r in ok if r["candidate"] == selection.selected), None)
    ratio = (best_fixed[f"p50_ms_t{main_t}"] / chosen[f"p50_ms_t{main_t}"]) if (best_fixed and chosen) else None
    return {"model": name, "kind": kind, "threads_selected_at": main_t, "selected": selection.selected,
            "selection_message": selection.message, "fidelity_bar": f"{metric} >= {bar}",
            "best_fixed_shape": best_fixed and best_fixed["candidate"],
            "selected_vs_best_fixed_p50": ratio, "skipped": skipped, "rows": rows}


def _print(result: dict[str, Any], threads: list[int]) -> None:
    print(f"\n### {result['model']} ({result['kind']}); selected at {result['threads_selected_at']} thread(s): "
          f"{result['selected']}\n")
    head = ["candidate", "runs as", "tokens"]
    for t in threads:
        head += [f"p50 ms ({t}t)", f"p95 ms ({t}t)", f"speed-up p50 ({t}t)"]
    head += ["peak RSS MB", "model RSS MB", "size MB", "fidelity", "verdict"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in result["rows"]:
        if "status" in r:
            print(f"| {r['candidate']} | {r['status']} |" + " |" * (len(head) - 2))
            continue
        cells = [r["candidate"], r["runs_as"], r["tokens"]]
        for t in threads:
            cells += [f"{r[f'p50_ms_t{t}']:.2f}", f"{r[f'p95_ms_t{t}']:.2f}", f"{r[f'speedup_p50_t{t}']:.2f}x"]
        fid = (f"acc {r['accuracy']:.4f}, " if r["accuracy"] is not None else "") + \
            f"cos {r['cosine_mean']:.4f} (min {r['cosine_min']:.4f}), agree {r['top1_agreement']:.3f}"
        cells += [f"{r['rss_peak_mb']:.0f}", f"{r['rss_model_mb']:.0f}", f"{r['size_mb']:.1f}", fid, r["verdict"]]
        print("| " + " | ".join(cells) + " |")
    if result["selected_vs_best_fixed_p50"]:
        print(f"\nselected {result['selected']} vs the fastest fixed-shape candidate keeping {result['fidelity_bar']} "
              f"({result['best_fixed_shape']}): {result['selected_vs_best_fixed_p50']:.2f}x at p50")
    print(result["selection_message"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,digits-resnet")
    ap.add_argument("--profile", default="intel-cpu")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "routes.json"))
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    from flows._env import configure_embedded_defaults

    configure_embedded_defaults(quiet=True)
    from edgeopt.hardware import fingerprint

    work = Path(tempfile.mkdtemp(prefix="edgeopt-routes-"))
    results, t0 = [], time.perf_counter()
    for name in args.models.split(","):
        print(f"{name} on {args.profile}, threads {threads}, {args.repeats} interleaved repeats ...", flush=True)
        results.append(run_model(name, profile_name=args.profile, threads=threads, repeats=args.repeats,
                                 work=work / name))
    report = {"profile": args.profile, "threads": threads, "repeats": args.repeats,
              "command": "benchmarks/bench_routes.py " + " ".join(sys.argv[1:]),
              "wall_s": round(time.perf_counter() - t0, 1),
              "hardware": fingerprint().model_dump(mode="json"), "models": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    for r in results:
        _print(r, threads)
    print(f"\nwall time {report['wall_s']} s; written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
