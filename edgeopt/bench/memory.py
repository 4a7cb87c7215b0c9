"""Memory figures of the measuring process (used by ``edgeopt.bench.worker``).

The worker takes a *reference* reading once the runtime is imported, its own libraries are loaded and
warmed on a tiny model, and the inputs are built; then it loads the artifact, runs it, and takes a
*steady* reading after the timed runs. Both readings come after ``settle()`` (``gc.collect`` and glibc's
``malloc_trim(0)``), so freed memory the allocator still holds is not counted.

On Linux (``/proc/self/status``):

* steady memory = ``RssAnon`` at the steady reading minus ``RssAnon`` at the reference (the heap the
  loaded model keeps: weights, arenas, compiled kernels), plus the pages of files mapped since the
  reference (model weights a runtime uses in place, e.g. OpenVINO's IR ``.bin``) that the timed runs
  touched (``Referenced`` in ``/proc/self/smaps``, its bits cleared just before the timed loop through
  ``/proc/self/clear_refs``). Weight pages read once while compiling and never again are not counted:
  they are clean page cache the kernel reclaims; pages inference reads are memory the model needs;
* file-backed memory = the difference of ``RssFile`` (every mapped file page still resident), reported;
* model peak = ``VmHWM`` at the end minus ``VmRSS`` at the reference, ``VmHWM`` having been reset
  there (``/proc/self/clear_refs``, Linux >= 4.0): the peak of loading and running, transients included;
* process peak = the larger of ``VmHWM`` just before that reset and at the end.

``getrusage(RUSAGE_SELF).ru_maxrss`` is not used on Linux: after fork+exec it carries the *parent's*
peak (a 600 MB parent makes a 9 MB child report 600 MB). Elsewhere steady memory is psutil's USS
(private memory) and the peak is ``ru_maxrss``, which cannot be reset: the model peak is NaN then,
and a warning says so. No figure is clamped: a non-positive or unmeasurable difference is reported as
measured (or NaN), and the gates treat it as a failure to measure.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import math
import resource
import sys
from dataclasses import dataclass
from typing import Any

__all__ = ["MemoryProbe", "Reading", "delta_mb", "read", "reset_peak", "rss_mb", "settle"]

log = logging.getLogger(__name__)

_LINUX = sys.platform.startswith("linux")
_STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
_libc: dict[str, Any] = {}


@dataclass(frozen=True)
class Reading:
    """One reading (MB); None where this OS does not give the figure."""

    rss: float | None
    peak: float | None
    anon: float | None
    file: float | None
    #: what ``anon`` is: "RssAnon" (Linux) or "USS (psutil)"
    kind: str = "RssAnon"


def _status() -> dict[str, float]:
    """The memory fields of ``/proc/self/status`` in MB ({} when unreadable)."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in _STATUS_FIELDS:
                    out[key] = float(value.split()[0]) / 1024.0
    except (OSError, ValueError, IndexError):
        return {}
    return out


def _ru_maxrss_mb() -> float:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024.0


def read() -> Reading:
    """Resident, peak, anonymous (or private) and file-backed memory of this process now."""
    status = _status() if _LINUX else {}
    if "RssAnon" in status:
        return Reading(rss=status.get("VmRSS"), peak=status.get("VmHWM"), anon=status["RssAnon"],
                       file=status.get("RssFile"), kind="RssAnon")
    import psutil

    proc = psutil.Process()
    try:
        private: float | None = proc.memory_full_info().uss / 2**20
    except (psutil.AccessDenied, AttributeError):  # pragma: no cover - depends on the OS
        private = None
    return Reading(rss=proc.memory_info().rss / 2**20, peak=_ru_maxrss_mb(), anon=private, file=None,
                   kind="USS (psutil)")


def rss_mb() -> float:
    """Current resident memory of this process (MB)."""
    rss = read().rss
    return float(rss) if rss is not None else math.nan


