"""Fingerprint of the machine that produced a measurement: CPU, ISA flags, cores, RAM, GPU, OS, tools."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import socket
import subprocess
from collections.abc import Collection
from functools import cache

import psutil

from edgeopt.records import HardwareFingerprint

__all__ = ["ISA_FLAGS", "TOOL_DISTRIBUTIONS", "VNNI_FLAGS", "cpu_features", "distribution_versions", "fingerprint",
           "has_isa", "tool_versions", "u8s8_saturates"]

#: ISA features worth recording, as /proc/cpuinfo spells them → our names.
ISA_FLAGS = {
    "sse4_2": "sse4.2",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512_vnni": "avx512-vnni",
    "avx512_bf16": "avx512-bf16",
    "avx512_fp16": "avx512-fp16",
    "avx_vnni": "avx-vnni",
    "amx_tile": "amx",
    "amx_int8": "amx-int8",
    "amx_bf16": "amx-bf16",
    # ARM (Features line)
    "asimd": "neon",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "bf16": "bf16",
    "sve": "sve",
    "sve2": "sve2",
}

#: x86 features (our names) whose 8-bit dot product accumulates u8×s8 products straight into 32 bits
VNNI_FLAGS = ("avx512-vnni", "avx-vnni", "amx", "amx-int8")

#: Toolchains whose versions go with every figure (missing ones are left out).
TOOL_DISTRIBUTIONS = (
    "edgeopt", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "nncf", "optimum-intel",
    "olive-ai", "llama-cpp-python", "mlx", "tensorrt", "torch",
)


def _arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "aarch64": "arm64"}.get(machine, machine)


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model") and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
                if model and flags:
                    break  # one processor's lines say it; the file repeats them per logical CPU
    except OSError:
        pass
    if not model and platform.system() == "Darwin":
        model = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        if _arch() == "arm64":
            flags |= {"asimd"}
    return model or platform.processor() or _arch(), flags


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _gpus() -> tuple[str, ...]:
    if shutil.which("nvidia-smi"):
        out = _run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"])
        if out:
            return tuple(f"nvidia: {line.strip()}" for line in out.splitlines() if line.strip())
    if platform.system() == "Darwin" and _arch() == "arm64":
        return ("apple: integrated GPU",)
    return ()


def has_isa(fp: HardwareFingerprint, feature: str) -> bool:
    return feature.lower() in fp.isa_flags


@cache
def cpu_features() -> tuple[str, tuple[str, ...]]:
    """This machine's architecture and ISA flags (our names, as in ``fingerprint()``), without the rest
    of the fingerprint (no GPU probe, no package versions): cheap enough for every build to ask."""
    _, raw_flags = _cpuinfo()
    return _arch(), tuple(sorted({ours for theirs, ours in ISA_FLAGS.items() if theirs in raw_flags}))


def u8s8_saturates(*, arch: str, isa_flags: Collection[str]) -> bool:
    """Whether this CPU's u8×s8 integer kernels can saturate: x86-64 without VNNI or AMX.

    Without VNNI, x86 INT8 kernels multiply uint8 activations by int8 weights with ``VPMADDUBSW``, which
    adds each pair of products into a 16-bit integer and clamps it (255·127·2 > 32767). VNNI
    (``VPDPBUSD``) and AMX accumulate in 32 bits; ARM's dot products have no such step. ONNX Runtime and
    NNCF both answer with 7-bit weights on such CPUs (``reduce_range``, ``overflow_fix``).
    """
    return arch == "x86_64" and not set(isa_flags) & set(VNNI_FLAGS)


def distribution_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of the given distributions (missing ones are left out)."""
    versions = {}
    for dist in names:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@cache
def tool_versions() -> dict[str, str]:
    return distribution_versions(TOOL_DISTRIBUTIONS)


@cache
def fingerprint() -> HardwareFingerprint:
    """The fingerprint of this machine (cached per process)."""
    model, _ = _cpuinfo()
    arch, flags = cpu_features()
    return HardwareFingerprint(
        hostname=socket.gethostname(),
        os=f"{platform.system()} {platform.release()}",
        arch=arch,
        cpu_model=model,
        isa_flags=flags,
        cores_physical=psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        cores_logical=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        ram_mb=int(psutil.virtual_memory().total // 2**20),
        gpus=_gpus(),
        python=platform.python_version(),
        tool_versions=tool_versions(),
    )
