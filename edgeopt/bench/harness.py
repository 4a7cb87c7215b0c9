"""Parent side of the benchmark harness: every measurement in a fresh, supervised process.

``measure`` and ``infer`` write a job file, start ``python -m edgeopt.bench.worker JOB.json`` in
its own session (process group) with stdout/stderr in files, supervise it (time limit, optional
RSS limit) and turn the way it ended into a result or a ``CandidateFailed`` with a classified
reason:

==========================================================  ==================
how the worker ended                                        reason
==========================================================  ==================
still running after ``timeout_s`` (whole group killed)      ``timeout``
RSS above ``memory_limit_mb`` (killed by the watchdog)      ``oom``
MemoryError / std::bad_alloc / "Failed to allocate"         ``oom``
SIGKILL from outside the harness (the kernel OOM killer)    ``oom``
SIGSEGV, SIGABRT, SIGBUS, SIGILL, SIGFPE, other signals     ``crash``
``CandidateFailed`` inside the worker                       its reason
exit != 0 mentioning NOT_IMPLEMENTED / unsupported          ``unsupported-op``
another exception while loading the artifact                ``build-error``
other exit != 0                                             ``crash`` (last stderr line)
==========================================================  ==================

``DataError`` and ``ConfigError`` raised in the worker are raised again here with their message
(the data or settings are wrong, not the candidate).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

import edgeopt
from edgeopt.bench.stats import relative_spread, summarize
from edgeopt.errors import CandidateFailed, ConfigError, DataError, ModelError
from edgeopt.records import Artifact, BenchmarkResult, HardwareFingerprint, Record, TensorSpec

__all__ = ["BenchSettings", "artifact_size_bytes", "combine", "infer", "measure"]

log = logging.getLogger(__name__)

_WATCHDOG_PERIOD_S = 0.05
_MEMORY_RE = re.compile(r"MemoryError|std::bad_alloc|Failed to allocate|Cannot allocate memory|out of memory")
_UNSUPPORTED_RE = re.compile(r"NOT_IMPLEMENTED|Could not find an implementation|unsupported", re.IGNORECASE)
_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE}


class BenchSettings(Record):
    """How one latency measurement runs. Timed runs continue until both minimums are met."""

    warmup_runs: int = Field(default=10, ge=0, description="untimed runs before timing")
    min_runs: int = Field(default=100, ge=1, description="fewest timed runs (100 gives p99 a tail sample)")
    min_duration_s: float = Field(default=1.0, ge=0, description="shortest timed period, seconds")
    max_runs: int = Field(default=100_000, ge=1, description="timing stops at this many runs")
    max_duration_s: float = Field(default=60.0, gt=0, description="timing stops after this many seconds")
    batch_size: int = Field(default=1, ge=1, description="samples per run")
    timeout_s: float = Field(default=300.0, gt=0, description="the worker is killed after this long")
    memory_limit_mb: float | None = Field(default=None, gt=0, description="kill the worker above this RSS")
    eval_samples: int = Field(default=64, ge=1, description="data samples cycled through as inputs")

    @model_validator(mode="after")
    def _ordered(self) -> BenchSettings:
        if self.min_runs > self.max_runs:
            raise ValueError(f"min_runs ({self.min_runs}) must be <= max_runs ({self.max_runs})")
        if self.min_duration_s > self.max_duration_s:
            raise ValueError(
                f"min_duration_s ({self.min_duration_s}) must be <= max_duration_s ({self.max_duration_s})"
            )
        return self


def artifact_size_bytes(path: str | Path) -> int:
    """Size of a model file, or the total size of the files in a model folder."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


