"""The MLX backend on the tests' tiny Llama (mlx[cpu] off Apple silicon): mlx-lm's quantization read back
from the folder, generation measured in a fresh process, perplexity / KLD / top-1 against llama.cpp's F16
reference (an independent runtime), and the speed caveat off Apple silicon."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from edgeopt import backends, llm_workflow
from edgeopt.errors import CandidateFailed, ConfigError
from edgeopt.intake import assess
from edgeopt.profiles import load_profile
from tests.conftest import write_profile

pytest.importorskip("mlx_lm")
pytest.importorskip("llama_cpp")

from edgeopt.backends.mlx import MlxRecipe, quantization_applied, speed_caveat
from edgeopt.evaluate.llm import run_eval_job

WINDOW, WINDOWS = 64, 8
ON_APPLE = sys.platform == "darwin" and speed_caveat() is None


@pytest.fixture(scope="module")
def built(tiny_llama, tmp_path_factory):
    """4-bit and 8-bit (group 64) MLX folders converted from the checkpoint, built once for the module."""
    a = assess(tiny_llama["hf"])
    b = backends.get("mlx")
    work = tmp_path_factory.mktemp("mlx")
    return {bits: b.optimize(model=a.model, assessment=a, recipe=MlxRecipe(bits=bits, group_size=64),
                             candidate=f"mlx-int{bits}", out_dir=work / str(bits)) for bits in (4, 8)}


@pytest.fixture(scope="module")
def scores(built, tiny_llama, tmp_path_factory):
    """The evaluator's worker job (``run_eval_job``) on llama.cpp's F16 GGUF (the reference) and on both MLX builds."""
    folder = tmp_path_factory.mktemp("mlx-eval")
    common = {"evaluation": str(tiny_llama["eval"]), "window": WINDOW, "max_windows": WINDOWS}
    ref = run_eval_job({**common, "path": str(tiny_llama["f16"]), "runtime": {"threads": 1}, "artifact": None,
                        "reference_out": str(folder / "reference.npz")})
    out = {"f16": ref}
    for bits, art in built.items():
        out[bits] = run_eval_job({**common, "path": art.path, "runtime": art.runtime,
                                  "artifact": art.model_dump(mode="json"), "reference": str(folder / "reference.npz")})
    return out


def test_quantization_is_read_back_from_the_folder(built):
    for bits, art in built.items():
        applied = quantization_applied(art.path)
        assert (applied["bits"], applied["group_size"], applied["mode"]) == (bits, 64, "affine")
        # every matrix of the tiny Llama (4 layers x 7, embeddings, lm_head) has a width divisible by 64
        assert len(applied["quantized"]) == 30 and applied["float"] == []
        assert art.precision == f"int{bits}-g64" and art.backend == "mlx"
        assert f"quantization read back: {bits}-bit affine, group 64; 30 of 30 matrices quantized" in art.notes
        assert any(n.startswith("threads: MLX has no thread setting") for n in art.notes)
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in Path(art.path).iterdir()}
    assert built[4].size_bytes < built[8].size_bytes
    assert set(built[4].tool_versions) >= {"mlx", "mlx-lm"}


def test_quality_against_llama_cpps_f16(scores):
    """The 8-bit model against the F16 reference: perplexity within 3% and mean KLD < 0.01 (8-bit weights with a
    scale per 64 lose almost nothing; this catches a wrong conversion, a shifted vocabulary or mismatched
    tokenization, which put KLD near the entropy itself); top-1 agreement >= 95%. The 4-bit build loses more
    than the 8-bit one (the bits asked for are the bits run) but stays a usable model (KLD < 0.2)."""
    f16, q8, q4 = scores["f16"], scores[8], scores[4]
    # the garbage check runs on MLX's greedy generation: the same verdict and continuation as llama.cpp's F16
    # (the briefly trained tiny Llama continues with newlines, which the check calls empty, in both runtimes)
    assert q8["garbage"] == q4["garbage"] == f16["garbage"] and q8["garbage_text"] == f16["garbage_text"]
    assert q8["tokens"] == f16["tokens"] == WINDOW * WINDOWS
    assert abs(q8["perplexity"] / f16["perplexity"] - 1) < 0.03
    assert q8["kld_mean"] < 0.01 and q8["top1_agreement"] >= 0.95
    assert q8["kld_mean"] < q4["kld_mean"] < 0.2
    assert all(math.isfinite(s[k]) for s in (q8, q4) for k in ("perplexity", "kld_mean", "kld_p99", "top1_agreement"))


def test_generation_is_measured_and_its_speed_marked_off_apple_silicon(built, tmp_path):
    from edgeopt.bench.generate import measure_generation

    art = built[4]
    r = measure_generation(art, prompt=list(range(5, 37)), gen_tokens=24, threads=1, repeats=2,
                           work_dir=tmp_path / "g")
    assert (r.prompt_tokens, r.gen_tokens, r.token_samples) == (32, 24, 2 * 23)
    assert all(math.isfinite(v) and v > 0 for v in (r.gen_tps, r.prompt_tps, r.ttft_ms, r.token_ms_p99))
    assert r.token_ms_p50 <= r.token_ms_p95 <= r.token_ms_p99 and r.size_bytes == art.size_bytes
    assert r.threads >= 1  # the cores MLX used (CPU time / wall time): no thread setting to honour
    if ON_APPLE:
        assert r.not_representative is None
    else:
        assert r.not_representative and r.not_representative.startswith("not representative: MLX on ")
        assert any(n.startswith("speed not representative") for n in art.notes)


def test_bad_recipes_and_inputs_fail_in_one_line(tiny_llama, tmp_path):
    for recipe, says in (({"bits": 5}, "bits must be one of 2, 3, 4, 6, 8 (MLX affine quantization); got 5"),
                         ({"group_size": 48}, "group_size must be one of 32, 64, 128; got 48")):
        path = write_profile(tmp_path / "p.yaml", candidates=[{"name": "x", "backend": "mlx", "recipe": recipe}])
        with pytest.raises(ConfigError) as bad:
            load_profile(path)
        assert says in str(bad.value) and "\n" not in str(bad.value)
    g = assess(tiny_llama["f16"])  # a GGUF: MLX converts from the checkpoint
    with pytest.raises(CandidateFailed) as info:
        backends.get("mlx").optimize(model=g.model, assessment=g, recipe=MlxRecipe(), candidate="gguf",
                                     out_dir=tmp_path / "g")
    assert "builds hf models, got 'gguf'" in str(info.value)


def test_the_apple_silicon_profile_plans_mlx_and_llama_cpp_and_skips_mlx_from_a_gguf():
    prof = load_profile("apple-silicon")
    specs, _ = llm_workflow.plan(prof)
    assert {s.name for s in specs} >= {"mlx-int4-g64", "mlx-int8-g64", "llamacpp-q8_0", "llamacpp-q4_k_m"}
    from_gguf, why = llm_workflow.plan(prof, model_format="gguf")
    assert {s.backend for s in from_gguf} == {"llamacpp"}
    assert any(w.startswith("mlx-int4-g64: mlx builds from the Hugging Face checkpoint") for w in why)
