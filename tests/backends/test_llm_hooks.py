"""The language-model hooks of ``Backend`` (``generate_job``, ``llm_session``, ``weight_bytes_per_token``), reached
through the registry by an artifact's backend name: the generation benchmark, the evaluators and the bandwidth
bound dispatch on that name alone. Every registered backend is covered (a new entry automatically)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeopt import backends
from edgeopt.backends.base import Backend
from edgeopt.bench.generate import bytes_per_token, run_generate_job
from edgeopt.errors import ConfigError, ModelError
from edgeopt.evaluate.llm import run_eval_job
from edgeopt.llm_workflow import LLM_BACKENDS

HOOKS = ("generate_job", "llm_session")


@pytest.mark.parametrize("name", backends.names())
def test_language_model_backends_implement_the_hooks_and_the_others_refuse_in_one_line(name, tmp_path):
    overridden = {h for h in HOOKS if getattr(backends._backend_class(name), h) is not getattr(Backend, h)}
    if name in LLM_BACKENDS:
        assert overridden == set(HOOKS)
        return
    assert overridden == set()
    job = {"path": str(tmp_path), "runtime": {}, "artifact": {"backend": name}}
    refusal = rf"^backend '{name}' does not run language models \("
    with pytest.raises(ConfigError, match=refusal + "no generation benchmark"):
        run_generate_job({**job, "mode": "generate", "prompt": [1, 2], "gen_tokens": 2, "repeats": 1})
    with pytest.raises(ConfigError, match=refusal + "no perplexity or KLD evaluation"):
        run_eval_job({**job, "mode": "llm-eval", "window": 8, "max_windows": 1, "evaluation": str(tmp_path / "t")})
    assert bytes_per_token(tmp_path, backend=name, kv_bytes_per_token=8, context_tokens=4) is None  # no bound


def test_mlx_has_no_bandwidth_bound_and_unknown_backends_are_config_errors(tmp_path):
    assert bytes_per_token(tmp_path, backend="mlx", kv_bytes_per_token=8, context_tokens=4) is None
    with pytest.raises(ConfigError, match="unknown backend 'nope'"):
        bytes_per_token(tmp_path, backend="nope", kv_bytes_per_token=8, context_tokens=4)


def test_the_bound_of_a_gguf_goes_through_the_llamacpp_backend(tmp_path):
    """A GGUF written here with known tensors: llama.cpp's figure is every tensor as stored but the embedding
    table. The backend name decides, not the file: the folder backends refuse the same path, naming what
    they expect, and llama.cpp refuses a folder."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    tensors = {"token_embd.weight": np.ones((32, 64), dtype=np.float16),
               "blk.0.attn_q.weight": np.ones((64, 64), dtype=np.float16),
               "output_norm.weight": np.ones(64, dtype=np.float32)}
    w = gguf.GGUFWriter(str(path), "llama")
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    weights = 64 * 64 * 2 + 64 * 4  # attn_q in F16, the norm in F32; token_embd.weight left out
    assert weights == sum(a.nbytes for n, a in tensors.items() if n != "token_embd.weight")
    assert bytes_per_token(path, backend="llamacpp", kv_bytes_per_token=100, context_tokens=3) == weights + 300
    with pytest.raises(ModelError, match="no openvino_model.xml"):
        bytes_per_token(path, backend="openvino-genai", kv_bytes_per_token=0, context_tokens=0)
    with pytest.raises(ModelError, match="does not hold genai_config.json and model.onnx"):
        bytes_per_token(path, backend="onnxruntime-genai", kv_bytes_per_token=0, context_tokens=0)
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        bytes_per_token(Path(tmp_path), backend="llamacpp", kv_bytes_per_token=0, context_tokens=0)
