"""Audit of a measurement: did the timed runs compute what the evaluation saw, without caching results?

Two checks after MLPerf's compliance tests:

* **Output audit** (TEST01): the measuring process keeps the outputs of a sample of timed-loop runs
  (``write_capture``: the first pass over up to 16 full batches, ``audit.npz``: ``index`` = the data rows,
  ``output_<k>`` = the outputs, padded back to the full sequence length as ``infer`` pads them).
  ``check_outputs`` compares them with the evaluation run's outputs (``infer``) for the same rows: a
  runtime that computes something else while it is timed (another precision, stale or approximate
  results) fails with reason ``audit``.
* **Repeat audit** (TEST04): after the timed loop, each of the first few distinct inputs runs several
  times back to back (``repeat_ratio``). Their median latency over the same inputs' latency right after another
  same-shaped input, measured interleaved with them, is about 1 for an honest runtime; a runtime that caches results by input answers the repeats far faster.
  ``edgeopt.bench.harness.measure`` fails such a candidate (``AUDIT_REPEAT_RATIO_MIN``). Not seen by this
  check: a cache of two or more entries (the other input and the repeated one both stay cached).

Public surface: ``check_outputs(*, benchmark, outputs_path, rtol=AUDIT_RTOL)`` and ``AUDIT_RTOL``; the
worker's side: ``write_capture`` and ``repeat_ratio``.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.bench.shapes import pad_outputs
from edgeopt.errors import CandidateFailed
from edgeopt.records import BenchmarkResult

__all__ = ["AUDIT_RTOL", "RepeatAudit", "check_outputs", "repeat_ratio", "write_capture"]

log = logging.getLogger(__name__)

#: output audit tolerance, relative to the output's scale (its largest |value| over the compared rows of
#: the evaluation run). The two runs load the same artifact with the same options and batches, so most
#: runtimes agree bit for bit; what may differ is reduction order across threads: ~1e-6 of the scale in
#: fp32, about one ulp (~5e-4 relative) in fp16/bf16 arithmetic. Outputs of other inputs, stale outputs or
#: a 1 % rescale of the outputs differ by 1e-2 of the scale or more.
AUDIT_RTOL = 1e-3


# ------------------------------------------------------------------------------------ worker side
def write_capture(path: Path, captured: list[list[Any]], *, batch_size: int,
                  spans: list[tuple[int, int]]) -> str | None:
    """Write the timed loop's captured outputs (batch i = data rows ``i*batch_size ...``) to ``path``.

    ``spans`` holds each feed's (full, used) sequence length when inputs ran trimmed (else empty): the
    outputs are padded back to the full length as ``infer`` does. Outputs without a batch axis are left
    out. Returns the path, or None when nothing was captured.
    """
    if not captured:
        return None
    batches = [pad_outputs(outs, full=spans[i][0], used=spans[i][1]) if spans else [np.asarray(o) for o in outs]
               for i, outs in enumerate(captured)]
    arrays = {"index": np.arange(len(batches) * batch_size, dtype=np.int64)}
    for k in range(min(len(b) for b in batches)):
        parts = [np.asarray(b[k]) for b in batches]
        if all(p.ndim > 0 and p.shape[0] == batch_size for p in parts) and len({p.shape for p in parts}) == 1:
            arrays[f"output_{k}"] = np.concatenate(parts, axis=0)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)
    return str(path)


@dataclass(frozen=True)
class RepeatAudit:
    """The repeat audit's result: the median ratio, and each input's (ratio, what it was compared with)."""

    ratio: float | None
    per_input: tuple[tuple[float, str], ...] = ()


def _shapes(feed: dict[str, np.ndarray]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple(sorted((k, tuple(np.shape(v))) for k, v in feed.items()))


def _variant(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same shapes and values with other contents: every input reversed along its last axis."""
    return {k: np.ascontiguousarray(v[..., ::-1]) if np.ndim(v) else v for k, v in feed.items()}


