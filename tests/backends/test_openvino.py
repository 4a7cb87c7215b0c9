"""OpenVINO backend: every recipe on tiny hand-built models, execution read-back, failures, validation."""

from __future__ import annotations

import hashlib
import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from edgeopt.backends.openvino import (
    ExecutionReport,
    OpenVinoBackend,
    OpenVinoRecipe,
    OpenVinoSession,
    classify,
    ir_sha256,
)
from edgeopt.data import Dataset
from edgeopt.errors import CandidateFailed, ConfigError
from edgeopt.hardware import cpu_features, u8s8_saturates
from edgeopt.records import Artifact, Assessment, ModelRef

onnx = pytest.importorskip("onnx")
ov = pytest.importorskip("openvino")
# found, not imported: nncf imports torch when present (seconds), only the NNCF tests should pay for it
pytestmark = pytest.mark.skipif(importlib.util.find_spec("nncf") is None, reason="nncf is not installed")
from onnx import TensorProto, helper, numpy_helper

OPSET, IR_VERSION = 17, 9  # onnx 1.23 writes IR 14 by default, which onnxruntime 1.31 refuses


# -- tiny models -----------------------------------------------------------------------------------


def _save(nodes: list, name: str, inputs: list, outputs: list, inits: list, path: Path,
          domains: tuple[tuple[str, int], ...] = ()) -> Path:
    opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, v) for d, v in domains]
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION), str(path))
    return path


