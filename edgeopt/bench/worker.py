"""The measuring process: ``python -m edgeopt.bench.worker JOB.json`` (started by ``harness``).

It runs in a fresh interpreter so a crash, a leak or an OOM costs only this candidate. It reads a
job file written by the parent, does one job (``measure`` or ``infer``), and writes a result JSON
(``job["result_path"]``): ``{"ok": true, ...}`` or ``{"ok": false, "reason"|"error", "message"}``.
Its only output besides that file and the files it was asked for is logging on stderr.

Memory: on Linux the peak is the process's own ``VmHWM`` (``/proc/self/status``), reset after the
inputs are built (``/proc/self/clear_refs``). ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used
there because after fork+exec it carries the *parent's* peak (a 600 MB parent makes a 9 MB child
report 600 MB); elsewhere it is the fallback.

Fault injection (tests only): ``EDGEOPT_BENCH_FAULT`` makes the worker misbehave right after
loading the artifact, to test the parent's failure classification: ``segfault`` / ``abort`` kill
it with SIGSEGV / SIGABRT; ``hang`` sleeps forever; ``oom`` allocates past the job's memory limit
and waits 10 s for the watchdog (with no limit: allocates 2 GB), then raises ``MemoryError``;
``nan`` makes the outputs NaN.
"""

from __future__ import annotations

import faulthandler
import gc
import importlib
import json
import logging
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.bench.shapes import pad_outputs, split_runtime, trim
from edgeopt.data import Dataset, load_dataset, synthetic_dataset
from edgeopt.errors import BackendUnavailable, CandidateFailed, ConfigError, DataError, ModelError
from edgeopt.records import Artifact, TensorSpec

__all__ = ["FAULT_ENV", "main"]

log = logging.getLogger(__name__)

FAULT_ENV = "EDGEOPT_BENCH_FAULT"
FAULTS = ("segfault", "abort", "hang", "oom", "nan")
_LINUX = sys.platform.startswith("linux")
#: what the worker is doing, reported with a failure ("imports", "data", "load", "run", "write")
_stage = {"now": "start"}


# ---------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Current resident memory of this process (MB)."""
    kib = _status_kib("VmRSS") if _LINUX else None
    if kib is not None:
        return kib / 1024.0
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> tuple[float, str]:
    """Peak resident memory of this process (MB) and where the figure comes from."""
    kib = _status_kib("VmHWM") if _LINUX else None
    if kib is not None:
        return kib / 1024.0, "VmHWM"
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024.0), "ru_maxrss"


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so data loading is not counted as the model's."""
    if not _LINUX:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------ the session
class _NanSession:
    """Fault injection: the wrapped session's float outputs replaced with NaN."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.input_names = inner.input_names

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outs = self._inner.run(feeds)
        return [np.full_like(o, np.nan) if np.issubdtype(o.dtype, np.floating) else o for o in outs]


def _inject_fault(session: Any, memory_limit_mb: float | None) -> Any:
    fault = os.environ.get(FAULT_ENV, "")
    if not fault:
        return session
    if fault not in FAULTS:
        raise ConfigError(f"{FAULT_ENV}={fault!r} is not a known fault (allowed: {', '.join(FAULTS)})")
    log.warning("fault injection: %s", fault)
    if fault == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif fault == "abort":
        os.abort()
    elif fault == "hang":
        while True:
            time.sleep(3600)
    elif fault == "oom":
        cap_mb = memory_limit_mb + 64.0 if memory_limit_mb else 2048.0
        hoard = []
        while rss_mb() < cap_mb:
            hoard.append(np.ones(32 * 2**20 // 8))  # 32 MB, pages touched
            time.sleep(0.01)
        if memory_limit_mb:  # above the limit: give the parent's watchdog time to kill this process
            time.sleep(10.0)
        raise MemoryError(f"fault injection: allocated {rss_mb():.0f} MB")
    elif fault == "nan":
        return _NanSession(session)
    return session


def _import_toolchain(artifact: Artifact) -> Any:
    """The artifact's backend, with its toolchain imported so that its memory counts as baseline."""
    from edgeopt import backends

    backend = backends.get(artifact.backend)
    backend.check_available()
    for module in backend.requires:
        importlib.import_module(module)
    return backend