# ------------------------------------------------------------------------------------ public API
def measure(
    *,
    artifact: Artifact,
    settings: BenchSettings,
    signature: tuple[TensorSpec, ...],
    hardware: HardwareFingerprint,
    out_dir: Path,
    data_path: str | None = None,
    lock_path: Path | None = None,
) -> BenchmarkResult:
    """Measure ``artifact``'s latency and memory in a fresh process; files go to ``out_dir``.

    ``out_dir`` receives ``job.json``, ``result.json``, ``worker.stdout.log``, ``worker.stderr.log``
    and ``latency_ms.npy`` (raw samples, ms). Inputs come from ``data_path`` (an evaluation .npz,
    see ``edgeopt.data``) or are synthesized from ``signature``. With ``lock_path``, an exclusive
    ``flock`` on that file is held for the whole measurement: one benchmark at a time per machine.

    Raises ``CandidateFailed`` (classified, see the module docstring), ``DataError``,
    ``ConfigError``, ``ModelError`` (artifact path missing) or ``BackendUnavailable``.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    _preflight(artifact)
    samples_path = out_dir / "latency_ms.npy"
    samples_path.unlink(missing_ok=True)
    job = {
        "mode": "measure",
        "artifact": artifact.model_dump(mode="json"),
        "signature": [s.model_dump(mode="json") for s in signature],
        "data_path": str(Path(data_path).resolve()) if data_path else None,
        "settings": settings.model_dump(mode="json"),
        "samples_path": str(samples_path),
    }
    with _exclusive(lock_path):
        payload = _run_worker(job, work_dir=out_dir, candidate=artifact.candidate, what="benchmark",
                              timeout_s=settings.timeout_s, memory_limit_mb=settings.memory_limit_mb)
    summary = summarize(np.load(samples_path, allow_pickle=False))
    if summary.samples != payload["samples"]:
        raise CandidateFailed("crash", f"candidate '{artifact.candidate}': {samples_path} holds "
                                       f"{summary.samples} samples, the worker reported {payload['samples']}")
    threads = artifact.runtime.get("intra_op_threads")
    log.info("benchmark %s: p50 %.4f ms, p99 %.4f ms over %d runs, peak RSS %.1f MB",
             artifact.candidate, summary.latency_ms_p50, summary.latency_ms_p99, summary.samples,
             payload["rss_peak_mb"])
    return BenchmarkResult(
        candidate=artifact.candidate,
        samples=summary.samples,
        batch_size=settings.batch_size,
        threads=int(threads) if threads is not None else None,
        latency_ms_p50=summary.latency_ms_p50,
        latency_ms_p90=summary.latency_ms_p90,
        latency_ms_p95=summary.latency_ms_p95,
        latency_ms_p99=summary.latency_ms_p99,
        latency_ms_mean=summary.latency_ms_mean,
        latency_ms_std=summary.latency_ms_std,
        latency_ms_min=summary.latency_ms_min,
        latency_ms_max=summary.latency_ms_max,
        throughput_per_s=summary.throughput_per_s(batch_size=settings.batch_size),
        rss_peak_mb=float(payload["rss_peak_mb"]),
        rss_model_mb=float(payload["rss_model_mb"]),
        load_time_ms=float(payload["load_time_ms"]),
        size_bytes=artifact_size_bytes(artifact.path),
        duration_s=float(payload["duration_s"]),
        samples_path=str(samples_path),
        sequence=str(payload.get("sequence") or "fixed"),
        seq_len_mean=payload.get("seq_len_mean"),
        hardware=hardware,
    )


def infer(
    *,
    artifact: Artifact,
    signature: tuple[TensorSpec, ...],
    out_path: Path,
    data_path: str | None = None,
    batch_size: int = 1,
    max_samples: int | None = None,
    timeout_s: float = 300.0,
) -> Path:
    """Run ``artifact`` on every sample (or the first ``max_samples``) in a fresh process.

    Writes ``out_path`` (.npz) with ``output_0, output_1, ...`` (batches concatenated along axis 0)
    and ``output_names`` when the session exposes them. Same failures as ``measure``; non-finite
    outputs fail with ``accuracy``. The worker's files are kept next to ``out_path`` on failure.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"max_samples must be >= 1 or None, got {max_samples}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _preflight(artifact)
    work_dir = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".infer", dir=out_path.parent))
    job = {
        "mode": "infer",
        "artifact": artifact.model_dump(mode="json"),
        "signature": [s.model_dump(mode="json") for s in signature],
        "data_path": str(Path(data_path).resolve()) if data_path else None,
        "batch_size": batch_size,
        "max_samples": max_samples,
        "out_path": str(out_path.resolve()),
    }
    _run_worker(job, work_dir=work_dir, candidate=artifact.candidate, what="inference",
                timeout_s=timeout_s, memory_limit_mb=None)
    shutil.rmtree(work_dir, ignore_errors=True)
    return out_path


