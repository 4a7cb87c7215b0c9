"""The optimize flow's work without Prefect: the direct side of ``bench_orchestration.py`` (issue 12).

    .venv/bin/python benchmarks/orchestration_direct.py --model M --profile P --calibration C --evaluation E
                                                        --data-dir D --model-name N --out result.json

What a user's script does that calls the core (``edgeopt.workflow``) and the MLflow functions the flow's
tasks wrap (``tasks.tracking``'s ``.fn``), in the flow's order, on an ONNX model: intake and data
preparation, input shapes, plan, an MLflow parent run, the builds (two at a time, as the flow's task
runner does), the comparison groups measured in interleaved rounds (odd rounds reversed), outputs, audit,
evaluation, the host's spread and earlier speed-ups, gates, the speed-ups recorded, selection, one MLflow
child run per outcome (two at a time, as the flow submits them), the report, the selection recorded,
registration, the parent run ended. No extra measuring rounds (run it with a profile whose
``benchmark.extra_repeats`` is 0). Not done: Prefect's own artifacts (report, Pareto table and chart, link),
its run logger and the host's benchmark slot on the server, which only exist with Prefect.

It runs as its own process (imports included) against ``$MLFLOW_TRACKING_URI``; it imports Prefect only
because ``tasks.tracking`` defines tasks, and times that import first so the caller can leave it out.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()
from prefect import task  # noqa: F401  (first, timed: the caller subtracts it from this process's wall time)
from prefect.cache_policies import NONE  # noqa: F401  (what tasks.tracking imports from Prefect)

T_PREFECT = time.perf_counter() - T0

import argparse
import json
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run(*, model: str, profile: str, calibration: str, evaluation: str, data_dir: str, model_name: str) -> dict:
    from edgeopt import report, workflow
    from edgeopt.comparison import comparison_groups
    from edgeopt.errors import CandidateFailed
    from edgeopt.hardware import fingerprint
    from edgeopt.profiles import host_mismatches, load_profile
    from edgeopt.records import CandidateOutcome
    from tasks import tracking

    spans: dict[str, list[float]] = {}  # phase -> [start, end], seconds from this process's start

    def mark(phase: str) -> None:  # the phase starts now; the one before ends
        now = time.perf_counter() - T0
        if spans:
            spans[next(reversed(spans))].append(now)
        spans[phase] = [now]

    mark("prepare")
    base = Path(data_dir).resolve()
    work = base / "work"
    prof = load_profile(profile)
    source, assessment = workflow.prepare_model(str(Path(model).resolve()), work_dir=work)
    seq = prof.benchmark.seq_len
    cal = workflow.prepare_data(calibration, assessment=assessment, seq_len=seq, work_dir=work, role="calibration")
    ev = workflow.prepare_data(evaluation, assessment=assessment, seq_len=seq, work_dir=work, role="evaluation")
    shaped = workflow.resolve_input_shapes(assessment, shapes=[], profile=prof, evaluation=ev, seq_len=seq)
    source, assessment = (shaped if source.model.format == "onnx" else source), shaped
    if workflow.extra_shape_settings(assessment, shapes=[], profile=prof, evaluation=ev, seq_len=seq):
        raise SystemExit("extra shape settings are not mirrored here")
    hw = fingerprint()
    if host_mismatches(prof, hw):
        raise SystemExit(f"profile {prof.name} does not fit this machine")
    workflow.check_data(assessment, calibration=cal, evaluation=ev)
    planned, _skipped = workflow.plan(prof, source=source, converted=assessment)
    specs = [prof.baseline.spec(baseline=True), *planned]
    inputs = {s.name: workflow.build_input(s, source=source, converted=assessment) for s in specs}
    mark("mlflow-start")
    exp_id, run_id = tracking.start_parent_run.fn(
        data_dir=str(base), experiment=f"edgeopt/{model_name}", run_name=f"optimize-{prof.name}", assessment=source,
        profile_name=prof.name, profile_doc=prof.model_dump(mode="json"), hardware=hw,
        tags={"prefect.flow_run_id": ""}, input_shapes=assessment.input_shapes)

    def build(s):
        try:
            art = workflow.build(s, assessment=inputs[s.name], calibration=cal, work_dir=work, hardware=hw)
            return workflow.with_input_shapes(art, shapes=assessment.input_shapes)
        except CandidateFailed as exc:
            return workflow.failed(s, stage="build", error=exc)

    mark("build")
    with ThreadPoolExecutor(max_workers=2) as pool:  # the flow's ThreadPoolTaskRunner(max_workers=2)
        built = dict(zip([s.name for s in specs], pool.map(build, specs), strict=True))
    base_spec = specs[0]
    ready = {s.name: (s, built[s.name]) for s in planned if not isinstance(built[s.name], CandidateOutcome)}
    groups = comparison_groups(base_spec, built[base_spec.name], ready, threads=prof.hardware.threads)
    all_specs = {g.baseline.name: g.baseline for g in groups} | {s.name: s for s in planned}
    artifacts = {g.baseline.name: g.artifact for g in groups} | {n: a for n, (_, a) in ready.items()}

    mark("benchmark")
    results: dict[str, list] = {}
    failures: dict[str, CandidateOutcome] = {}
    for r in range(prof.benchmark.repeats):  # flows/_measuring.py: interleaved, odd rounds reversed
        order = [(g, n) for g in groups for n in g.names]
        for g, name in (reversed(order) if r % 2 else order):
            if name in failures:
                continue
            try:
                results.setdefault(name, []).append(workflow.measure(
                    artifacts[name], profile=prof, assessment=assessment, hardware=hw, evaluation=ev, work_dir=work,
                    group=g.digest, lock_path=work / "bench.lock", repeat=r))
            except CandidateFailed as exc:
                failures[name] = workflow.failed(all_specs[name], stage="benchmark", error=exc, artifact=artifacts[name])
    reference = groups[0].baseline.name
    names = [g.baseline.name for g in groups] + sorted((n for g in groups for n in g.members),
                                                       key=[s.name for s in specs].index)
    mark("outputs and evaluation")
    refs = {n: g.baseline.name for g in groups if g.setting.shape for n in g.names}
    outcomes, baseline_outputs = [], {}
    for name in names:  # flows/optimize.py's _outputs_and_eval
        spec, art = all_specs[name], artifacts[name]
        if name in failures:
            outcomes.append(failures[name])
            continue
        outcome = CandidateOutcome(spec=spec, artifact=art, benchmark=workflow.pool(results[name]))
        try:
            outputs = workflow.run_outputs(art, profile=prof, assessment=assessment, evaluation=ev, work_dir=work,
                                           hardware=hw)
        except CandidateFailed as exc:
            outcomes.append(workflow.failed(spec, stage="evaluate", error=exc, artifact=art))
            continue
        if spec.baseline:
            baseline_outputs[name] = outputs
        outcome = workflow.audit(outcome, outputs=outputs)
        if outcome.ok:
            try:
                e = workflow.evaluate(name, outputs=outputs, baseline_outputs=baseline_outputs.get(refs.get(name, reference)),
                                      assessment=assessment, evaluation=ev, max_samples=prof.benchmark.max_eval_samples)
                outcome = outcome.model_copy(update={"evaluation": e})
            except CandidateFailed as exc:
                outcome = workflow.failed(spec, stage="evaluate", error=exc, artifact=art)
        outcomes.append(outcome)
    mark("gates and selection")
    baselines = {n: g.baseline.name for g in groups for n in g.members}
    spread = workflow.host_spread(profile=prof, hardware=hw, data_dir=base)
    run = str(uuid.uuid4())
    earlier = workflow.earlier_speedups(outcomes, artifacts=artifacts, run=run, profile=prof, kind=assessment.kind,
                                        baselines=baselines, evaluation=ev, hardware=hw, data_dir=base)
    outcomes = workflow.with_gates(outcomes, profile=prof, kind=assessment.kind, baselines=baselines,
                                   run_to_run_sd=spread.sd_log, earlier=earlier)
    workflow.record_speedups(outcomes, artifacts=artifacts, fresh=set(results), run=run, profile=prof,
                             kind=assessment.kind, evaluation=ev, hardware=hw, data_dir=base)
    failed_builds = [built[s.name] for s in planned if isinstance(built[s.name], CandidateOutcome)]
    order = {n: i for i, n in enumerate([g.baseline.name for g in groups] + [s.name for s in planned])}
    outcomes = sorted([*outcomes, *failed_builds], key=lambda o: order[o.name])
    selection = workflow.select(outcomes, profile=prof)

    # flows/_recording.py's log_outcomes and the end of optimize_flow
    def log(o):
        return tracking.log_candidate.fn(data_dir=str(base), experiment_id=exp_id, parent_run_id=run_id, outcome=o,
                                         cached=False)

    mark("mlflow child runs")
    with ThreadPoolExecutor(max_workers=2) as pool:
        child_ids = dict(zip([o.name for o in outcomes], pool.map(log, outcomes), strict=True))
    mark("report, mlflow selection, registration, end")
    url = tracking.run_url(experiment_id=exp_id, run_id=run_id, data_dir=str(base))
    chosen = next((o for o in outcomes if o.name == selection.selected), None)
    links = {"MLflow run": url} | ({"Registered model": f"{model_name}, alias '{tracking.CANDIDATE_ALIAS}'"}
                                   if chosen else {})
    md = report.markdown(outcomes, selection, title=f"edgeopt optimize: {model_name} on {prof.name}", links=links)
    tracking.record_selection.fn(data_dir=str(base), run_id=run_id, selection=selection, report_md=md,
                                 outcomes=outcomes)
    version = None
    if chosen is not None:
        version = tracking.register_selected.fn(data_dir=str(base), model_name=model_name,
                                                run_id=child_ids[chosen.name], outcome=chosen, selection=selection,
                                                assessment=assessment)
    tracking.end_parent_run.fn(data_dir=str(base), run_id=run_id, status="FINISHED")
    mark("done")
    spans.pop("done")
    return {"outcomes": [o.name for o in outcomes], "failed": sorted(o.name for o in outcomes if not o.ok),
            "rounds": {n: len(v) for n, v in results.items()}, "selected": selection.selected,
            "registered_version": version, "experiment_id": exp_id, "mlflow_run_id": run_id,
            "mlflow_child_runs": len(child_ids), "phases_s": {k: v[1] - v[0] for k, v in spans.items()},
            "phase_starts_s": {k: v[0] for k, v in spans.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("model", "profile", "calibration", "evaluation", "data-dir", "model-name", "out"):
        ap.add_argument(f"--{name}", required=True)
    args = ap.parse_args()
    t_imports = time.perf_counter() - T0
    out = run(model=args.model, profile=args.profile, calibration=args.calibration, evaluation=args.evaluation,
              data_dir=args.data_dir, model_name=args.model_name)
    out |= {"prefect_import_s": T_PREFECT, "in_process_s": time.perf_counter() - T0, "argparse_at_s": t_imports}
    Path(args.out).write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
