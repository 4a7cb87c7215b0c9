"""Supervision of the measuring process: start ``python -m edgeopt.bench.worker JOB.json``, watch it, classify
how it ended.

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
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import edgeopt
from edgeopt import native_log
from edgeopt.errors import CandidateFailed, ConfigError, DataError

__all__ = ["classify_exit", "exclusive", "run_worker"]

log = logging.getLogger(__name__)

_WATCHDOG_PERIOD_S = 0.05
_MEMORY_RE = re.compile(r"MemoryError|std::bad_alloc|Failed to allocate|Cannot allocate memory|out of memory")
_UNSUPPORTED_RE = re.compile(r"NOT_IMPLEMENTED|Could not find an implementation|unsupported", re.IGNORECASE)
_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE}


@contextlib.contextmanager
def exclusive(lock_path: Path | None) -> Iterator[None]:
    if lock_path is None:
        yield
        return
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for the lock %s", lock_path)
            waited = time.monotonic()
            fcntl.flock(fh, fcntl.LOCK_EX)
            log.info("got the lock %s after %.1f s", lock_path, time.monotonic() - waited)
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


def run_worker(job: dict[str, Any], *, work_dir: Path, candidate: str, what: str,
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
    if native_log.echo_enabled():  # --verbose: the worker's native runtime logs on the terminal too
        _echo(stderr_path, f"{what} worker for {candidate}")
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
    raise classify_exit(rc, stderr, candidate=candidate, what=what, where=where)


def _echo(path: Path, what: str) -> None:
    text = path.read_text(errors="replace") if path.is_file() else ""
    if text.strip():
        sys.stderr.write(f"--- {what}: {path}\n{text.rstrip()}\n---\n")
        sys.stderr.flush()


def _classify_text(text: str) -> str | None:
    if _MEMORY_RE.search(text):
        return "oom"
    if _UNSUPPORTED_RE.search(text):
        return "unsupported-op"
    return None


def classify_exit(rc: int, stderr: str, *, candidate: str, what: str, where: str) -> CandidateFailed:
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