def combine(results: list[BenchmarkResult], *, out_path: Path) -> BenchmarkResult:
    """Pool repeated measurements of one artifact (each in its own fresh process) into one result.

    Percentiles come from all samples together; the spread of the repeats' p50 says how much one
    measurement moves on this machine. Peak RSS is the largest seen, the model's RSS and the load
    time the median. The pooled samples are written to ``out_path`` (.npy).
    """
    if not results:
        raise ValueError("no results to combine")
    if len({r.candidate for r in results}) != 1:
        raise ValueError(f"results of different candidates: {sorted({r.candidate for r in results})}")
    if len(results) == 1:
        r = results[0]
        return r.model_copy(update={"repeats": 1, "latency_ms_p50_repeats": (r.latency_ms_p50,),
                                    "latency_p50_spread_pct": 0.0})
    pooled = np.concatenate([np.load(r.samples_path, allow_pickle=False) for r in results])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.save(out_path, pooled)
    s = summarize(pooled)
    p50s = tuple(r.latency_ms_p50 for r in results)
    first = results[0]
    return first.model_copy(update={
        "samples": s.samples,
        "latency_ms_p50": s.latency_ms_p50, "latency_ms_p90": s.latency_ms_p90,
        "latency_ms_p95": s.latency_ms_p95, "latency_ms_p99": s.latency_ms_p99,
        "latency_ms_mean": s.latency_ms_mean, "latency_ms_std": s.latency_ms_std,
        "latency_ms_min": s.latency_ms_min, "latency_ms_max": s.latency_ms_max,
        "throughput_per_s": s.throughput_per_s(batch_size=first.batch_size),
        "rss_peak_mb": max(r.rss_peak_mb for r in results),
        "rss_model_mb": float(np.median([r.rss_model_mb for r in results])),
        "load_time_ms": float(np.median([r.load_time_ms for r in results])),
        "duration_s": sum(r.duration_s for r in results),
        "samples_path": str(out_path),
        "repeats": len(results),
        "latency_ms_p50_repeats": p50s,
        "latency_p50_spread_pct": 100.0 * relative_spread(p50s),
    })


# ------------------------------------------------------------------------------------- internals
def _preflight(artifact: Artifact) -> None:
    """Cheap checks in the parent: backend known (ConfigError) and installed, artifact present."""
    from edgeopt import backends

    backends.get(artifact.backend).check_available()
    if not Path(artifact.path).exists():
        raise ModelError(f"artifact of candidate '{artifact.candidate}': {artifact.path} does not exist")


@contextlib.contextmanager
def _exclusive(lock_path: Path | None) -> Iterator[None]:
    if lock_path is None:
        yield
        return
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for the benchmark lock %s", lock_path)
            waited = time.monotonic()
            fcntl.flock(fh, fcntl.LOCK_EX)
            log.info("got the benchmark lock after %.1f s", time.monotonic() - waited)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(edgeopt.__file__).resolve().parent.parent)  # importable even if not installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _supervise(proc: subprocess.Popen[bytes], *, timeout_s: float,
               memory_limit_mb: float | None) -> tuple[bool, float | None]:
    """Wait for the worker; returns (timed_out, RSS in MB when the watchdog killed it, else None)."""
    if memory_limit_mb is None:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait()
            return True, None
        return False, None
    import psutil

    deadline = time.monotonic() + timeout_s
    try:
        watched = psutil.Process(proc.pid)
    except psutil.NoSuchProcess:
        watched = None
    while proc.poll() is None:
        if time.monotonic() > deadline:
            _kill_group(proc)
            proc.wait()
            return True, None
        try:
            rss = watched.memory_info().rss / 2**20 if watched is not None else 0.0
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            rss = 0.0
        if rss > memory_limit_mb:
            _kill_group(proc)
            proc.wait()
            return False, rss
        time.sleep(_WATCHDOG_PERIOD_S)
    return False, None


def _tail(path: Path, limit: int = 65536) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - limit))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output on stderr"


