"""Fault injection for the measuring process (tests only): ``EDGEOPT_BENCH_FAULT=<fault>``.

The worker calls ``inject`` right after loading the artifact (measure and infer jobs). Faults:

* ``segfault`` / ``abort``: the process dies by SIGSEGV / SIGABRT;
* ``hang``: sleeps forever (the parent's time limit);
* ``oom``: allocates past the job's memory limit and waits 10 s for the watchdog (with no limit:
  allocates 2 GB), then raises ``MemoryError``;
* ``nan``: float outputs are NaN;
* ``cached``: outputs remembered for the last input (a one-entry cache keyed by the input bytes); any
  other input costs an extra 2 ms: fast only on repeated identical inputs (the repeat audit, TEST04);
* ``drift``: float outputs scaled by 1.1 while the timed loop runs (``timing["on"]``), unchanged
  otherwise: they differ from the evaluation run's (the output audit, TEST01);
* ``alternating``: each run does the work once in the 1st, 3rd, 5th... measuring process and four
  times in the 2nd, 4th... (counted in the file ``EDGEOPT_BENCH_FAULT_STATE``): rounds that disagree
  by 4x, for a ratio whose interval straddles its threshold whatever the machine does.

``EDGEOPT_BENCH_FAULT_CANDIDATE=<name>`` limits the fault to that candidate's processes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import time
from typing import Any

import numpy as np

from edgeopt.bench import memory
from edgeopt.errors import ConfigError

__all__ = ["FAULTS", "FAULT_ENV", "inject", "timing"]

log = logging.getLogger(__name__)

FAULT_ENV = "EDGEOPT_BENCH_FAULT"
FAULT_CANDIDATE_ENV = "EDGEOPT_BENCH_FAULT_CANDIDATE"
FAULT_STATE_ENV = "EDGEOPT_BENCH_FAULT_STATE"
FAULTS = ("segfault", "abort", "hang", "oom", "nan", "cached", "drift", "alternating")
#: True while the worker's timed loop runs (the ``drift`` fault acts only then)
timing = {"on": False}


class _FaultSession:
    """Fault injection: a wrapper around the real session that changes what ``run`` does."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.input_names = inner.input_names
        self.output_names = getattr(inner, "output_names", None)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._inner.run(feeds)


class _NanSession(_FaultSession):
    """Float outputs replaced with NaN."""

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outs = self._inner.run(feeds)
        return [np.full_like(o, np.nan) if np.issubdtype(o.dtype, np.floating) else o for o in outs]


class _CachedSession(_FaultSession):
    """Outputs remembered for the last input (by its bytes); every other input costs an extra 2 ms."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self._key: bytes | None = None
        self._outs: list[np.ndarray] = []

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        h = hashlib.sha256()
        for name in sorted(feeds):
            arr = np.ascontiguousarray(feeds[name])
            h.update(f"{name}{arr.dtype.str}{arr.shape}".encode())
            h.update(arr.tobytes())
        key = h.digest()
        if key != self._key:
            time.sleep(0.002)
            self._key, self._outs = key, self._inner.run(feeds)
        return self._outs


class _DriftSession(_FaultSession):
    """Float outputs scaled by 1.1 while the timed loop runs, unchanged otherwise."""

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outs = self._inner.run(feeds)
        if not timing["on"]:
            return outs
        return [o * np.asarray(1.1, dtype=o.dtype) if np.issubdtype(o.dtype, np.floating) else o for o in outs]


class _SlowSession(_FaultSession):
    """Every run does the work ``times`` times."""

    def __init__(self, inner: Any, times: int) -> None:
        super().__init__(inner)
        self._times = times

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        for _ in range(self._times - 1):
            self._inner.run(feeds)
        return self._inner.run(feeds)


def _alternating(session: Any) -> _SlowSession:
    state = os.environ.get(FAULT_STATE_ENV)
    if not state:
        raise ConfigError(f"{FAULT_ENV}=alternating needs {FAULT_STATE_ENV}=<a file to count processes in>")
    with open(state, "a+") as fh:  # one line per measuring process
        fh.seek(0)
        count = len(fh.read().splitlines())
        fh.write("x\n")
    return _SlowSession(session, 1 if count % 2 == 0 else 4)


def inject(session: Any, memory_limit_mb: float | None, *, candidate: str | None = None,
           timed: bool = False) -> Any:
    """The session, or a misbehaving stand-in when ``EDGEOPT_BENCH_FAULT`` names a fault (and
    ``EDGEOPT_BENCH_FAULT_CANDIDATE``, if set, names ``candidate``); ``timed``: a measuring job."""
    fault = os.environ.get(FAULT_ENV, "")
    if not fault:
        return session
    only = os.environ.get(FAULT_CANDIDATE_ENV)
    if only and candidate != only:
        return session
    if fault == "alternating":
        return _alternating(session) if timed else session
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
        while memory.rss_mb() < cap_mb:
            hoard.append(np.ones(32 * 2**20 // 8))  # 32 MB, pages touched
            time.sleep(0.01)
        if memory_limit_mb:  # above the limit: give the parent's watchdog time to kill this process
            time.sleep(10.0)
        raise MemoryError(f"fault injection: allocated {memory.rss_mb():.0f} MB")
    wrappers: dict[str, type[_FaultSession]] = {"nan": _NanSession, "cached": _CachedSession,
                                                "drift": _DriftSession}
    return wrappers[fault](session) if fault in wrappers else session