def _dataset(job: dict[str, Any], *, count: int) -> Dataset:
    signature = tuple(TensorSpec.model_validate(s) for s in job["signature"])
    if job.get("data_path"):
        return load_dataset(job["data_path"], signature=signature, role="evaluation")
    return synthetic_dataset(signature, count=count)


def _check_finite(outputs: list[np.ndarray], candidate: str, names: list[str] | None = None) -> None:
    for i, out in enumerate(outputs):
        arr = np.asarray(out)
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            name = names[i] if names and i < len(names) else f"output_{i}"
            raise CandidateFailed("accuracy", f"candidate '{candidate}': {name} has {bad} NaN/inf values "
                                              f"out of {arr.size}")


# ------------------------------------------------------------------------------------------- jobs
def _measure(job: dict[str, Any]) -> dict[str, Any]:
    artifact = Artifact.model_validate(job["artifact"])
    s = job["settings"]
    _stage["now"] = "imports"
    backend = _import_toolchain(artifact)
    rss_after_imports = rss_mb()

    _stage["now"] = "data"
    bs = int(s["batch_size"])
    ds = _dataset(job, count=int(s["eval_samples"])).head(int(s["eval_samples"]))
    feeds = [{k: np.ascontiguousarray(v) for k, v in ds.sample(i * bs, batch_size=bs).items()}
             for i in range(max(1, math.ceil(ds.count / bs)))]
    runtime, sequence = split_runtime(artifact.runtime)
    if sequence:  # each input at its real (or bucketed) length
        feeds = [trim(f, sequence)[0] for f in feeds]
    lengths = [f["attention_mask"].shape[1] for f in feeds if getattr(f.get("attention_mask"), "ndim", 0) == 2]
    data_id = ds.sha256
    del ds
    gc.collect()
    peak_reset = _reset_peak_rss()
    rss_baseline = rss_mb()

    _stage["now"] = "load"
    t0 = time.perf_counter_ns()
    session = backend.load(path=artifact.path, runtime=runtime)
    load_time_ms = (time.perf_counter_ns() - t0) / 1e6
    _stage["now"] = "run"
    session = _inject_fault(session, s.get("memory_limit_mb"))
    names = list(getattr(session, "output_names", None) or []) or None
    run = session.run

    # one untimed pass over every distinct input checks the outputs and doubles as warm-up
    for feed in feeds:
        _check_finite(run(feed), artifact.candidate, names)
    n = len(feeds)
    for i in range(int(s["warmup_runs"])):
        run(feeds[i % n])

    min_runs, max_runs = int(s["min_runs"]), int(s["max_runs"])
    min_ns, max_ns = int(s["min_duration_s"] * 1e9), int(s["max_duration_s"] * 1e9)
    lat_ns: list[int] = []
    append, clock = lat_ns.append, time.perf_counter_ns
    gc.collect()
    gc.disable()
    timed_start_unix = time.time()
    start = clock()
    try:
        i = 0
        while True:
            feed = feeds[i % n]
            t_a = clock()
            out = run(feed)
            t_b = clock()
            append(t_b - t_a)
            i += 1
            elapsed = t_b - start
            if i >= max_runs or elapsed >= max_ns or (i >= min_runs and elapsed >= min_ns):
                break
    finally:
        gc.enable()
    duration_s = (clock() - start) / 1e9
    timed_end_unix = time.time()
    _check_finite(out, artifact.candidate, names)

    _stage["now"] = "write"
    samples = np.asarray(lat_ns, dtype=np.float64) / 1e6
    samples_path = Path(job["samples_path"])
    with open(samples_path, "wb") as fh:
        np.save(fh, samples)
    peak, peak_source = peak_rss_mb()
    return {
        "samples": int(samples.size),
        "samples_path": str(samples_path),
        "load_time_ms": load_time_ms,
        "duration_s": duration_s,
        "rss_after_imports_mb": rss_after_imports,
        "rss_baseline_mb": rss_baseline,
        "rss_peak_mb": peak,
        "rss_model_mb": max(0.0, peak - rss_baseline),
        "peak_source": peak_source,
        "peak_reset": peak_reset,
        "distinct_inputs": n,
        "data": data_id,
        "tool_versions": backend.tool_versions(),
        "timed_start_unix": timed_start_unix,
        "timed_end_unix": timed_end_unix,
        "sequence": sequence["mode"] if sequence else "fixed",
        "seq_len_mean": float(np.mean(lengths)) if lengths else None,
    }


