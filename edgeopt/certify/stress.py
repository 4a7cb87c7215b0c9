"""Stress, soak and power checks: the artifact under concurrent callers, over a sustained run, and the
energy it uses. Each run happens in a fresh supervised process (``edgeopt.certify.stress_worker``; a
crash, hang or OOM there is classified as in ``edgeopt.bench.supervise``). Public surface::

    stress_check(*, artifact, signature, evaluation_path, out_dir, callers=4, duration_s=10.0, threads=1,
                 p99_max_ms=None) -> CheckResult                                        check "stress"
    soak_check(*, artifact, signature, evaluation_path, out_dir, duration_s=60.0, window_s=5.0, threads=1,
               p99_drift_max=0.5, rss_slope_max_mb_per_min=5.0) -> CheckResult          check "soak"
    power_check(*, out_dir, soak=None, duration_s=5.0) -> CheckResult                   check "power"

Every call runs one data row (batch 1) of ``evaluation_path`` (an evaluation .npz, see ``edgeopt.data``;
the first ``MAX_INPUTS`` rows cycled) or synthetic rows from ``signature``; ``threads`` is the runtime's
``intra_op_threads`` per call. ``ConfigError`` and ``DataError`` are raised (wrong settings or data); a
failing artifact (crash, timeout, oom, missing file, toolchain not installed) gives status ``fail``.

**stress** — one caller for a quarter of ``duration_s`` (at least ``SINGLE_MIN_S``), then ``callers``
threads on one session for ``duration_s``, in the same process. Fails on any exception, NaN/inf output,
output that differs from the single caller's for the same input (rtol 1e-3, atol 1e-5), crash, or a
concurrent p99 above ``p99_max_ms`` when given. Samples: ``stress_latency_ms.npz`` with ``single_ms``,
``concurrent_ms``, ``concurrent_caller`` (caller index of each call) and ``concurrent_end_s`` (end of each
call from the start of the concurrent phase).

**soak** — one caller for ``duration_s`` in windows of ``window_s``. The first window is a warm-up: it is
in the series but excluded from the slopes and the drift. Slopes are least squares against the window
start; drift is median p99 of the last third of the remaining windows / median p99 of the first third - 1.
Fails on any error or NaN/inf output, on an RSS slope above ``rss_slope_max_mb_per_min`` or a drift above
``p99_drift_max`` (a leak or throttling shows as a trend). An RSS slope counts only when the growth it
fits over the compared windows (slope x their span) is also above ``RSS_GROWTH_MIN_MB``: on a soak of
seconds a few allocator pages would otherwise extrapolate to MB/min. Time series, ``soak_series.json``::

    {"schema": 1, "duration_s": 60.0, "window_s": 5.0, "threads": 1, "warmup_windows": 1,
     "x": "start_s", "rss_slope_mb_per_min": 0.1, "p99_slope_ms_per_min": 0.01, "p99_drift": 0.03,
     "thresholds": {"rss_slope_max_mb_per_min": 5.0, "p99_drift_max": 0.5},
     "windows": [{"start_s": 0.0,     # window start, seconds from the start of the soak
                  "end_s": 5.0,       # window end (its last call finished), seconds
                  "calls": 1234,      # calls in the window (p99 of fewer than 100 is interpolated)
                  "p50_ms": 0.8, "p99_ms": 1.9,   # latency percentiles in the window (null: no call)
                  "rss_mb": 210.3,    # resident memory of the process at the window end
                  "freq_mhz": 2445.4, # mean CPU frequency at the window end (null: unreadable)
                  "temp_c": null,     # hottest CPU sensor at the window end (null: unreadable)
                  "energy_j": null,   # energy used in the window, RAPL or NVML (null: unreadable)
                  "warmup": true}, ...]}

**power** — energy per inference and average power where the host exposes them (Linux RAPL
``/sys/class/powercap/intel-rapl:*/energy_uj`` readable, NVIDIA NVML through ``pynvml``; macOS
``powermetrics`` is probed only). The soak reads the energy counter at every window, so the flow calls
``power_check(soak=<the soak's CheckResult>)`` after the soak: energy per inference = energy of the
soak's post-warm-up windows / their calls; it also measures the idle power for ``duration_s`` so the figure
above idle is given. Not applicable (with what was probed and why) where no sensor is readable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.bench import supervise
from edgeopt.bench.stats import summarize
from edgeopt.certify.records import CheckResult
from edgeopt.certify.stress_worker import MAX_INPUTS, EnergyMeter
from edgeopt.errors import BackendUnavailable, CandidateFailed, ConfigError, DataError, ModelError
from edgeopt.records import Artifact, TensorSpec

__all__ = ["MAX_INPUTS", "RSS_GROWTH_MIN_MB", "SINGLE_MIN_S", "power_check", "soak_check", "stress_check"]

log = logging.getLogger(__name__)

#: shortest single-caller phase before the concurrent one (it lasts a quarter of ``duration_s``)
SINGLE_MIN_S = 0.5
#: the soak's RSS slope fails only when the growth it fits over the compared windows is above this
RSS_GROWTH_MIN_MB = 1.0
#: time allowed beyond the run itself for starting the process, importing and loading
_STARTUP_S = 180.0


def stress_check(*, artifact: Artifact, signature: tuple[TensorSpec, ...], evaluation_path: str | None,
                 out_dir: Path, callers: int = 4, duration_s: float = 10.0, threads: int = 1,
                 p99_max_ms: float | None = None) -> CheckResult:
    """``callers`` threads calling one session at once for ``duration_s`` (see the module docstring)."""
    if callers < 1 or threads < 1 or not duration_s > 0 or (p99_max_ms is not None and not p99_max_ms > 0):
        raise ConfigError(f"stress: callers >= 1, threads >= 1, duration_s > 0 and p99_max_ms > 0 or None; "
                          "got "
                          f"{callers}, {threads}, {duration_s}, {p99_max_ms}")
    started, out_dir = time.monotonic(), _prepare(out_dir)
    single_s = max(SINGLE_MIN_S, duration_s / 4)
    settings = {"callers": callers, "duration_s": duration_s, "single_s": single_s, "threads": threads}
    samples_path = out_dir / "stress_latency_ms.npz"
    job = _job("stress", artifact, signature, evaluation_path, settings, samples_path=str(samples_path))
    thresholds = {"p99_max_ms": p99_max_ms, "errors_max": 0, "nonfinite_max": 0, "mismatches_max": 0}
    payload = _run("stress", job, artifact=artifact, out_dir=out_dir,
                   timeout_s=_STARTUP_S + 2 * (duration_s + single_s))
    if isinstance(payload, CheckResult):
        return _finish(payload, started, evidence={"settings": settings, "thresholds": thresholds})
    with np.load(samples_path, allow_pickle=False) as data:
        single, concurrent = _latency(data["single_ms"]), _latency(data["concurrent_ms"])
    single["throughput_per_s"] = payload["single_calls"] / payload["single_wall_s"]
    concurrent["throughput_per_s"] = payload["concurrent_calls"] / payload["concurrent_wall_s"]
    concurrent["calls_per_caller"] = payload["calls_per_caller"]
    one = single["throughput_per_s"]
    scaling = concurrent["throughput_per_s"] / one if one else math.nan
    nonfinite = payload["nonfinite"] + payload["single_nonfinite"]
    problems = []
    if payload["errors"]:
        problems.append(f"{payload['errors']} calls raised (first: {payload['first_error']})")
    if nonfinite:
        problems.append(f"{nonfinite} calls gave NaN/inf outputs")
    if payload["mismatches"]:
        problems.append(f"{payload['mismatches']} concurrent calls gave outputs that differ from a single "
                        "caller's")
    p99 = concurrent["latency_ms_p99"]
    if p99_max_ms is not None and not p99 <= p99_max_ms:
        problems.append(f"p99 under load {p99:.4g} ms > {p99_max_ms:g} ms")
    limit = f" (max {p99_max_ms:g} ms)" if p99_max_ms is not None else ""
    summary = (f"{callers} callers x {duration_s:g} s: {concurrent['throughput_per_s']:.1f} inf/s "
               f"({scaling:.2f}x one caller's {single['throughput_per_s']:.1f}), p50 "
               f"{concurrent['latency_ms_p50']:.4g} ms, p99 {p99:.4g} ms{limit} (one caller: p99 "
               f"{single['latency_ms_p99']:.4g} ms); {payload['errors']} errors, {nonfinite} non-finite, "
               f"{payload['mismatches']} mismatches")
    evidence = {"settings": settings, "thresholds": thresholds, "single": single, "concurrent": concurrent,
                "scaling": scaling, "errors": payload["errors"], "first_error": payload["first_error"],
                "nonfinite": nonfinite, "mismatches": payload["mismatches"], **_facts(payload),
                "rss_peak_mb": payload["rss_peak_mb"]}
    log.info("stress %s: %s", artifact.candidate, summary)
    return _finish(CheckResult(check="stress", status="fail" if problems else "pass", summary=summary,
                               reason="; ".join(problems) or None,
                               files=(str(samples_path), str(out_dir / "stress_result.json"))),
                   started, evidence=evidence)


def soak_check(*, artifact: Artifact, signature: tuple[TensorSpec, ...], evaluation_path: str | None,
               out_dir: Path, duration_s: float = 60.0, window_s: float = 5.0, threads: int = 1,
               p99_drift_max: float = 0.5, rss_slope_max_mb_per_min: float = 5.0) -> CheckResult:
    """A sustained single-caller run in windows; fails on an RSS or p99 trend (see the module docstring)."""
    if not window_s > 0 or duration_s < 4 * window_s or threads < 1:
        raise ConfigError(f"soak: window_s > 0, duration_s >= 4 * window_s (a warm-up window and three to "
                          f"compare) and threads >= 1; got window_s={window_s}, duration_s={duration_s}, "
                          f"threads={threads}")
    started, out_dir = time.monotonic(), _prepare(out_dir)
    settings = {"duration_s": duration_s, "window_s": window_s, "threads": threads}
    thresholds = {"rss_slope_max_mb_per_min": rss_slope_max_mb_per_min, "p99_drift_max": p99_drift_max,
                  "rss_growth_min_mb": RSS_GROWTH_MIN_MB, "errors_max": 0, "nonfinite_max": 0}
    job = _job("soak", artifact, signature, evaluation_path, settings)
    payload = _run("soak", job, artifact=artifact, out_dir=out_dir, timeout_s=_STARTUP_S + 2 * duration_s)
    if isinstance(payload, CheckResult):
        return _finish(payload, started, evidence={"settings": settings, "thresholds": thresholds})
    windows = payload["windows"]
    for k, w in enumerate(windows):
        w["warmup"] = k == 0
    kept = [w for w in windows[1:] if w["calls"]]
    x = [w["start_s"] / 60.0 for w in kept]
    rss_slope = _slope(x, [w["rss_mb"] for w in kept])
    p99_slope = _slope(x, [w["p99_ms"] for w in kept])
    third = max(1, len(kept) // 3)
    first = float(np.median([w["p99_ms"] for w in kept[:third]])) if kept else math.nan
    last = float(np.median([w["p99_ms"] for w in kept[-third:]])) if kept else math.nan
    drift = last / first - 1.0 if first > 0 else math.nan
    series = {"schema": 1, **settings, "warmup_windows": 1, "x": "start_s", "rss_slope_mb_per_min": rss_slope,
              "p99_slope_ms_per_min": p99_slope, "p99_drift": drift, "thresholds": thresholds,
              "windows": windows}
    series_path = out_dir / "soak_series.json"
    series_path.write_text(json.dumps(_jsonable(series), indent=1))
    problems = []
    if payload["errors"]:
        problems.append(f"{payload['errors']} calls raised (first: {payload['first_error']})")
    if payload["nonfinite"]:
        problems.append(f"{payload['nonfinite']} calls gave NaN/inf outputs")
    growth = rss_slope * (x[-1] - x[0]) if len(x) > 1 else math.nan
    if not (rss_slope <= rss_slope_max_mb_per_min or growth <= RSS_GROWTH_MIN_MB):
        problems.append(f"RSS slope {rss_slope:.3g} MB/min > {rss_slope_max_mb_per_min:g} MB/min "
                        f"(fitted growth {growth:.3g} MB; a leak)")
    if not drift <= p99_drift_max:
        problems.append(f"p99 drift {drift:+.1%} > {p99_drift_max:+.0%} (last third of the windows vs the "
                        "first)")
    energy = [w["energy_j"] for w in kept]
    evidence = {"settings": settings, "thresholds": thresholds, "windows": len(windows), "warmup_windows": 1,
                "calls": payload["calls"], "rss_slope_mb_per_min": rss_slope, "rss_growth_mb": growth,
                "p99_slope_ms_per_min": p99_slope,
                "p99_drift": drift, "p99_ms_first_third": first, "p99_ms_last_third": last,
                "rss_mb_range": _range([w["rss_mb"] for w in kept]),
                "freq_mhz_range": _range([w["freq_mhz"] for w in kept]),
                "temp_c_max": max((w["temp_c"] for w in kept if w["temp_c"] is not None), default=None),
                "errors": payload["errors"], "first_error": payload["first_error"],
                "nonfinite": payload["nonfinite"],
                "energy": {"source": payload["energy_source"], "probes": payload["energy_probes"],
                           "energy_j": sum(energy) if kept and None not in energy else None,
                           "calls": sum(w["calls"] for w in kept),
                           "seconds": sum(w["end_s"] - w["start_s"] for w in kept)},
                **_facts(payload)}
    summary = (f"{duration_s:g} s in {len(windows)} windows of {window_s:g} s (first one warm-up): RSS slope "
               f"{rss_slope:.3g} MB/min (max {rss_slope_max_mb_per_min:g}), p99 drift {drift:+.1%} (max "
               f"{p99_drift_max:+.0%}), p99 slope {p99_slope:.3g} ms/min; {payload['errors']} errors")
    log.info("soak %s: %s", artifact.candidate, summary)
    return _finish(CheckResult(check="soak", status="fail" if problems else "pass", summary=summary,
                               reason="; ".join(problems) or None,
                               files=(str(series_path), str(out_dir / "soak_result.json"))),
                   started, evidence=evidence)


def power_check(*, out_dir: Path, soak: CheckResult | None = None, duration_s: float = 5.0) -> CheckResult:
    """Energy per inference of ``soak`` and the host's idle power over ``duration_s``, where measurable."""
    if soak is not None and soak.check != "soak":
        raise ConfigError(f"power_check(soak=...) takes the soak check's result, got the {soak.check!r} "
                          "check's")
    started, out_dir = time.monotonic(), _prepare(out_dir)
    meter, path = EnergyMeter(), out_dir / "power.json"
    evidence: dict[str, Any] = {"probes": meter.probes, "source": meter.available}
    if meter.available is None:
        path.write_text(json.dumps(evidence, indent=1))
        reason = "no power sensor readable: " + "; ".join(f"{k}: {v}" for k, v in meter.probes.items())
        result = CheckResult(check="power", status="not-applicable", summary="energy not measurable here",
                             reason=reason, files=(str(path),))
        return _finish(result, started, evidence=evidence)
    before, t0 = meter.read(), time.monotonic()
    time.sleep(duration_s)
    after, seconds = meter.read(), time.monotonic() - t0
    idle_w = (after - before) / seconds if before is not None and after is not None else math.nan
    evidence.update(idle_s=seconds, idle_w=idle_w)
    summary = f"{meter.available}: idle {idle_w:.3g} W over {seconds:.1f} s"
    soaked = (soak.evidence.get("energy") or {}) if soak is not None else {}
    if soaked.get("energy_j") is not None and soaked.get("calls") and soaked.get("seconds"):
        avg_w = soaked["energy_j"] / soaked["seconds"]
        per = soaked["energy_j"] / soaked["calls"]
        above = (avg_w - idle_w) * soaked["seconds"] / soaked["calls"]
        evidence.update(soak_energy_j=soaked["energy_j"], soak_calls=soaked["calls"],
                        soak_s=soaked["seconds"],
                        power_w=avg_w, energy_mj_per_inference=per * 1e3,
                        energy_mj_per_inference_above_idle=above * 1e3)
        summary = (f"{meter.available}: {per * 1e3:.4g} mJ/inference ({above * 1e3:.4g} above idle), "
                   f"{avg_w:.3g} W during the soak vs idle {idle_w:.3g} W")
    else:
        evidence["note"] = "no soak energy given (soak=None, or the soak's host had no readable sensor)"
    path.write_text(json.dumps(_jsonable(evidence), indent=1))
    return _finish(CheckResult(check="power", status="pass", summary=summary, files=(str(path),)), started,
                   evidence=evidence)