def _io(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _attention(path: Path) -> Path:
    """x [batch,4,16] → q, k, v projections → Softmax(q·kᵀ)·v → y [batch,4,16]."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 16)) / 4).astype(np.float32), n)
             for n in ("wq", "wk", "wv")]
    nodes = [helper.make_node("MatMul", ["x", w], [w[1]], name=f"proj_{w[1]}") for w in ("wq", "wk", "wv")]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
              helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"),
              helper.make_node("Softmax", ["s"], ["p"], axis=-1, name="softmax"),
              helper.make_node("MatMul", ["p", "v"], ["y"], name="context")]
    return _save(nodes, "attention", [_io("x", ["batch", 4, 16])], [_io("y", ["batch", 4, 16])], inits, path)


def _unsupported(path: Path) -> Path:
    nodes = [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example", name="frob")]
    return _save(nodes, "custom", [_io("x", [1, 4])], [_io("y", [1, 4])], [], path, (("com.example", 1),))


def _ref(path: Path) -> ModelRef:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    return ModelRef(path=str(path), format="onnx", sha256=digest, size_bytes=len(data))


class Case:
    """A model with its records, calibration samples, evaluation inputs and ORT FP32 reference outputs."""

    def __init__(self, path: Path, input_name: str, calibration: np.ndarray, inputs: np.ndarray,
                 kind: str = "cnn") -> None:
        import onnxruntime as ort

        self.path, self.input_name, self.inputs = path, input_name, inputs
        self.model = _ref(path)
        self.assessment = Assessment(model=self.model, kind=kind, params=0)
        self.calibration = Dataset(path=None, sha256="cal", inputs={input_name: calibration})
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.reference = sess.run(None, {input_name: inputs})[0]


@pytest.fixture(scope="module")
def cnn(tiny) -> Case:
    data = np.load(tiny["eval"])
    return Case(tiny["model"], "input", np.load(tiny["calibration"])["input"], data["input"])


@pytest.fixture(scope="module")
def dense(mlp) -> Case:
    return Case(mlp["model"], "x", np.load(mlp["calibration"])["x"], np.load(mlp["eval"])["x"][:32], "other")


@pytest.fixture(scope="module")
def backend() -> OpenVinoBackend:
    return OpenVinoBackend()


def _build(backend: OpenVinoBackend, case: Case, out: Path, *, calibrate: bool = False,
           **recipe: object) -> tuple[Artifact, OpenVinoSession, np.ndarray]:
    """Build, check the artifact record against its folder, load it and run the evaluation inputs."""
    r = OpenVinoRecipe(**recipe)
    art = backend.optimize(model=case.model, assessment=case.assessment, recipe=r, candidate="cand",
                           out_dir=out, calibration=case.calibration if calibrate else None)
    folder = Path(art.path)
    assert folder == out / "model" and sorted(p.name for p in out.iterdir()) == ["model"], "leftovers"
    assert sorted(p.name for p in folder.iterdir()) == ["model.bin", "model.xml"]
    assert art.sha256 == ir_sha256(folder) == _folder_sha256(folder)
    assert art.size_bytes == sum(p.stat().st_size for p in folder.iterdir())
    assert (art.backend, art.parent_sha256) == ("openvino", case.model.sha256)
    assert {"openvino", "nncf"} <= set(art.tool_versions)
    assert art.runtime["compiled"]["devices"] == ["CPU"] and art.runtime["compiled"]["target_share"] == 1.0
    assert any(n.startswith("exec precision:") for n in art.notes)
    session = backend.load(path=art.path, runtime=art.runtime | {"intra_op_threads": 1})
    assert session.input_names == [case.input_name]
    return art, session, session.run({case.input_name: case.inputs})[0]


def _folder_sha256(folder: Path) -> str:
    """The generic folder hash ir_sha256 agrees with: relative path, NUL, bytes, in sorted path order."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.mean(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def _ir_types(art: Artifact) -> Counter[str]:
    model = ov.Core().read_model(str(Path(art.path) / "model.xml"))
    return Counter(op.get_type_name() for op in model.get_ops())


def _exec_precisions(session: OpenVinoSession, layer: str) -> set[str]:
    ops = session._compiled.get_runtime_model().get_ordered_ops()
    return {str(op.get_rt_info()["runtimePrecision"].astype(str)) for op in ops
            if op.get_rt_info()["layerType"].astype(str) == layer}


def _bf16_cpu() -> bool:
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


# -- float builds ----------------------------------------------------------------------------------


def test_fp32_executes_in_f32_and_matches_onnxruntime(backend, cnn, tmp_path):
    art, session, out = _build(backend, cnn, tmp_path / "a")
    assert art.precision == "fp32" and art.runtime["inference_precision"] == "f32"
    np.testing.assert_allclose(out, cnn.reference, rtol=1e-4, atol=1e-4)
    assert _exec_precisions(session, "Convolution") == {"f32"}, "inference_precision f32 runs convs in f32"
    report = session.execution()
    assert report.inference_precision == "f32" and report.compute_shares == {"f32": 1.0}
    assert report.target_share == 1.0 and report.devices == ("CPU",)
    assert art.runtime["compiled"]["compute_shares"] == {"f32": 1.0}
    again = backend.optimize(model=cnn.model, assessment=cnn.assessment, recipe=OpenVinoRecipe(),
                             candidate="cand", out_dir=tmp_path / "b")
    assert again.sha256 == art.sha256, "the same recipe must give the same IR bytes"


def test_concurrent_callers_each_get_their_own_results(backend, cnn, tmp_path):
    """Threads sharing one session (the certification's stress check, a server) must not read each
    other's outputs: one infer request per thread."""
    from concurrent.futures import ThreadPoolExecutor

    _, session, _ = _build(backend, cnn, tmp_path / "a")
    rows = [cnn.inputs[i:i + 1] for i in range(48)]
    alone = [session.run({"input": r})[0] for r in rows]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda r: session.run({"input": r})[0], rows * 4))
    for i, out in enumerate(together):
        np.testing.assert_allclose(out, alone[i % len(rows)], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not _bf16_cpu(), reason="this CPU has no bf16: 'auto' stays f32")
