"""Prefect tasks of the nightly and drift flows: thin wrappers over ``edgeopt.nightly`` and
``edgeopt.drift``. Nothing is cached: the digest reads tonight's files, the duel is evidence about the
two artifacts now, on this machine, and a drift check is about tonight's production sample."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from edgeopt import bench, drift, nightly
from edgeopt.bench import BenchSettings
from edgeopt.certify.records import Subject
from edgeopt.data import load_dataset
from edgeopt.evaluate import load_outputs
from edgeopt.records import Artifact, HardwareFingerprint, TensorSpec


@task(name="change-digest", cache_policy=NO_CACHE)
def change_digest_task(model: str, calibration: str | None, evaluation: str | None, profile_doc: dict[str, Any],
                       candidates: list[str] | None, hardware: HardwareFingerprint) -> str:
    return nightly.change_digest(model=model, calibration=calibration, evaluation=evaluation,
                                 profile_doc=profile_doc, candidates=candidates, hardware=hardware)


@task(name="duel", cache_policy=NO_CACHE)
def duel_task(champion: Subject, challenger: Subject, evaluation_path: str | None, out_dir: str,
              hardware: HardwareFingerprint, settings: BenchSettings, threads: int, rounds: int, confidence: float,
              run_to_run_sd: float, min_improvement: float, accuracy_ratio_min: float) -> nightly.Duel:
    return nightly.duel(champion=champion.artifact, challenger=challenger.artifact, signature=challenger.signature,
                        evaluation_path=evaluation_path, out_dir=Path(out_dir), hardware=hardware,
                        settings=settings, threads=threads, rounds=rounds, confidence=confidence,
                        run_to_run_sd=run_to_run_sd, min_improvement=min_improvement,
                        accuracy_ratio_min=accuracy_ratio_min, lock_path=Path(out_dir) / "bench.lock")


@task(name="drift", cache_policy=NO_CACHE)
def drift_task(signature: tuple[TensorSpec, ...], calibration: str, production: str, baseline: Artifact | None,
               work_dir: str, psi_threshold: float, ks_pvalue: float) -> drift.DriftReport:
    ref = load_dataset(calibration, signature=signature, role="calibration")
    prod = load_dataset(production, signature=signature, role="production")
    embeddings = None
    if baseline is not None:  # token inputs: compare what the model makes of them
        out = Path(work_dir) / "drift"
        embeddings = tuple(drift.pooled(load_outputs(bench.infer(
            artifact=baseline, signature=signature, out_path=out / f"{role}.npz", data_path=path)))
            for role, path in (("reference", calibration), ("production", production)))
    return drift.compare(ref.inputs, prod.inputs, psi_threshold=psi_threshold, ks_pvalue=ks_pvalue,
                         embeddings=embeddings)
