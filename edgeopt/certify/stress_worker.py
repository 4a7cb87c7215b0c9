"""The stress and soak process: ``python -m edgeopt.certify.stress_worker JOB.json`` (started by
``edgeopt.certify.stress``).

A fresh interpreter per check, as ``edgeopt.bench.worker`` (whose data, toolchain and failure helpers it
reuses). It loads the artifact through its backend (``intra_op_threads`` = the job's ``threads``), through
``edgeopt.bench.faults.inject``, and runs each input once untimed (finite outputs, kept as reference), then:

* ``stress``: one caller for ``single_s``, then ``callers`` threads calling ``session.run`` on the same
  session at once for ``duration_s``. Every output is checked for NaN/inf; each caller's first pass over
  the inputs is compared with the reference outputs (``mismatches``: a session that is not safe for
  concurrent callers); exceptions are counted (``errors``, the first one kept). The latencies (ms), the
  caller of each concurrent call and its end time go to ``job["samples_path"]`` (.npz).
* ``soak``: one caller for ``duration_s``, in windows of ``window_s``; after each window its p50 and p99,
  the RSS, the mean CPU frequency, the CPU temperature and the energy used in the window (RAPL or NVML,
  when readable) are taken. Latencies are kept per window in a reused buffer: the harness does not grow.

``job["result_path"]`` receives ``{"ok": true, ...figures}`` or the bench worker's failure payload.

Test-only fault (``EDGEOPT_STRESS_FAULT``, honoured by this worker only, never set in production):
``leak[:MB_PER_MIN]`` keeps touched memory while the session runs, at about ``MB_PER_MIN`` (default 60) per
minute; ``race``: a call that starts while another call is running raises ``RuntimeError`` (a session
unsafe for concurrent callers). ``EDGEOPT_BENCH_FAULT`` faults (``nan``, ``segfault``, ...) apply too.
"""

from __future__ import annotations

import faulthandler
import gc
import glob
import json
import logging
import os
import sys
import threading
import time
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.bench import faults, memory
from edgeopt.bench.shapes import split_runtime, trim
from edgeopt.bench.worker import _check_finite, _dataset, _failure, _import_toolchain, _write_json
from edgeopt.errors import CandidateFailed, ConfigError
from edgeopt.records import Artifact

__all__ = ["MAX_INPUTS", "STRESS_FAULT_ENV", "EnergyMeter", "cpu_freq_mhz", "cpu_temp_c", "main"]

log = logging.getLogger(__name__)

STRESS_FAULT_ENV = "EDGEOPT_STRESS_FAULT"
#: distinct data rows cycled through as inputs (one row per call)
MAX_INPUTS = 64
#: a caller stops after this many exceptions (they are all counted until then)
_MAX_ERRORS = 100
_stage = {"now": "start"}


# ------------------------------------------------------------------------------------ host sensors
def cpu_freq_mhz() -> float | None:
    """Mean CPU frequency (MHz): cpufreq ``scaling_cur_freq``, else ``/proc/cpuinfo``; None if unreadable."""
    values = []
    for path in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"):
        try:
            values.append(int(Path(path).read_text().strip()) / 1000.0)
        except (OSError, ValueError):
            continue
    if not values:
        try:
            with open("/proc/cpuinfo") as fh:
                values = [float(ln.split(":", 1)[1]) for ln in fh if ln.lower().startswith("cpu mhz")]
        except (OSError, ValueError, IndexError):
            values = []
    return float(np.mean(values)) if values else None


_CPU_SENSORS = ("x86_pkg_temp", "coretemp", "k10temp", "zenpower", "cpu", "soc", "acpitz")


def cpu_temp_c() -> float | None:
    """Hottest CPU temperature (°C) of ``/sys/class/thermal`` zones and hwmon sensors; None if unreadable."""
    found = []
    for zone in glob.glob("/sys/class/thermal/thermal_zone*"):
        kind, value = _text(Path(zone, "type")) or "", _number(Path(zone, "temp"))
        if value is not None and any(s in kind.lower() for s in _CPU_SENSORS):
            found.append(value / 1000.0)
    for mon in glob.glob("/sys/class/hwmon/hwmon*"):
        if any(s in (_text(Path(mon, "name")) or "").lower() for s in _CPU_SENSORS):
            values = (_number(Path(p)) for p in glob.glob(f"{mon}/temp*_input"))
            found += [v / 1000.0 for v in values if v is not None]
    return max(found) if found else None


