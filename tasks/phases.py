"""Prefect tasks for each phase of the optimize workflow: thin wrappers over ``edgeopt.workflow``.

Builds, benchmarks and output runs are cached on what determines them (``edgeopt.keys``: model
sha, recipe, data shas, tool versions, hardware, schema; for a benchmark also its comparison group
and round) so a re-run with nothing changed rebuilds and re-measures nothing. A cache entry whose
folder's stamp no longer matches (files gone or changed) is recomputed. Candidate failures
(``CandidateFailed``) are not retried: they are deterministic; the flow records them and goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from edgeopt import intake, workflow
from edgeopt.hardware import fingerprint
from edgeopt.profiles import Profile, load_profile
from edgeopt.records import (
    Artifact,
    Assessment,
    BenchmarkResult,
    CandidateOutcome,
    CandidateSpec,
    EvalResult,
    HardwareFingerprint,
    Selection,
)

#: Prefect global concurrency limit (1 slot) that keeps measurements on one host one at a time.
BENCH_LIMIT = f"edgeopt-benchmark-{socket.gethostname()}"
#: lease of that slot on a Prefect server, renewed while held: a killed holder's slot goes back to the
#: pool this long after its last renewal (the server's lease reaper)
SLOT_LEASE_S = 60.0

log = logging.getLogger(__name__)


@contextlib.contextmanager
def benchmark_slot() -> Iterator[None]:
    """Hold this host's benchmark slot for a whole measuring phase.

    With a Prefect server (``PREFECT_API_URL``): the global concurrency limit ``BENCH_LIMIT`` (created
    on first use), one slot, leased. One acquisition per flow run, not per task: a per-task tag limit
    costs about a second of lease traffic per measurement. With the embedded API every process runs
    its own short-lived server whose leases die with it, so the slot of a killed run would never be
    given back and every later run would wait for ever: there, a host-wide file lock, which the
    kernel releases when its holder dies, does the same job. The harness also holds a file lock per
    measurement.
    """
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        with _host_lock():
            yield
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(BENCH_LIMIT)
        except ObjectNotFound:
            with contextlib.suppress(Exception):  # another flow may have created it meanwhile
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=BENCH_LIMIT, limit=1))
    with concurrency(BENCH_LIMIT, occupy=1, strict=True, lease_duration=SLOT_LEASE_S):
        yield


@contextlib.contextmanager
def _host_lock() -> Iterator[None]:
    import fcntl

    path = Path(tempfile.gettempdir()) / f"edgeopt-benchmark-{os.getuid()}.lock"
    with open(path, "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another edgeopt run is measuring on this host; waiting for it (lock %s)", path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_key(_ctx: Any, p: dict[str, Any]) -> str:
    key = workflow.build_key(p["spec"], assessment=p["assessment"], calibration=p["calibration"],
                             hardware=p["hardware"])
    return f"build-{p['spec'].name}-{key}"


def _bench_key(_ctx: Any, p: dict[str, Any]) -> str:
    key = workflow.bench_key(p["artifact"], profile=p["profile"], evaluation=p["evaluation"], hardware=p["hardware"],
                             group=p["group"], repeat=p["repeat"])
    return f"bench-{p['artifact'].candidate}-{key}"


def _outputs_key(_ctx: Any, p: dict[str, Any]) -> str:
    key = workflow.outputs_key(p["artifact"], profile=p["profile"], evaluation=p["evaluation"], hardware=p["hardware"])
    return f"outputs-{p['artifact'].candidate}-{key}"


def build_stale(spec: CandidateSpec, assessment: Assessment, calibration: str | None, work_dir: str,
                hardware: HardwareFingerprint) -> bool:
    folder = workflow.build_dir(spec, assessment=assessment, calibration=calibration, work_dir=Path(work_dir),
                                hardware=hardware)
    return not workflow.result_ok(folder, name=spec.name)


def bench_stale(artifact: Artifact, profile: Profile, evaluation: str | None, hardware: HardwareFingerprint,
                group: str, repeat: int, work_dir: str) -> bool:
    if not Path(artifact.path).exists():
        return True
    folder = workflow.bench_dir(artifact, profile=profile, evaluation=evaluation, hardware=hardware, group=group,
                                repeat=repeat, work_dir=Path(work_dir))
    return not workflow.result_ok(folder, name=artifact.candidate)


def outputs_stale(artifact: Artifact, profile: Profile, evaluation: str | None, hardware: HardwareFingerprint,
                  work_dir: str) -> bool:
    folder = workflow.outputs_dir(artifact, profile=profile, evaluation=evaluation, hardware=hardware,
                                  work_dir=Path(work_dir))
    return not workflow.result_ok(folder, name=artifact.candidate)


@task(name="load-profile", cache_policy=NO_CACHE)
def load_profile_task(profile: str) -> Profile:
    return load_profile(profile)


@task(name="assess", cache_policy=NO_CACHE)
def assess_task(model: str) -> Assessment:
    return intake.assess(model)


@task(name="prepare-model", cache_policy=NO_CACHE)
def prepare_model_task(model: str, work_dir: str) -> tuple[Assessment, Assessment]:
    """(the model as given, the ONNX model candidates are built from); exports HF checkpoints."""
    return workflow.prepare_model(model, work_dir=Path(work_dir))


@task(name="prepare-data", task_run_name="prepare-{role}-data", cache_policy=NO_CACHE)
def prepare_data_task(path: str | None, assessment: Assessment, seq_len: int, work_dir: str, role: str) -> str | None:
    return workflow.prepare_data(path, assessment=assessment, seq_len=seq_len, work_dir=Path(work_dir), role=role)


@task(name="fingerprint", cache_policy=NO_CACHE)
def fingerprint_task() -> HardwareFingerprint:
    return fingerprint()


@task(name="input-shapes", cache_policy=NO_CACHE)
def input_shapes_task(assessment: Assessment, shapes: list[str], profile: Profile, evaluation: str | None,
                      seq_len: int) -> Assessment:
    return workflow.resolve_input_shapes(assessment, shapes=shapes, profile=profile, evaluation=evaluation,
                                         seq_len=seq_len)


@task(name="synthetic-data", cache_policy=NO_CACHE)
def synthetic_data_task(assessment: Assessment, work_dir: str) -> str:
    return workflow.synthetic_data(assessment, work_dir=Path(work_dir))


@task(name="check-data", cache_policy=NO_CACHE)
def check_data_task(assessment: Assessment, calibration: str | None, evaluation: str | None) -> None:
    workflow.check_data(assessment, calibration=calibration, evaluation=evaluation)


@task(name="build-candidate", task_run_name="build-{spec.name}", cache_key_fn=_build_key, persist_result=True)
def build_task(spec: CandidateSpec, assessment: Assessment, calibration: str | None, work_dir: str,
               hardware: HardwareFingerprint) -> Artifact:
    return workflow.build(spec, assessment=assessment, calibration=calibration, work_dir=Path(work_dir),
                          hardware=hardware)


@task(name="benchmark", task_run_name="benchmark-{artifact.candidate}-{repeat}",
      cache_key_fn=_bench_key, persist_result=True)
def benchmark_task(artifact: Artifact, profile: Profile, assessment: Assessment, hardware: HardwareFingerprint,
                   evaluation: str | None, work_dir: str, group: str, repeat: int = 0) -> BenchmarkResult:
    work = Path(work_dir)
    return workflow.measure(artifact, profile=profile, assessment=assessment, hardware=hardware,
                            evaluation=evaluation, work_dir=work, group=group, lock_path=work / "bench.lock",
                            repeat=repeat)


@task(name="pool-repeats", task_run_name="pool-{candidate}", cache_policy=NO_CACHE)
def pool_task(candidate: str, results: list[BenchmarkResult]) -> BenchmarkResult:
    return workflow.pool(results)


@task(name="run-outputs", task_run_name="outputs-{artifact.candidate}",
      cache_key_fn=_outputs_key, persist_result=True)
def outputs_task(artifact: Artifact, profile: Profile, assessment: Assessment, evaluation: str | None,
                 work_dir: str, hardware: HardwareFingerprint) -> str:
    return workflow.run_outputs(artifact, profile=profile, assessment=assessment, evaluation=evaluation,
                                work_dir=Path(work_dir), hardware=hardware)


@task(name="evaluate", task_run_name="evaluate-{candidate}", cache_policy=NO_CACHE)
def evaluate_task(candidate: str, outputs: str, baseline_outputs: str, assessment: Assessment,
                  evaluation: str | None, max_samples: int) -> EvalResult:
    return workflow.evaluate(candidate, outputs=outputs, baseline_outputs=baseline_outputs, assessment=assessment,
                             evaluation=evaluation, max_samples=max_samples)


@task(name="audit", task_run_name="audit-{outcome.spec.name}", cache_policy=NO_CACHE)
def audit_task(outcome: CandidateOutcome, outputs: str) -> CandidateOutcome:
    return workflow.audit(outcome, outputs=outputs)


@task(name="gate", cache_policy=NO_CACHE)
def gate_task(outcomes: list[CandidateOutcome], profile: Profile, kind: str,
              baselines: dict[str, str], run_to_run_sd: float = 0.0,
              earlier: dict[str, list[float]] | None = None) -> list[CandidateOutcome]:
    return workflow.with_gates(outcomes, profile=profile, kind=kind, baselines=baselines,
                               run_to_run_sd=run_to_run_sd, earlier=earlier)


@task(name="host-spread", cache_policy=NO_CACHE)
def host_spread_task(profile: Profile, hardware: HardwareFingerprint, data_dir: str, kind: str = ""):
    return workflow.host_spread(profile=profile, hardware=hardware, data_dir=Path(data_dir), kind=kind)


@task(name="earlier-speedups", cache_policy=NO_CACHE)
def earlier_speedups_task(outcomes: list[CandidateOutcome], artifacts: dict[str, Artifact], run: str,
                          profile: Profile, kind: str, baselines: dict[str, str], evaluation: str | None,
                          hardware: HardwareFingerprint, data_dir: str) -> dict[str, list[float]]:
    return workflow.earlier_speedups(outcomes, artifacts=artifacts, run=run, profile=profile, kind=kind,
                                     baselines=baselines, evaluation=evaluation, hardware=hardware,
                                     data_dir=Path(data_dir))


@task(name="record-speedups", cache_policy=NO_CACHE)
def record_speedups_task(outcomes: list[CandidateOutcome], artifacts: dict[str, Artifact], fresh: set[str],
                         run: str, profile: Profile, kind: str, evaluation: str | None,
                         hardware: HardwareFingerprint, data_dir: str) -> int:
    return workflow.record_speedups(outcomes, artifacts=artifacts, fresh=fresh, run=run, profile=profile,
                                    kind=kind, evaluation=evaluation, hardware=hardware, data_dir=Path(data_dir))


@task(name="select", cache_policy=NO_CACHE)
def select_task(outcomes: list[CandidateOutcome], profile: Profile) -> Selection:
    return workflow.select(outcomes, profile=profile)
