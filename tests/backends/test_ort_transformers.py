"""ONNX Runtime's transformer optimizer as an ORT recipe (``transformer_fusion``), on a tiny BERT."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from edgeopt import intake
from edgeopt.backends.onnxruntime import OnnxRuntimeBackend, OrtRecipe
from edgeopt.data import load_dataset
from edgeopt.errors import CandidateFailed
from edgeopt.hardware import cpu_features, u8s8_saturates

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _ops(path: str) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(path).graph.node)


def _hidden(backend: OnnxRuntimeBackend, path: str, runtime: dict, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = backend.load(path=path, runtime=runtime)
    return np.concatenate([session.run({k: v[i:i + 1] for k, v in feeds.items()})[0]
                           for i in range(len(next(iter(feeds.values()))))])


def _build(tiny_bert: dict[str, Path], out: Path, **recipe):
    a = intake.assess(str(tiny_bert["model"]))
    r = OrtRecipe.model_validate(recipe)
    cal = (load_dataset(str(tiny_bert["calibration"]), signature=a.inputs, role="calibration")
           if r.needs_calibration() else None)
    return a, OnnxRuntimeBackend().optimize(model=a.model, assessment=a, recipe=r, candidate="cand", out_dir=out,
                                            calibration=cal)


@pytest.fixture(scope="module")
def feeds(tiny_bert) -> dict[str, np.ndarray]:
    data = np.load(tiny_bert["eval"])
    return {k: data[k][:8] for k in ("input_ids", "attention_mask", "token_type_ids") if k in data.files}


def test_fp32_fusion_fuses_attention_and_keeps_the_outputs(tiny_bert, feeds, tmp_path) -> None:
    source = _ops(str(tiny_bert["model"]))
    assert source["Softmax"] == 2 and not source["Attention"]
    _, art = _build(tiny_bert, tmp_path / "b", precision="fp32", transformer_fusion="bert")
    ops = _ops(art.path)
    assert ops["Attention"] == 2, ops  # one per layer
    assert ops["SkipLayerNormalization"] >= 2 and not ops["Softmax"]
    assert sum(ops.values()) < sum(source.values()) / 3
    assert any("Attention" in n for n in art.notes) and any("rewritten as Div" in n for n in art.notes)
    assert art.runtime["graph_optimization"] == "all"
    backend = OnnxRuntimeBackend()
    ref = _hidden(backend, str(tiny_bert["model"]), {}, feeds)
    np.testing.assert_allclose(_hidden(backend, art.path, art.runtime, feeds), ref, atol=1e-4)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["model.onnx"], "temporary files left behind"


def test_dynamic_int8_on_the_fused_graph(tiny_bert, feeds, tmp_path) -> None:
    _, art = _build(tiny_bert, tmp_path / "b", precision="int8", quantization="dynamic", transformer_fusion="bert")
    ops = _ops(art.path)
    assert ops["QAttention"] == 2 or (ops["Attention"] == 2 and ops["MatMulInteger"]), ops
    # no Conv: every quantized op runs on u8×s8 GEMM kernels, so 7-bit weights wherever those saturate
    saturates = u8s8_saturates(arch=cpu_features()[0], isa_flags=cpu_features()[1])
    assert any(n.startswith("reduce_range: on" if saturates else "reduce_range: off") for n in art.notes)
    backend = OnnxRuntimeBackend()
    ref = _hidden(backend, str(tiny_bert["model"]), {}, feeds)
    out = _hidden(backend, art.path, art.runtime, feeds)
    cos = np.sum(out * ref, axis=-1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert np.isfinite(out).all() and float(np.mean(cos)) > 0.95, float(np.mean(cos))


def test_static_int8_on_the_fused_graph(tiny_bert, tmp_path) -> None:
    _, art = _build(tiny_bert, tmp_path / "b", precision="int8", quantization="static", transformer_fusion="bert",
                    calibration_samples=16)
    ops = _ops(art.path)
    assert ops["Attention"] == 2 and ops["QuantizeLinear"] and ops["DequantizeLinear"], ops


def test_fusion_of_a_model_without_attention_fails_unsupported(tiny, tmp_path) -> None:
    a = intake.assess(str(tiny["model"]))
    out = tmp_path / "b"
    with pytest.raises(CandidateFailed) as err:
        OnnxRuntimeBackend().optimize(model=a.model, assessment=a, candidate="cnn-bert", out_dir=out,
                                      recipe=OrtRecipe(precision="fp32", transformer_fusion="bert"))
    assert err.value.reason == "unsupported-op"
    assert "matched no attention subgraph" in str(err.value) and "\n" not in str(err.value)
    assert not (out / "model.onnx").exists() and not any(out.iterdir())


def test_fusion_recipe_validation() -> None:
    with pytest.raises(ValidationError, match="num_heads.*applies only with transformer_fusion='bert'"):
        OrtRecipe(num_heads=12)
    with pytest.raises(ValidationError, match="transformer_fusion applies with precision 'fp32' or 'int8'"):
        OrtRecipe(precision="fp16", transformer_fusion="bert")
    with pytest.raises(ValidationError, match="transformer_fusion"):
        OrtRecipe(transformer_fusion="gpt2")
    assert OrtRecipe(transformer_fusion="bert").runtime_options()["graph_optimization"] == "all"


def test_static_int8_keeping_attention_and_norms_in_float(tiny_bert, tmp_path) -> None:
    _, default = _build(tiny_bert, tmp_path / "d", precision="int8", quantization="static", calibration_samples=16)
    _, kept = _build(tiny_bert, tmp_path / "k", precision="int8", quantization="static", calibration_samples=16,
                     op_types_to_quantize=("MatMul",), quantize_activation_matmuls=False)
    assert "kept in float: 4 MatMul(s) of two activations" in kept.notes  # 2 layers x (Q·Kᵀ, scores·V)
    source = onnx.load(str(tiny_bert["model"])).graph
    constants = {t.name for t in source.initializer} | {o for n in source.node if n.op_type == "Constant"
                                                          for o in n.output}
    attention = {n.name for n in source.node if n.op_type == "MatMul" and not set(n.input) & constants}
    assert len(attention) == 4

    def fed_by_dq(path: str) -> dict[str, bool]:
        graph = onnx.load(path).graph
        dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        return {n.name: bool(set(n.input) & dq) for n in graph.node if n.op_type == "MatMul"}

    in_default, in_kept = fed_by_dq(default.path), fed_by_dq(kept.path)
    assert all(in_default[n] for n in attention)  # the default quantizes attention's MatMuls ...
    assert not any(in_kept[n] for n in attention)  # ... this recipe keeps them in float
    assert all(q for n, q in in_kept.items() if n not in attention)  # the weight MatMuls are INT8
    assert _ops(kept.path)["QuantizeLinear"] < _ops(default.path)["QuantizeLinear"]


def test_nncf_accuracy_control_on_an_encoder_compares_sentence_embeddings(tiny_bert, tmp_path) -> None:
    pytest.importorskip("nncf")
    from edgeopt.backends.openvino import OpenVinoBackend, OpenVinoRecipe

    a = intake.assess(str(tiny_bert["model"]))
    cal = load_dataset(str(tiny_bert["calibration"]), signature=a.inputs, role="calibration")
    art = OpenVinoBackend().optimize(model=a.model, assessment=a, candidate="ov-acc", out_dir=tmp_path / "b",
                                     calibration=cal, recipe=OpenVinoRecipe(precision="int8", max_accuracy_drop=0.01))
    note = next(n for n in art.notes if n.startswith("accuracy control: cosine"))
    assert float(note.split("samples ")[1].split()[0]) >= 0.99 - 1e-9  # mean-pooled cosine kept within the budget


def test_parallel_static_builds_leave_nothing_in_the_working_directory(tiny_bert, tmp_path, monkeypatch) -> None:
    """ONNX Runtime's shape inference fails on the exported BERT and dumps a model and its external data
    into the working directory; two builds in threads of one process (as the flow runs them) must
    each leave nothing there."""
    from concurrent.futures import ThreadPoolExecutor

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = [pool.submit(_build, tiny_bert, tmp_path / f"out{i}", precision="int8", quantization="static")
                for i in range(2)]
        arts = [f.result()[1] for f in done]
    assert all(Path(a.path).is_file() for a in arts)
    assert sorted(p.name for p in cwd.iterdir()) == []
