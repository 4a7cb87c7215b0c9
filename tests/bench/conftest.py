"""Fixtures shared by the harness tests."""

from __future__ import annotations

import pytest

from edgeopt.records import HardwareFingerprint


@pytest.fixture(scope="module")
def hardware() -> HardwareFingerprint:
    """A fingerprint to attach to measurements (the harness records it; it does not probe the machine)."""
    ort = pytest.importorskip("onnxruntime")
    return HardwareFingerprint(hostname="test-host", os="linux", arch="x86_64", cpu_model="test-cpu",
                               isa_flags=("avx2",), cores_physical=2, cores_logical=2, ram_mb=1024,
                               python="3.11", tool_versions={"onnxruntime": ort.__version__})
