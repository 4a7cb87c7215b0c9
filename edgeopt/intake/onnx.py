"""ONNX intake: validate, hash and assess an ONNX model file."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from edgeopt.data import file_sha256
from edgeopt.errors import BackendUnavailable, ModelError
from edgeopt.intake.onnx_graph import census, recurrent_reason, runtime_opsets
from edgeopt.records import Assessment, ModelKind, ModelRef, TensorSpec

__all__ = ["INT8_OPS", "MAX_IR_VERSION", "assess_onnx", "onnx_ref"]

log = logging.getLogger(__name__)

#: Highest ONNX IR version the runtimes we ship can load (onnxruntime 1.31 stops at 13).
MAX_IR_VERSION = 13

#: Op types the INT8 paths (ORT QDQ / QOperator, OpenVINO) quantize or pass through in INT8.
INT8_OPS = frozenset({
    "Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul", "Relu", "Clip", "LeakyRelu", "Sigmoid",
    "MaxPool", "AveragePool", "GlobalAveragePool", "Concat", "Reshape", "Transpose", "Squeeze",
    "Unsqueeze", "Flatten", "Resize", "Gather", "Split", "Pad", "ArgMax", "Where", "Softmax",
    "InstanceNormalization", "LayerNormalization", "Slice", "Expand", "Tile",
})
#: Ops that carry no compute and are left out of the coverage share.
#: Control-flow ops are containers: their bodies' ops are counted instead.
_NEUTRAL_OPS = frozenset({"Identity", "Constant", "Shape", "Cast", "ConstantOfShape", "Range", "If", "Loop", "Scan"})

_TENSOR_TYPES = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "str",
    9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16",
}


def _import_onnx():
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - onnx is a core dependency
        raise BackendUnavailable("onnx", "onnxruntime", "missing: onnx") from exc
    return onnx


def onnx_ref(path: str | Path) -> ModelRef:
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model {p}: no such file; check the path")
    if not p.is_file():
        raise ModelError(f"model {p}: is a folder, not an .onnx file")
    return ModelRef(path=str(p.resolve()), format="onnx", sha256=file_sha256(p), size_bytes=p.stat().st_size)


def _tensor_spec(value_info) -> TensorSpec:
    ttype = value_info.type.tensor_type
    dims: list[int | str] = []
    for d in ttype.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or "?")
    return TensorSpec(name=value_info.name, dtype=_TENSOR_TYPES.get(ttype.elem_type, str(ttype.elem_type)),
                      shape=tuple(dims))


def _kind(ops: Counter, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> tuple[ModelKind, str]:
    """(kind, why): the reason names the trait that decided it."""
    names = {s.name.lower() for s in inputs}
    out_names = " ".join(s.name.lower() for s in outputs)
    if "input_ids" in names:
        if any(n.startswith("past_key_values") for n in names) or "present" in out_names:
            return "llm", "input_ids with past_key_values / present"
        return "encoder", "input_ids without a key-value cache"
    recurrent = recurrent_reason(ops, inputs, outputs)
    if recurrent:
        return "rnn", recurrent
    conv = ops.get("Conv", 0) + ops.get("ConvTranspose", 0)
    if conv and any(len(s.shape) == 4 for s in inputs):
        return "cnn", "convolutions over a 4-D input"
    if conv:
        return "other", "convolutions, but no 4-D image input"
    return "other", "no convolution, recurrent cell, state input or input_ids"


def _check_opset(path: str | Path, opset: int | None) -> tuple[dict[str, int], tuple[str, ...]]:
    """(the newest opset of each installed runtime, notes); ``ModelError`` when none of them loads it."""
    supported = runtime_opsets()
    if opset is None or not supported:
        return supported, ()
    too_old = {name: v for name, v in supported.items() if opset > v}
    if len(too_old) == len(supported):
        raise ModelError(
            f"model {path}: opset {opset} is newer than the installed runtimes load "
            f"({', '.join(f'{n} <= {v}' for n, v in sorted(supported.items()))}); re-export it with "
            f"opset {min(supported.values())} or update the runtimes"
        )
    notes = tuple(f"opset {opset} is newer than {name} loads (<= {v}): its candidates will fail"
                  for name, v in sorted(too_old.items()))
    return supported, notes


def assess_onnx(path: str | Path) -> Assessment:
    """Validate ``path`` as ONNX and describe it; ``ModelError`` with one line on any problem."""
    onnx = _import_onnx()
    ref = onnx_ref(path)
    p = Path(ref.path)
    try:
        model = onnx.load(str(p), load_external_data=True)
    except Exception as exc:  # protobuf DecodeError, truncated external data, ...
        raise ModelError(
            f"model {path}: not a readable ONNX file ({type(exc).__name__}); "
            "check that it is a complete .onnx export (re-export or re-download it)"
        ) from exc
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"model {path}: not an ONNX model (no graph found); export the model to ONNX first")
    if model.ir_version > MAX_IR_VERSION:
        raise ModelError(
            f"model {path}: ONNX IR version {model.ir_version} is newer than the runtimes support "
            f"(<= {MAX_IR_VERSION}); re-save it with model.ir_version = 10"
        )
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    supported, notes = _check_opset(path, opset)
    try:
        onnx.checker.check_model(str(p))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model {path}: invalid ONNX model ({first[:200]}); re-export it") from exc

    initializer_names = {t.name for t in model.graph.initializer}
    inputs = tuple(_tensor_spec(v) for v in model.graph.input if v.name not in initializer_names)
    outputs = tuple(_tensor_spec(v) for v in model.graph.output)
    # every node: control-flow bodies (If / Loop / Scan) and local functions (dynamo exports) included
    found = census(model)
    ops, params = found.ops, found.params
    kind, kind_reason = _kind(ops, inputs, outputs)
    compute = {op: c for op, c in ops.items() if op not in _NEUTRAL_OPS}
    covered = sum(c for op, c in compute.items() if op in INT8_OPS)
    total = sum(compute.values())
    assessment = Assessment(
        model=ref,
        kind=kind,
        kind_reason=kind_reason,
        params=params,
        constant_params=found.constant_params,
        opset=opset,
        ir_version=int(model.ir_version),
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        op_histogram=dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        control_flow_ops=dict(sorted(found.control_flow_ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        runtime_opsets=supported,
        notes=notes,
        inputs=inputs,
        outputs=outputs,
        quantizable_ops=tuple(sorted(op for op in compute if op in INT8_OPS)),
        unquantizable_ops=tuple(sorted(op for op in compute if op not in INT8_OPS)),
        int8_coverage=round(covered / total, 4) if total else 0.0,
    )
    log.info("assessed %s: %s (%s), %d params, opset %s", p.name, kind, kind_reason, params, opset)
    for note in notes:
        log.warning("%s: %s", p.name, note)
    return assessment
