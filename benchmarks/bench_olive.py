"""Olive's candidates beside edgeopt's own, through edgeopt, on the reference CNN and on MiniLM (one run).

    .venv/bin/python benchmarks/bench_olive.py [--models digits-resnet minilm] [--out benchmarks/results/olive.json]

For each model (built by ``edgeopt zoo build``), with nothing cached:
  * ``edgeopt optimize`` (the CLI, its own EDGEOPT_HOME) builds, measures, evaluates and gates the
    candidates in one table;
  * every candidate is then built again alone, timed (wall time to produce it; an Olive run's includes
    Olive's process start-up, also measured on its own: a fresh ``import olive.workflows``);
  * reported per candidate: p50 speed-up against the FP32 baseline (with its interval), accuracy or
    fidelity, gate status, build wall time; then Olive's best output beside edgeopt's selection.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: the candidates compared (intel-cpu profile names): edgeopt's strongest of each toolchain, and Olive's
CANDIDATES = {
    "digits-resnet": ["ort-int8-dynamic", "ort-int8-static-minmax", "ov-int8", "olive-int8-static"],
    "minilm": ["ort-bert-int8-dynamic", "ort-int8-static-matmul", "ov-int8", "olive-bert"],
}
DATA = {"digits-resnet": ("model.onnx", "calibration.npz", "eval.npz"),
        "minilm": ("hf", "calibration.txt", "eval.txt")}


def _olive_startup_s() -> float:
    """Wall time of a fresh Python process that imports Olive's workflow API (what every run pays first)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import olive.workflows"], check=True, capture_output=True)
    return time.perf_counter() - t0


def _build_times(model: str, cal: str, names: list[str], work: Path) -> dict[str, float]:
    """Wall time to build each candidate, one at a time with nothing cached (the flow builds two at a time,
    so its own build phase says less about each)."""
    from edgeopt import workflow
    from edgeopt.errors import CandidateFailed
    from edgeopt.hardware import fingerprint
    from edgeopt.profiles import load_profile

    prof = load_profile("intel-cpu")
    source, converted = workflow.prepare_model(model, work_dir=work)
    cal = workflow.prepare_data(cal, assessment=converted, seq_len=prof.benchmark.seq_len, work_dir=work,
                                role="calibration")
    hw = fingerprint()
    specs, _ = workflow.plan(prof, only=tuple(names), source=source, converted=converted)
    times = {}
    for spec in specs:
        t0 = time.perf_counter()
        try:
            workflow.build(spec, assessment=workflow.build_input(spec, source=source, converted=converted),
                           calibration=cal, work_dir=work, hardware=hw)
        except CandidateFailed as exc:
            print(f"  {spec.name}: build failed ({exc.reason})", flush=True)
        times[spec.name] = time.perf_counter() - t0
    return times


def _row(o: dict, build_s: dict[str, float]) -> dict:
    speed = next((v for v in o["verdicts"] if v["gate"] == "speedup"), None)
    ev, bench, fail = o["evaluation"], o["benchmark"], o["failure"]
    failed_gates = [v["gate"] for v in o["verdicts"] if v["status"] != "pass"]
    name = o["spec"]["name"]
    return {
        "candidate": name, "backend": o["spec"]["backend"], "ok": fail is None,
        "status": "baseline" if o["spec"]["baseline"] else (f"failed ({fail['reason']})" if fail else
                                                            "passed" if not failed_gates else
                                                            "not passed: " + ", ".join(failed_gates)),
        "p50_ms": bench["latency_ms_p50"] if bench else None,
        "speedup_p50": speed["measured"] if speed else None,
        "speedup_ci": [speed["ci_low"], speed["ci_high"]] if speed and speed["ci_low"] is not None else None,
        "metric": ev["metric"] if ev else None, "value": ev["value"] if ev else None,
        "build_s": round(build_s[name], 1) if name in build_s else None,
    }


def _relative(arg: str) -> str:
    """A path under the repository as the user writes it from its root; other arguments unchanged."""
    try:
        return str(Path(arg).relative_to(REPO))
    except ValueError:
        return arg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(CANDIDATES))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "olive.json"))
    args = ap.parse_args()
    from edgeopt.hardware import fingerprint

    out = Path(args.out)  # a run for some models updates their entries in an existing file
    results = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {"models": {}}
    results.update(command=" ".join([".venv/bin/python benchmarks/bench_olive.py", *sys.argv[1:]]),
                   hardware=fingerprint().model_dump(mode="json"), olive_startup_s=round(_olive_startup_s(), 1))
    print(f"olive start-up (fresh import of olive.workflows): {results['olive_startup_s']} s", flush=True)
    edgeopt = str(Path(sys.executable).parent / "edgeopt")
    for name in args.models:
        zoo = REPO / ".edgeopt" / "zoo" / name
        model, cal, ev = (str(zoo / f) for f in DATA[name])
        home = Path(tempfile.mkdtemp(prefix=f"bench-olive-{name}-"))
        command = [edgeopt, "optimize", model, "--profile", "intel-cpu", "--calibration", cal, "--eval", ev,
                   *[a for c in CANDIDATES[name] for a in ("-c", c)], "--json", str(home / "report.json")]
        print(f"{name}: EDGEOPT_HOME={home} {' '.join(command)}", flush=True)
        env = {**os.environ, "EDGEOPT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        t0 = time.perf_counter()
        subprocess.run(command, env=env, check=True)  # the table goes to this process's output
        flow_s = time.perf_counter() - t0
        print(f"{name}: timing each build alone, nothing cached", flush=True)
        build_s = _build_times(model, cal, CANDIDATES[name], home / "builds-alone")
        report = json.loads((home / "report.json").read_text(encoding="utf-8"))
        rows = [_row(o, build_s) for o in report["outcomes"]]
        olive = [r for r in rows if r["backend"] == "olive" and r["ok"]]
        best_olive = max(olive, key=lambda r: (r["status"] == "passed", r["speedup_p50"] or 0), default=None)
        shown = ["edgeopt", *(_relative(a) for a in command[1:-1]), "report.json"]  # no machine paths kept
        results["models"][name] = {"command": " ".join(shown), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                         time.gmtime()), "rows": rows,
                                   "selected": report["selection"]["selected"],
                                   "olive_best": best_olive["candidate"] if best_olive else None,
                                   "flow_wall_s": round(flow_s, 1)}
        for r in rows:
            print(f"  {r['candidate']:<24} {r['status']:<34} p50 {r['p50_ms'] or 0:8.3f} ms  speed-up "
                  f"{r['speedup_p50'] or 0:5.2f}  {r['metric']}={r['value']}  build {r['build_s']} s", flush=True)
        print(f"  edgeopt selects: {results['models'][name]['selected']}; "
              f"Olive's best: {results['models'][name]['olive_best']}", flush=True)
        out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