def test_auto_precision_on_a_bf16_cpu_is_reported_as_bf16(backend, cnn, tmp_path):
    art, session, out = _build(backend, cnn, tmp_path, inference_precision="auto")
    assert art.precision == "bf16" and art.runtime["compiled"]["inference_precision"] == "bf16"
    assert "bf16" in _exec_precisions(session, "Convolution")
    assert any("inference precision bf16" in n for n in art.notes)
    assert _cosine(out, cnn.reference) > 0.99


def test_fp16_weights(backend, cnn, tmp_path):
    fp32, _, _ = _build(backend, cnn, tmp_path / "fp32")
    art, _, out = _build(backend, cnn, tmp_path / "fp16", precision="fp16")
    assert art.precision == "fp16w+fp32" and art.size_bytes < fp32.size_bytes
    np.testing.assert_allclose(out, cnn.reference, rtol=1e-2, atol=1e-2)


# -- NNCF -----------------------------------------------------------------------------------------


def test_int8_quantizes_and_stays_close(backend, cnn, tmp_path):
    art, session, out = _build(backend, cnn, tmp_path / "a", calibrate=True, precision="int8", subset_size=32)
    assert art.precision == "int8+fp32"
    assert _ir_types(art)["FakeQuantize"] >= 2
    assert _exec_precisions(session, "Convolution") & {"u8", "i8"}
    assert {"u8", "i8"} & set(session.execution().compute_shares)
    assert any("32 of 64 calibration samples" in n and "model_type none" in n for n in art.notes)
    agreement, cosine = _agreement(out, cnn.reference), _cosine(out, cnn.reference)
    assert agreement >= 0.8 or cosine > 0.95, f"agreement {agreement:.3f}, cosine {cosine:.4f}"
    again = backend.optimize(model=cnn.model, assessment=cnn.assessment, calibration=cnn.calibration,
                             recipe=OpenVinoRecipe(precision="int8", subset_size=32), candidate="cand",
                             out_dir=tmp_path / "b")
    assert again.sha256 == art.sha256


def test_int8_with_accuracy_control(backend, cnn, tmp_path):
    art, _, out = _build(backend, cnn, tmp_path, calibrate=True, precision="int8", max_accuracy_drop=0.01)
    note = next(n for n in art.notes if n.startswith("accuracy control: top1_agreement"))
    assert float(note.split("samples ")[1].split()[0]) >= 0.99 - 1e-9
    assert _agreement(out, cnn.reference) >= 0.8


def test_accuracy_control_without_a_budget_is_a_config_error(backend, cnn, tmp_path):
    # the flow fills max_accuracy_drop from the profile's gates; a direct build must give it
    with pytest.raises(ConfigError, match="accuracy_control needs max_accuracy_drop"):
        backend.optimize(model=cnn.model, assessment=cnn.assessment, calibration=cnn.calibration,
                         recipe=OpenVinoRecipe(precision="int8", accuracy_control=True), candidate="cand",
                         out_dir=tmp_path / "b")
    assert not (tmp_path / "b" / "model").exists()


def test_int8_needs_calibration(backend, cnn, tmp_path):
    with pytest.raises(CandidateFailed) as info:
        backend.optimize(model=cnn.model, assessment=cnn.assessment, recipe=OpenVinoRecipe(precision="int8"),
                         candidate="cand", out_dir=tmp_path)
    assert info.value.reason == "missing-data" and "--calibration" in str(info.value)


