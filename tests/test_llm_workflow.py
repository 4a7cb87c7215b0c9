"""edgeopt.llm_workflow's plain functions: planning, data checks, measurement keys, gating (no llama.cpp run)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeopt import llm_workflow
from edgeopt.errors import ConfigError, DataError
from edgeopt.profiles import load_profile
from edgeopt.records import Artifact, CandidateOutcome, CandidateSpec, GenerationResult, LLMEvalResult


def _gen(name: str, runs: list[float], *, rss: float = 100.0) -> GenerationResult:
    return GenerationResult(candidate=name, prompt_tokens=32, gen_tokens=32, repeats=len(runs), threads=1,
                            prompt_tps=500.0, gen_tps=float(np.median(runs)), ttft_ms=10.0, token_ms_p50=1.0,
                            token_ms_p95=1.2, token_ms_p99=1.3, token_samples=31 * len(runs), rss_peak_mb=rss + 50,
                            rss_model_mb=rss, load_time_ms=5.0, size_bytes=1000, gen_tps_rounds=tuple(runs))


def _scores(name: str, ppl: float, kld: float) -> LLMEvalResult:
    return LLMEvalResult(candidate=name, perplexity=ppl, baseline_perplexity=ppl, kld_mean=kld, kld_p99=kld,
                         kld_max=kld, top1_agreement=0.97, tokens=256, window=64)


def _art(name: str, sha: str = "a" * 64) -> Artifact:
    return Artifact(candidate=name, backend="llamacpp", path=f"/nowhere/{name}.gguf", sha256=sha, size_bytes=1000,
                    parent_sha256="b" * 64, precision="q4_0", runtime={"threads": None})


def test_plan_takes_the_llamacpp_recipes_and_says_why_not_the_others():
    prof = load_profile("intel-cpu")
    specs, skipped = llm_workflow.plan(prof)
    assert [s.name for s in specs][:2] == ["llamacpp-q8_0", "llamacpp-q4_k_m"]
    assert {s.backend for s in specs} == {"llamacpp", "openvino-genai", "onnxruntime-genai"}
    # from a GGUF file only llama.cpp builds: OpenVINO GenAI and ONNX Runtime GenAI need the checkpoint, and say so
    from_gguf, why = llm_workflow.plan(prof, model_format="gguf")
    assert {s.backend for s in from_gguf} == {"llamacpp"}
    assert any(w.startswith("ov-genai-int4: openvino-genai builds from the Hugging Face checkpoint") for w in why)
    assert any(w.startswith("ort-genai-int4: onnxruntime-genai builds from the Hugging Face checkpoint") for w in why)
    assert any(w.startswith("ort-fp32-optimized:") for w in skipped)
    with pytest.raises(ConfigError, match="does not run language models"):
        llm_workflow.plan(prof, only=("ort-int8-dynamic",))
    # and a CNN or encoder run never sees them
    assert not any(s.backend == "llamacpp" for s in prof.candidate_specs(kind="cnn"))
    assert not any(s.backend == "llamacpp" for s in prof.candidate_specs(kind="encoder"))


def test_check_data_refuses_in_one_line(tmp_path):
    specs, _ = llm_workflow.plan(load_profile("intel-cpu"))
    text = tmp_path / "eval.txt"
    text.write_text("some text\n", encoding="utf-8")
    with pytest.raises(DataError, match="pass --eval"):
        llm_workflow.check_data(specs, calibration=None, evaluation=None)
    with pytest.raises(DataError, match="llamacpp-q4_k_m-imatrix .*--calibration"):
        llm_workflow.check_data(specs, calibration=None, evaluation=str(text))
    llm_workflow.check_data([s for s in specs if not s.recipe.get("imatrix")], calibration=None,
                            evaluation=str(text))


def test_a_measurement_is_keyed_by_the_set_it_was_measured_with(tmp_path):
    prof = load_profile("intel-cpu")
    ref, q8, q4 = _art("llamacpp-f16", "1" * 64), _art("llamacpp-q8_0", "2" * 64), _art("llamacpp-q4_0", "3" * 64)
    one = llm_workflow.comparison_group({"f16": ref, "q8": q8})
    two = llm_workflow.comparison_group({"f16": ref, "q8": q8, "q4": q4})
    kw = {"profile": prof, "evaluation": None, "hardware": None, "round_": 0, "work_dir": tmp_path}
    assert llm_workflow.generation_dir(ref, group=one, **kw) != llm_workflow.generation_dir(ref, group=two, **kw)
    assert llm_workflow.generation_dir(ref, group=one, **kw) == llm_workflow.generation_dir(ref, group=one, **kw)
    assert llm_workflow.generation_dir(ref, group=one, **kw) != llm_workflow.generation_dir(
        ref, group=one, **{**kw, "round_": 1})


def test_gate_speedup_is_the_ratio_of_this_runs_tokens_per_s_and_nan_fails():
    prof = load_profile("intel-cpu")
    base_rounds = [_gen("llamacpp-f16", [100.0, 102.0]), _gen("llamacpp-f16", [98.0, 101.0])]
    cand_rounds = [_gen("llamacpp-q4_0", [250.0, 255.0], rss=40), _gen("llamacpp-q4_0", [245.0, 252.0], rss=40)]
    base = CandidateOutcome(spec=llm_workflow.BASELINE, artifact=_art("llamacpp-f16"),
                            generation=llm_workflow.pool(base_rounds), llm_eval=_scores("llamacpp-f16", 20.0, 0.0))
    spec = CandidateSpec(name="llamacpp-q4_0", backend="llamacpp", recipe={"quant": "Q4_0"})
    cand = CandidateOutcome(spec=spec, artifact=_art("llamacpp-q4_0"), generation=llm_workflow.pool(cand_rounds),
                            llm_eval=_scores("llamacpp-q4_0", 20.4, 0.004))
    rounds = {"llamacpp-f16": base_rounds, "llamacpp-q4_0": cand_rounds}
    gated = llm_workflow.gate(cand, baseline=base, rounds=rounds, profile=prof)
    by = {v.gate: v for v in gated.verdicts}
    expected = np.median([250, 255, 245, 252]) / np.median([100, 102, 98, 101])
    assert gated.speedup_p50 == pytest.approx(expected, rel=1e-12)
    assert by["speedup"].ci_low <= by["speedup"].measured <= by["speedup"].ci_high
    assert by["speedup"].passed and by["perplexity"].passed and by["kld"].passed and by["memory"].passed
    assert gated.passed and gated.baseline == "llamacpp-f16"
    assert gated.llm_eval.baseline_perplexity == 20.0
    assert gated.evaluation.value == pytest.approx(0.97)  # the quality the selection weighs

    broken = cand.model_copy(update={"llm_eval": _scores("llamacpp-q4_0", math.nan, math.nan)})
    by = {v.gate: v for v in llm_workflow.gate(broken, baseline=base, rounds=rounds, profile=prof).verdicts}
    assert by["perplexity"].status == "fail" and by["kld"].status == "fail"


def test_speed_that_is_not_representative_never_passes_the_speed_gate_and_says_so():
    """MLX measured off Apple silicon (mlx[cpu]): its generation result carries the caveat; the speed-up is NaN
    and fails (never a silent pass, however fast the figures), quality gates are judged as usual, and the
    table and the report mark the figures."""
    from edgeopt import report

    prof = load_profile("apple-silicon")
    caveat = "not representative: MLX on Linux x86_64 runs its CPU backend"
    base_rounds = [_gen("llamacpp-f16", [100.0, 102.0])]
    fast = [_gen("mlx-int8-g64", [900.0, 950.0], rss=40).model_copy(update={"not_representative": caveat})]
    base = CandidateOutcome(spec=llm_workflow.BASELINE, artifact=_art("llamacpp-f16"),
                            generation=llm_workflow.pool(base_rounds), llm_eval=_scores("llamacpp-f16", 20.0, 0.0))
    spec = CandidateSpec(name="mlx-int8-g64", backend="mlx", recipe={"bits": 8})
    cand = CandidateOutcome(spec=spec, artifact=_art("mlx-int8-g64"), generation=llm_workflow.pool(fast),
                            llm_eval=_scores("mlx-int8-g64", 20.1, 0.001))
    gated = llm_workflow.gate(cand, baseline=base, rounds={"llamacpp-f16": base_rounds, "mlx-int8-g64": fast},
                              profile=prof)
    by = {v.gate: v for v in gated.verdicts}
    assert by["speedup"].status == "fail" and math.isnan(by["speedup"].measured) and math.isnan(gated.speedup_p50)
    assert by["speedup"].metric.endswith("(not representative)")
    from edgeopt.pareto import nearest_misses

    assert "speedup not judged: the speed figures are not representative" in nearest_misses([gated])[0]
    assert by["perplexity"].passed and by["kld"].passed and not gated.passed
    assert gated.generation.gen_tps == pytest.approx(925.0)  # the raw figure is kept, with its caveat
    row = next(r for r in report.llm_rows([base, gated]) if r["candidate"] == "mlx-int8-g64")
    assert row["speed-up"] == "not representative" and row["gen tok/s"].endswith("(n/r)")
    assert row["verdict"] == "fail: speedup (speed not representative)"
