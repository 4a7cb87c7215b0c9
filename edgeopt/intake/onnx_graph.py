"""Walking an ONNX graph for the assessment: every node (control-flow subgraphs and local functions
included), parameters in initializers and ``Constant`` nodes, the opsets the installed runtimes load,
and recurrent / stateful model traits.

``If``, ``Loop`` and ``Scan`` hold their bodies as graph attributes; a model exported with its network
inside an ``If`` shows only ``If`` at the top level, so every walk here descends into them.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from edgeopt.records import TensorSpec

__all__ = ["CONTROL_FLOW_OPS", "GraphCensus", "census", "recurrent_reason", "runtime_opsets"]

log = logging.getLogger(__name__)

#: ops whose graph attributes (bodies, branches) are run by the op itself
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})
#: recurrent cells: a model with one of these is kind ``rnn``
RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})
#: Constant-node tensors counted as parameters: weights, not shapes or indices (onnx TensorProto types:
#: float, uint8, int8, float16, double, bfloat16)
_WEIGHT_TYPES = frozenset({1, 2, 3, 10, 11, 16})
#: input names that carry a recurrent state (h0, c0, state, hidden, past_*, ...)
_STATE_NAME = re.compile(r"(^|[_.:/])(h0|c0|h|c|state|states|hidden|hx|cx|cache|past|memory|mem)([_.:/\d]|$)",
                         re.IGNORECASE)


@dataclass(frozen=True)
class GraphCensus:
    """What a walk over every node found."""

    ops: Counter
    control_flow_ops: Counter
    params: int
    constant_params: int


def _elements(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _subgraphs(node) -> Iterator:
    from onnx import AttributeProto

    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == AttributeProto.GRAPHS:
            yield from attr.graphs


def _walk(graph, *, inside: bool) -> Iterator[tuple[object, bool]]:
    """(node, whether it sits inside a control-flow body) for every node of ``graph`` and its subgraphs."""
    for node in graph.node:
        yield node, inside
        for sub in _subgraphs(node):
            yield from _walk(sub, inside=True)


def _initializers(graph) -> Iterator:
    yield from graph.initializer
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _initializers(sub)


def _constant_params(node) -> int:
    for attr in node.attribute:
        if attr.name == "value" and attr.t.data_type in _WEIGHT_TYPES:
            return _elements(attr.t.dims)
        if attr.name == "sparse_value" and attr.sparse_tensor.values.data_type in _WEIGHT_TYPES:
            return _elements(attr.sparse_tensor.values.dims)
        if attr.name == "value_floats":
            return len(attr.floats)
        if attr.name == "value_float":
            return 1
    return 0


def census(model) -> GraphCensus:
    """Op histogram (all nodes), the part of it inside control flow, and parameter counts."""
    ops: Counter = Counter()
    inside_ops: Counter = Counter()
    constant = 0
    bodies = [(model.graph, False)] + [(fn, True) for fn in model.functions]
    for body, fn in bodies:
        for node, inside in _walk(body, inside=False):
            ops[node.op_type] += 1
            if inside:
                inside_ops[node.op_type] += 1
            if node.op_type == "Constant" and not fn:
                constant += _constant_params(node)
    initializer = sum(_elements(t.dims) for t in _initializers(model.graph))
    return GraphCensus(ops=ops, control_flow_ops=inside_ops, params=initializer + constant, constant_params=constant)


def recurrent_reason(ops: Counter, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> str:
    """Why the model is recurrent or stateful ('' if it does not look so)."""
    cells = sorted(op for op in ops if op in RECURRENT_OPS)
    if cells:
        return f"recurrent cells ({', '.join(cells)})"
    states = [s.name for s in inputs if _STATE_NAME.search(s.name)]
    if states:
        loops = sorted(op for op in ops if op in ("Loop", "Scan"))
        via = f" and {'/'.join(loops)}" if loops else ""
        return f"state inputs ({', '.join(states)}){via}: stateful, fed back between calls"
    return ""


@functools.cache
def runtime_opsets() -> dict[str, int]:
    """The newest default-domain ONNX opset each installed runtime loads (runtime -> opset).

    ONNX Runtime (the baseline's runtime) checks the opset when it loads a model: found by loading a
    one-node model at decreasing opsets, from two past the installed onnx package's newest (cached
    per process). OpenVINO reads any opset stamp and fails per op instead, so it has no entry.
    """
    found: dict[str, int] = {}
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return found

    def loads(opset: int) -> bool:
        g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        data = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=9).SerializeToString()
        so = ort.SessionOptions()
        so.log_severity_level = 4
        try:
            ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
            return True
        except Exception:  # noqa: BLE001 - any refusal means "not this opset"
            return False

    best = next((v for v in range(onnx.defs.onnx_opset_version() + 2, 6, -1) if loads(v)), None)
    if best is not None:
        found["onnxruntime"] = best
    log.debug("runtime opsets: %s", found)
    return found
