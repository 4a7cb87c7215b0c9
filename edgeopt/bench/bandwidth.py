"""Memory read bandwidth, measured once per hardware fingerprint and thread count, stored on disk.

A sum over a tensor far larger than the caches (torch's vectorised reduction; numpy's sum is slower
and understates the bandwidth), best of a few passes, per thread count. Stored in
``<data dir>/bandwidth.json`` under a key of the fingerprint's hardware fields (CPU model, ISA, cores,
RAM, OS, arch), so a run on the same machine reuses it and another machine measures its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from edgeopt.records import HardwareFingerprint

__all__ = ["hardware_key", "measure_read_gbps", "read_bandwidth_gbps"]

log = logging.getLogger(__name__)

_SIZE_BYTES = 512 * 2**20
_PASSES = 10


def hardware_key(fp: HardwareFingerprint) -> str:
    fields = [fp.cpu_model, fp.arch, fp.os, str(fp.cores_physical), str(fp.cores_logical), str(fp.ram_mb),
              ",".join(sorted(fp.isa_flags))]
    return hashlib.sha256("\0".join(fields).encode()).hexdigest()[:16]


def measure_read_gbps(threads: int) -> float:
    """GB/s (1e9 bytes) of a float32 sum over 512 MiB with ``threads`` threads, best of 10."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(_SIZE_BYTES // 4, dtype=torch.float32)
        best = float("inf")
        for _ in range(_PASSES):
            start = time.perf_counter()
            float(x.sum())
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(old)
    return _SIZE_BYTES / best / 1e9


def read_bandwidth_gbps(fp: HardwareFingerprint, *, threads: int, store: Path) -> float:
    """The stored figure for this hardware and thread count, measured and stored when missing."""
    doc: dict[str, dict[str, float]] = {}
    if store.is_file():
        try:
            doc = json.loads(store.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            doc = {}
    key = hardware_key(fp)
    entry = doc.setdefault(key, {"cpu_model": fp.cpu_model})  # type: ignore[dict-item]
    if str(threads) not in entry:
        entry[str(threads)] = round(measure_read_gbps(threads), 2)
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        log.info("read bandwidth on %s, %d threads: %.1f GB/s", fp.cpu_model, threads, entry[str(threads)])
    return float(entry[str(threads)])