def _text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _number(path: Path) -> float | None:
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        return None


class EnergyMeter:
    """Cumulative energy (J) of the host's packages (RAPL) or GPUs (NVML), where readable.

    ``probe()`` returns one line per source saying whether it can be read and why not; ``available`` is the
    source used (``"rapl"``, ``"nvml"`` or None). RAPL counters wrap at ``max_energy_range_uj``; ``read``
    adds the wraps. macOS ``powermetrics`` is only probed (it needs root and samples on its own clock).
    """

    def __init__(self) -> None:
        self.probes: dict[str, str] = {}
        self.available: str | None = None
        self._rapl: list[tuple[Path, float]] = []
        self._last: dict[Path, float] = {}
        self._total_j = 0.0
        self._nvml: list[Any] = []
        self._probe_rapl()
        self._probe_nvml()
        self._probe_powermetrics()

    def _probe_rapl(self) -> None:
        zones = sorted(p for p in glob.glob("/sys/class/powercap/intel-rapl:*") if p.count(":") == 1)
        if not zones:
            self.probes["rapl"] = "no /sys/class/powercap/intel-rapl:* package zones (no RAPL exposed)"
            return
        for zone in zones:
            energy, wrap = Path(zone, "energy_uj"), _number(Path(zone, "max_energy_range_uj"))
            if _number(energy) is None:
                self.probes["rapl"] = (f"{energy} is not readable by this user (root only since Linux 5.10, "
                                       "CVE-2020-8694)")
                self._rapl = []
                return
            self._rapl.append((energy, wrap / 1e6 if wrap else float("inf")))
        self.probes["rapl"] = f"readable: {len(zones)} package zone(s)"
        self.available = "rapl"

    def _probe_nvml(self) -> None:
        try:
            import pynvml
        except ImportError:
            self.probes["nvml"] = "pynvml is not installed"
            return
        try:
            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            for h in handles:
                pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
        except Exception as exc:  # noqa: BLE001 - no driver, no GPU, or a GPU older than Volta
            self.probes["nvml"] = f"NVML unusable: {type(exc).__name__}: {exc}"
            return
        if not handles:
            self.probes["nvml"] = "NVML found no GPU"
            return
        self.probes["nvml"] = f"readable: {len(handles)} GPU(s)"
        if self.available is None:
            self.available, self._nvml = "nvml", handles

    def _probe_powermetrics(self) -> None:
        if sys.platform != "darwin":
            self.probes["powermetrics"] = f"macOS only (this is {sys.platform})"
        elif os.geteuid() != 0:
            self.probes["powermetrics"] = "needs root (sudo powermetrics); this process is not root"
        else:
            self.probes["powermetrics"] = "root, but sampling powermetrics around a run is not implemented"

    def read(self) -> float | None:
        """Energy used (J) since an arbitrary origin; None if no source is readable."""
        if self.available == "rapl":
            for path, wrap_j in self._rapl:
                now = (_number(path) or float("nan")) / 1e6
                last = self._last.get(path)
                if last is not None:
                    self._total_j += now - last + (wrap_j if now < last else 0.0)
                self._last[path] = now
            return self._total_j
        if self.available == "nvml":
            import pynvml

            return sum(pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._nvml) / 1000.0
        return None


