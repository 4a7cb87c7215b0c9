"""The per-platform optimize flow: assess → build candidates → benchmark → evaluate → gate → select
→ register, tracked in MLflow, with a report artifact in Prefect.

Run it locally with ``edgeopt optimize MODEL --profile intel-cpu`` (embedded Prefect API and
MLflow store), or as the ``optimize-intel-cpu`` deployment on a work pool (``prefect.yaml``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict

from edgeopt import report, settings, workflow
from edgeopt.errors import CandidateFailed, ConfigError, EdgeOptError
from edgeopt.profiles import host_mismatches
from edgeopt.records import CandidateOutcome, Selection
from tasks import tracking
from tasks.phases import (
    bench_files_missing,
    benchmark_slot,
    benchmark_task,
    build_files_missing,
    build_task,
    check_data_task,
    evaluate_task,
    fingerprint_task,
    gate_task,
    load_profile_task,
    outputs_files_missing,
    outputs_task,
    pool_task,
    prepare_data_task,
    prepare_model_task,
    select_task,
)

log = logging.getLogger(__name__)

#: In-process progress listeners (the CLI's progress bar); deployments run without any.
_listeners: list[Callable[[str, str], None]] = []


def add_progress_listener(fn: Callable[[str, str], None]) -> Callable[[], None]:
    _listeners.append(fn)
    return lambda: _listeners.remove(fn)


def _progress(stage: str, detail: str) -> None:
    for fn in _listeners:
        fn(stage, detail)


class OptimizeReport(BaseModel):
    """What the optimize flow returns (and the CLI prints)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    profile: str
    model_name: str
    outcomes: tuple[CandidateOutcome, ...]
    selection: Selection
    experiment_id: str
    mlflow_run_id: str
    mlflow_run_url: str
    tracking_uri: str
    registered_version: str | None = None
    flow_run_id: str | None = None
    flow_run_url: str | None = None
    cached: tuple[str, ...] = ()


def _default_model_name(model: str, profile: str) -> str:
    p = Path(model).expanduser().resolve()
    stem = p.name if p.is_dir() else p.stem
    if stem in ("model", "hf", "checkpoint", ""):
        stem = p.parent.name
    return f"{stem}-{profile}"


def _benchmark_rounds(specs, built, *, prof, assessment, hw, evaluation, work, refresh):
    """Measure every built candidate ``repeats`` times, interleaved (round 1: all, round 2: all...),
    so slow and fast periods of the machine fall on every candidate alike.

    Returns ({name: [result per repeat]}, {name: failed outcome}, {name: all repeats cached?}).
    """
    results: dict[str, list] = {}
    failures: dict[str, CandidateOutcome] = {}
    cached: dict[str, bool] = {}
    repeats = prof.benchmark.repeats
    for r in range(repeats):
        for s in specs:
            art = built[s.name]
            if isinstance(art, CandidateOutcome) or s.name in failures:
                continue
            _progress("benchmark", f"{s.name} ({r + 1}/{repeats})")
            stale = refresh or bench_files_missing(art, prof, work, r)
            state = benchmark_task.with_options(refresh_cache=stale or None)(
                art, prof, assessment, hw, evaluation, work, r, return_state=True)
            try:
                results.setdefault(s.name, []).append(state.result())
            except CandidateFailed as exc:
                failures[s.name] = workflow.failed(s, stage="benchmark", error=exc, artifact=art)
                if s.baseline:  # nothing can be compared with it: stop measuring
                    return results, failures, cached
                continue
            cached[s.name] = cached.get(s.name, True) and state.name == "Cached"
    return results, failures, cached


