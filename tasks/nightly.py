"""Prefect tasks of the nightly flow: thin wrappers over ``edgeopt.nightly``. Nothing is cached: the
digest reads tonight's files, and the duel is evidence about the two artifacts now, on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from edgeopt import nightly
from edgeopt.bench import BenchSettings
from edgeopt.certify.records import Subject
from edgeopt.records import HardwareFingerprint


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