def test_transformer_patterns_and_ignored_scope(backend, tmp_path):
    rng = np.random.default_rng(0)
    case = Case(_attention(tmp_path / "attn.onnx"), "x", rng.standard_normal((16, 4, 16)).astype(np.float32),
                rng.standard_normal((8, 4, 16)).astype(np.float32), kind="encoder")
    with pytest.raises(CandidateFailed, match="not nodes of the model") as info:
        backend.optimize(model=case.model, assessment=case.assessment, calibration=case.calibration,
                         recipe=OpenVinoRecipe(precision="int8", ignored_names=("no_such_node",)),
                         candidate="cand", out_dir=tmp_path / "bad")
    assert info.value.reason == "build-error"
    art, _, out = _build(backend, case, tmp_path / "out", calibrate=True, precision="int8",
                         ignored_names=("softmax",), ignored_types=("Softmax", "LayerNorm"))
    assert any("model_type transformer" in n for n in art.notes)
    assert "ignored_types not in this model: LayerNorm" in art.notes
    # The IR's own FakeQuantize arithmetic (evaluated exactly in numpy) gives cosine 0.988 to FP32 on this
    # random attention; u8×s8 kernels that do not saturate (VNNI/AMX) should land there. On x86-64 without
    # VNNI they saturate (VPMADDUBSW's 16-bit pair sums) unless NNCF's overflow fix gives the weights 7 bits:
    # measured on AVX2, 0.949 without it, 0.988 with it. 0.95 sits between the two.
    cosine = _cosine(out, case.reference)
    overflow_fixed = any("overflow fix" in n for n in art.notes)
    if cosine <= 0.95 and u8s8_saturates(arch=cpu_features()[0], isa_flags=cpu_features()[1]) and not overflow_fixed:
        assert cosine > 0.9, f"cosine {cosine:.4f}: more than this CPU's known saturation loss"
        pytest.xfail(f"cosine {cosine:.4f}: this CPU has no VNNI and the NNCF build does not apply NNCF's "
                     "overflow_fix (backends/ov_nncf.py, issue 7): its u8×s8 kernels saturate")
    assert cosine > 0.95, f"cosine {cosine:.4f}"


@pytest.mark.parametrize(("recipe", "label", "cosine"), [
    ({"precision": "int8-weights"}, "int8w+fp32", 0.999),
    ({"precision": "int4-weights", "group_size": 64, "sym": True}, "int4w+fp32", 0.97),
])
def test_weight_compression(backend, dense, tmp_path, recipe, label, cosine):
    fp32, _, _ = _build(backend, dense, tmp_path / "fp32")
    art, _, out = _build(backend, dense, tmp_path / "w", **recipe)
    assert art.precision == label and art.size_bytes < fp32.size_bytes / 3
    assert _cosine(out, dense.reference) > cosine


# -- failures and validation -----------------------------------------------------------------------


def test_unsupported_op_is_classified(backend, tmp_path):
    path = _unsupported(tmp_path / "custom.onnx")
    with pytest.raises(CandidateFailed) as info:
        backend.optimize(model=_ref(path), assessment=Assessment(model=_ref(path), kind="other", params=0),
                         recipe=OpenVinoRecipe(), candidate="cand", out_dir=tmp_path / "out")
    assert info.value.reason == "unsupported-op" and "Frobnicate" in str(info.value)
    assert not (tmp_path / "out" / "model").exists()


def test_missing_device_is_unavailable(backend, cnn, tmp_path):
    if "NPU" in ov.Core().available_devices:
        pytest.skip("this machine has an NPU")
    with pytest.raises(CandidateFailed) as info:
        backend.optimize(model=cnn.model, assessment=cnn.assessment, recipe=OpenVinoRecipe(device="NPU"),
                         candidate="cand", out_dir=tmp_path)
    assert info.value.reason == "unavailable" and "available: CPU" in str(info.value)


def test_classify():
    assert classify(RuntimeError("std::bad_alloc")) == "oom"
    assert classify(RuntimeError("No conversion rule found for operations: X")) == "unsupported-op"
    assert classify(RuntimeError("something else")) == "build-error"


def test_runtime_options_are_checked(backend, cnn, tmp_path):
    art, _, _ = _build(backend, cnn, tmp_path)
    with pytest.raises(ConfigError, match="unknown openvino runtime option.*'inter_op_threads'.*allowed"):
        backend.load(path=art.path, runtime=art.runtime | {"inter_op_threads": 1})
    with pytest.raises(ConfigError, match="performance_hint='fast'.*allowed: latency, throughput"):
        backend.load(path=art.path, runtime={"performance_hint": "fast"})
    session = backend.load(path=str(Path(art.path) / "model.xml"), runtime={"intra_op_threads": 1,
                                                                           "performance_hint": "throughput"})
    assert session._compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert session.run(session.probe_feeds())[0].shape == (1, 4)


