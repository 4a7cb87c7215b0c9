"""Assessment of real-world traits: weights in Constant nodes, a network inside an If, recurrent and
stateful models, an opset newer than the runtimes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeopt.errors import ModelError
from edgeopt.intake import assess
from edgeopt.intake.onnx_graph import runtime_opsets
from tests.realworld_models import make_constant_weights, make_dynamic_hw, make_if_network, make_stateful


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("realworld")
    return {"constant": make_constant_weights(d / "constant.onnx"), "if": make_if_network(d / "if.onnx"),
            "dynamic": make_dynamic_hw(d / "dynamic.onnx"), "stateful": make_stateful(d / "stateful.onnx")}


def test_constant_node_weights_are_parameters(models):
    a = assess(models["constant"])
    # 8*1*3*3 + 8 floats in Constant nodes; the int64 [0, -1] shape constant is not a weight
    assert a.params == 80 and a.constant_params == 80
    assert a.kind == "cnn"
    assert a.op_histogram == {"Constant": 3, "Conv": 1, "GlobalAveragePool": 1, "Relu": 1, "Reshape": 1}


def test_if_branches_are_walked(models):
    a = assess(models["if"])
    assert a.params == 2 * 80  # each branch's initializers
    assert a.op_histogram == {"Constant": 2, "Conv": 2, "Flatten": 2, "GlobalAveragePool": 2, "Relu": 2,
                              "Equal": 1, "If": 1}
    assert a.control_flow_ops == {"Conv": 2, "Flatten": 2, "GlobalAveragePool": 2, "Relu": 2}
    assert a.kind == "cnn"
    # Equal is the only compute op left in float; If is a container and not counted
    assert a.unquantizable_ops == ("Equal",)
    assert a.int8_coverage == pytest.approx(8 / 9, abs=1e-4)


def test_the_if_model_runs_as_assessed(models):
    import onnxruntime as ort

    s = ort.InferenceSession(str(models["if"]), providers=["CPUExecutionProvider"])
    (y,) = s.run(None, {"x": np.ones((2, 1, 8, 8), np.float32)})
    assert y.shape == (2, 8)


def test_recurrent_and_stateful_kinds(models, tmp_path):
    a = assess(models["stateful"])
    assert a.kind == "rnn" and "GRU" in a.kind_reason
    assert [(s.name, s.shape) for s in a.inputs] == [("x", ("time", "batch", 8)), ("state", (1, "batch", 16)),
                                                     ("sr", ())]
    # a state input without a recurrent cell: stateful all the same
    nodes = [helper.make_node("Add", ["x", "state"], ["y"]), helper.make_node("Identity", ["y"], ["state_out"])]
    g = helper.make_graph(nodes, "s", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                                       helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
                           helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), tmp_path / "s.onnx")
    b = assess(tmp_path / "s.onnx")
    assert b.kind == "rnn" and "state inputs (state)" in b.kind_reason


def test_existing_kinds_keep_their_reason(tiny, mlp):
    assert assess(tiny["model"]).kind == "cnn"
    other = assess(mlp["model"])
    assert other.kind == "other" and other.kind_reason.startswith("no convolution")


def test_runtime_opsets_are_reported(models):
    a = assess(models["dynamic"])
    assert a.runtime_opsets == runtime_opsets()
    assert a.runtime_opsets["onnxruntime"] >= 17 and a.notes == ()


def test_opset_newer_than_the_runtimes_is_refused_at_assess(tmp_path):
    newest = runtime_opsets()["onnxruntime"]
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", newest + 1)], ir_version=9)
    onnx.save(m, tmp_path / "new.onnx")
    with pytest.raises(ModelError, match=rf"opset {newest + 1} is newer than the installed runtimes load "
                                         rf"\(onnxruntime <= {newest}\)") as info:
        assess(tmp_path / "new.onnx")
    assert "\n" not in str(info.value)
