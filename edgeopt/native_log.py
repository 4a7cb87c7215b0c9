"""Native runtime logs (ONNX Runtime's ``[E:onnxruntime:...]`` lines, OpenVINO's and NNCF's C++ messages).

They are written by C++ code straight to file descriptor 2, past Python's ``sys.stderr`` and its
logging. The command line diverts descriptor 2 into a private temporary file for the whole run
(``divert``), keeping Python's own ``sys.stderr`` (logging, progress, error lines) on the terminal;
each build then copies what was written while it ran into its ``build.log`` (``captured``).
Benchmarks run in worker processes whose stderr is already a file (``worker.stderr.log``);
``echo_enabled`` makes the supervisor copy those to the terminal too (``--verbose``).

Two builds run side by side share the one descriptor: a build's log holds the native lines written
while it ran, which may include lines of a build running at the same time (each log says so).
Without ``divert`` (``--verbose``, or edgeopt used as a library) native logs go where they always went.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["ECHO_ENV", "captured", "divert", "diverted", "echo_enabled"]

log = logging.getLogger(__name__)

#: set to "1" (by ``--verbose``) to copy native logs of worker processes to the terminal
ECHO_ENV = "EDGEOPT_NATIVE_LOGS_ECHO"

_state: dict[str, IO[bytes] | None] = {"file": None}


def divert() -> None:
    """Send descriptor 2 to a private temporary file; ``sys.stderr`` keeps writing to the terminal.

    Call it before logging handlers are made (they keep the ``sys.stderr`` of their time). Idempotent.
    """
    if _state["file"] is not None:
        return
    sys.stderr.flush()
    terminal = os.dup(2)
    sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                           errors="backslashreplace")
    sink = tempfile.TemporaryFile(prefix="edgeopt-native-")  # noqa: SIM115 - open for the whole process
    os.dup2(sink.fileno(), 2)
    _state["file"] = sink


def diverted() -> bool:
    return _state["file"] is not None


def echo_enabled() -> bool:
    return os.environ.get(ECHO_ENV) == "1"


def _size(fd: int) -> int:
    return os.fstat(fd).st_size


@contextmanager
def captured(path: Path, *, what: str) -> Iterator[None]:
    """Copy the native lines written to descriptor 2 while the block runs into ``path`` (appended).

    Without ``divert`` the file only says where the native logs went.
    """
    sink = _state["file"]
    start = _size(sink.fileno()) if sink else 0
    began = time.strftime("%Y-%m-%dT%H:%M:%S")
    try:
        yield
    finally:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as out:
            out.write(f"# {what}: native runtime log from {began} to {time.strftime('%H:%M:%S')}\n".encode())
            if sink is None:
                out.write(b"# (not captured: native logs went to this process's stderr)\n")
            else:
                end = _size(sink.fileno())
                text = os.pread(sink.fileno(), end - start, start) if end > start else b""
                out.write(b"# (a build running at the same time may have written some of these lines)\n")
                out.write(text)
                if text:
                    log.debug("%s: %d bytes of native log in %s", what, len(text), path)
