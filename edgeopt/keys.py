"""One key per result: the digest that names a build, benchmark or output folder is the digest that
keys its cache entry (``tasks/phases.py``), computed here from every input that changes the result.

::

    build     model sha, backend, recipe, calibration data sha, tool versions, hardware, sequence choice
    bench     artifact sha, runtime options, benchmark settings, evaluation data sha, tool versions,
              hardware, round number, and the comparison group (every member's artifact and runtime)
    outputs   artifact sha, runtime options, batch size, sample limit, evaluation data sha, tool
              versions, hardware

Every key also carries the record schema version, so results written by an older edgeopt are
rebuilt. A finished folder holds a stamp (``key.json``): its key and the sha256 of each file it
produced; a cache hit is used only when the stamp matches the key and every file its digest
(``stamp_ok``), otherwise the result is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from edgeopt.records import SCHEMA_VERSION, HardwareFingerprint

__all__ = ["STAMP", "digest", "hardware_identity", "result_key", "stamp_ok", "write_stamp"]

log = logging.getLogger(__name__)

STAMP = "key.json"


def digest(*parts: Any) -> str:
    """A stable short hash of JSON-able parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def hardware_identity(hw: HardwareFingerprint | None) -> dict[str, Any] | None:
    """What about the machine changes a result: CPU, ISA, cores, OS, toolchain versions (not the hostname,
    nor the RAM figure, which can read a few MB differently between boots)."""
    if hw is None:
        return None
    return {"os": hw.os, "arch": hw.arch, "cpu": hw.cpu_model, "isa": sorted(hw.isa_flags),
            "cores": [hw.cores_physical, hw.cores_logical], "gpus": list(hw.gpus), "python": hw.python,
            "tools": hw.tool_versions}


def result_key(phase: str, **parts: Any) -> str:
    """The key of one result of ``phase`` ('build', 'bench', 'outputs') from every input that changes it."""
    return digest(phase, SCHEMA_VERSION, parts)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path, names: list[str] | None) -> list[Path]:
    if names is not None:
        return [folder / n for n in names]
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STAMP)


def write_stamp(folder: Path, key: str, *, files: list[str] | None = None) -> None:
    """Record ``key`` and the sha256 of ``files`` (relative names; default: every file in ``folder``)."""
    folder = Path(folder)
    digests = {str(p.relative_to(folder)): _sha256(p) for p in _files(folder, files) if p.is_file()}
    tmp = folder / (STAMP + ".tmp")
    tmp.write_text(json.dumps({"key": key, "files": digests}, indent=1))
    os.replace(tmp, folder / STAMP)


def stamp_ok(folder: Path, key: str) -> bool:
    """True when ``folder``'s stamp names ``key`` and every stamped file still has its digest."""
    try:
        stamp = json.loads((Path(folder) / STAMP).read_text())
    except (OSError, ValueError):
        return False
    if stamp.get("key") != key or not stamp.get("files"):
        return False
    for rel, sha in stamp["files"].items():
        path = Path(folder) / rel
        if not path.is_file() or _sha256(path) != sha:
            log.info("%s changed since it was produced; it is recomputed", path)
            return False
    return True
