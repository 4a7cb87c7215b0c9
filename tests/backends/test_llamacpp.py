"""llama.cpp backend on the tests' tiny Llama: every quant type, read-back of tensor types, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeopt.errors import CandidateFailed
from edgeopt.intake import assess

llama_cpp = pytest.importorskip("llama_cpp")

from edgeopt.backends.llamacpp import (
    ALLOWED_TYPES,
    LlamaCppBackend,
    LlamaCppRecipe,
    check_types,
)
from edgeopt.data import Dataset

#: the main type each quant puts in most matrices
MAIN = {"Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K_M": "Q5_K", "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q4_0": "Q4_0",
        "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS", "Q3_K_M": "Q3_K", "Q2_K": "Q2_K"}


def test_every_quant_type_the_recipe_offers_is_tested() -> None:
    from typing import get_args

    from edgeopt.backends.llamacpp import QuantType

    assert set(get_args(QuantType)) - {"F16"} == set(MAIN)


def _build(model: Path, tmp_path: Path, **recipe):
    a = assess(model)
    cal = recipe.pop("calibration", None)
    return LlamaCppBackend().optimize(model=a.model, assessment=a, recipe=LlamaCppRecipe(**recipe), candidate="c",
                                      out_dir=tmp_path / "out", calibration=cal)


@pytest.mark.parametrize("quant", sorted(MAIN))
def test_every_quant_type_is_applied(tiny_llama, tmp_path: Path, quant: str) -> None:
    from edgeopt.intake.llm import read_gguf_types

    art = _build(tiny_llama["f16"], tmp_path, quant=quant)
    types = read_gguf_types(art.path)
    matrices = [t for n, t in types.items() if n.endswith(".weight") and "norm" not in n]
    assert check_types(types, quant) == [] and set(matrices) <= ALLOWED_TYPES[quant]
    assert matrices.count(MAIN[quant]) > len(matrices) // 2
    assert art.size_bytes < tiny_llama["f16"].stat().st_size and any("tensor types" in n for n in art.notes)
    assert art.runtime["n_ctx"] == 512 and art.precision == quant.lower()


def test_a_fallback_type_fails_the_candidate(tiny_llama, tmp_path: Path) -> None:
    """Rows of 96 take Q4_0 (blocks of 32) but not Q4_K (256): llama.cpp falls back and says 'success'."""
    import torch
    import transformers

    folder = tmp_path / "narrow"
    shutil.copytree(tiny_llama["hf"], folder)
    config = transformers.AutoConfig.from_pretrained(str(folder))
    config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads = 96, 192, 2, 1
    config.head_dim = 48
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(folder))
    with pytest.raises(CandidateFailed, match="did not apply Q4_K_M") as info:
        _build(folder, tmp_path, quant="Q4_K_M")
    assert info.value.reason == "unsupported-op"
    _build(folder, tmp_path / "q4", quant="Q4_0")  # rows of 96 do take blocks of 32


def test_requantizing_and_too_long_context_are_refused(tiny_llama, tmp_path: Path) -> None:
    q = _build(tiny_llama["f16"], tmp_path / "a", quant="Q8_0")
    with pytest.raises(CandidateFailed, match="already quantized"):
        _build(Path(q.path), tmp_path / "b", quant="Q4_0")
    as_is = _build(Path(q.path), tmp_path / "c", quant="F16")  # measured as it is, when asked
    assert "Q8_0" in " ".join(as_is.notes)
    with pytest.raises(CandidateFailed, match="exceeds the model's context length 512"):
        _build(tiny_llama["f16"], tmp_path / "d", quant="Q8_0", n_ctx=4096)


def test_importance_matrix_from_calibration_text(tiny_llama, tmp_path: Path) -> None:
    with pytest.raises(CandidateFailed, match="--calibration") as info:
        _build(tiny_llama["hf"], tmp_path / "a", quant="IQ4_XS", imatrix=True)
    assert info.value.reason == "missing-data"
    cal = Dataset(str(tiny_llama["calibration"]), "", {})
    plain = _build(tiny_llama["f16"], tmp_path / "b", quant="IQ4_XS")
    weighted = _build(tiny_llama["hf"], tmp_path / "c", quant="IQ4_XS", imatrix=True, calibration=cal)
    assert any("importance matrix: 29 tensors" in n for n in weighted.notes)
    assert weighted.sha256 != plain.sha256  # the matrix changed the rounding


def test_session_returns_logits_per_position(tiny_llama) -> None:
    s = LlamaCppBackend().load(path=str(tiny_llama["f16"]), runtime={"n_ctx": 64, "threads": 1})
    (y,) = s.run({"input_ids": np.array([[5, 6, 7, 8], [9, 10, 11, 12]])})
    assert y.shape == (2, 4, 1024) and np.isfinite(y).all() and not np.allclose(y[0], y[1])


def test_recipe_fields_are_documented_and_validated() -> None:
    with pytest.raises(ValueError, match="IQ4_XS"):
        LlamaCppRecipe(quant="Q3_K")
    opts = LlamaCppRecipe(kv_type="q8_0", flash_attn=True, n_batch=64).runtime_options()
    assert json.loads(json.dumps(opts))["kv_type"] == "q8_0" and opts["flash_attn"] and opts["n_batch"] == 64


def test_the_checkpoint_is_converted_once_for_every_candidate_and_a_tampered_conversion_is_redone(
        tiny_llama, tmp_path: Path) -> None:
    """Every llama.cpp candidate of a checkpoint starts from its F16 GGUF: converted once per checkpoint and
    converter into the builds folder's ``.gguf-f16``, reused by the next candidate (same bytes as a fresh
    conversion), and converted again when the cached file no longer matches its digest."""
    from edgeopt.convert.hf_gguf import convert_hf_to_gguf
    from edgeopt.data import file_sha256

    a = assess(tiny_llama["hf"])
    builds = tmp_path / "builds"

    def build(name: str, quant: str):
        return LlamaCppBackend().optimize(model=a.model, assessment=a, recipe=LlamaCppRecipe(quant=quant),
                                          candidate=name, out_dir=builds / name)

    ref = build("ref", "F16")
    cached = list((builds / ".gguf-f16").glob("*.gguf"))
    assert len(cached) == 1 and file_sha256(cached[0]) == ref.sha256
    fresh = convert_hf_to_gguf(tiny_llama["hf"], tmp_path / "fresh.gguf")
    assert file_sha256(fresh) == ref.sha256  # the conversion is deterministic: reuse gives the same bytes
    stamp = cached[0].stat().st_mtime_ns
    q8 = build("q8", "Q8_0")
    assert cached[0].stat().st_mtime_ns == stamp  # not converted again
    assert not (builds / "q8" / "model-f16.gguf").exists() and Path(q8.path).name == "model-q8_0.gguf"
    with open(cached[0], "r+b") as fh:  # a cache file changed behind our back is not used
        fh.seek(-16, 2)
        fh.write(b"\0" * 16)
    again = build("ref2", "F16")
    assert again.sha256 == ref.sha256 and file_sha256(cached[0]) == ref.sha256


def test_candidates_built_at_the_same_time_share_one_conversion(tiny_llama, tmp_path: Path) -> None:
    """The flow builds candidates concurrently: both builds succeed from one conversion (a first version
    raced two threads of one process on the same temporary file)."""
    from concurrent.futures import ThreadPoolExecutor

    a = assess(tiny_llama["hf"])
    builds = tmp_path / "builds"

    def build(quant: str):
        return LlamaCppBackend().optimize(model=a.model, assessment=a, recipe=LlamaCppRecipe(quant=quant),
                                          candidate=quant, out_dir=builds / quant)

    with ThreadPoolExecutor(3) as pool:
        arts = list(pool.map(build, ["F16", "Q8_0", "Q4_0"]))
    assert [Path(x.path).name for x in arts] == ["model-f16.gguf", "model-q8_0.gguf", "model-q4_0.gguf"]
    assert len(list((builds / ".gguf-f16").glob("*.gguf"))) == 1
    assert not list((builds / ".gguf-f16").glob("*partial*"))


def test_a_wheel_built_for_another_cpu_is_named_before_it_runs() -> None:
    """llama-cpp-python compiles llama.cpp for the CPU it is built on and pip reuses the wheel on later machines:
    a wheel from an AVX-512 host stops an AVX2-only CPU at its first kernel, one from an AVX2 host leaves an
    AMX host's kernels unused. Both directions from llama.cpp's own system-info line, then this host's path."""
    import llama_cpp

    from edgeopt.backends.llamacpp import build_isa_gap, build_note
    from edgeopt.hardware import cpu_features

    avx2_build = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | REPACK = 1 |"
    amx_build = avx2_build.replace("AVX2 = 1 |", "AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 | AMX_INT8 = 1 |")
    avx2_cpu, amx_cpu = {"avx", "avx2", "fma", "f16c"}, {"avx", "avx2", "fma", "f16c", "avx512f", "avx512-vnni",
                                                         "amx", "amx-int8"}
    assert build_isa_gap(amx_build, avx2_cpu) == (["AVX512", "AVX512_VNNI", "AMX_INT8"], [])
    assert build_isa_gap(avx2_build, amx_cpu) == ([], ["AVX512", "AVX512_VNNI", "AMX_INT8"])
    assert build_isa_gap(avx2_build, avx2_cpu) == ([], [])
    # this host: the installed build against this CPU (a wheel that runs here uses nothing this CPU lacks)
    info = llama_cpp.llama_print_system_info().decode()
    missing, unused = build_isa_gap(info, cpu_features()[1])
    assert missing == []
    note = build_note()
    assert (note is None) == (unused == []) and (note is None or all(u in note for u in unused))
