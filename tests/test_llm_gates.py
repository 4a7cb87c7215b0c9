"""LLM gates: perplexity within 5% of F16, mean KLD <= 0.01, generation speed-up, memory; NaN fails."""

from __future__ import annotations

import math

import pytest

from edgeopt.gates import llm_verdicts
from edgeopt.profiles import load_profile
from edgeopt.records import GenerationResult


def _gen(name: str, tps: float, mem: float) -> GenerationResult:
    return GenerationResult(candidate=name, prompt_tokens=64, gen_tokens=32, repeats=2, threads=1, prompt_tps=100,
                            gen_tps=tps, ttft_ms=10, token_ms_p50=1, token_ms_p95=1, token_ms_p99=1,
                            token_samples=62, rss_peak_mb=100, rss_model_mb=mem, load_time_ms=1, size_bytes=1)


def test_intel_cpu_has_the_llm_gates() -> None:
    g = load_profile("intel-cpu").gates_for("llm")
    assert (g.perplexity_ratio_max, g.kld_mean_max, g.speedup_min, g.memory_reduction_min) == (1.05, 0.01, 2.0, 0.5)
    assert load_profile("intel-cpu").gates_for("cnn").kld_mean_max is None


@pytest.mark.parametrize(("ppl", "kld", "tps", "mem", "failing"), [
    (10.4, 0.005, 25.0, 40.0, set()),
    (10.6, 0.005, 25.0, 40.0, {"perplexity"}),          # 6% worse than F16
    (10.4, 0.02, 25.0, 40.0, {"kld"}),
    (10.4, 0.005, 15.0, 60.0, {"speedup", "memory"}),
    (math.nan, math.nan, math.nan, math.nan, {"perplexity", "kld", "speedup", "memory"}),
])
def test_llm_verdicts(ppl: float, kld: float, tps: float, mem: float, failing: set[str]) -> None:
    gates = load_profile("intel-cpu").gates_for("llm")
    verdicts = llm_verdicts(candidate=_gen("q", tps, mem), baseline=_gen("f16", 10.0, 100.0), perplexity=ppl,
                            baseline_perplexity=10.0, kld_mean=kld, gates=gates)
    assert {v.gate for v in verdicts if not v.passed} == failing
    assert all(v.status == ("fail" if v.gate in failing else "pass") for v in verdicts)