def repeat_ratio(run: Callable[[dict[str, np.ndarray]], Any], feeds: list[dict[str, np.ndarray]], *,
                 inputs: int = 8, repeats: int = 6, budget_s: float | None = None) -> RepeatAudit:
    """Median over the first ``inputs`` feeds of: median latency of the feed run again right after itself
    / median latency of the same feed right after another input.

    Both are measured here, interleaved, in three rounds of: a same-shaped input with other contents
    (``_variant``), the feed (the reference: it follows another input), then the feed again
    (``(repeats - 1) // 2`` times: repeats). Measured side by side, a busy machine or a contended thread
    pool slows both alike (comparing with the timed loop's runs instead made a 2-thread candidate on a
    loaded 2-core machine look 15x "faster" on repeats), and a runtime that re-prepares its kernels on a
    shape change (OpenVINO) is not mistaken for a cache. Paired per feed, so feeds of different lengths
    compare like with like. Once ``budget_s`` has been spent, no further feed is started (three at
    least are audited).
    """
    n, clock = len(feeds), time.perf_counter_ns
    per_input: list[tuple[float, str]] = []
    started = clock()
    per_round = max(1, (repeats - 1) // 2)
    gc.disable()
    try:
        for j in range(min(n, inputs)):
            if budget_s is not None and j >= 3 and (clock() - started) / 1e9 > budget_s:
                break
            feed, other = feeds[j], _variant(feeds[j])
            reference, repeated = [], []
            for _ in range(3):
                run(other)
                t_a = clock()
                run(feed)
                reference.append(clock() - t_a)
                for _ in range(per_round):
                    t_a = clock()
                    run(feed)
                    repeated.append(clock() - t_a)
            base = float(np.median(reference)) if reference else 0.0
            if base > 0 and repeated:
                per_input.append((float(np.median(repeated)) / base, "same-shape input"))
    finally:
        gc.enable()
    ratio = float(np.median([r for r, _ in per_input])) if per_input else None
    return RepeatAudit(ratio=ratio, per_input=tuple(per_input))


# ------------------------------------------------------------------------------------ parent side
def check_outputs(*, benchmark: BenchmarkResult, outputs_path: str, rtol: float = AUDIT_RTOL) -> None:
    """Compare the outputs captured in ``benchmark``'s timed loop with the evaluation run's (``infer``).

    ``outputs_path`` is ``infer``'s .npz (``output_<k>``, rows = samples) for the same artifact, data
    and batch size. The rows compared are the captured ones that lie in a full batch of the evaluation run
    too (its last, wrapped-around batch is left out). Float outputs may differ by ``rtol`` times the
    output's scale (the largest |value| of the evaluation run's output over those rows, see
    ``AUDIT_RTOL``); integer and boolean outputs must be equal.

    Raises ``CandidateFailed("audit", ...)`` naming the output, the largest difference, the sample and
    the tolerance (or when the audit file is gone). Logs a warning and returns when there is nothing to compare (no capture, no common row).
    """
    who = f"candidate '{benchmark.candidate}'"
    if not benchmark.audit_path:
        log.warning("%s: no outputs were captured in the timed loop (fewer samples than one batch?): "
                    "output audit skipped", who)
        return
    if not Path(benchmark.audit_path).is_file():
        raise CandidateFailed("audit", f"{who}: the outputs captured in its timed loop ({benchmark.audit_path}) "
                              "are gone, so its timed runs cannot be audited; measure it again")
    with np.load(benchmark.audit_path, allow_pickle=False) as npz:
        captured = {k: npz[k] for k in npz.files}
    with np.load(outputs_path, allow_pickle=False) as npz:
        evaluated = {k: npz[k] for k in npz.files if k.startswith("output_") and k != "output_names"}
    index = captured.pop("index")
    keys = sorted(set(captured) & set(evaluated), key=lambda k: int(k.split("_")[1]))
    if not keys:
        log.warning("%s: the audit file %s and the outputs %s share no output: output audit skipped",
                    who, benchmark.audit_path, outputs_path)
        return
    bs = max(1, benchmark.batch_size)
    rows = int(evaluated[keys[0]].shape[0]) if evaluated[keys[0]].ndim else 0
    usable = index < (rows // bs) * bs
    if not usable.any():
        log.warning("%s: the evaluation run's %d samples include none of the %d rows captured in the timed "
                    "loop: output audit skipped", who, rows, index.size)
        return
    compared = 0
    for key in keys:
        timed, reference = captured[key][usable], evaluated[key][index[usable]]
        if timed.shape != reference.shape:
            raise CandidateFailed("audit", f"{who}: timed outputs differ from the evaluation run's for the "
                                  f"same inputs: {key} has shape {list(timed.shape)} in the timed loop and "
                                  f"{list(reference.shape)} in the evaluation run")
        _compare(key, timed, reference, index[usable], rtol=rtol, who=who)
        compared += 1
    log.info("%s: output audit passed (%d outputs, %d samples, tolerance %.1e of each output's scale)",
             who, compared, int(usable.sum()), rtol)


def _compare(key: str, timed: np.ndarray, reference: np.ndarray, rows: np.ndarray, *, rtol: float,
             who: str) -> None:
    exact = not (np.issubdtype(reference.dtype, np.floating) or np.issubdtype(reference.dtype, np.complexfloating))
    a, b = timed.astype(np.float64), reference.astype(np.float64)
    diff = np.abs(a - b)
    diff[~np.isfinite(diff)] = np.inf  # NaN or inf where the other run has a number
    finite_ref = np.abs(b[np.isfinite(b)])
    scale = float(finite_ref.max()) if finite_ref.size else 0.0
    tol = 0.0 if exact else rtol * scale if scale > 0 else rtol
    if diff.size == 0 or float(diff.max()) <= tol:
        return
    worst = int(np.argmax(diff))
    sample = int(rows[np.unravel_index(worst, diff.shape)[0]])
    kind = "exactly (integer output)" if exact else f"{rtol:g} x scale {scale:.4g}"
    raise CandidateFailed("audit", f"{who}: timed outputs differ from the evaluation run's for the same "
                          f"inputs: {key} max abs diff {float(diff.max()):.4g} at sample {sample} "
                          f"(tolerance {tol:.4g}: {kind})")