def _measure_all(specs, built, *, prof, assessment, hw, evaluation, work, refresh):
    """Benchmark (interleaved repeats), run outputs and evaluate every built candidate, in order."""
    outcomes: list[CandidateOutcome] = []
    baseline_outputs: str | None = None
    results, failures, cached = _benchmark_rounds(specs, built, prof=prof, assessment=assessment, hw=hw,
                                                  evaluation=evaluation, work=work, refresh=refresh)
    for s in specs:
        art = built[s.name]
        if isinstance(art, CandidateOutcome) or s.name in failures:
            outcome = art if isinstance(art, CandidateOutcome) else failures[s.name]
            if s.baseline:
                raise EdgeOptError(f"the baseline {s.name} failed ({outcome.failure.reason}): "
                                   f"{outcome.failure.message}; nothing is registered")
            outcomes.append(outcome)
            continue
        outcome = CandidateOutcome(spec=s, artifact=art, benchmark=pool_task(s.name, results[s.name]))
        _progress("evaluate", s.name)
        stale = refresh or outputs_files_missing(art, prof, work)
        try:
            outputs = outputs_task.with_options(refresh_cache=stale or None)(art, prof, assessment, evaluation, work)
        except CandidateFailed as exc:
            if s.baseline:
                raise EdgeOptError(f"the baseline {s.name} failed ({exc.reason}): {exc}; nothing is registered") from exc
            outcomes.append(workflow.failed(s, stage="evaluate", error=exc, artifact=art))
            continue
        if s.baseline:
            baseline_outputs = outputs
        try:
            ev = evaluate_task(s.name, outputs, baseline_outputs, assessment, evaluation,
                               prof.benchmark.max_eval_samples)
            outcome = outcome.model_copy(update={"evaluation": ev})
        except CandidateFailed as exc:
            outcome = workflow.failed(s, stage="evaluate", error=exc, artifact=art)
        outcomes.append(outcome)
    return outcomes, cached


