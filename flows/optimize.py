"""The per-platform optimize flow: assess → build candidates → benchmark → evaluate → gate → select
→ register, tracked in MLflow, with a report artifact in Prefect.

Run it locally with ``edgeopt optimize MODEL --profile intel-cpu`` (embedded Prefect API and
MLflow store), or as the ``optimize-intel-cpu`` deployment on a work pool (``prefect.yaml``).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict

from edgeopt import report, settings, workflow
from edgeopt.comparison import combine_shape_verdicts, comparison_groups, shape_variants
from edgeopt.errors import CandidateFailed, ConfigError, EdgeOptError
from edgeopt.gates import more_rounds_could_settle
from edgeopt.input_shapes import describe as describe_shapes
from edgeopt.names import check_name, safe_name
from edgeopt.profiles import host_mismatches
from edgeopt.records import CandidateOutcome, Selection
from flows._measuring import Measurements, measure_rounds
from flows._names import by_profile
from flows._pools import refuse_wrong_host
from flows._recording import log_outcomes
from tasks import tracking
from tasks.phases import (
    assess_task,
    audit_task,
    benchmark_slot,
    build_stale,
    build_task,
    check_data_task,
    earlier_speedups_task,
    evaluate_task,
    fingerprint_task,
    gate_task,
    host_spread_task,
    input_shapes_task,
    load_profile_task,
    outputs_stale,
    outputs_task,
    pool_task,
    prepare_data_task,
    prepare_model_task,
    record_speedups_task,
    select_task,
    synthetic_data_task,
)

log = logging.getLogger(__name__)

#: In-process progress listeners (the CLI's progress bar); deployments run without any.
_listeners: list[Callable[[str, str], None]] = []


def add_progress_listener(fn: Callable[[str, str], None]) -> Callable[[], None]:
    _listeners.append(fn)
    return lambda: _listeners.remove(fn)


def _progress(stage: str, detail: str) -> None:
    """A phase of the run: to the CLI's progress bar and, as one log line, to the run's log in the API."""
    for fn in _listeners:
        fn(stage, detail)
    try:
        get_run_logger().info("%s: %s", stage, detail)
    except MissingContextError:  # called outside a flow run
        pass


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
    remeasured: tuple[str, ...] = ()
    input_shapes: dict[str, tuple[int, ...]] = {}
    per_sample_inputs: tuple[str, ...] = ()
    synthetic_data: tuple[str, ...] = ()
    shape_settings: tuple[str, ...] = ()


def _default_model_name(model: str, profile: str) -> str:
    p = Path(model).expanduser().resolve()
    stem = p.name if p.is_dir() else p.stem
    if stem in ("model", "hf", "checkpoint", ""):
        stem = p.parent.name
    return safe_name(f"{stem}-{profile}")


def _outputs_and_eval(names, m: Measurements, *, specs, artifacts, prof, assessment, hw, evaluation, work,
                      refresh, reference: str, refs: dict[str, str] | None = None) -> list[CandidateOutcome]:
    """Pool each member's rounds, run its outputs over the evaluation data, audit its timed outputs
    against them, and evaluate it against the ``reference`` baseline's outputs (first in ``names``), or
    against the baseline named in ``refs`` (a shape setting's members: the baseline at their shapes)."""
    outcomes: list[CandidateOutcome] = []
    baseline_outputs: dict[str, str] = {}
    for name in names:
        spec, art = specs[name], artifacts.get(name)
        if name in m.failures:
            outcomes.append(m.failures[name])
            continue
        outcome = CandidateOutcome(spec=spec, artifact=art, benchmark=pool_task(name, m.results[name]))
        _progress("evaluate", name)
        stale = refresh or outputs_stale(art, prof, evaluation, hw, work)
        try:
            outputs = outputs_task.with_options(refresh_cache=stale or None)(art, prof, assessment, evaluation, work, hw)
        except CandidateFailed as exc:
            outcomes.append(workflow.failed(spec, stage="evaluate", error=exc, artifact=art))
            continue
        if spec.baseline:
            baseline_outputs[name] = outputs
        outcome = audit_task(outcome, outputs)
        if outcome.ok:
            try:
                ev = evaluate_task(name, outputs, baseline_outputs.get((refs or {}).get(name, reference)),
                                   assessment, evaluation,
                                   prof.benchmark.max_eval_samples)
                outcome = outcome.model_copy(update={"evaluation": ev})
            except CandidateFailed as exc:
                outcome = workflow.failed(spec, stage="evaluate", error=exc, artifact=art)
        outcomes.append(outcome)
    return outcomes


def _measure_all(groups, specs, artifacts, *, prof, assessment, hw, evaluation, work, refresh):
    """Measure every group (interleaved rounds), evaluate, gate; re-measure uncertain verdicts.

    Returns (gated outcomes: baselines first, Measurements).
    """
    kw = {"specs": specs, "artifacts": artifacts, "prof": prof, "assessment": assessment, "hw": hw,
          "evaluation": evaluation, "work": work, "refresh": refresh}
    m = measure_rounds(groups, range(prof.benchmark.repeats), m=Measurements(), progress=_progress, **kw)
    reference = groups[0].baseline.name
    if reference in m.failures:
        f = m.failures[reference].failure
        raise EdgeOptError(f"the baseline {reference} failed ({f.reason}): {f.message}; nothing is registered")
    names = [g.baseline.name for g in groups] + [n for g in groups for n in g.members]
    order = {n: i for i, n in enumerate(specs)}
    names = names[:len(groups)] + sorted(names[len(groups):], key=order.__getitem__)
    refs = {n: g.baseline.name for g in groups if g.setting.shape for n in g.names}
    outcomes = _outputs_and_eval(names, m, reference=reference, refs=refs, **kw)
    if not next(o for o in outcomes if o.name == reference).ok:
        f = next(o for o in outcomes if o.name == reference).failure
        raise EdgeOptError(f"the baseline {reference} failed ({f.reason}): {f.message}; nothing is registered")
    baselines = {n: g.baseline.name for g in groups for n in g.members}
    spread = host_spread_task(prof, hw, str(Path(work).parent))
    logger = get_run_logger()
    logger.info("speed-up intervals are at least this host's %s", spread.describe())
    run = str(flow_run.id or uuid.uuid4())

    def gate(outcomes):
        # each comparison measured in earlier runs on this host is judged on all of them
        earlier = earlier_speedups_task(outcomes, artifacts, run, prof, assessment.kind, baselines, evaluation, hw,
                                        str(Path(work).parent))
        if earlier:
            logger.info("speed-ups pooled with earlier runs on this host: %s", ", ".join(
                f"{n} ({len(v)} earlier)" for n, v in sorted(earlier.items())))
        return gate_task(outcomes, prof, assessment.kind, baselines, spread.sd_log, earlier)

    outcomes = gate(outcomes)
    uncertain = _worth_more_rounds(outcomes)
    extra, done = prof.benchmark.extra_repeats, prof.benchmark.repeats
    while uncertain and extra and done < prof.benchmark.max_repeats:
        step = min(extra, prof.benchmark.max_repeats - done)
        logger.info("uncertain verdicts (%s): rounds %d-%d, with their baselines",
                    ", ".join(sorted(uncertain)), done + 1, done + step)
        # an uncertain candidate and its baseline get the rounds, interleaved; settled members keep the
        # rounds they have, and each ratio pairs a member's rounds with the baseline's of the same index
        # (measured side by side), so a settled ratio never mixes in rounds its member was not part of
        regroup = [g for g in groups if uncertain & set(g.members)]
        again = {n for g in regroup for n in (g.baseline.name, *(uncertain & set(g.members))) if n not in m.failures}
        measure_rounds(regroup, range(done, done + step), m=m, only=again, progress=_progress, **kw)
        done += step
        pooled = {n: pool_task(n, m.results[n]) for n in again if n not in m.failures}
        outcomes = [o.model_copy(update={"benchmark": pooled[o.name]}) if o.name in pooled and o.ok
                    else (m.failures[o.name] if o.name in m.failures and o.name in again else o) for o in outcomes]
        outcomes = gate(outcomes)
        uncertain = _worth_more_rounds(outcomes)
    fresh = {n for n in m.results if not m.reused(n)}
    record_speedups_task(outcomes, artifacts, fresh, run, prof, assessment.kind, evaluation, hw,
                         str(Path(work).parent))
    return outcomes, m


def _pareto_rows(rows: list[dict[str, str]], selection: Selection) -> list[dict[str, str]]:
    """The candidate table's rows on the Pareto frontier (the selected one first), with their scores."""
    on = [r for r in rows if r["candidate"] in selection.frontier]
    on.sort(key=lambda r: (r["candidate"] != selection.selected, -selection.scores.get(r["candidate"], 0.0)))
    return [{"candidate": r["candidate"], "selected": "yes" if r["candidate"] == selection.selected else "",
             "score": f"{selection.scores[r['candidate']]:.3f}" if r["candidate"] in selection.scores else "-",
             **{k: r[k] for k in report.CLI_COLUMNS[1:]}} for r in on]


def _worth_more_rounds(outcomes: list[CandidateOutcome]) -> set[str]:
    """Uncertain candidates more rounds could settle; those whose speed-up lies within the host's
    run-to-run band of the threshold stay uncertain (no number of rounds in one run narrows it)."""
    stuck = {o.name for o in outcomes if o.uncertain and not more_rounds_could_settle(o)}
    if stuck:
        get_run_logger().info("uncertain within this host's run-to-run spread, not re-measured: %s",
                              ", ".join(sorted(stuck)))
    return {o.name for o in outcomes if o.uncertain} - stuck


@flow(name="optimize", flow_run_name=by_profile("optimize"), task_runner=ThreadPoolTaskRunner(max_workers=2))
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
    shapes: list[str] | None = None,
    synthetic_data: bool = False,
) -> OptimizeReport:
    """Optimize MODEL for PROFILE on this machine and register the winner (if any) in MLflow.

    Args:
        model: path to the model on the worker: an .onnx file or a Hugging Face checkpoint folder.
        profile: target profile name (profiles/*.yaml) or path to a profile file.
        calibration: .npz calibration data, or .txt/.jsonl sentences for text models.
        evaluation: .npz evaluation data (a ``labels`` array gives accuracy), or .txt/.jsonl sentences.
        candidates: only these candidate names from the profile (default: all).
        model_name: registered model name in MLflow (default: the model file's name, a dash, the profile).
        data_dir: edgeopt data folder (default: $EDGEOPT_HOME or ./.edgeopt).
        refresh: rebuild and re-measure everything, ignoring cached results.
        allow_hardware_mismatch: run even if this machine does not fit the profile's hardware.
        seq_len: token length for text data (default: the profile's benchmark.seq_len).
        shapes: input shapes as NAME=1x3x640x640 (over the profile's input_shapes) for dynamic dims.
        synthetic_data: calibrate and evaluate on generated inputs at those shapes where no data is given
            (said in the report and the MLflow tag ``edgeopt.synthetic_data``).
    """
    refuse_wrong_host(allow_mismatch=allow_hardware_mismatch)
    logger = get_run_logger()
    if model_name is not None:  # it names the MLflow experiment and registered model: checked before anything
        check_name(model_name, what="--model-name")
    base = Path(data_dir).expanduser().resolve() if data_dir else settings.data_dir()
    work = str(base / "work")
    calibration = str(Path(calibration).resolve()) if calibration else None
    evaluation = str(Path(evaluation).resolve()) if evaluation else None

    _progress("assess", Path(model).name)
    prof = load_profile_task(profile)
    given = assess_task(str(Path(model).expanduser().resolve()))
    if given.kind == "llm":  # llama.cpp candidates against the F16 GGUF: flows/_llm.py
        from flows._llm import optimize_llm

        return optimize_llm(source=given, prof=prof, calibration=calibration, evaluation=evaluation,
                            candidates=candidates, name=model_name or _default_model_name(model, prof.name), base=base,
                            work=work, refresh=refresh, allow_mismatch=allow_hardware_mismatch, progress=_progress)
    source, assessment = prepare_model_task(str(Path(model).expanduser().resolve()), work)
    seq = seq_len or prof.benchmark.seq_len
    calibration = prepare_data_task(calibration, assessment, seq, work, "calibration")
    evaluation = prepare_data_task(evaluation, assessment, seq, work, "evaluation")
    shaped = input_shapes_task(assessment, list(shapes or []), prof, evaluation, seq)
    source, assessment = (shaped if source.model.format == "onnx" else source), shaped
    logger.info("input shapes: %s", describe_shapes(assessment.input_shapes))
    # an input given several --shape values: one benchmark setting per shape, the first one the candidates' own
    extra_shapes = workflow.extra_shape_settings(assessment, shapes=list(shapes or []), profile=prof,
                                                 evaluation=evaluation, seq_len=seq)
    for label, at in extra_shapes:
        logger.info("shape setting %s: %s", label, describe_shapes(at))
    generated = tuple(role for role, path in (("calibration", calibration), ("evaluation", evaluation))
                      if synthetic_data and path is None)
    if generated:  # asked for explicitly: generated inputs at the run's shapes, said everywhere
        # calibration from a generated file; evaluation (and benchmark) inputs are generated by each measuring
        # process at its own setting's shapes, as without data
        calibration = calibration or synthetic_data_task(assessment, work)
        logger.warning("synthetic data for %s: %s", " and ".join(generated), report.synthetic_note(generated))
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
        tags={"prefect.flow_run_id": str(flow_run.id or ""),
              **({"edgeopt.synthetic_data": ",".join(generated)} if generated else {})},
        input_shapes=assessment.input_shapes)
    status = "FAILED"
    try:
        futures = {}
        for s in specs:
            stale = refresh or build_stale(s, inputs[s.name], calibration, work, hw)
            futures[s.name] = build_task.with_options(refresh_cache=stale or None).submit(
                s, inputs[s.name], calibration, work, hw)
        # Every build finishes before the first measurement: a build running beside a benchmark
        # would slow it down (one benchmark at a time per machine, and nothing else either).
        built: dict[str, object] = {}
        for s in specs:
            _progress("build", s.name)
            try:  # the shapes it runs at go with the artifact (and into its benchmark keys)
                built[s.name] = workflow.with_input_shapes(futures[s.name].result(), shapes=assessment.input_shapes)
            except CandidateFailed as exc:
                logger.warning("%s", exc)
                built[s.name] = workflow.failed(s, stage="build", error=exc)
        base_spec = specs[0]
        if isinstance(built[base_spec.name], CandidateOutcome):
            f = built[base_spec.name].failure
            raise EdgeOptError(f"the baseline {base_spec.name} could not be built ({f.reason}): {f.message}; "
                               "nothing is registered")
        ready = {s.name: (s, built[s.name]) for s in planned if not isinstance(built[s.name], CandidateOutcome)}
        variants = shape_variants(ready, extra_shapes)  # each candidate at each extra shape: its own setting
        of_candidate = {f"{n}-{label}": n for label, _ in extra_shapes for n in ready}
        ready = ready | variants
        groups = comparison_groups(base_spec, built[base_spec.name], ready, threads=prof.hardware.threads)
        for g in groups[1:]:
            logger.info("baseline %s: %s, for %s", g.baseline.name, g.setting.describe(), ", ".join(g.members))
        all_specs = {g.baseline.name: g.baseline for g in groups} | {s.name: s for s in planned} | \
            {n: s for n, (s, _) in variants.items()}
        artifacts = {g.baseline.name: g.artifact for g in groups} | {n: a for n, (_, a) in ready.items()}
        with benchmark_slot():
            measured, m = _measure_all(groups, all_specs, artifacts, prof=prof, assessment=assessment, hw=hw,
                                       evaluation=evaluation, work=work, refresh=refresh)
        measured = combine_shape_verdicts(measured, of_candidate)  # it passes only if it passes at every shape
        failed_builds = [built[s.name] for s in planned if isinstance(built[s.name], CandidateOutcome)]
        named = [s.name for s in planned]
        named = [x for n in named for x in (n, *(v for v, c in of_candidate.items() if c == n))]
        order = {n: i for i, n in enumerate([g.baseline.name for g in groups] + named)}
        outcomes = sorted([*measured, *failed_builds], key=lambda o: order[o.name])

        _progress("select", prof.name)
        selection = select_task([o for o in outcomes if o.name not in of_candidate], prof)
        table = report.rows(outcomes, selection)
        reused = tuple(o.name for o in outcomes if m.reused(o.name))
        logged = log_outcomes(outcomes=outcomes, selection=selection, table=table, columns=report.CLI_COLUMNS,
                              reused=reused, base=str(base), experiment_id=exp_id, run_id=run_id, name=name,
                              profile=prof, logger=logger)
        child_ids, url, chosen, md = logged.child_ids, logged.url, logged.chosen, logged.markdown
        if assessment.input_shapes:
            md += f"\n\nInput shapes (batch included): {describe_shapes(assessment.input_shapes)}\n"
        if assessment.per_sample_inputs:
            md += f"\n{report.per_sample_note(assessment.per_sample_inputs)}\n"
        if generated:
            md += f"\n**Synthetic data**: {report.synthetic_note(generated)}\n"
        if extra_shapes:
            md += f"\n{report.shape_settings_note(assessment.input_shapes, extra_shapes)}\n"
        tracking.record_selection(data_dir=str(base), run_id=run_id, selection=selection, report_md=md,
                                  outcomes=outcomes)
        create_markdown_artifact(markdown=md, key=re.sub(r"[^a-z0-9-]+", "-", f"optimize-{prof.name}".lower()),
                                 description=f"Candidates for {name} on {prof.name}")
        frontier = _pareto_rows(table, selection)
        if frontier:
            create_table_artifact(table=frontier, key=f"pareto-{prof.name}".lower(),
                                  description=f"Pareto frontier of {name} on {prof.name}: the candidates no other "
                                  "beats on latency, memory, size and accuracy at once; the selected one first")
        chart = report.pareto_chart_markdown(outcomes, selection, title=f"Pareto frontier: {name} on {prof.name}")
        if chart:
            create_markdown_artifact(markdown=chart, key=re.sub(r"[^a-z0-9-]+", "-", f"pareto-chart-{prof.name}".lower()),
                                     description=f"Pareto chart of {name} on {prof.name}")
        create_link_artifact(link=url, link_text="MLflow run", key="mlflow-run")
        # Registration is the last step: nothing is registered or aliased unless everything else succeeded.
        version = None
        if chosen is not None:
            _progress("register", chosen.name)
            version = tracking.register_selected(data_dir=str(base), model_name=name, run_id=child_ids[chosen.name],
                                                 outcome=chosen, selection=selection, assessment=assessment)
        status = "FINISHED"
        return OptimizeReport(
            profile=prof.name, model_name=name, outcomes=tuple(outcomes), selection=selection,
            experiment_id=exp_id, mlflow_run_id=run_id, mlflow_run_url=url,
            tracking_uri=settings.mlflow_tracking_uri(base), registered_version=version,
            cached=reused, input_shapes=assessment.input_shapes, per_sample_inputs=assessment.per_sample_inputs,
            synthetic_data=generated, shape_settings=tuple(label for label, _ in extra_shapes), remeasured=tuple(o.name for o in outcomes if o.benchmark and o.name not in reused),
            flow_run_id=str(flow_run.id) if flow_run.id else None,
            flow_run_url=flow_run.ui_url if flow_run.ui_url and not flow_run.ui_url.startswith("None") else None,
        )
    finally:
        try:
            tracking.end_parent_run(data_dir=str(base), run_id=run_id, status=status)
        except Exception as exc:  # never mask the error that is already on its way out
            if status == "FINISHED":
                raise
            logger.warning("could not mark the MLflow run %s failed: %s", run_id, exc)
