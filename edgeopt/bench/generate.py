"""Generation benchmark for language models, in the harness's fresh worker processes.

One worker protocol, one measuring loop per runtime: inside ``python -m edgeopt.bench.worker`` (job mode
``generate``), ``run_generate_job`` hands the job to the artifact's backend (``Backend.generate_job``, found in
the registry by the artifact's backend name: llama.cpp's loop is ``edgeopt.backends.llamacpp_generate``), which
loads the artifact with the candidate's runtime settings, warms up, then for each repeat evaluates the same
prompt from an empty KV cache (prompt tokens/s), and generates exactly ``gen_tokens`` greedy tokens from it
(time to first token, per-token latencies, generation tokens/s). EOS does not stop it: every candidate does
the same work. Every loop returns ``generation_figures``, so the figures mean the same. The parent side
(``measure_generation``) runs it in a fresh supervised process; ``interleaved_generation`` alternates baseline
and candidates over rounds and keeps every round, so ratios compare measurements taken side by side.

``bandwidth_fraction`` relates generation speed to the memory-bandwidth bound: each generated token
reads every weight once (the token-embedding table excepted: one row is gathered) plus the KV cache
filled so far; bytes per token x tokens/s / measured read bandwidth (``edgeopt.bench.bandwidth``).

The KV cache's size is what the runtime allocated, not a formula (llama.cpp's log of its KV buffer, the
CPU plugin's or ONNX Runtime's cache element types); the record gives it per token and at the profile's
context length (``benchmark.llm.context_tokens``). Runtimes that do not report their KV cache leave both None.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt import backends
from edgeopt.bench.supervise import exclusive, run_worker
from edgeopt.records import Artifact, GenerationResult

__all__ = ["bytes_per_token", "generation_figures", "interleaved_generation", "measure_generation",
           "run_generate_job"]


def run_generate_job(job: dict[str, Any]) -> dict[str, Any]:
    """Worker side: the measuring loop of the artifact's backend (``Backend.generate_job``; called in the fresh
    process). A job without an artifact record is a GGUF, measured by llama.cpp."""
    return backends.job_backend(job).generate_job(job)


def generation_figures(*, prompt_tps: list[float], gen_tps: list[float], ttft: list[float], latencies: list[float],
                       before: Any, load_ms: float, threads: int,
                       kv_bytes_per_token: float | None = None) -> dict[str, Any]:
    """Worker side: the result of a generation measurement from its repeats' figures and the memory reading
    taken before the model was loaded (every runtime's loop returns this, so the figures mean the same)."""
    import resource

    from edgeopt.bench import memory

    after = memory.read()
    peak = after.peak if after.peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lat = np.asarray(latencies)
    return {"prompt_tps": prompt_tps, "gen_tps": gen_tps, "ttft_ms": ttft,
            "token_ms_p50": float(np.percentile(lat, 50)), "token_ms_p95": float(np.percentile(lat, 95)),
            "token_ms_p99": float(np.percentile(lat, 99)), "token_samples": int(lat.size),
            "rss_peak_mb": float(peak), "rss_model_mb": memory.delta_mb(after.rss, before.rss),
            "load_time_ms": load_ms, "threads": threads, "kv_bytes_per_token": kv_bytes_per_token}


def bytes_per_token(path: str | Path, *, backend: str, kv_bytes_per_token: int, context_tokens: int) -> int | None:
    """Bytes one generated token reads: the weights but the embedding table (``Backend.weight_bytes_per_token`` of
    the artifact's ``backend``: a GGUF, an OpenVINO GenAI folder, an ONNX Runtime GenAI folder), plus the KV cache
    so far. None when the backend has no such figure (MLX): no bandwidth bound."""
    weights = backends.get(backend).weight_bytes_per_token(path=path)
    return None if weights is None else weights + kv_bytes_per_token * context_tokens


def measure_generation(artifact: Artifact, *, prompt: list[int], gen_tokens: int, threads: int,
                       repeats: int, work_dir: Path, timeout_s: float = 600.0,
                       lock_path: Path | None = None, context_tokens: int = 2048) -> GenerationResult:
    """One fresh-process generation measurement of ``artifact`` with ``threads`` threads; its KV cache is
    given at ``context_tokens``."""
    work_dir.mkdir(parents=True, exist_ok=True)
    runtime = {**artifact.runtime, "threads": threads,
               "n_ctx": max(int(artifact.runtime.get("n_ctx", 512)), len(prompt) + gen_tokens + 8)}
    job = {"mode": "generate", "path": artifact.path, "runtime": runtime, "prompt": prompt,
           "gen_tokens": gen_tokens, "repeats": repeats, "artifact": artifact.model_dump(mode="json")}
    with exclusive(lock_path):
        out = run_worker(job, work_dir=work_dir, candidate=artifact.candidate, what="generation benchmark",
                         timeout_s=timeout_s, memory_limit_mb=None)

    def med(key: str) -> float:
        values = [float(v) for v in out[key] if math.isfinite(float(v))]
        return float(np.median(values)) if values else math.nan

    kv = out.get("kv_bytes_per_token")
    kv = float(kv) if kv is not None and math.isfinite(float(kv)) and float(kv) > 0 else None
    return GenerationResult(candidate=artifact.candidate, prompt_tokens=len(prompt), gen_tokens=gen_tokens,
                            repeats=repeats, threads=int(out["threads"]), prompt_tps=med("prompt_tps"),
                            gen_tps=med("gen_tps"), ttft_ms=med("ttft_ms"), token_ms_p50=out["token_ms_p50"],
                            token_ms_p95=out["token_ms_p95"], token_ms_p99=out["token_ms_p99"],
                            token_samples=out["token_samples"], rss_peak_mb=out["rss_peak_mb"],
                            rss_model_mb=out["rss_model_mb"], load_time_ms=out["load_time_ms"],
                            size_bytes=artifact.size_bytes,
                            gen_tps_rounds=tuple(float(v) for v in out["gen_tps"]),
                            kv_cache_bytes_per_token=kv, kv_context_tokens=context_tokens if kv else None,
                            kv_cache_mb=kv * context_tokens / 2**20 if kv else None,
                            not_representative=out.get("not_representative"))


def interleaved_generation(artifacts: dict[str, Artifact], *, rounds: int, work_dir: Path,
                           **kwargs: Any) -> dict[str, GenerationResult]:
    """Measure every artifact once per round, in the same order each round; pool each one's rounds."""
    per: dict[str, list[GenerationResult]] = {name: [] for name in artifacts}
    for r in range(rounds):
        for name, art in artifacts.items():
            per[name].append(measure_generation(art, work_dir=work_dir / f"{name}-r{r}", **kwargs))
    pooled = {}
    for name, results in per.items():
        first = results[0]
        gen = [v for res in results for v in res.gen_tps_rounds]
        pooled[name] = first.model_copy(update={
            "repeats": sum(r.repeats for r in results), "gen_tps": float(np.median(gen)),
            "prompt_tps": float(np.median([r.prompt_tps for r in results])),
            "ttft_ms": float(np.median([r.ttft_ms for r in results])),
            "rss_peak_mb": max(r.rss_peak_mb for r in results), "gen_tps_rounds": tuple(gen)})
    return pooled