def _run_worker(job: dict[str, Any], *, work_dir: Path, candidate: str, what: str,
                timeout_s: float, memory_limit_mb: float | None) -> dict[str, Any]:
    """Run one job in a fresh worker process; return its result payload or raise a classified error."""
    work_dir = work_dir.resolve()
    job_path, result_path = work_dir / "job.json", work_dir / "result.json"
    stdout_path, stderr_path = work_dir / "worker.stdout.log", work_dir / "worker.stderr.log"
    result_path.unlink(missing_ok=True)
    job = {**job, "result_path": str(result_path), "memory_limit_mb": memory_limit_mb}
    job_path.write_text(json.dumps(job, indent=1))
    cmd = [sys.executable, "-m", "edgeopt.bench.worker", str(job_path)]
    log.debug("starting %s worker for %s: %s", what, candidate, cmd)
    started = time.monotonic()
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=work_dir,
                                env=_child_env(), start_new_session=True, close_fds=True)
    try:
        timed_out, killed_at_mb = _supervise(proc, timeout_s=timeout_s, memory_limit_mb=memory_limit_mb)
    finally:
        _kill_group(proc)  # also on KeyboardInterrupt, and anything the worker left behind
        if proc.poll() is None:
            proc.wait()
    elapsed = time.monotonic() - started
    where = f"(worker log: {stderr_path})"
    if timed_out:
        raise CandidateFailed("timeout", f"candidate '{candidate}': {what} did not finish within "
                                         f"{timeout_s:g} s; the worker was killed {where}")
    if killed_at_mb is not None:
        raise CandidateFailed("oom", f"candidate '{candidate}': {what} worker used {killed_at_mb:.0f} MB, "
                                     f"above the memory limit of {memory_limit_mb:g} MB; killed {where}")
    payload: dict[str, Any] | None = None
    if result_path.is_file():
        with contextlib.suppress(ValueError, OSError):
            payload = json.loads(result_path.read_text())
    rc = proc.returncode
    if rc == 0 and payload is not None and payload.get("ok"):
        log.debug("%s worker for %s finished in %.2f s", what, candidate, elapsed)
        return payload
    stderr = _tail(stderr_path)
    if payload is not None and not payload.get("ok", False):
        message = str(payload.get("message", ""))
        if payload.get("error") == "DataError":
            raise DataError(message)
        if payload.get("error") == "ConfigError":
            raise ConfigError(message)
        stage = str(payload.get("stage", ""))
        # an exception while loading means the artifact is unusable: a build problem, not a crash
        fallback = "build-error" if stage == "load" else "crash"
        reason = payload.get("reason") or _classify_text(message) or fallback
        raise CandidateFailed(reason, f"candidate '{candidate}': {what} failed at {stage} ({reason}): "
                                      f"{message} {where}")
    raise _classify_exit(rc, stderr, candidate=candidate, what=what, where=where)


def _classify_text(text: str) -> str | None:
    if _MEMORY_RE.search(text):
        return "oom"
    if _UNSUPPORTED_RE.search(text):
        return "unsupported-op"
    return None


def _classify_exit(rc: int, stderr: str, *, candidate: str, what: str, where: str) -> CandidateFailed:
    """The failure for a worker that ended without reporting one itself."""
    head = f"candidate '{candidate}': {what} worker"
    if rc < 0:
        try:
            sig: signal.Signals | int = signal.Signals(-rc)
            name = sig.name
        except ValueError:
            sig, name = -rc, f"signal {-rc}"
        if _MEMORY_RE.search(stderr):
            return CandidateFailed("oom", f"{head} died by {name} after an allocation failure: "
                                          f"{_last_line(stderr)} {where}")
        if sig == signal.SIGKILL:
            return CandidateFailed("oom", f"{head} was killed by SIGKILL from outside the harness, most "
                                          f"likely by the kernel OOM killer {where}")
        kind = "native crash" if sig in _CRASH_SIGNALS else "killed"
        return CandidateFailed("crash", f"{head} died by {name} ({kind}) {where}")
    if rc == 0:
        return CandidateFailed("crash", f"{head} exited without a result {where}")
    reason = _classify_text(stderr) or "crash"
    return CandidateFailed(reason, f"{head} exited with code {rc}: {_last_line(stderr)} {where}")
