from __future__ import annotations

import pytest

from edgeopt.data import file_sha256
from edgeopt.errors import ModelError
from edgeopt.intake import assess
from tests.conftest import make_tiny_cnn


def test_assess_tiny_cnn(tiny):
    a = assess(tiny["model"])
    assert a.kind == "cnn"
    assert a.model.format == "onnx"
    assert a.model.sha256 == file_sha256(tiny["model"])
    assert a.model.size_bytes == tiny["model"].stat().st_size
    assert a.opset == 17 and a.ir_version == 9
    assert [(s.name, s.dtype, s.shape) for s in a.inputs] == [("input", "float32", ("batch", 1, 8, 8))]
    assert [(s.name, s.shape) for s in a.outputs] == [("logits", ("batch", 4))]
    assert a.inputs[0].dynamic_dims == (0,)
    assert a.op_histogram == {"Conv": 2, "Relu": 2, "Flatten": 1, "Gemm": 1, "GlobalAveragePool": 1}
    # 16*1*9 + 16 + 16*16*9 + 16 + 16*4 + 4
    assert a.params == 144 + 16 + 2304 + 16 + 64 + 4
    assert a.unquantizable_ops == ()
    assert a.int8_coverage == 1.0


def test_assess_mlp_is_other_kind(mlp):
    a = assess(mlp["model"])
    assert a.kind == "other"
    assert a.op_histogram["MatMul"] == 4


def test_unquantizable_ops_are_listed(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Erf", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), tmp_path / "e.onnx")
    a = assess(tmp_path / "e.onnx")
    assert a.unquantizable_ops == ("Erf",) and a.int8_coverage == 0.0


@pytest.mark.parametrize("case, pattern", [
    ("missing", "no such file"),
    ("text", "not a readable ONNX file|not an ONNX model"),
    ("truncated", "not a readable ONNX file|invalid ONNX model"),
    ("ir14", "IR version 14 is newer than the runtimes support"),
    ("invalid", "invalid ONNX model"),
])
def test_bad_models_give_one_line(tmp_path, tiny, case, pattern):
    import onnx

    path = tmp_path / "m.onnx"
    if case == "text":
        path.write_text("hello, I am not a model")
    elif case == "truncated":
        path.write_bytes(tiny["model"].read_bytes()[: tiny["model"].stat().st_size // 2])
    elif case == "ir14":
        m = onnx.load(tiny["model"])
        m.ir_version = 14
        onnx.save(m, path)
    elif case == "invalid":
        m = onnx.load(tiny["model"])
        m.graph.node[0].input[1] = "no_such_tensor"
        onnx.save(m, path)
    with pytest.raises(ModelError, match=pattern) as info:
        assess(path)
    assert "\n" not in str(info.value)


def test_same_model_same_hash(tmp_path):
    a = make_tiny_cnn(tmp_path / "a.onnx", seed=3)
    b = make_tiny_cnn(tmp_path / "b.onnx", seed=3)
    c = make_tiny_cnn(tmp_path / "c.onnx", seed=4)
    assert assess(a).model.sha256 == assess(b).model.sha256 != assess(c).model.sha256
