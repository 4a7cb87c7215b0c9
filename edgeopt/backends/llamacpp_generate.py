"""llama.cpp's generation measuring loop (``LlamaCppBackend.generate_job``), in the fresh measuring process.

Load the GGUF with the candidate's runtime settings, warm up, then for each repeat evaluate the same prompt
from an empty KV cache (prompt tokens/s), and generate exactly ``gen_tokens`` greedy tokens from it (time to
first token, per-token latencies, generation tokens/s). EOS does not stop it: every candidate does the same
work. The other runtimes' loops (``edgeopt.backends.ov_genai``, ``ort_genai``, ``mlx``) keep to these
definitions; all return ``edgeopt.bench.generate.generation_figures``.

The KV cache's size is what the runtime allocated, not a formula: llama.cpp logs its KV buffer when the
context is created (``llama_kv_cache: size = X MiB (N cells, ...)``), so bytes per token = X / N for the
recipe's KV-cache type.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import numpy as np

from edgeopt.backends.llamacpp import offload_caveat, open_llama

__all__ = ["generate_job", "kv_bytes_per_token_from_log"]

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


def generate_job(job: dict[str, Any]) -> dict[str, Any]:
    """Worker side of a generation measurement of a GGUF (imports llama_cpp; called in the fresh process)."""
    import llama_cpp

    from edgeopt.bench import memory
    from edgeopt.bench.generate import generation_figures

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
