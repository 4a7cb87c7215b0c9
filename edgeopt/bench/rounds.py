"""Interleaved rounds of a reference and the artifacts compared with it, each round in fresh processes.

Round 1 measures the reference, then the others in order; round 2 in reverse order; and so on, so no
artifact is always first or last and slow and fast periods of the machine fall on all alike. A
reference that cannot be measured raises (nothing can be compared with it); another artifact that
cannot is dropped from later rounds with its one-line reason.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeopt.bench.harness import BenchSettings, measure
from edgeopt.errors import BackendUnavailable, CandidateFailed
from edgeopt.records import Artifact, HardwareFingerprint, TensorSpec

__all__ = ["interleaved_rounds"]

log = logging.getLogger(__name__)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def interleaved_rounds(*, artifacts: dict[str, Artifact], reference: str, rounds: int, settings: BenchSettings,
                       signature: tuple[TensorSpec, ...], hardware: HardwareFingerprint, out_dir: Path,
                       data_path: str | None, lock_path: Path | None = None, what: str = "benchmark",
                       progress: Callable[[str], None] = lambda msg: None,
                       ) -> tuple[dict[str, list[np.ndarray]], dict[str, str]]:
    """Latency samples per artifact name (one array per round) and the failures (name -> one line).

    ``artifacts`` is ordered with ``reference`` in it; round ``r`` of ``name`` goes to
    ``out_dir/<name>-r<r>``. ``CandidateFailed`` when the reference fails.
    """
    order = [reference, *[n for n in artifacts if n != reference]]
    samples: dict[str, list[np.ndarray]] = {n: [] for n in order}
    failures: dict[str, str] = {}
    for r in range(rounds):
        for name in reversed(order) if r % 2 else order:
            if name in failures:
                continue
            progress(f"{what} {name} ({r + 1}/{rounds})")
            try:
                result = measure(artifact=artifacts[name], settings=settings, signature=signature, hardware=hardware,
                                 out_dir=Path(out_dir) / f"{_slug(name)}-r{r}", data_path=data_path,
                                 lock_path=lock_path)
            except (CandidateFailed, BackendUnavailable) as exc:
                line = " ".join(str(exc).split())
                if name == reference:
                    raise CandidateFailed(getattr(exc, "reason", "unavailable"),
                                          f"{what}: the reference {artifacts[name].candidate} could not be "
                                          f"measured: {line}") from exc
                failures[name] = line
                log.warning("%s: %s failed to measure: %s", what, name, line)
                continue
            samples[name].append(np.load(result.samples_path, allow_pickle=False))
    return samples, failures
