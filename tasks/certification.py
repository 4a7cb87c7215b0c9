"""Prefect tasks of the certification and cross-validation flows: thin wrappers over ``edgeopt.certify``.

Nothing here is cached: a certification is evidence about the artifact *now*, on this machine.
Checks do not raise for a failing verdict (that is a ``CheckResult`` with status ``fail``); an
exception means the check could not run, and the flow fails with it (no tag, no alias moves).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from edgeopt.bench import BenchSettings
from edgeopt.certify.records import CheckResult, CrossValidation, Subject
from edgeopt.data import Dataset
from edgeopt.records import HardwareFingerprint

_OPTS: dict[str, Any] = {"cache_policy": NO_CACHE}


@task(name="check-data-quality", **_OPTS)
def data_quality_task(subject: Subject, evaluation: Dataset, calibration: Dataset | None, out_dir: str) -> CheckResult:
    from edgeopt.certify import data_quality

    return data_quality.check(signature=subject.signature, evaluation=evaluation, calibration=calibration,
                              out_dir=Path(out_dir))


@task(name="check-accuracy", **_OPTS)
def accuracy_task(subject: Subject, evaluation_path: str, out_dir: str, confidence: float) -> CheckResult:
    from edgeopt.certify import accuracy

    return accuracy.check(artifact=subject.artifact, baseline=subject.baseline, signature=subject.signature,
                          evaluation_path=evaluation_path, kind=subject.kind, gates=subject.gates,
                          out_dir=Path(out_dir), confidence=confidence)


@task(name="check-robustness", **_OPTS)
def robustness_task(subject: Subject, evaluation: Dataset, calibration: Dataset | None, out_dir: str,
                    noise_level: float) -> CheckResult:
    from edgeopt.certify import robustness

    # the floor under perturbation is the fidelity the profile accepts: cosine_min for encoders, else
    # accuracy_ratio_min (agreement with the baseline on the same perturbed inputs)
    floor = subject.gates.get("cosine_min") if subject.kind == "encoder" else None
    floor = floor if floor is not None else subject.gates.get("accuracy_ratio_min", 0.95)
    return robustness.check(artifact=subject.artifact, baseline=subject.baseline, signature=subject.signature,
                            evaluation=evaluation, calibration=calibration, kind=subject.kind,
                            out_dir=Path(out_dir), noise_level=noise_level, agreement_min=min(1.0, float(floor)))


@task(name="check-stress", **_OPTS)
def stress_task(subject: Subject, evaluation_path: str, out_dir: str, callers: int, duration_s: float,
                threads: int) -> CheckResult:
    from edgeopt.certify import stress

    return stress.stress_check(artifact=subject.artifact, signature=subject.signature,
                               evaluation_path=evaluation_path, out_dir=Path(out_dir), callers=callers,
                               duration_s=duration_s, threads=threads)


@task(name="check-soak", **_OPTS)
def soak_task(subject: Subject, evaluation_path: str, out_dir: str, duration_s: float, threads: int) -> CheckResult:
    from edgeopt.certify import stress

    return stress.soak_check(artifact=subject.artifact, signature=subject.signature,
                             evaluation_path=evaluation_path, out_dir=Path(out_dir), duration_s=duration_s,
                             window_s=max(1.0, min(5.0, duration_s / 12.0)), threads=threads)


@task(name="check-power", **_OPTS)
def power_task(soak: CheckResult, out_dir: str) -> CheckResult:
    from edgeopt.certify import stress

    return stress.power_check(soak=soak, out_dir=Path(out_dir))


@task(name="check-provenance", **_OPTS)
def provenance_task(subject: Subject, hardware: HardwareFingerprint, out_dir: str, key_dir: str,
                    checks: list[CheckResult]) -> CheckResult:
    from edgeopt.certify import provenance

    info = {"model_name": subject.model_name, "version": subject.version, "profile": subject.profile,
            "kind": subject.kind, "baseline_sha256": subject.baseline.sha256}
    return provenance.provenance_check(artifact=subject.artifact, hardware=hardware, out_dir=Path(out_dir),
                                       key_dir=Path(key_dir), subject_info=info,
                                       checks=[c.model_dump(mode="json") for c in checks])


@task(name="cross-validate-matrix", **_OPTS)
def cross_validate_task(subject: Subject, evaluation_path: str | None, out_dir: str, hardware: HardwareFingerprint,
                        settings: BenchSettings, rounds: int, confidence: float, cosine_min: float, threads: int,
                        lock_path: str, run_to_run_sd: float = 0.0) -> CrossValidation:
    from edgeopt.certify import crossval

    rh = subject.recorded_hardware
    recorded = hardware.model_copy(update={"cpu_model": rh["cpu"], "arch": rh.get("arch", hardware.arch),
                                           "isa_flags": tuple(f for f in rh.get("isa", "").split(",") if f)}
                                   ) if rh.get("cpu") else None
    cv = crossval.cross_validate(subject=subject, evaluation_path=evaluation_path, out_dir=Path(out_dir),
                                 hardware=hardware, settings=settings, rounds=rounds, confidence=confidence,
                                 cosine_min=cosine_min, threads=threads, recorded_hardware=recorded,
                                 lock_path=Path(lock_path), run_to_run_sd=run_to_run_sd)
    crossval.write(cv, out_dir=Path(out_dir))
    return cv
