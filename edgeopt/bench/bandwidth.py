"""Memory read bandwidth, measured once per hardware fingerprint and thread count, stored on disk.

A sum over a tensor far larger than the caches (torch's vectorised reduction; numpy's sum is slower
and understates the bandwidth), best of a few passes, per thread count. Stored in
``<data dir>/bandwidth.json`` under a key of the fingerprint's hardware fields (CPU model, ISA, cores,
RAM, OS, arch), so a run on the same machine reuses it and another machine measures its own.

The figure is a best-of (contention only lowers it), so a stored figure that a later measurement
outruns was taken under load: ``bound_fraction`` then measures again and keeps the larger figure, and a
fraction still above 1 (no generation can read its weights faster than the memory delivers them) is
NaN with a warning, never a number above 100%.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

from edgeopt.records import HardwareFingerprint

__all__ = ["bound_fraction", "hardware_key", "last_level_cache_bytes", "measure_read_gbps", "read_bandwidth_gbps"]

log = logging.getLogger(__name__)

_SIZE_BYTES = 512 * 2**20
_PASSES = 10


def hardware_key(fp: HardwareFingerprint) -> str:
    fields = [fp.cpu_model, fp.arch, fp.os, str(fp.cores_physical), str(fp.cores_logical), str(fp.ram_mb),
              ",".join(sorted(fp.isa_flags))]
    return hashlib.sha256("\0".join(fields).encode()).hexdigest()[:16]


def last_level_cache_bytes(sys_cpu: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The largest CPU cache's size in bytes (Linux sysfs), 0 when unknown. Weights that fit in it are read
    from the cache, not from memory: the memory-bandwidth bound does not apply to them."""
    best = 0
    for size_file in sys_cpu.glob("index*/size"):
        text = size_file.read_text().strip().upper() if size_file.is_file() else ""
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best


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


def read_bandwidth_gbps(fp: HardwareFingerprint, *, threads: int, store: Path, at_least_gbps: float = 0.0) -> float:
    """The stored figure for this hardware and thread count, measured and stored when missing, and measured
    again when it is below ``at_least_gbps`` (a rate a measurement just achieved): the larger one is kept."""
    doc: dict[str, dict[str, float]] = {}
    if store.is_file():
        try:
            doc = json.loads(store.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            doc = {}
    key = hardware_key(fp)
    entry = doc.setdefault(key, {"cpu_model": fp.cpu_model})  # type: ignore[dict-item]
    stored = entry.get(str(threads))
    if stored is None or float(stored) < at_least_gbps:
        if stored is not None:
            log.warning("the stored read bandwidth (%.2f GB/s, %d threads) is below what a measurement just read "
                        "(%.2f GB/s): it was measured under load; measuring again", float(stored), threads,
                        at_least_gbps)
        entry[str(threads)] = round(max(measure_read_gbps(threads), float(stored or 0.0)), 2)
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        log.info("read bandwidth on %s, %d threads: %.1f GB/s", fp.cpu_model, threads, entry[str(threads)])
    return float(entry[str(threads)])


def bound_fraction(*, tokens_per_s: float, bytes_per_token: int, fp: HardwareFingerprint, threads: int,
                   store: Path) -> tuple[float, float]:
    """(read bandwidth in GB/s, the fraction of it that generating ``tokens_per_s`` tokens reads).

    A fraction above 1 with the stored figure re-measures it (see the module doc); still above 1 after
    that, the fraction is NaN: one of the two measurements is wrong and the figure would mislead."""
    rate = tokens_per_s * bytes_per_token / 1e9 if math.isfinite(tokens_per_s) and tokens_per_s > 0 else math.nan
    bw = read_bandwidth_gbps(fp, threads=threads, store=store)
    if math.isfinite(rate) and rate > bw:
        bw = read_bandwidth_gbps(fp, threads=threads, store=store, at_least_gbps=rate)
    if not math.isfinite(rate) or rate > bw:
        if math.isfinite(rate):
            log.warning("generation read %.2f GB/s, above the measured bound of %.2f GB/s (%d threads): the "
                        "bound fraction is not reported", rate, bw, threads)
        return bw, math.nan
    return bw, rate / bw
