"""The optimize flow for language models (llama.cpp): called by ``flows.optimize.optimize_flow`` when the
model is of kind ``llm``. Same shape as the CNN / encoder path: build every candidate (the F16 GGUF
reference first), then measure generation in interleaved rounds while holding the host's benchmark
slot, evaluate against the reference, gate, select on the Pareto frontier, log the parent and child
MLflow runs and register the winner (alias ``candidate``) last. Phases live in ``edgeopt.llm_workflow``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from edgeopt import llm_workflow, report, settings, workflow
from edgeopt.errors import CandidateFailed, ConfigError, EdgeOptError
from edgeopt.profiles import Profile, host_mismatches
from edgeopt.records import (
    Artifact,
    Assessment,
    CandidateOutcome,
    CandidateSpec,
    GenerationResult,
    HardwareFingerprint,
)
from flows._recording import log_outcomes
from tasks import llm as llm_tasks
from tasks import tracking
from tasks.phases import benchmark_slot, fingerprint_task, host_spread_task, select_task


def optimize_llm(*, source: Assessment, prof: Profile, calibration: str | None, evaluation: str | None,
                 candidates: list[str] | None, name: str, base: Path, work: str, refresh: bool, allow_mismatch: bool,
                 progress: Callable[[str, str], None]) -> Any:
    """The LLM half of ``optimize_flow`` (its arguments, resolved); returns its ``OptimizeReport``."""
    from flows.optimize import OptimizeReport

    logger = get_run_logger()
    hw = fingerprint_task()
    mismatch = host_mismatches(prof, hw)
    if mismatch and not allow_mismatch:
        raise ConfigError(f"profile {prof.name} does not fit this machine: {'; '.join(mismatch)}; "
                          "pick another profile or pass --allow-hardware-mismatch")
    llm_workflow.check_model(source)
    planned, skipped = llm_workflow.plan(prof, only=tuple(candidates or ()), model_format=source.model.format)
    for why in skipped:
        logger.info("skipped %s", why)
    llm_workflow.check_data(planned, calibration=calibration, evaluation=evaluation)
    assert evaluation is not None  # check_data refuses a run without it
    specs = [llm_workflow.BASELINE, *planned]
    exp_id, run_id = tracking.start_parent_run(
        data_dir=str(base), experiment=f"edgeopt/{name}", run_name=f"optimize-{prof.name}", assessment=source,
        profile_name=prof.name, profile_doc=prof.model_dump(mode="json"), hardware=hw,
        tags={"prefect.flow_run_id": str(flow_run.id or "")})
    status = "FAILED"
    try:
        futures = {s.name: llm_tasks.build_task.with_options(
            refresh_cache=(refresh or llm_tasks.build_stale(s, source, calibration, work, hw)) or None).submit(
                s, source, calibration, work, hw) for s in specs}
        built: dict[str, Artifact | CandidateOutcome] = {}
        for s in specs:  # every build finishes before the first measurement
            progress("build", s.name)
            try:
                built[s.name] = futures[s.name].result()
            except CandidateFailed as exc:
                logger.warning("%s", exc)
                built[s.name] = workflow.failed(s, stage="build", error=exc)
        ref = built[llm_workflow.BASELINE.name]
        if isinstance(ref, CandidateOutcome):
            raise EdgeOptError(f"the F16 reference could not be built ({ref.failure.reason}): {ref.failure.message}; "
                               "nothing is registered")
        arts = {n: a for n, a in built.items() if isinstance(a, Artifact)}
        with benchmark_slot():
            m = _Measuring(arts, {s.name: s for s in specs}, prof=prof, evaluation=evaluation, hw=hw, work=work,
                           refresh=refresh, progress=progress)
            m.rounds_of(set(arts), range(prof.benchmark.repeats))
            outcomes = _gated(m, m.evaluate(), base=base)
            # the memory-bandwidth bound is read inside the slot too: nothing else measures meanwhile
            outcomes = [llm_tasks.bound_task(o, source, hw, str(base / "bandwidth.json")) if o.ok else o
                        for o in outcomes]
        reused = {n for n in arts if n not in m.fresh and n not in m.failures}
        outcomes += [o for o in built.values() if isinstance(o, CandidateOutcome)]
        order = {s.name: i for i, s in enumerate(specs)}
        outcomes.sort(key=lambda o: order[o.name])

        progress("select", prof.name)
        selection = select_task(outcomes, prof)
        table = report.llm_rows(outcomes, selection)
        logged = log_outcomes(outcomes=outcomes, selection=selection, table=table, columns=report.LLM_CLI_COLUMNS,
                              reused=reused, base=str(base), experiment_id=exp_id, run_id=run_id, name=name,
                              profile=prof, logger=logger)
        child_ids, url, chosen, md = logged.child_ids, logged.url, logged.chosen, logged.markdown
        tracking.record_selection(data_dir=str(base), run_id=run_id, selection=selection, report_md=md,
                                  outcomes=outcomes)
        create_markdown_artifact(markdown=md, key=re.sub(r"[^a-z0-9-]+", "-", f"optimize-{prof.name}".lower()),
                                 description=f"Candidates for {name} on {prof.name}")
        frontier = [{"selected": "yes" if r["candidate"] == selection.selected else "",
                     **{k: r[k] for k in report.LLM_CLI_COLUMNS}} for r in table if r["candidate"] in selection.frontier]
        if frontier:
            create_table_artifact(table=frontier, key=f"pareto-{prof.name}".lower(),
                                  description=f"Pareto frontier of {name} on {prof.name}: the candidates no other "
                                  "beats on time per token, top-1 agreement, model memory and size at once")
        create_link_artifact(link=url, link_text="MLflow run", key="mlflow-run")
        version = None  # registration is the last step
        if chosen is not None:
            progress("register", chosen.name)
            version = tracking.register_selected(data_dir=str(base), model_name=name, run_id=child_ids[chosen.name],
                                                 outcome=chosen, selection=selection, assessment=source)
        status = "FINISHED"
        return OptimizeReport(
            profile=prof.name, model_name=name, outcomes=tuple(outcomes), selection=selection, experiment_id=exp_id,
            mlflow_run_id=run_id, mlflow_run_url=url, tracking_uri=settings.mlflow_tracking_uri(base),
            registered_version=version, cached=tuple(sorted(reused)),
            remeasured=tuple(o.name for o in outcomes if o.generation and o.name not in reused),
            flow_run_id=str(flow_run.id) if flow_run.id else None,
            flow_run_url=flow_run.ui_url if flow_run.ui_url and not flow_run.ui_url.startswith("None") else None)
    finally:
        try:
            tracking.end_parent_run(data_dir=str(base), run_id=run_id, status=status)
        except Exception as exc:  # never mask the error that is already on its way out
            if status == "FINISHED":
                raise
            logger.warning("could not mark the MLflow run %s failed: %s", run_id, exc)


class _Measuring:
    """The generation rounds of one run (interleaved: reference, candidates..., then again) and the evaluations."""

    def __init__(self, arts: dict[str, Artifact], specs: dict[str, CandidateSpec], *, prof: Profile, evaluation: str,
                 hw: HardwareFingerprint, work: str, refresh: bool, progress: Callable[[str, str], None]) -> None:
        self.arts, self.specs, self.prof, self.evaluation, self.hw, self.work = arts, specs, prof, evaluation, hw, work
        self.refresh, self.progress = refresh, progress
        self.reference = llm_workflow.BASELINE.name
        self.prompt = llm_tasks.prompt_task(arts[self.reference], evaluation, prof.benchmark.llm.prompt_tokens)
        self.group = llm_workflow.comparison_group(arts)  # the set measured together: part of every key
        self.rounds: dict[str, list[GenerationResult]] = {n: [] for n in arts}
        self.failures: dict[str, CandidateOutcome] = {}
        self.fresh: set[str] = set()

    def rounds_of(self, names: set[str], indices: range) -> None:
        """Rounds ``indices`` of ``names`` (the reference always among them), in the artifacts' order each round."""
        total = max(indices.stop, self.prof.benchmark.repeats)
        for r in indices:
            for n, art in self.arts.items():
                if n not in names or n in self.failures:
                    continue
                self.progress("benchmark", f"{n} round {r + 1}/{total}")
                stale = self.refresh or llm_tasks.generation_stale(art, self.prof, self.evaluation, self.hw,
                                                                   self.group, r, self.work)
                self.fresh |= {n} if stale else set()
                try:
                    self.rounds[n].append(llm_tasks.generation_task.with_options(refresh_cache=stale or None)(
                        art, self.prof, self.prompt, self.evaluation, self.hw, self.group, r, self.work))
                except CandidateFailed as exc:
                    if n == self.reference:
                        raise EdgeOptError(f"the F16 reference failed ({exc.reason}): {exc}; "
                                           "nothing is registered") from exc
                    get_run_logger().warning("%s", exc)
                    self.failures[n] = workflow.failed(self.specs[n], stage="benchmark", error=exc, artifact=art)

    def evaluate(self) -> list[CandidateOutcome]:
        """Each artifact's outcome: pooled generation and its scores (the reference first: the candidates' KLD
        is against its log-probabilities), or its failure."""
        outcomes: list[CandidateOutcome] = []
        ref_dir, ref_garbage = None, ""
        for n, art in self.arts.items():
            spec = self.specs[n]
            if n in self.failures:
                outcomes.append(self.failures[n])
                continue
            self.progress("evaluate", n)
            ref_art = None if n == self.reference else self.arts[self.reference]
            stale = self.refresh or llm_tasks.eval_stale(art, self.prof, self.evaluation, self.hw, ref_art, self.work)
            try:
                scores, folder = llm_tasks.eval_task.with_options(refresh_cache=stale or None)(
                    art, self.prof, self.evaluation, self.hw, ref_art, ref_dir, self.work)
            except CandidateFailed as exc:
                if n == self.reference:
                    raise EdgeOptError(f"the F16 reference failed its evaluation ({exc.reason}): {exc}; "
                                       "nothing is registered") from exc
                outcomes.append(workflow.failed(spec, stage="evaluate", error=exc, artifact=art))
                continue
            if n == self.reference:
                ref_dir, ref_garbage = folder, scores.garbage
                if scores.garbage:
                    get_run_logger().warning("the F16 reference fails the garbage check (%s): the check is not held "
                                             "against the candidates", scores.garbage)
            elif scores.garbage and not ref_garbage:
                outcomes.append(workflow.failed(spec, stage="evaluate", artifact=art, error=CandidateFailed(
                    "accuracy", f"{n}: garbage output ({scores.garbage}) where the F16 reference's is fine")))
                continue
            outcomes.append(CandidateOutcome(spec=spec, artifact=art, generation=llm_workflow.pool(self.rounds[n]),
                                             llm_eval=scores))
        return outcomes


