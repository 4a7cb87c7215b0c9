"""Generation benchmark for language models (GGUF / llama.cpp), in the harness's fresh worker processes.

One measuring loop, run inside ``python -m edgeopt.bench.worker`` (job mode ``generate``): load the
GGUF with the candidate's runtime settings, warm up, then for each repeat evaluate the same prompt from
an empty KV cache (prompt tokens/s), and generate exactly ``gen_tokens`` greedy tokens from it
(time to first token, per-token latencies, generation tokens/s). EOS does not stop it: every candidate
does the same work. The parent side (``measure_generation``) runs it in a fresh supervised process;
``interleaved_generation`` alternates baseline and candidates over rounds and keeps every round, so
ratios compare measurements taken side by side.

``bandwidth_fraction`` relates generation speed to the memory-bandwidth bound: each generated token
reads every weight once (the token-embedding table excepted: one row is gathered) plus the KV cache
filled so far; bytes per token x tokens/s / measured read bandwidth (``edgeopt.bench.bandwidth``).

The KV cache's size is what the runtime allocated, not a formula: llama.cpp logs its KV buffer when the
context is created (``llama_kv_cache: size = X MiB (N cells, ...)``), so bytes per token = X / N for the
recipe's KV-cache type; the record gives it per token and at the profile's context length
(``benchmark.llm.context_tokens``). Runtimes that do not report their KV cache leave both None.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.bench.supervise import exclusive, run_worker
from edgeopt.records import Artifact, GenerationResult

__all__ = ["bytes_per_token", "generation_figures", "interleaved_generation", "kv_bytes_per_token_from_log",
           "measure_generation", "run_generate_job"]

_LOG_CALLBACK: list[Any] = []
_KV_SIZE_RE = re.compile(r"llama_kv_cache\w*: size =\s*([0-9.]+) MiB \(\s*(\d+) cells")


def kv_bytes_per_token_from_log(text: str) -> float | None:
    """Bytes of K and V per context token from llama.cpp's context-creation log (the last KV cache it
    reported), or None when the log has no such line."""
    found = _KV_SIZE_RE.findall(text)
    if not found:
        return None
    mib, cells = found[-1]
    return float(mib) * 2**20 / int(cells) if int(cells) > 0 else None


def _capture_llama_log() -> list[str]:
    """Route llama.cpp's log lines (all levels) to descriptor 2 (the worker's log file) and keep them here."""
    import ctypes

    import llama_cpp

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def _keep(_level: int, text: bytes, _user: object) -> None:
        line = text.decode("utf-8", errors="replace")
        lines.append(line)
        os.write(2, text)

    _LOG_CALLBACK[:] = [_keep]  # kept alive: llama.cpp holds only the C pointer
    llama_cpp.llama_log_set(_keep, ctypes.c_void_p(0))
    return lines


def run_generate_job(job: dict[str, Any]) -> dict[str, Any]:
    """Worker side: the measuring loop (imports llama_cpp; called in the fresh process). An OpenVINO GenAI
    artifact, an ONNX Runtime GenAI one and an MLX one are measured by their backend's loop
    (``edgeopt.backends.ov_genai.generate_job``, ``edgeopt.backends.ort_genai.generate_job``,
    ``edgeopt.backends.mlx.generate_job``), to the same definitions."""
    backend = (job.get("artifact") or {}).get("backend")
    if backend == "openvino-genai":
        from edgeopt.backends.ov_genai import generate_job

        return generate_job(job)
    if backend == "onnxruntime-genai":
        from edgeopt.backends.ort_genai import generate_job as ort_generate_job

        return ort_generate_job(job)
    if backend == "mlx":
        from edgeopt.backends.mlx import generate_job as mlx_generate_job

        return mlx_generate_job(job)

    import llama_cpp

    from edgeopt.backends.llamacpp import offload_caveat, open_llama
    from edgeopt.bench import memory

    llama_cpp.llama_backend_init()
    log_lines = _capture_llama_log()
    before = memory.read()
    memory.reset_peak()
    t0 = time.perf_counter()
    llm = open_llama(job["path"], job["runtime"])
    load_ms = (time.perf_counter() - t0) * 1e3
    prompt = [int(t) for t in job["prompt"]]
    n_gen = int(job["gen_tokens"])

    def generate() -> tuple[float, list[float]]:
        llm.reset()  # empty KV cache: no reuse of the previous repeat's prompt
        stamps: list[float] = []
        start = time.perf_counter()
        for _tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == n_gen:
                break
        return (stamps[0] - start) * 1e3, list(np.diff(stamps) * 1e3)

    generate()  # warm-up: kernels, thread pools, pages of the weights
    prompt_tps, ttft, gen_tps, latencies = [], [], [], []
    for _ in range(int(job["repeats"])):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prompt_tps.append(len(prompt) / (time.perf_counter() - start))
        first, steps = generate()
        ttft.append(first)
        latencies.extend(steps)
        gen_tps.append(len(steps) / (sum(steps) / 1e3))
    out = generation_figures(prompt_tps=prompt_tps, gen_tps=gen_tps, ttft=ttft, latencies=latencies, before=before,
                             load_ms=load_ms, threads=llm.context_params.n_threads,
                             kv_bytes_per_token=kv_bytes_per_token_from_log("".join(log_lines)))
    out["not_representative"] = offload_caveat(job["runtime"])
    return out


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


def bytes_per_token(path: str | Path, *, kv_bytes_per_token: int, context_tokens: int) -> int:
    """Bytes one generated token reads: all weights except the embedding table, plus the KV cache so far.
    ``path`` is a GGUF file, an OpenVINO GenAI folder (``openvino_model.xml``) or an ONNX Runtime GenAI folder
    (``genai_config.json`` + ``model.onnx``)."""
    path = Path(path)
    if path.is_dir() and (path / "openvino_model.xml").is_file():
        from edgeopt.backends.ov_genai import weight_bytes_per_token

        weights = weight_bytes_per_token(path / "openvino_model.xml")
    elif path.is_dir() and (path / "genai_config.json").is_file():
        from edgeopt.backends.ort_genai import weight_bytes_per_token as onnx_weight_bytes

        weights = onnx_weight_bytes(path / "model.onnx")
    else:
        from edgeopt.intake.llm import _reader

        reader = _reader(path)
        weights = sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")
    return weights + kv_bytes_per_token * context_tokens


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