@flow(name="optimize", flow_run_name="optimize-{profile}", task_runner=ThreadPoolTaskRunner(max_workers=2))
def optimize_flow(
    model: str,
    profile: str = "intel-cpu",
    calibration: str | None = None,
    evaluation: str | None = None,
    candidates: list[str] | None = None,
    model_name: str | None = None,
    data_dir: str | None = None,
    refresh: bool = False,
    allow_hardware_mismatch: bool = False,
    seq_len: int | None = None,
) -> OptimizeReport:
    """Optimize MODEL for PROFILE on this machine and register the winner (if any) in MLflow.

    Args:
        model: path to the model on the worker: an .onnx file or a Hugging Face checkpoint folder.
        profile: target profile name (profiles/*.yaml) or path to a profile file.
        calibration: .npz calibration data, or .txt/.jsonl sentences for text models.
        evaluation: .npz evaluation data (a ``labels`` array gives accuracy), or .txt/.jsonl sentences.
        candidates: only these candidate names from the profile (default: all).
        model_name: registered model name in MLflow (default: <model>-<profile>).
        data_dir: edgeopt data folder (default: $EDGEOPT_HOME or ./.edgeopt).
        refresh: rebuild and re-measure everything, ignoring cached results.
        allow_hardware_mismatch: run even if this machine does not fit the profile's hardware.
        seq_len: token length for text data (default: the profile's benchmark.seq_len).
    """
    logger = get_run_logger()
    base = Path(data_dir).expanduser().resolve() if data_dir else settings.data_dir()
    work = str(base / "work")
    calibration = str(Path(calibration).resolve()) if calibration else None
    evaluation = str(Path(evaluation).resolve()) if evaluation else None

    _progress("assess", Path(model).name)
    prof = load_profile_task(profile)
    source, assessment = prepare_model_task(str(Path(model).expanduser().resolve()), work)
    seq = seq_len or prof.benchmark.seq_len
    calibration = prepare_data_task(calibration, assessment, seq, work, "calibration")
    evaluation = prepare_data_task(evaluation, assessment, seq, work, "evaluation")
    hw = fingerprint_task()
    mismatch = host_mismatches(prof, hw)
    if mismatch and not allow_hardware_mismatch:
        raise ConfigError(f"profile {prof.name} does not fit this machine: {'; '.join(mismatch)}; "
                          "pick another profile or pass --allow-hardware-mismatch")
    check_data_task(assessment, calibration, evaluation)
    planned, skipped = workflow.plan(prof, only=tuple(candidates or ()), source=source, converted=assessment)
    for why in skipped:
        logger.info("skipped %s", why)
    specs = [prof.baseline.spec(baseline=True), *planned]
    inputs = {s.name: workflow.build_input(s, source=source, converted=assessment) for s in specs}
    name = model_name or _default_model_name(model, prof.name)

    exp_id, run_id = tracking.start_parent_run(
        data_dir=str(base), experiment=f"edgeopt/{name}", run_name=f"optimize-{prof.name}",
        assessment=source, profile_name=prof.name, profile_doc=prof.model_dump(mode="json"), hardware=hw,
        tags={"prefect.flow_run_id": str(flow_run.id or "")})
    status = "FAILED"
    selection: Selection | None = None
    try:
        futures = {}
        for s in specs:
            stale = refresh or build_files_missing(s, inputs[s.name], calibration, work)
            futures[s.name] = build_task.with_options(refresh_cache=stale or None).submit(
                s, inputs[s.name], calibration, work)
        # Every build finishes before the first measurement: a build running beside a benchmark
        # would slow it down (one benchmark at a time per machine, and nothing else either).
        built: dict[str, object] = {}
        for s in specs:
            _progress("build", s.name)
            try:
                built[s.name] = futures[s.name].result()
            except CandidateFailed as exc:
                logger.warning("%s", exc)
                built[s.name] = workflow.failed(s, stage="build", error=exc)
        for s in specs:
            art = built[s.name]
            if s.baseline and isinstance(art, CandidateOutcome):
                raise EdgeOptError(f"the baseline {s.name} could not be built ({art.failure.reason}): "
                                   f"{art.failure.message}; nothing is registered")
        with benchmark_slot():
            outcomes, cached = _measure_all(specs, built, prof=prof, assessment=assessment, hw=hw,
                                            evaluation=evaluation, work=work, refresh=refresh)

        _progress("select", prof.name)
        outcomes = gate_task(outcomes, prof, assessment.kind)
        selection = select_task(outcomes, prof)
        logs = [tracking.log_candidate.submit(data_dir=str(base), experiment_id=exp_id, parent_run_id=run_id,
                                              outcome=o, cached=cached.get(o.name, False)) for o in outcomes]
        child_ids = {o.name: f.result() for o, f in zip(outcomes, logs, strict=True)}
        version = None
        if selection.selected:
            _progress("register", selection.selected)
            chosen = next(o for o in outcomes if o.name == selection.selected)
            version = tracking.register_selected(data_dir=str(base), model_name=name,
                                                 run_id=child_ids[chosen.name], outcome=chosen, selection=selection)
        url = tracking.run_url(experiment_id=exp_id, run_id=run_id, data_dir=str(base))
        links = {"MLflow run": url}
        if version:
            links["Registered model"] = f"{name} version {version} (alias '{tracking.CANDIDATE_ALIAS}')"
        md = report.markdown(outcomes, selection, title=f"edgeopt optimize: {name} on {prof.name}", links=links)
        create_markdown_artifact(markdown=md, key=f"optimize-{prof.name}".lower(),
                                 description=f"Candidates for {name} on {prof.name}")
        create_link_artifact(link=url, link_text="MLflow run", key="mlflow-run")
        status = "FINISHED"
        return OptimizeReport(
            profile=prof.name, model_name=name, outcomes=tuple(outcomes), selection=selection,
            experiment_id=exp_id, mlflow_run_id=run_id, mlflow_run_url=url,
            tracking_uri=settings.mlflow_tracking_uri(base), registered_version=version,
            cached=tuple(n for n, hit in cached.items() if hit),
            flow_run_id=str(flow_run.id) if flow_run.id else None,
            flow_run_url=flow_run.ui_url if flow_run.ui_url and not flow_run.ui_url.startswith("None") else None,
        )
    finally:
        tracking.end_parent_run(data_dir=str(base), run_id=run_id, selection=selection, status=status,
                                report_md=md if status == "FINISHED" else None)
