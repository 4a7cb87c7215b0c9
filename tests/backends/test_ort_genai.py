"""The ONNX Runtime GenAI backend on the tests' tiny Llama: the model builder's int4 weights read back from
model.onnx, logits checked against llama.cpp's F16 reference (an independent runtime), generation measured by
onnxruntime_genai to the same definitions as the other runtimes."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from edgeopt import backends
from edgeopt.errors import CandidateFailed, ConfigError
from edgeopt.intake import assess
from edgeopt.profiles import load_profile
from tests.conftest import write_profile

pytest.importorskip("onnxruntime_genai")
pytest.importorskip("llama_cpp")

from edgeopt.backends.ort_genai import OrtGenAIRecipe, _check_applied, matmul_weights
from edgeopt.evaluate.llm import kl_divergence, tokenize_text, window_logprobs

WINDOW = 64


@pytest.fixture(scope="module")
def built(tiny_llama, tmp_path_factory):
    """The fp32 reference and an int4 build (blocks of 64: neither the builder's default 32 nor the recipe's 128)."""
    a = assess(tiny_llama["hf"])
    b = backends.get("onnxruntime-genai")
    work = tmp_path_factory.mktemp("ort-genai")
    recipes = {"fp32": OrtGenAIRecipe(weights="fp32", threads=1),
               "int4": OrtGenAIRecipe(weights="int4", block_size=64, accuracy_level=4, threads=1)}
    return {w: b.optimize(model=a.model, assessment=a, recipe=r, candidate=w, out_dir=work / w)
            for w, r in recipes.items()}


def test_int4_weights_are_read_back_from_model_onnx(built, tiny_llama):
    """Every weight matrix of the int4 build is a 4-bit MatMulNBits at the recipe's block size and accuracy level;
    the fp32 build has the same matrices as float MatMuls; the embedding table stays float in both."""
    q, f = (matmul_weights(Path(built[w].path) / "model.onnx") for w in ("int4", "fp32"))
    assert q["matmulnbits"] > 0 and q["float"] == []
    assert q["bits"] == {4: q["matmulnbits"]} and q["block_size"] == {64: q["matmulnbits"]}
    assert q["accuracy_level"] == {4: q["matmulnbits"]} and q["zero_points"] == 0  # symmetric by default
    assert f["matmulnbits"] == 0 and len(f["float"]) == q["matmulnbits"]
    assert q["embedding"] == f["embedding"] == "float32"
    cfg = json.loads((Path(tiny_llama["hf"]) / "config.json").read_text())
    # one per attention (q, k, v fused) and output projection, three per MLP, and the LM head
    assert q["matmulnbits"] in (cfg["num_hidden_layers"] * 5 + 1, cfg["num_hidden_layers"] * 7 + 1)
    int4, fp32 = built["int4"], built["fp32"]
    assert int4.size_bytes == sum(p.stat().st_size for p in Path(int4.path).rglob("*") if p.is_file())
    assert int4.size_bytes < fp32.size_bytes / 3  # 4-bit matrices; the float embedding table in both
    assert any(f"block sizes {{64: {q['matmulnbits']}}}" in n for n in int4.notes), int4.notes
    assert {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json"} <= {
        p.name for p in Path(int4.path).iterdir()}
    session = json.loads((Path(int4.path) / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert (session["intra_op_num_threads"], session["inter_op_num_threads"]) == (1, 1)  # the recipe's threads
    # a build that did not apply what was asked fails the candidate
    with pytest.raises(CandidateFailed, match="int4 block 128 was not applied as asked") as info:
        _check_applied(q, OrtGenAIRecipe(block_size=128), "x")
    assert info.value.reason == "unsupported-op"
    with pytest.raises(CandidateFailed, match="no MatMulNBits"):
        _check_applied(f, OrtGenAIRecipe(), "x")


def test_the_models_give_llama_cpps_f16_logits(built, tiny_llama):
    """onnxruntime_genai and llama.cpp are two runtimes of one checkpoint: the same tokens; the fp32 model's
    next-token distributions match the F16 GGUF's closely (fp16 rounding only), the int4 model's within the
    quality gate's KLD with the same top-1 prediction at most positions."""
    from edgeopt.backends.llamacpp import open_llama

    text = tiny_llama["eval"].read_text(encoding="utf-8")[:3000]
    ref = open_llama(str(tiny_llama["f16"]), {"n_ctx": WINDOW + 8, "threads": 1}, logits_all=True)
    ids = tokenize_text(ref, text)
    ref_logp, targets = window_logprobs(ref, ids, window=WINDOW)
    klds = {}
    for name in ("fp32", "int4"):
        ort = backends.get("onnxruntime-genai").load(path=built[name].path, runtime={"threads": 1})
        assert tokenize_text(ort, text) == ids
        logp, ort_targets = window_logprobs(ort, ids, window=WINDOW)
        assert np.array_equal(targets, ort_targets)
        klds[name] = kl_divergence(ref_logp, logp)
    assert klds["fp32"][0] < 1e-3 and klds["fp32"][3] >= 0.97, klds
    assert klds["int4"][0] < 0.01 and klds["int4"][3] >= 0.9, klds  # within the default KLD gate
    assert klds["int4"][0] > klds["fp32"][0]  # 4-bit weights do lose something