def _infer(job: dict[str, Any]) -> dict[str, Any]:
    artifact = Artifact.model_validate(job["artifact"])
    _stage["now"] = "imports"
    backend = _import_toolchain(artifact)
    _stage["now"] = "data"
    max_samples = job.get("max_samples")
    ds = _dataset(job, count=int(max_samples or 16))
    if max_samples:
        ds = ds.head(int(max_samples))
    _stage["now"] = "load"
    runtime, sequence = split_runtime(artifact.runtime)
    session = backend.load(path=artifact.path, runtime=runtime)
    _stage["now"] = "run"
    session = _inject_fault(session, None)
    names = list(getattr(session, "output_names", None) or []) or None

    bs, count = int(job["batch_size"]), ds.count
    chunks: list[list[np.ndarray]] = []
    for start in range(0, count, bs):
        valid = min(bs, count - start)
        feed = ds.sample(start, batch_size=bs)  # the last batch wraps around; cut back below
        if sequence:
            feed, full, used = trim(feed, sequence)
            outs = pad_outputs(session.run(feed), full=full, used=used)
        else:
            outs = session.run(feed)
        outs = [o[:valid] if np.ndim(o) > 0 and o.shape[0] == bs else o for o in outs]
        chunks.append(outs)
    arrays = {}
    for i in range(len(chunks[0])):
        parts = [np.asarray(c[i]) for c in chunks]
        arrays[f"output_{i}"] = np.concatenate(parts, axis=0) if parts[0].ndim > 0 else np.stack(parts)
    _check_finite(list(arrays.values()), artifact.candidate, names)
    if names:
        arrays["output_names"] = np.asarray(names, dtype=str)

    _stage["now"] = "write"
    out_path = Path(job["out_path"])
    tmp = out_path.with_name(out_path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, out_path)
    return {"samples": count, "outputs": len(chunks[0]), "out_path": str(out_path)}


# ------------------------------------------------------------------------------------------- main
def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return " | ".join(lines)[:500] if lines else ""


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def _failure(exc: BaseException) -> dict[str, Any]:
    """The result payload for an exception: its class, a one-line message, and a reason if known."""
    reasons = {BackendUnavailable: "unavailable", ModelError: "build-error", MemoryError: "oom",
               DataError: "missing-data"}
    payload: dict[str, Any] = {"ok": False, "error": type(exc).__name__}
    if isinstance(exc, CandidateFailed):
        payload["reason"] = exc.reason
    for cls, reason in reasons.items():
        if isinstance(exc, cls):
            payload["reason"] = reason
    known = (CandidateFailed, BackendUnavailable, ModelError, DataError, ConfigError)
    payload["message"] = _one_line(str(exc) if isinstance(exc, known) else f"{type(exc).__name__}: {exc}")
    return payload


def main(argv: list[str] | None = None) -> int:
    """Run the job in ``argv[0]``; write its result JSON; return the exit code (0 = ok)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m edgeopt.bench.worker JOB.json\n")
        return 2
    faulthandler.enable()  # native crashes dump the Python stack to stderr, then die by the signal
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job = json.loads(Path(args[0]).read_text())
    started = time.time()
    code = 1
    try:
        jobs = {"measure": _measure, "infer": _infer}
        if job.get("mode") not in jobs:
            raise ConfigError(f"unknown job mode {job.get('mode')!r} (allowed: {', '.join(jobs)})")
        payload: dict[str, Any] = {"ok": True, **jobs[job["mode"]](job)}
        _stage["now"] = "done"
        code = 0
    except Exception as exc:  # every failure goes to the result file, classified
        if not isinstance(exc, (CandidateFailed, BackendUnavailable, ModelError, DataError, ConfigError)):
            log.exception("job failed")
        payload = _failure(exc)
    payload.update(stage=_stage["now"], started_unix=started, finished_unix=time.time(), pid=os.getpid())
    _write_json(Path(job["result_path"]), payload)
    return code


if __name__ == "__main__":
    _code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_code)  # skip interpreter teardown: a toolchain's crash at exit is not the candidate's