# ------------------------------------------------------------------------------------ test faults
class _Leak(faults._FaultSession):
    def __init__(self, inner: Any, mb_per_min: float) -> None:
        super().__init__(inner)
        self._rate = mb_per_min / 60.0 * 2**20  # bytes per second
        self._hoard: list[np.ndarray] = []
        self._last = time.monotonic()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        now = time.monotonic()
        if now - self._last >= 0.05:
            self._hoard.append(np.ones(int(self._rate * (now - self._last)) // 8 + 1))  # pages touched
            self._last = now
        return self._inner.run(feeds)


class _Race(faults._FaultSession):
    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self._busy = threading.Lock()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("fault injection: concurrent call into a session that allows one caller")
        try:
            return self._inner.run(feeds)
        finally:
            self._busy.release()


def _stress_fault(session: Any) -> Any:
    fault = os.environ.get(STRESS_FAULT_ENV, "")
    if not fault:
        return session
    name, _, arg = fault.partition(":")
    log.warning("fault injection (tests only): %s", fault)
    if name == "leak":
        return _Leak(session, float(arg or 60.0))
    if name == "race":
        return _Race(session)
    raise ConfigError(f"{STRESS_FAULT_ENV}={fault!r} is not a known fault (allowed: leak[:MB_PER_MIN], race)")


# ------------------------------------------------------------------------------------------ setup
def _session(job: dict[str, Any]) -> tuple[Any, list[dict[str, np.ndarray]], list[list[np.ndarray]], dict]:
    """(session, feeds of one row each, their reference outputs, facts for the result)."""
    artifact = Artifact.model_validate(job["artifact"])
    _stage["now"] = "imports"
    backend = _import_toolchain(artifact)
    _stage["now"] = "data"
    ds = _dataset(job, count=MAX_INPUTS).head(MAX_INPUTS)
    feeds = [{k: v if v.flags.c_contiguous else np.ascontiguousarray(v) for k, v in ds.sample(i).items()}
             for i in range(ds.count)]  # (a 0-d input stays 0-d)
    runtime, sequence = split_runtime(artifact.runtime)
    if sequence:
        feeds = [trim(f, sequence)[0] for f in feeds]
    runtime = {**runtime, "intra_op_threads": int(job["settings"]["threads"])}
    _stage["now"] = "load"
    session = backend.load(path=artifact.path, runtime=runtime)
    _stage["now"] = "run"
    session = _stress_fault(faults.inject(session, None, candidate=artifact.candidate, timed=True))
    names = list(getattr(session, "output_names", None) or []) or None
    reference = []
    for feed in feeds:
        out = [np.array(o, copy=True) for o in session.run(feed)]
        _check_finite(out, artifact.candidate, names)
        reference.append(out)
    facts = {"distinct_inputs": len(feeds), "data": ds.sha256, "tool_versions": backend.tool_versions(),
             "sequence": sequence["mode"] if sequence else "fixed", "runtime": runtime}
    return session, feeds, reference, facts


def _finite(outs: list[np.ndarray]) -> bool:
    return all(np.isfinite(o).all() for o in outs if np.issubdtype(np.asarray(o).dtype, np.floating))


def _same(outs: list[np.ndarray], ref: list[np.ndarray]) -> bool:
    if len(outs) != len(ref):
        return False
    return all(np.shape(a) == np.shape(b) and np.allclose(a, b, rtol=1e-3, atol=1e-5)
               for a, b in zip(outs, ref, strict=True))


# ------------------------------------------------------------------------------------------ jobs
def _stress(job: dict[str, Any]) -> dict[str, Any]:
    s = job["settings"]
    session, feeds, reference, facts = _session(job)
    n, run, clock = len(feeds), session.run, time.perf_counter_ns

    single = array("q")
    end = clock() + int(float(s["single_s"]) * 1e9)
    i, nonfinite = 0, 0
    start = clock()
    while clock() < end:
        t_a = clock()
        out = run(feeds[i % n])
        single.append(clock() - t_a)
        nonfinite += not _finite(out)
        i += 1
    single_wall = (clock() - start) / 1e9

    callers = int(s["callers"])
    lat = [array("q") for _ in range(callers)]
    ends = [array("q") for _ in range(callers)]
    counts = {"errors": 0, "nonfinite": 0, "mismatches": 0}
    first_error: list[str] = []
    lock, stop, barrier = threading.Lock(), threading.Event(), threading.Barrier(callers + 1)
    t0 = [0]

    def caller(k: int) -> None:
        mine, my_ends, errors, bad, mismatched = lat[k], ends[k], 0, 0, 0
        barrier.wait()
        j = 0
        while not stop.is_set() and errors < _MAX_ERRORS:
            idx = (k * 7 + j) % n  # callers start on different inputs
            t_a = clock()
            try:
                out = run(feeds[idx])
            except Exception as exc:  # noqa: BLE001 - every failed call is counted, the first one kept
                errors += 1
                with lock:
                    if not first_error:
                        first_error.append(f"{type(exc).__name__}: {exc}")
                continue
            t_b = clock()
            mine.append(t_b - t_a)
            my_ends.append(t_b - t0[0])
            bad += not _finite(out)
            if j < n:
                mismatched += not _same(out, reference[idx])
            j += 1
        with lock:
            counts["errors"] += errors
            counts["nonfinite"] += bad
            counts["mismatches"] += mismatched

    threads = [threading.Thread(target=caller, args=(k,), daemon=True) for k in range(callers)]
    for t in threads:
        t.start()
    gc.disable()
    try:
        t0[0] = clock()
        barrier.wait()
        time.sleep(float(s["duration_s"]))
        stop.set()
        for t in threads:
            t.join()
    finally:
        gc.enable()
    wall = (clock() - t0[0]) / 1e9

    _stage["now"] = "write"
    concurrent = np.concatenate([np.frombuffer(a, dtype=np.int64) for a in lat]).astype(np.float64) / 1e6
    with open(job["samples_path"], "wb") as fh:
        np.savez(fh, single_ms=np.frombuffer(single, dtype=np.int64).astype(np.float64) / 1e6,
                 concurrent_ms=concurrent,
                 concurrent_caller=np.concatenate([np.full(len(a), k, np.int32) for k, a in enumerate(lat)]),
                 concurrent_end_s=np.concatenate([np.frombuffer(a, dtype=np.int64) for a in ends]) / 1e9)
    return {**facts, "single_calls": len(single), "single_wall_s": single_wall, "single_nonfinite": nonfinite,
            "concurrent_calls": int(concurrent.size), "concurrent_wall_s": wall,
            "calls_per_caller": [len(a) for a in lat], **counts,
            "first_error": first_error[0][:300] if first_error else None, "rss_peak_mb": memory.read().peak}


def _soak(job: dict[str, Any]) -> dict[str, Any]:
    s = job["settings"]
    session, feeds, _, facts = _session(job)
    n, run, clock = len(feeds), session.run, time.perf_counter_ns
    duration_ns, window_ns = int(float(s["duration_s"]) * 1e9), int(float(s["window_s"]) * 1e9)
    meter = EnergyMeter()
    buf = np.empty(4096, dtype=np.int64)  # reused every window: the harness's own memory stays flat
    windows, errors, nonfinite, first_error, i = [], 0, 0, None, 0
    energy_before = meter.read()
    begin = clock()
    while clock() - begin < duration_ns and errors < _MAX_ERRORS:
        w_start = clock()
        w_end, count = min(w_start + window_ns, begin + duration_ns), 0
        while clock() < w_end:
            t_a = clock()
            try:
                out = run(feeds[i % n])
            except Exception as exc:  # noqa: BLE001 - counted; the check fails on any
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"[:300]
                if errors >= _MAX_ERRORS:
                    break
                continue
            t_b = clock()
            if count == buf.size:
                buf = np.concatenate([buf, np.empty_like(buf)])
            buf[count] = t_b - t_a
            count += 1
            nonfinite += not _finite(out)
            i += 1
        w_stop = clock()
        energy_now = meter.read()
        p50, p99 = (np.percentile(buf[:count], [50, 99]) / 1e6).tolist() if count else (None, None)
        windows.append({"start_s": (w_start - begin) / 1e9, "end_s": (w_stop - begin) / 1e9, "calls": count,
                        "p50_ms": p50, "p99_ms": p99, "rss_mb": memory.rss_mb(), "freq_mhz": cpu_freq_mhz(),
                        "temp_c": cpu_temp_c(),
                        "energy_j": None if energy_now is None or energy_before is None
                        else energy_now - energy_before})
        energy_before = energy_now
    return {**facts, "windows": windows, "errors": errors, "nonfinite": nonfinite, "first_error": first_error,
            "calls": i, "energy_source": meter.available, "energy_probes": meter.probes}


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Run the job in ``argv[0]``; write its result JSON; return the exit code (0 = ok)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m edgeopt.certify.stress_worker JOB.json\n")
        return 2
    faulthandler.enable()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job = json.loads(Path(args[0]).read_text())
    started, code = time.time(), 1
    try:
        jobs = {"stress": _stress, "soak": _soak}
        if job.get("mode") not in jobs:
            raise ConfigError(f"unknown job mode {job.get('mode')!r} (allowed: {', '.join(jobs)})")
        payload: dict[str, Any] = {"ok": True, **jobs[job["mode"]](job)}
        _stage["now"], code = "done", 0
    except Exception as exc:  # every failure goes to the result file, classified
        if not isinstance(exc, (CandidateFailed, ConfigError)):
            log.exception("job failed")
        payload = _failure(exc)
    payload.update(stage=_stage["now"], started_unix=started, finished_unix=time.time(), pid=os.getpid())
    _write_json(Path(job["result_path"]), payload)
    return code


if __name__ == "__main__":
    _code = main()
    logging.shutdown()
    sys.stderr.flush()
    os._exit(_code)  # skip interpreter teardown: a toolchain's crash at exit is not the artifact's