# ------------------------------------------------------------------------------------- internals
def _prepare(out_dir: Path) -> Path:
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _job(mode: str, artifact: Artifact, signature: tuple[TensorSpec, ...], evaluation_path: str | None,
         settings: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"mode": mode, "artifact": artifact.model_dump(mode="json"),
            "signature": [s.model_dump(mode="json") for s in signature],
            "data_path": str(Path(evaluation_path).resolve()) if evaluation_path else None,
            "settings": settings, **extra}


def _run(name: str, job: dict[str, Any], *, artifact: Artifact, out_dir: Path,
         timeout_s: float) -> dict[str, Any] | CheckResult:
    """The worker's payload, or a failed CheckResult for an artifact that cannot be run or failed."""
    try:
        from edgeopt import backends

        backends.get(artifact.backend).check_available()
        if not Path(artifact.path).exists():
            raise ModelError(f"artifact of candidate '{artifact.candidate}': {artifact.path} does not exist")
        return _run_worker(job, name=name, work_dir=out_dir, candidate=artifact.candidate,
                           timeout_s=timeout_s)
    except (CandidateFailed, ModelError, BackendUnavailable) as exc:
        fallback = "unavailable" if isinstance(exc, BackendUnavailable) else "build-error"
        reason = getattr(exc, "reason", fallback)
        log.warning("%s check of %s failed: %s", name, artifact.candidate, exc)
        return CheckResult(check=name, status="fail", summary=f"{name} run failed ({reason})",
                           reason=f"{reason}: {exc}", files=(str(out_dir / f"{name}_worker.stderr.log"),))