def test_generation_is_measured_to_the_same_definitions(built, tiny_llama, tmp_path):
    """tokens/s from the generator's token timestamps, checked against wall time around it: the difference between
    generating N tokens and 1 token, over N - 1 tokens (loose: two separate timings on a shared machine; it catches
    a figure off by a unit or counting the prompt). The KV-cache figure is what the runtime keeps per token: the
    model's present K/V elements after 2N and N tokens (an independent reading), at their element size."""
    import onnxruntime as ort
    import onnxruntime_genai as og

    from edgeopt.backends.ort_genai import kv_bytes_per_token, open_model
    from edgeopt.bench.generate import measure_generation

    art = built["int4"]
    prompt = list(range(5, 37))
    r = measure_generation(art, prompt=prompt, gen_tokens=24, threads=1, repeats=3, work_dir=tmp_path / "g",
                           context_tokens=4096)
    assert (r.prompt_tokens, r.gen_tokens, r.threads, r.token_samples) == (32, 24, 1, 3 * 23)
    assert all(math.isfinite(v) and v > 0 for v in (r.gen_tps, r.prompt_tps, r.ttft_ms, r.token_ms_p99))
    assert r.token_ms_p50 <= r.token_ms_p95 <= r.token_ms_p99 and r.size_bytes == art.size_bytes

    model = open_model(art.path, threads=1)
    x = np.asarray([prompt], dtype=np.int32)

    def wall(tokens: int) -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=32 + tokens, min_length=32 + tokens, do_sample=False)
        best = math.inf
        for _ in range(5):
            start = time.perf_counter()
            g = og.Generator(model, params)
            g.append_tokens(x)
            while not g.is_done():
                g.generate_next_token()
            best = min(best, time.perf_counter() - start)
        return best

    wall(24)  # warm-up
    independent = 23 / (wall(24) - wall(1))
    assert independent / 2.5 < r.gen_tps < independent * 2.5

    session = ort.InferenceSession(str(Path(art.path) / "model.onnx"), providers=["CPUExecutionProvider"])
    past = {i.name: i for i in session.get_inputs() if i.name.startswith("past_key_values")}

    def present_bytes(n: int) -> int:
        feeds = {"input_ids": np.arange(5, 5 + n, dtype=np.int64)[None], "attention_mask": np.ones((1, n), np.int64)}
        feeds |= {name: np.zeros((1, i.shape[1], 0, 64), np.float32) for name, i in past.items()}
        outs = session.run(None, feeds)
        return sum(o.nbytes for o, meta in zip(outs, session.get_outputs(), strict=True)
                   if meta.name.startswith("present"))

    per_token = (present_bytes(32) - present_bytes(16)) / 16
    assert kv_bytes_per_token(art.path) == per_token
    llm = assess(tiny_llama["hf"]).llm
    assert per_token == llm.kv_cache_bytes_per_token * 2  # the assessment counts F16; this CPU cache is float32
    assert r.kv_cache_bytes_per_token == per_token and r.kv_context_tokens == 4096
    assert r.kv_cache_mb == pytest.approx(per_token * 4096 / 2**20)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="counts the process's threads in /proc")
