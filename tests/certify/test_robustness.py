"""Robustness check: real models run by the benchmark harness on noisy and edge inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper

from edgeopt.certify import robustness
from edgeopt.data import Dataset, file_sha256, load_dataset
from edgeopt.records import Artifact, TensorSpec

SIG = (TensorSpec(name="input", dtype="float32", shape=("batch", 1, 8, 8)),)


def _artifact(path: Path, name: str) -> Artifact:
    return Artifact(candidate=name, backend="onnxruntime", path=str(path), sha256=file_sha256(path),
                    size_bytes=path.stat().st_size, parent_sha256="0" * 64, precision="fp32",
                    runtime={"intra_op_threads": 1})


def _extended(src: Path, dst: Path, nodes: list, inits: list) -> Path:
    """The tiny CNN with ``nodes`` after its classifier: they read 'raw' and write the output 'logits'."""
    model = onnx.load(str(src))
    for node in model.graph.node:
        node.output[:] = ["raw" if o == "logits" else o for o in node.output]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dst


def _const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory) -> dict[str, Path]:
    from onnxruntime.quantization import quantize_dynamic

    d = tmp_path_factory.mktemp("robustness-models")
    quantize_dynamic(str(tiny["model"]), str(d / "int8.onnx"))
    return {
        "int8": d / "int8.onnx",
        # class 2 gains 100 x (|mean of the input| - 1) when positive: nothing on real samples (|mean| ~0.1),
        # hundreds on inputs filled with the calibration range's extremes (|mean| ~3.5)
        "explodes": _extended(tiny["model"], d / "explodes.onnx", [
            helper.make_node("ReduceMean", ["input"], ["mu"], axes=[1, 2, 3], keepdims=0),
            helper.make_node("Abs", ["mu"], ["abs_mu"]),
            helper.make_node("Sub", ["abs_mu", "one"], ["excess"]),
            helper.make_node("Relu", ["excess"], ["over"]),
            helper.make_node("Unsqueeze", ["over", "axis1"], ["over2"]),
            helper.make_node("Mul", ["over2", "to_class2"], ["bump"]),
            helper.make_node("Add", ["raw", "bump"], ["logits"]),
        ], [_const("one", np.float32(1.0)), _const("axis1", np.array([1], np.int64)),
            _const("to_class2", np.array([0, 0, 100, 0], np.float32))]),
        # adds 0.001 / sum(x²): negligible on real samples, inf on an all-zero input
        "inf_at_zero": _extended(tiny["model"], d / "inf_at_zero.onnx", [
            helper.make_node("ReduceSumSquare", ["input"], ["ss"], axes=[1, 2, 3], keepdims=0),
            helper.make_node("Unsqueeze", ["ss", "axis1"], ["ss2"]),
            helper.make_node("Div", ["eps", "ss2"], ["inv"]),
            helper.make_node("Add", ["raw", "inv"], ["logits"]),
        ], [_const("eps", np.float32(1e-3)), _const("axis1", np.array([1], np.int64))]),
    }


@pytest.fixture(scope="module")
def data(tiny) -> dict[str, Dataset]:
    return {"evaluation": load_dataset(tiny["eval"], signature=SIG, role="evaluation"),
            "calibration": load_dataset(tiny["calibration"], signature=SIG, role="calibration")}


def _check(candidate: Path, tiny, data, tmp_path: Path, **kw):
    return robustness.check(artifact=_artifact(candidate, "candidate"), baseline=_artifact(tiny["model"], "fp32"),
                            signature=SIG, evaluation=data["evaluation"], calibration=data["calibration"],
                            kind="cnn", out_dir=tmp_path, **kw)


def test_an_int8_candidate_passes_every_set(tiny, models, data, tmp_path):
    r = _check(models["int8"], tiny, data, tmp_path)
    assert r.check == "robustness" and r.status == "pass" and r.reason is None, r.reason
    sets = r.evidence["sets"]
    assert [s for s in sets] == ["clean", "noise", "zeros", "range-min", "range-max"]
    assert sets["clean"]["status"] == "reference"
    for name in robustness.PERTURBED:
        assert sets[name]["status"] == "pass" and sets[name]["agreement"] >= 0.95 and sets[name]["finite"]
        assert sets[name]["rows"] == 64 and sets[name]["metric"] == "top1_agreement"
    assert sets["noise"]["stability_candidate"] >= 0.95 and sets["noise"]["stability_baseline"] == 1.0
    inputs = r.evidence["inputs"]
    assert inputs["noise_sigma"]["input"] == pytest.approx(0.01 * float(np.std(data["evaluation"].inputs["input"])))
    assert inputs["range_source"] == "calibration" and inputs["inputs_not_perturbed"] == {}
    cal = data["calibration"].inputs["input"]
    assert inputs["range"]["input"] == [float(cal.min()), float(cal.max())]
    assert "finite on 5/5 sets" in r.summary and "(each >= 0.95)" in r.summary
    names = {Path(f).name for f in r.files}
    assert {f"robustness-{s}.npz" for s in sets} <= names and "robustness-candidate-outputs.npz" in names
    with np.load(tmp_path / "robustness-range-max.npz") as npz:
        assert np.all(npz["input"] == cal.max())


def test_a_model_that_explodes_on_edge_inputs_fails(tiny, models, data, tmp_path):
    r = _check(models["explodes"], tiny, data, tmp_path)
    sets = r.evidence["sets"]
    assert r.status == "fail"
    assert sets["noise"]["status"] == sets["zeros"]["status"] == "pass"
    assert sets["range-min"]["agreement"] == sets["range-max"]["agreement"] == 0.0
    assert "range-min: top1_agreement with the baseline 0.0000 < 0.95" in r.reason and "range-max" in r.reason


def test_non_finite_outputs_on_zeros_fail(tiny, models, data, tmp_path):
    r = _check(models["inf_at_zero"], tiny, data, tmp_path)
    sets = r.evidence["sets"]
    assert r.status == "fail" and sets["zeros"]["finite"] is False and sets["zeros"]["status"] == "fail"
    assert r.reason.startswith("zeros: candidate outputs are not finite")
    assert all(sets[s]["status"] == "pass" for s in ("noise", "range-min", "range-max"))
    assert "finite on 4/5 sets" in r.summary


def test_without_calibration_data_the_evaluation_range_is_used(data):
    sets, how = robustness.input_sets(evaluation=data["evaluation"], calibration=None, noise_level=0.05, samples=16)
    x = data["evaluation"].inputs["input"]
    assert how["range_source"].startswith("evaluation") and how["range"]["input"] == [float(x.min()), float(x.max())]
    noise = sets["noise"]["input"] - sets["clean"]["input"]
    assert noise.dtype == np.float32 and noise.std() == pytest.approx(0.05 * x.std(), rel=0.1)
    assert np.array_equal(sets["clean"]["input"], x[how["rows"]]) and len(set(how["rows"])) == 16
    assert not sets["zeros"]["input"].any()


def test_integer_inputs_are_kept_and_said_so():
    rng = np.random.default_rng(0)
    ev = Dataset(None, "mixed", {"pixels": rng.standard_normal((30, 5)).astype(np.float32),
                                 "input_ids": rng.integers(1, 9, (30, 4))})
    sets, how = robustness.input_sets(evaluation=ev, calibration=None, noise_level=0.01, samples=10)
    assert how["perturbed_inputs"] == ["pixels"] and "input_ids" in how["inputs_not_perturbed"]
    for name in sets:
        assert np.array_equal(sets[name]["input_ids"], sets["clean"]["input_ids"])
    assert not np.array_equal(sets["noise"]["pixels"], sets["clean"]["pixels"])


def test_integer_only_models_are_not_applicable(tiny, tmp_path):
    sig = (TensorSpec(name="input_ids", dtype="int64", shape=("batch", 4)),)
    ids = np.random.default_rng(1).integers(1, 9, (20, 4))
    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 3])
    graph = helper.make_graph([helper.make_node("Gather", ["table", "input_ids"], ["y"])], "emb", [x], [y],
                              [_const("table", np.ones((10, 3), np.float32))])
    model = tmp_path / "emb.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(model))
    r = robustness.check(artifact=_artifact(model, "c"), baseline=_artifact(model, "b"), signature=sig,
                         evaluation=Dataset(None, "ids", {"input_ids": ids}), calibration=None, kind="encoder",
                         out_dir=tmp_path / "out")
    assert r.status == "not-applicable" and r.passed and "integer" in r.reason and r.files == ()
    assert "input_ids" in r.evidence["inputs"]["inputs_not_perturbed"]