def test_auto_device_reports_where_it_runs(backend, cnn, tmp_path):
    art = backend.optimize(model=cnn.model, assessment=cnn.assessment, recipe=OpenVinoRecipe(device="AUTO"),
                           candidate="cand", out_dir=tmp_path)
    assert art.runtime["compiled"]["devices"] and art.runtime["compiled"]["target_share"] is None
    assert art.precision == "fp32"  # AUTO has no precision hint: read from the exec graph


def test_fallback_is_flagged():
    report = ExecutionReport(target="GPU", devices=("CPU",), inference_precision="f32", nodes=3,
                             precision_shares={"f32": 1.0})
    assert report.target_share == 0.0
    assert any(n.startswith("FALLBACK: targets GPU") for n in report.describe())
    auto = ExecutionReport(target="AUTO", devices=("CPU",), inference_precision="f32", nodes=1)
    assert auto.target_share is None and not any("FALLBACK" in n for n in auto.describe())


@pytest.mark.parametrize(("recipe", "message"), [
    ({"precision": "int3"}, "'fp32', 'fp16', 'int8', 'int8-weights' or 'int4-weights'"),
    ({"inference_precision": "f64"}, "'auto', 'f32', 'bf16' or 'f16'"),
    ({"device": "TPU"}, "'CPU', 'GPU', 'NPU' or 'AUTO'"),
    ({"precison": "int8"}, "unknown openvino recipe field(s) 'precison'; allowed: precision"),
    ({"preset": "mixed"}, "'preset' applies only with precision='int8' (received precision='fp32')"),
    ({"precision": "int8", "group_size": 64}, "'group_size' applies only with precision='int4-weights'"),
    ({"precision": "int8", "accuracy_metric": "cosine"}, "applies only with accuracy_control or max_accuracy_drop set"),
    ({"precision": "fp16", "sym": True}, "'sym' applies only with precision 'int8-weights' or 'int4-"),
    ({"precision": "int4-weights", "group_size": 0}, "group_size must be -1"),
    ({"precision": "int8", "max_accuracy_drop": 2}, "less than 1"),
])
def test_bad_recipes_name_allowed_values(recipe, message):
    with pytest.raises(ValidationError) as info:
        OpenVinoRecipe.model_validate(recipe)
    assert message in str(info.value)


def test_recipe_contract():
    assert all(f.description for f in OpenVinoRecipe.model_fields.values())
    assert OpenVinoRecipe(precision="int8").needs_calibration() and not OpenVinoRecipe().needs_calibration()
    assert OpenVinoRecipe().runtime_options() == {"device": "CPU", "performance_hint": "latency",
                                                  "inference_precision": "f32", "intra_op_threads": None,
                                                  "num_streams": None}


def test_measured_by_the_harness(backend, cnn, tmp_path):
    from edgeopt import backends, bench
    from edgeopt.hardware import fingerprint
    from edgeopt.records import TensorSpec

    if "openvino" not in backends.names():
        pytest.skip("openvino is not in the backend registry yet")
    art, _, _ = _build(backend, cnn, tmp_path / "build")
    art = art.model_copy(update={"runtime": art.runtime | {"intra_op_threads": 1}})
    settings = bench.BenchSettings(warmup_runs=2, min_runs=20, min_duration_s=0)
    result = bench.measure(artifact=art, settings=settings,
                           signature=(TensorSpec(name="input", dtype="float32", shape=("batch", 1, 8, 8)),),
                           hardware=fingerprint(), out_dir=tmp_path / "bench")
    assert result.samples >= 20 and result.threads == 1 and result.size_bytes == art.size_bytes