def _run_worker(job: dict[str, Any], *, name: str, work_dir: Path, candidate: str,
                timeout_s: float) -> dict[str, Any]:
    """``supervise.run_worker`` for ``python -m edgeopt.certify.stress_worker`` (same supervision, same
    classification of how the process ended), with files named ``<name>_*`` so checks can share a folder."""
    job_path, result_path = work_dir / f"{name}_job.json", work_dir / f"{name}_result.json"
    stderr_path = work_dir / f"{name}_worker.stderr.log"
    result_path.unlink(missing_ok=True)
    job_path.write_text(json.dumps({**job, "result_path": str(result_path)}, indent=1))
    cmd = [sys.executable, "-m", "edgeopt.certify.stress_worker", str(job_path)]
    with open(work_dir / f"{name}_worker.stdout.log", "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=work_dir,
                                env=supervise._child_env(), start_new_session=True, close_fds=True)
    try:
        timed_out, _ = supervise._supervise(proc, timeout_s=timeout_s, memory_limit_mb=None)
    finally:
        supervise._kill_group(proc)
        if proc.poll() is None:
            proc.wait()
    where = f"(worker log: {stderr_path})"
    if timed_out:
        raise CandidateFailed("timeout", f"candidate '{candidate}': the {name} run did not finish within "
                                         f"{timeout_s:g} s; the worker was killed {where}")
    payload = None
    with contextlib.suppress(ValueError, OSError):
        payload = json.loads(result_path.read_text())
    if proc.returncode == 0 and payload and payload.get("ok"):
        return payload
    if payload is not None and not payload.get("ok", False):
        message, stage = str(payload.get("message", "")), str(payload.get("stage", ""))
        if payload.get("error") in ("DataError", "ConfigError"):
            raise (DataError if payload["error"] == "DataError" else ConfigError)(message)
        reason = payload.get("reason") or supervise._classify_text(message) or (
            "build-error" if stage == "load" else "crash")
        raise CandidateFailed(reason, f"candidate '{candidate}': {name} failed at {stage}: {message} {where}")
    raise supervise.classify_exit(proc.returncode, supervise._tail(stderr_path), candidate=candidate,
                                  what=name, where=where)