def settle() -> None:
    """Collect garbage and give the allocator's free pages back to the OS (glibc ``malloc_trim``)."""
    gc.collect()
    if "trim" not in _libc:
        trim = None
        if _LINUX:
            try:
                trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
                trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
            except (OSError, AttributeError):  # musl and others have no malloc_trim
                trim = None
        _libc["trim"] = trim
    if _libc["trim"] is not None:
        _libc["trim"](0)


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where that is not possible."""
    if not _LINUX:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def delta_mb(after: float | None, before: float | None) -> float:
    """``after - before`` as measured (never clamped); NaN when either is missing or not finite."""
    if after is None or before is None or not (math.isfinite(after) and math.isfinite(before)):
        return math.nan
    return float(after - before)


def _mapped_files() -> set[str]:
    """Paths of the files mapped into this process now (empty where /proc is not there)."""
    try:
        with open("/proc/self/maps") as fh:
            return {parts[5].strip() for parts in (ln.split(maxsplit=5) for ln in fh) if len(parts) == 6
                    and parts[5].startswith("/")}
    except OSError:
        return set()


def _referenced_mb(exclude: set[str]) -> float | None:
    """MB of pages of mapped files not in ``exclude`` referenced since the bits were cleared."""
    total_kib, path = 0.0, None
    try:
        with open("/proc/self/smaps") as fh:
            for line in fh:
                head = line.split(maxsplit=5)
                if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
                    path = head[5].strip() if len(head) == 6 else None
                elif line.startswith("Referenced:") and path and path.startswith("/") and path not in exclude:
                    total_kib += float(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return total_kib / 1024.0


class MemoryProbe:
    """The reference reading and, later, the figures measured against it."""

    def __init__(self) -> None:
        self._ref: Reading | None = None
        self._peak_before = math.nan
        self._reset = False
        self._files_at_ref: set[str] = set()
        self._marked = False

    def reference(self) -> None:
        """Settle, note the process peak so far, reset the peak, read the reference."""
        settle()
        before = read()
        self._peak_before = before.peak if before.peak is not None else math.nan
        self._reset = reset_peak()
        self._files_at_ref = _mapped_files()
        self._ref = read()

    def mark_working_set(self) -> None:
        """Clear the pages' referenced bits (Linux): ``steady`` then counts the model-file pages used after this."""
        if not _LINUX:
            return
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("1")
            self._marked = True
        except OSError:
            self._marked = False

    def source(self) -> str:
        """Where the figures come from, for ``BenchmarkResult.memory_source``."""
        steady = self._ref.kind if self._ref is not None else "RssAnon"
        if self._marked:
            steady += " + model-file pages the timed runs referenced"
        if self._reset:
            return f"{steady}; VmHWM reset at reference"
        return f"{steady}; {'VmHWM' if _LINUX else 'ru_maxrss'} not reset"

    def steady(self, *, rss_after_data: float) -> dict[str, Any]:
        """Settle, read, and return the payload's memory figures (MB; NaN where not measurable)."""
        if self._ref is None:
            raise RuntimeError("MemoryProbe.steady() before reference()")
        settle()
        end, ref = read(), self._ref
        end_peak = end.peak if end.peak is not None else math.nan
        peak = max((p for p in (self._peak_before, end_peak) if math.isfinite(p)), default=math.nan)
        model_peak = delta_mb(end_peak, ref.rss) if self._reset else math.nan
        source = self.source()
        if not self._reset:
            log.warning("the peak RSS could not be reset at the reference point (%s): rss_peak_model_mb is "
                        "NaN, rss_peak_mb includes imports and data", source)
        anon = delta_mb(end.anon, ref.anon)
        used_files = _referenced_mb(self._files_at_ref) if self._marked else 0.0
        return {
            "rss_peak_mb": peak,
            "rss_steady_mb": anon + used_files if used_files is not None else math.nan,
            "rss_steady_anon_mb": anon,
            "rss_steady_mapped_mb": used_files,
            "rss_steady_file_mb": delta_mb(end.file, ref.file),
            "rss_peak_model_mb": model_peak,
            "memory_source": source,
            # the figure before schema 3 (peak minus RSS after the data), for comparison only: not recorded
            "rss_model_mb_v1": delta_mb(end_peak if self._reset else peak, rss_after_data),
            "rss_reference_mb": ref.rss,
            "rss_anon_reference_mb": ref.anon,
            "rss_anon_steady_mb": end.anon,
        }