def test_the_thread_count_reaches_onnx_runtime(built):
    """The runtime's threads (overlaid on genai_config.json as session_options) are what ONNX Runtime runs: a model
    opened with N intra-op threads adds a pool of N - 1 worker threads to the process (the caller is the N-th)."""
    import re

    from edgeopt.backends.ort_genai import open_model

    def threads() -> int:
        return int(re.search(r"Threads:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))

    path = built["int4"].path
    models = [open_model(path, threads=1)]  # the runtime's own threads, once per process
    added = []
    for n in (1, 3, 2):
        before = threads()
        models.append(open_model(path, threads=n))
        added.append(threads() - before)
    assert added == [0, 2, 1]


def test_eos_does_not_stop_a_measured_generation(built, tmp_path):
    """A copy of the int4 model whose EOS is the token it predicts greedily from the prompt: a plain greedy
    generation stops after one token, the measured one still generates every token asked for."""
    import shutil

    from edgeopt.backends.ort_genai import open_model
    from edgeopt.bench.generate import measure_generation

    prompt = list(range(5, 21))
    folder = tmp_path / "eos"
    shutil.copytree(built["int4"].path, folder)
    first = _greedy(open_model(folder, threads=1), prompt, 1)[0]
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["eos_token_id"] = first
    (folder / "genai_config.json").write_text(json.dumps(config))
    assert _greedy(open_model(folder, threads=1), prompt, 8) == [first], "EOS stops an unconstrained generation"
    art = built["int4"].model_copy(update={"path": str(folder)})
    r = measure_generation(art, prompt=prompt, gen_tokens=8, threads=1, repeats=2, work_dir=tmp_path / "g")
    assert (r.gen_tokens, r.token_samples) == (8, 2 * 7)


def _greedy(model, prompt: list[int], tokens: int) -> list[int]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + tokens, do_sample=False)
    g = og.Generator(model, params)
    g.append_tokens(np.asarray([prompt], dtype=np.int32))
    out = []
    while not g.is_done():
        g.generate_next_token()
        out.append(int(g.get_next_tokens()[0]))
    return out


def test_the_bandwidth_bound_counts_the_weights_as_stored(built, tiny_llama, tmp_path):
    """Bytes per token of a GenAI folder, checked against the weight file on disk: ``model.onnx.data`` less the
    embedding table (vocab × hidden float32: one row is gathered per token) and the rotary cos/sin caches (one
    position is read). 1% protects the definition: leaving the embedding in (~30% of the int4 model) or dropping
    the block scales (~10%) both exceed it. The flow's bound then uses it with the KV cache the runtime stores."""
    from edgeopt.bench.generate import bytes_per_token, measure_generation
    from edgeopt.hardware import fingerprint
    from edgeopt.llm_workflow import with_bound

    cfg = json.loads((Path(tiny_llama["hf"]) / "config.json").read_text())
    table = cfg["vocab_size"] * cfg["hidden_size"] * 4
    rotary = 2 * cfg["max_position_embeddings"] * (cfg["head_dim"] // 2) * 4
    for name in ("fp32", "int4"):
        folder = Path(built[name].path)
        on_disk = (folder / "model.onnx.data").stat().st_size - table - rotary
        assert bytes_per_token(folder, backend="onnxruntime-genai", kv_bytes_per_token=0,
                               context_tokens=0) == pytest.approx(on_disk, rel=0.01)
    a = assess(tiny_llama["hf"])
    r = measure_generation(built["int4"], prompt=list(range(5, 21)), gen_tokens=4, threads=1, repeats=1,
                           work_dir=tmp_path / "g")
    b = with_bound(r, built["int4"], assessment=a, hardware=fingerprint(), store=tmp_path / "bandwidth.json")
    weights = bytes_per_token(built["int4"].path, backend="onnxruntime-genai", kv_bytes_per_token=0,
                              context_tokens=0)
    assert b.bytes_per_token == weights + round(r.kv_cache_bytes_per_token) * (16 + 4 // 2)


def test_bad_requests_fail_in_one_line(tiny_llama, tmp_path):
    from tests.tinybert import make_tiny_bert

    b = backends.get("onnxruntime-genai")
    # a block size ONNX Runtime's quantizer does not take: the profile refuses it, naming the allowed ones
    path = write_profile(tmp_path / "p.yaml", candidates=[
        {"name": "x", "backend": "onnxruntime-genai", "kinds": ["llm"], "recipe": {"block_size": 100}}])
    with pytest.raises(ConfigError) as bad:
        load_profile(path)
    assert "block_size must be one of 16, 32, 64, 128, 256; got 100" in str(bad.value) and "\n" not in str(bad.value)
    # and were one to reach the builder, its own refusal is the candidate's one-line reason
    a = assess(tiny_llama["hf"])
    with pytest.raises(CandidateFailed) as info:
        b.optimize(model=a.model, assessment=a, recipe=OrtGenAIRecipe.model_construct(weights="int4", block_size=8,
                   accuracy_level=4, sym=True, threads=None), candidate="b8", out_dir=tmp_path / "b8")
    msg = str(info.value)
    assert info.value.reason == "build-error" and "\n" not in msg and len(msg) < 400, msg
    assert msg.startswith("b8: the onnxruntime-genai model builder failed (exit 1): RuntimeError: ")
    assert "Only block sizes 16, 32, 64, 128, 256 are supported for quantization, got: 8" in msg
    assert not (tmp_path / "b8" / "ort-genai").exists()
    # not a language model, not a checkpoint
    bert = assess(make_tiny_bert(tmp_path / "bert"))
    with pytest.raises(CandidateFailed, match="onnxruntime-genai builds language models; this model is a encoder"):
        b.optimize(model=bert.model, assessment=bert, recipe=OrtGenAIRecipe(), candidate="bert", out_dir=tmp_path / "e")
    g = assess(tiny_llama["f16"])
    with pytest.raises(CandidateFailed, match="builds hf models, got 'gguf'"):
        b.optimize(model=g.model, assessment=g, recipe=OrtGenAIRecipe(), candidate="gguf", out_dir=tmp_path / "g")