def _gated(m: _Measuring, outcomes: list[CandidateOutcome], *, base: Path) -> list[CandidateOutcome]:
    """Gate every candidate against the reference; re-measure uncertain speed-ups (with the reference,
    interleaved, ``extra_repeats`` rounds at a time up to ``max_repeats``), as the other models' flow does."""
    logger = get_run_logger()
    spread = host_spread_task(m.prof, m.hw, str(base), "llm")
    logger.info("speed-up intervals are at least this host's %s", spread.describe())

    run = str(flow_run.id or uuid.uuid4())

    def gate(outcomes: list[CandidateOutcome]) -> list[CandidateOutcome]:
        ref = next(o for o in outcomes if o.spec.baseline)
        # each comparison measured in earlier runs on this host is judged on all of them
        earlier = llm_tasks.earlier_speedups_task(outcomes, run, m.prof, m.evaluation, m.hw, str(base))
        if earlier:
            logger.info("speed-ups pooled with earlier runs on this host: %s", ", ".join(
                f"{n} ({len(v)} earlier)" for n, v in sorted(earlier.items())))
        return [llm_tasks.gate_task(o, ref, m.rounds, m.prof, spread.sd_log, earlier.get(o.name))
                if o.ok and not o.spec.baseline else o for o in outcomes]

    outcomes = gate(outcomes)
    cfg, done = m.prof.benchmark, m.prof.benchmark.repeats
    uncertain = {o.name for o in outcomes if o.uncertain}
    while uncertain and cfg.extra_repeats and done < cfg.max_repeats:
        step = min(cfg.extra_repeats, cfg.max_repeats - done)
        logger.info("uncertain verdicts (%s): rounds %d-%d, with the F16 reference", ", ".join(sorted(uncertain)),
                    done + 1, done + step)
        m.rounds_of(uncertain | {m.reference}, range(done, done + step))
        done += step
        outcomes = [m.failures[o.name] if o.name in m.failures else
                    o.model_copy(update={"generation": llm_workflow.pool(m.rounds[o.name])}) if o.generation else o
                    for o in outcomes]
        outcomes = gate(outcomes)
        uncertain = {o.name for o in outcomes if o.uncertain}
    llm_tasks.record_speedups_task(outcomes, m.rounds, m.fresh, run, m.prof, m.evaluation, m.hw, str(base))
    return outcomes
