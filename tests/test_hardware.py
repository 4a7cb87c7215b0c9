"""Hardware helpers: the cheap CPU-feature read and the u8×s8 saturation rule, on synthetic CPUs."""

from __future__ import annotations

import pytest

from edgeopt import hardware
from edgeopt.hardware import VNNI_FLAGS, cpu_features, fingerprint, u8s8_saturates


@pytest.mark.parametrize(("arch", "flags", "saturates"), [
    ("x86_64", {"sse4.2", "avx", "avx2", "fma", "f16c"}, True),  # AMD EPYC Zen 3: AVX2 only
    ("x86_64", {"avx2", "avx512f", "avx512bw"}, True),  # AVX-512 without VNNI (Skylake-SP)
    ("x86_64", {"avx2", "avx512f", "avx512-vnni", "avx512-bf16"}, False),  # AMD EPYC Zen 4
    ("x86_64", {"avx2", "avx512-vnni", "amx", "amx-int8", "amx-bf16"}, False),  # Xeon with AMX
    ("x86_64", {"avx2", "avx-vnni"}, False),  # VNNI without AVX-512 (Alder Lake)
    ("x86_64", set(), True),
    ("arm64", {"neon", "dotprod"}, False),
    ("arm64", set(), False),  # no VPMADDUBSW step anywhere on ARM
])
def test_u8s8_saturates(arch, flags, saturates) -> None:
    assert u8s8_saturates(arch=arch, isa_flags=flags) is saturates


def test_vnni_flags_are_names_fingerprints_use() -> None:
    assert set(VNNI_FLAGS) <= set(hardware.ISA_FLAGS.values())


def test_cpu_features_agree_with_the_fingerprint_and_skip_the_slow_probes(monkeypatch) -> None:
    fp = fingerprint()
    assert cpu_features() == (fp.arch, fp.isa_flags)
    cpu_features.cache_clear()

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("cpu_features must not probe GPUs or package versions")

    monkeypatch.setattr(hardware, "_gpus", fail)
    monkeypatch.setattr(hardware, "distribution_versions", fail)
    assert cpu_features() == (fp.arch, fp.isa_flags)