def _latency(samples: np.ndarray) -> dict[str, Any]:
    if samples.size == 0:
        return {"samples": 0, "latency_ms_p50": math.nan, "latency_ms_p99": math.nan,
                "latency_ms_max": math.nan}
    s = summarize(samples)
    return {"samples": s.samples, "latency_ms_p50": s.latency_ms_p50, "latency_ms_p99": s.latency_ms_p99,
            "latency_ms_max": s.latency_ms_max}


def _slope(x: list[float], y: list[float | None]) -> float:
    """Least-squares slope of ``y`` over ``x`` (NaN with fewer than two points or no spread in ``x``)."""
    pts = [(a, b) for a, b in zip(x, y, strict=True) if b is not None and math.isfinite(b)]
    if len(pts) < 2:
        return math.nan
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    dx = xs - xs.mean()
    denom = float(dx @ dx)
    return float(dx @ (ys - ys.mean()) / denom) if denom > 0 else math.nan


def _range(values: list[float | None]) -> list[float] | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return [min(finite), max(finite)] if finite else None


def _facts(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: payload.get(k) for k in ("distinct_inputs", "data", "sequence", "runtime", "tool_versions")}


def _jsonable(value: Any) -> Any:
    """NaN and inf as null (strict JSON, for the report renderer)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _finish(result: CheckResult, started: float, *, evidence: dict[str, Any]) -> CheckResult:
    return result.model_copy(update={"evidence": _jsonable({**evidence, **result.evidence}),
                                     "duration_s": time.monotonic() - started})
