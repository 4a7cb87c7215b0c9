"""Small ONNX models with the traits of real-world exports, built with ``onnx.helper``.

- ``make_constant_weights``: a CNN whose weights are ``Constant`` nodes, not initializers.
- ``make_if_network``: the whole network inside the branches of an ``If``.
- ``make_dynamic_hw``: a CNN with input ``[batch, 3, height, width]``.
- ``make_failing_reshape``: loads, then fails at run time inside ONNX Runtime (a native error line).
- ``make_stateful``: a GRU with a ``state`` input ``[1, batch, 16]`` (batch not leading) and a scalar ``sr``.
- ``make_dense_hw``: a dense-prediction CNN, ``image [batch, 3, height, width]`` → ``mask [batch, 4, height, width]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR = 9


def _save(graph, path: Path, opset: int = OPSET) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _w(rng, *shape) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.3).astype(np.float32)


def make_constant_weights(path: Path, *, seed: int = 0) -> Path:
    """Conv(1→8, 3×3) + Relu + GlobalAveragePool + Flatten; weight (72) and bias (8) in Constant nodes,
    plus an int64 shape constant that is not a parameter. 80 parameters."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(_w(rng, 8, 1, 3, 3), "w")),
        helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(_w(rng, 8), "b")),
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([0, -1], np.int64))),
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Reshape", ["g", "shape"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "constant_weights",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])])
    return _save(graph, path)


def _branch(name: str, rng) -> onnx.GraphProto:
    w = numpy_helper.from_array(_w(rng, 8, 1, 3, 3), f"{name}_w")
    b = numpy_helper.from_array(_w(rng, 8), f"{name}_b")
    nodes = [
        helper.make_node("Conv", ["x", f"{name}_w", f"{name}_b"], [f"{name}_c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"]),
        helper.make_node("GlobalAveragePool", [f"{name}_r"], [f"{name}_g"]),
        helper.make_node("Flatten", [f"{name}_g"], [f"{name}_y"]),
    ]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT,
                                                                           ["batch", 8])], initializer=[w, b])


def make_if_network(path: Path, *, seed: int = 0) -> Path:
    """Top level: Constant, Constant, Equal, If; each branch holds Conv + Relu + GlobalAveragePool + Flatten
    with its own weights (2 × 80 parameters)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array(1, np.int64))),
        helper.make_node("Constant", [], ["mode"], value=numpy_helper.from_array(np.array(1, np.int64))),
        helper.make_node("Equal", ["one", "mode"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=_branch("then", rng), else_branch=_branch("else", rng)),
    ]
    graph = helper.make_graph(nodes, "if_network",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])])
    return _save(graph, path)


def make_dynamic_hw(path: Path, *, seed: int = 0) -> Path:
    """Conv(3→8, 3×3, stride 2) + Relu + MaxPool(2×2) + GlobalAveragePool + Flatten + Gemm(8→4) over
    ``[batch, 3, height, width]``: an image smaller than 4×4 fails at the pooling kernel."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(_w(rng, 8, 3, 3, 3), "w"), numpy_helper.from_array(_w(rng, 8), "b"),
             numpy_helper.from_array(_w(rng, 4, 8), "fc_w"), numpy_helper.from_array(_w(rng, 4), "fc_b")]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["p"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1),
    ]
    graph = helper.make_graph(nodes, "dynamic_hw",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], initializer=inits)
    return _save(graph, path)


def make_stateful(path: Path, *, seed: int = 0) -> Path:
    """A GRU over ``x [time, batch, 8]`` from ``state [1, batch, 16]`` (batch on axis 1), its output scaled
    by a scalar ``sr`` (float); outputs ``y [time, batch, 16]`` and ``state_out [1, batch, 16]``."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(_w(rng, 1, 48, 8), "W"), numpy_helper.from_array(_w(rng, 1, 48, 16), "R"),
             numpy_helper.from_array(_w(rng, 1, 96), "B")]
    nodes = [
        helper.make_node("GRU", ["x", "W", "R", "B", "", "state"], ["h", "state_out"], hidden_size=16),
        helper.make_node("Squeeze", ["h", "axes"], ["hs"]),
        helper.make_node("Mul", ["hs", "sr"], ["y"]),
    ]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    graph = helper.make_graph(nodes, "stateful", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["time", "batch", 8]),
        helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, "batch", 16]),
        helper.make_tensor_value_info("sr", TensorProto.FLOAT, []),
    ], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["time", "batch", 16]),
        helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [1, "batch", 16])], initializer=inits)
    return _save(graph, path)


def make_failing_reshape(path: Path) -> Path:
    """``x [batch, 4]`` reshaped to ``[3, -1]``: valid, loads, and fails in ONNX Runtime's kernel at run time
    (which prints an ``[E:onnxruntime:...]`` line on descriptor 2 before raising)."""
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y"])], "failing_reshape",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, "n"])],
                              initializer=[numpy_helper.from_array(np.array([3, -1], np.int64), "s")])
    return _save(graph, path)


def make_dense_hw(path: Path, *, seed: int = 0) -> Path:
    """A dense-prediction CNN: Conv(3→8, 3×3) + Relu + Conv(8→4, 1×1) over ``image [batch, 3, height, width]``,
    output ``mask [batch, 4, height, width]`` (4 classes per pixel)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(_w(rng, 8, 3, 3, 3), "w1"), numpy_helper.from_array(_w(rng, 8), "b1"),
             numpy_helper.from_array(_w(rng, 4, 8, 1, 1), "w2"), numpy_helper.from_array(_w(rng, 4), "b2")]
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["r", "w2", "b2"], ["mask"]),
    ]
    graph = helper.make_graph(nodes, "dense_hw", [
        helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 4, "height", "width"])], initializer=inits)
    return _save(graph, path)
