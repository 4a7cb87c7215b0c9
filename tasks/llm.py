"""Prefect tasks of the optimize flow's language-model phases: thin wrappers over ``edgeopt.llm_workflow``.

Cached like the other candidates' tasks (``tasks.phases``): a build by ``workflow.build_key`` (model sha,
recipe, calibration text when the recipe uses it, tools, hardware); a generation measurement and an
evaluation by the key that names their folder (artifact as it runs, LLM benchmark settings, evaluation
text digest, tools, hardware; the round). The flow refreshes an entry whose folder's stamp is gone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from edgeopt import llm_workflow, reproducibility, workflow
from edgeopt.keys import digest
from edgeopt.profiles import Profile
from edgeopt.records import (
    Artifact,
    Assessment,
    CandidateOutcome,
    CandidateSpec,
    GenerationResult,
    HardwareFingerprint,
)


def _build_key(_ctx: Any, p: dict[str, Any]) -> str:
    key = workflow.build_key(p["spec"], assessment=p["assessment"], calibration=p["calibration"],
                             hardware=p["hardware"])
    return f"llm-build-{p['spec'].name}-{key}"


def _generation_key(_ctx: Any, p: dict[str, Any]) -> str:
    folder = llm_workflow.generation_dir(p["artifact"], profile=p["profile"], evaluation=p["evaluation"],
                                         hardware=p["hardware"], group=p["group"], round_=p["round_"],
                                         work_dir=Path(p["work_dir"]))
    return f"generate-{folder.name}-{digest(p['prompt'])}"


def _eval_key(_ctx: Any, p: dict[str, Any]) -> str:
    folder = llm_workflow.eval_dir(p["artifact"], profile=p["profile"], evaluation=p["evaluation"],
                                   hardware=p["hardware"], reference=p["reference"], work_dir=Path(p["work_dir"]))
    return f"llm-eval-{folder.name}"


def build_stale(spec: CandidateSpec, assessment: Assessment, calibration: str | None, work_dir: str,
                hardware: HardwareFingerprint) -> bool:
    folder = workflow.build_dir(spec, assessment=assessment, calibration=calibration, work_dir=Path(work_dir),
                                hardware=hardware)
    return not workflow.result_ok(folder, name=spec.name)


def generation_stale(artifact: Artifact, profile: Profile, evaluation: str | None, hardware: HardwareFingerprint,
                     group: str, round_: int, work_dir: str) -> bool:
    folder = llm_workflow.generation_dir(artifact, profile=profile, evaluation=evaluation, hardware=hardware,
                                         group=group, round_=round_, work_dir=Path(work_dir))
    return not (Path(artifact.path).exists() and workflow.result_ok(folder, name=artifact.candidate))


def eval_stale(artifact: Artifact, profile: Profile, evaluation: str, hardware: HardwareFingerprint,
               reference: Artifact | None, work_dir: str) -> bool:
    folder = llm_workflow.eval_dir(artifact, profile=profile, evaluation=evaluation, hardware=hardware,
                                   reference=reference, work_dir=Path(work_dir))
    return not (Path(artifact.path).exists() and workflow.result_ok(folder, name=artifact.candidate))


@task(name="llm-build", task_run_name="build-{spec.name}", cache_key_fn=_build_key, persist_result=True)
def build_task(spec: CandidateSpec, assessment: Assessment, calibration: str | None, work_dir: str,
               hardware: HardwareFingerprint) -> Artifact:
    return llm_workflow.build(spec, assessment=assessment, calibration=calibration, work_dir=Path(work_dir),
                              hardware=hardware)


@task(name="prompt", cache_policy=NO_CACHE)
def prompt_task(artifact: Artifact, evaluation: str, tokens: int) -> list[int]:
    return llm_workflow.prompt_ids(artifact, evaluation=evaluation, tokens=tokens)


@task(name="generate", task_run_name="generate-{artifact.candidate}-{round_}", cache_key_fn=_generation_key,
      persist_result=True)
def generation_task(artifact: Artifact, profile: Profile, prompt: list[int], evaluation: str | None,
                    hardware: HardwareFingerprint, group: str, round_: int, work_dir: str) -> GenerationResult:
    work = Path(work_dir)
    return llm_workflow.measure(artifact, profile=profile, prompt=prompt, evaluation=evaluation, hardware=hardware,
                                group=group, round_=round_, work_dir=work, lock_path=work / "bench.lock")


@task(name="llm-evaluate", task_run_name="evaluate-{artifact.candidate}", cache_key_fn=_eval_key,
      persist_result=True)
def eval_task(artifact: Artifact, profile: Profile, evaluation: str, hardware: HardwareFingerprint,
              reference: Artifact | None, reference_dir: str | None, work_dir: str):
    return llm_workflow.evaluate(artifact, profile=profile, evaluation=evaluation, hardware=hardware,
                                 work_dir=Path(work_dir), reference=reference, reference_dir=reference_dir)


@task(name="llm-bandwidth-bound", task_run_name="bound-{outcome.spec.name}", cache_policy=NO_CACHE)
def bound_task(outcome: CandidateOutcome, assessment: Assessment, hardware: HardwareFingerprint,
               store: str) -> CandidateOutcome:
    """The outcome with its generation figure as a fraction of this hardware's memory-bandwidth bound."""
    if outcome.generation is None or outcome.artifact is None:
        return outcome
    g = llm_workflow.with_bound(outcome.generation, outcome.artifact, assessment=assessment, hardware=hardware,
                                store=Path(store))
    return outcome.model_copy(update={"generation": g})


@task(name="llm-gate", task_run_name="gate-{outcome.spec.name}", cache_policy=NO_CACHE)
def gate_task(outcome: CandidateOutcome, baseline: CandidateOutcome, rounds: dict[str, list[GenerationResult]],
              profile: Profile, run_to_run_sd: float = 0.0,
              earlier: list[tuple[float, float]] | None = None) -> CandidateOutcome:
    return llm_workflow.gate(outcome, baseline=baseline, rounds=rounds, profile=profile, run_to_run_sd=run_to_run_sd,
                             earlier=earlier or ())


@task(name="llm-earlier-speedups", cache_policy=NO_CACHE)
def earlier_speedups_task(outcomes: list[CandidateOutcome], run: str, profile: Profile, evaluation: str | None,
                          hardware: HardwareFingerprint, data_dir: str) -> dict[str, list[tuple[float, float]]]:
    return llm_workflow.earlier_speedups(outcomes, run=run, profile=profile, evaluation=evaluation, hardware=hardware,
                                         history_file=reproducibility.history_path(data_dir, hardware, kind="llm"))


@task(name="llm-record-speedups", cache_policy=NO_CACHE)
def record_speedups_task(outcomes: list[CandidateOutcome], rounds: dict[str, list[GenerationResult]], fresh: set[str],
                         run: str, profile: Profile, evaluation: str | None, hardware: HardwareFingerprint,
                         data_dir: str) -> int:
    return llm_workflow.record_speedups(outcomes, rounds=rounds, fresh=fresh, run=run, profile=profile,
                                        evaluation=evaluation, hardware=hardware,
                                        history_file=reproducibility.history_path(data_dir, hardware, kind="llm"))
