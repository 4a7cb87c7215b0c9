"""ONNX Runtime's transformer optimizer (operator fusion for BERT-like encoders) for the ORT backend.

``fuse(src=..., out=..., ...)`` rewrites an encoder's subgraphs into ONNX Runtime's fused contrib
operators (``Attention``, ``SkipLayerNormalization``, ``BiasGelu``, ``EmbedLayerNormalization``)
with ``onnxruntime.transformers.optimizer`` and checks that the fused model computes what the
source computes. The fused model then runs as it is (FP32) or is quantized on top (INT8).

One canonicalisation comes first: Transformers 5's eager attention scales ``Q·Kᵀ`` with a ``Mul``
and the additive attention mask is a ``Mul`` too, and the optimizer's pattern matcher takes the
first ``Mul`` parent of the ``Add`` before the ``Softmax`` for both; so the scaling ``Mul`` by a
constant ``s`` becomes a ``Div`` by ``1/s`` (the pattern the optimizer knows). Nothing else changes.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.errors import CandidateFailed

__all__ = ["MAX_ABS_DIFF", "fuse", "model_dims"]

log = logging.getLogger(__name__)

#: a fused model whose outputs differ from the source's by more than this fails to build
MAX_ABS_DIFF = 1e-3
#: fused contrib operators counted in the notes
FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization",
             "BiasGelu", "FastGelu", "Gelu", "LayerNormalization")


def model_dims(src: str | Path) -> tuple[int, int]:
    """(num_heads, hidden_size) from the ``export.json`` edgeopt writes beside an exported model;
    (0, 0) when there is none (the optimizer then reads them from the graph if it can)."""
    meta = Path(src).parent / "export.json"
    if not meta.is_file():
        return 0, 0
    info = json.loads(meta.read_text(encoding="utf-8"))
    return int(info.get("num_attention_heads") or 0), int(info.get("hidden_size") or 0)


def _scale_mul_to_div(model: Any) -> int:
    """Rewrite ``Softmax(Add(Mul(MatMul, s), mask))``'s ``Mul`` by a constant scalar into ``Div`` by ``1/s``."""
    from onnx import numpy_helper

    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    rewritten = 0
    for softmax in (n for n in graph.node if n.op_type == "Softmax"):
        add = producer.get(softmax.input[0])
        if add is None or add.op_type != "Add":
            continue
        for name in add.input:
            mul = producer.get(name)
            if mul is None or mul.op_type != "Mul" or len(mul.input) != 2:
                continue
            matmul, scale = producer.get(mul.input[0]), consts.get(mul.input[1])
            if matmul is None or matmul.op_type != "MatMul" or scale is None or scale.size != 1 or scale.item() == 0:
                continue
            inverse = f"{mul.name or mul.output[0]}_inverse_scale"
            graph.initializer.append(numpy_helper.from_array(
                np.asarray(1.0 / scale.item(), dtype=scale.dtype).reshape(scale.shape), inverse))
            mul.op_type, mul.input[1] = "Div", inverse
            rewritten += 1
    return rewritten


def _probe_feeds(session: Any) -> dict[str, np.ndarray]:
    """Two token sequences of 16 (ids in a small range, a padded tail) for the inputs of an encoder."""
    feeds = {}
    for i in session.get_inputs():
        if "mask" in i.name:
            value = np.ones((2, 16), dtype=np.int64)
            value[1, 11:] = 0
        elif "type" in i.name:
            value = np.zeros((2, 16), dtype=np.int64)
        else:
            value = np.random.default_rng(0).integers(1, 100, size=(2, 16), dtype=np.int64)
        feeds[i.name] = value
    return feeds


def _max_abs_diff(src: str, fused: str) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    a = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(fused, opts, providers=["CPUExecutionProvider"])
    feeds = _probe_feeds(a)
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a.run(None, feeds), b.run(None, feeds), strict=True))


def fuse(*, src: str, out: Path, model_type: str, num_heads: int | None, hidden_size: int | None,
         candidate: str) -> list[str]:
    """Fuse ``src`` into ``out``; the notes say what was fused. ``CandidateFailed`` when no attention
    subgraph matched (``unsupported-op``) or the fused model computes something else (``build-error``)."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    heads, hidden = model_dims(src)
    heads, hidden = num_heads or heads, hidden_size or hidden
    model = onnx.load(src)
    rewritten = _scale_mul_to_div(model)
    staged = out.parent / "canonical.onnx"
    onnx.save(model, str(staged))
    previous = logging.getLogger("onnxruntime.transformers").level
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)  # it warns at length on no match
    try:
        fused = optimize_model(str(staged), model_type=model_type, num_heads=heads, hidden_size=hidden,
                               opt_level=0)
    finally:
        logging.getLogger("onnxruntime.transformers").setLevel(previous)
    fused.save_model_to_file(str(out))
    staged.unlink(missing_ok=True)
    ops = Counter(n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node)
    counts = {op: ops[op] for op in FUSED_OPS if ops.get(op)}
    if not (counts.get("Attention") or counts.get("MultiHeadAttention")):
        raise CandidateFailed("unsupported-op", f"{candidate}: ONNX Runtime's {model_type} optimizer matched no "
                              f"attention subgraph (fused: {_describe(counts) or 'nothing'}); this recipe "
                              "applies to BERT-like encoders")
    diff = _max_abs_diff(src, str(out))
    if not diff < MAX_ABS_DIFF:
        raise CandidateFailed("build-error", f"{candidate}: the fused model's outputs differ from the source's "
                              f"by {diff:.2e} (limit {MAX_ABS_DIFF:.0e})")
    log.info("%s: fused %s (max abs diff %.2e)", candidate, _describe(counts), diff)
    notes = [f"ONNX Runtime {model_type} fusion: {_describe(counts)}; {sum(ops.values())} nodes in all",
             f"fused outputs match the source within {diff:.1e}"]
    if rewritten:
        notes.append(f"{rewritten} attention scale Mul(s) rewritten as Div for the optimizer's patterns")
    return notes


def _describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{n}× {op}" for op, n in counts.items())
