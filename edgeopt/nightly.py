"""The nightly re-optimization's decisions: has anything changed, and does tonight's winner beat the champion?

**Change detection.** ``change_digest`` hashes everything that can change a nightly result: the
model's bytes, the calibration and evaluation data, the profile as validated, the candidate filter,
the hardware with its tool versions (``keys.hardware_identity``) and the record schema. The flow
re-optimizes only when it differs from the last completed nightly's digest; otherwise it records
"unchanged" in seconds.

**The duel.** Tonight's winner (the challenger) and the current champion are measured by the same
harness in the same run, interleaved (round 1: champion, challenger; round 2 reversed; ...), on the
same evaluation inputs with the profile's thread budget made explicit for both, each round in fresh
processes. The challenger's speed-up over the champion is ``champion p50 / challenger p50`` with the
interval of ``edgeopt.intervals.ratio_interval`` (Student's t over the paired per-round log ratios,
at least as wide as the host's run-to-run spread). Promotion needs:

* ``speed-up``: the interval's **lower bound** above ``1 + min_improvement``: the challenger is faster
  by more than the measured noise of both, not only on its point estimate;
* ``accuracy`` (when the evaluation data has labels): the challenger's top-1 accuracy, measured now on
  the same inputs, at least ``accuracy_ratio_min`` (the profile's gate) times the champion's;
* then certification (``flows/certify.py``), and only then the ``champion`` alias moves.

A failed or impossible measurement is NaN and never promotes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt import bench
from edgeopt.comparison import with_threads
from edgeopt.data import file_sha256, load_dataset, path_sha256
from edgeopt.errors import BackendUnavailable, CandidateFailed
from edgeopt.evaluate import load_outputs
from edgeopt.intervals import Interval, ratio_interval
from edgeopt.keys import digest, hardware_identity
from edgeopt.records import SCHEMA_VERSION, Artifact, HardwareFingerprint, TensorSpec

__all__ = ["Duel", "change_digest", "duel"]

log = logging.getLogger(__name__)


def change_digest(*, model: str, calibration: str | None, evaluation: str | None, profile_doc: dict[str, Any],
                  candidates: list[str] | None, hardware: HardwareFingerprint) -> str:
    """One digest of every input of a nightly run (module doc)."""
    def sha(path: str | None) -> str | None:
        return file_sha256(path) if path and Path(path).is_file() else (path_sha256(path) if path else None)

    return digest("nightly", SCHEMA_VERSION, path_sha256(model), sha(calibration), sha(evaluation), profile_doc,
                  sorted(candidates or []), hardware_identity(hardware))


@dataclass(frozen=True)
class Duel:
    """The challenger against the champion, measured interleaved in this run."""

    speedup: Interval
    rounds: int
    champion_p50_ms: float
    challenger_p50_ms: float
    champion_accuracy: float | None
    challenger_accuracy: float | None
    min_improvement: float
    accuracy_ratio_min: float

    @property
    def faster(self) -> bool:
        """The interval's lower bound clears ``1 + min_improvement`` (False when it cannot be formed)."""
        return self.speedup.finite and self.speedup.low > 1.0 + self.min_improvement

    @property
    def accurate(self) -> bool:
        if self.champion_accuracy is None or self.challenger_accuracy is None:
            return True  # no labels: the gates against the FP32 baseline already bound both
        if not (math.isfinite(self.champion_accuracy) and math.isfinite(self.challenger_accuracy)):
            return False
        return self.challenger_accuracy >= self.accuracy_ratio_min * self.champion_accuracy

    @property
    def promote(self) -> bool:
        return self.faster and self.accurate

    def reason(self) -> str:
        s = self.speedup
        ci = f"[{s.low:.2f}, {s.high:.2f}]" if s.finite else "not measurable"
        speed = (f"challenger {s.point:.2f}× the champion's speed at p50, {s.confidence:.0%} interval {ci} over "
                 f"{self.rounds} interleaved round(s)")
        if not self.faster:
            return f"{speed}: not faster by more than the noise (needs a lower bound above {1 + self.min_improvement:.2f})"
        if not self.accurate:
            return (f"{speed}, but its accuracy {self.challenger_accuracy:.4f} is below "
                    f"{self.accuracy_ratio_min:g} × the champion's {self.champion_accuracy:.4f}")
        acc = (f"; accuracy {self.challenger_accuracy:.4f} vs the champion's {self.champion_accuracy:.4f}"
               if self.challenger_accuracy is not None and self.champion_accuracy is not None else "")
        return f"{speed}: faster by more than the noise{acc}"

    def metrics(self) -> dict[str, float]:
        m = {"duel_speedup_p50": self.speedup.point, "duel_speedup_ci_low": self.speedup.low,
             "duel_speedup_ci_high": self.speedup.high, "duel_rounds": float(self.rounds),
             "duel_champion_p50_ms": self.champion_p50_ms, "duel_challenger_p50_ms": self.challenger_p50_ms}
        if self.champion_accuracy is not None and self.challenger_accuracy is not None:
            m |= {"duel_champion_accuracy": self.champion_accuracy,
                  "duel_challenger_accuracy": self.challenger_accuracy}
        return m


def _accuracy(artifact: Artifact, *, signature: tuple[TensorSpec, ...], labels: np.ndarray | None, out: Path,
              data_path: str, batch_size: int, timeout_s: float) -> float | None:
    if labels is None:
        return None
    try:
        outputs = load_outputs(bench.infer(artifact=artifact, signature=signature, out_path=out,
                                           data_path=data_path, batch_size=batch_size, timeout_s=timeout_s))
    except (CandidateFailed, BackendUnavailable) as exc:
        log.warning("duel: %s produced no outputs: %s", artifact.candidate, exc)
        return math.nan
    n = min(len(labels), len(outputs))
    if n == 0 or outputs.ndim < 2:
        return math.nan
    return float(np.mean(np.argmax(outputs[:n].reshape(n, -1), axis=1) == labels[:n]))


def duel(*, champion: Artifact, challenger: Artifact, signature: tuple[TensorSpec, ...], evaluation_path: str | None,
         out_dir: Path, hardware: HardwareFingerprint, settings: bench.BenchSettings, threads: int,
         rounds: int = 3, confidence: float = 0.95, run_to_run_sd: float = 0.0, min_improvement: float = 0.0,
         accuracy_ratio_min: float = 0.95, lock_path: Path | None = None,
         progress: Callable[[str], None] = lambda msg: None) -> Duel:
    """Measure ``challenger`` against ``champion`` (module doc). A champion that cannot be measured
    raises ``CandidateFailed``; a challenger that cannot gives a NaN speed-up (no promotion)."""
    if rounds < 2:
        raise ValueError(f"a duel needs two rounds or more (an interval over rounds), got {rounds}")
    sides = {"champion": with_threads(champion, threads=threads), "challenger": with_threads(challenger, threads=threads)}
    labels = (load_dataset(evaluation_path, signature=signature, role="evaluation").labels
              if evaluation_path else None)
    acc = {name: _accuracy(a, signature=signature, labels=labels, out=out_dir / "outputs" / f"{name}.npz",
                           data_path=evaluation_path or "", batch_size=settings.batch_size,
                           timeout_s=settings.timeout_s) for name, a in sides.items()}
    samples, failures = bench.interleaved_rounds(
        artifacts=sides, reference="champion", rounds=rounds, settings=settings, signature=signature,
        hardware=hardware, out_dir=out_dir / "bench", data_path=evaluation_path, lock_path=lock_path, what="duel",
        progress=progress)
    failed = "challenger" in failures
    speed = (Interval.nan(confidence) if failed else
             ratio_interval(baseline=samples["champion"], candidate=samples["challenger"], confidence=confidence,
                            floor_sd=run_to_run_sd))

    def p50(name: str) -> float:
        return float(np.median(np.concatenate(samples[name]))) if samples[name] else math.nan

    return Duel(speedup=speed, rounds=len(samples["challenger"]), champion_p50_ms=p50("champion"),
                challenger_p50_ms=p50("challenger"), champion_accuracy=acc["champion"],
                challenger_accuracy=acc["challenger"], min_improvement=min_improvement,
                accuracy_ratio_min=accuracy_ratio_min)
