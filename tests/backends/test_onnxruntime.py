"""ONNX Runtime backend: every recipe path on tiny hand-built models, failures and recipe validation."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper

from edgeopt import backends
from edgeopt.backends.onnxruntime import OnnxRuntimeBackend, OrtRecipe, classify
from edgeopt.backends.ort_quantize import choose_reduce_range
from edgeopt.data import Dataset
from edgeopt.errors import CandidateFailed, ConfigError
from edgeopt.hardware import cpu_features, u8s8_saturates
from edgeopt.records import Artifact, Assessment, ModelRef

OPSET = 17
IR_VERSION = 9  # onnx 1.23 writes IR 14 by default, which onnxruntime 1.31 refuses
STATIC = {"precision": "int8", "quantization": "static"}
DYNAMIC = {"precision": "int8", "quantization": "dynamic"}
#: whether this machine's u8×s8 kernels can saturate (x86-64 without VNNI/AMX): reduce_range's automatic choice
SATURATES = u8s8_saturates(arch=cpu_features()[0], isa_flags=cpu_features()[1])


# -- tiny models -----------------------------------------------------------------------------------


def _weight(rng: np.random.Generator, name: str, shape: tuple[int, ...], fan_in: int) -> onnx.TensorProto:
    scaled = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    return numpy_helper.from_array(scaled.astype(np.float32), name)


def _zeros(name: str, n: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.zeros(n, np.float32), name)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _io(name: str, shape: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _cnn(path: Path, logits_bias: np.ndarray | None = None) -> Path:
    """Conv → Relu → Conv → Relu → GlobalAveragePool → Flatten → Gemm: [batch,1,8,8] → logits [batch,4].

    With random weights every sample's logits are close to the mean logits (pooled features hardly vary),
    so the fixture centres them with ``logits_bias`` to get an argmax that varies across samples.
    """
    rng = np.random.default_rng(0)
    b3 = np.zeros(4, np.float32) if logits_bias is None else logits_bias.astype(np.float32)
    inits = [_weight(rng, "w1", (16, 1, 3, 3), 9), _zeros("b1", 16), _weight(rng, "w2", (32, 16, 3, 3), 144),
             _zeros("b2", 32), _weight(rng, "w3", (4, 32), 32), numpy_helper.from_array(b3, "b3")]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "tiny_cnn", [_io("input", ["batch", 1, 8, 8])],
                              [_io("logits", ["batch", 4])], inits)
    return _save(graph, path)


def _mlp(path: Path) -> Path:
    """MatMul → Add → Relu → MatMul → Add → Relu → Gemm: [batch,64] → logits [batch,10], ~85k weights."""
    rng = np.random.default_rng(1)
    inits = [_weight(rng, "w1", (64, 256), 64), _zeros("b1", 256), _weight(rng, "w2", (256, 256), 256),
             _zeros("b2", 256), _weight(rng, "w3", (10, 256), 256), _zeros("b3", 10)]
    nodes = [
        helper.make_node("MatMul", ["features", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "b2"], ["a2"], name="add2"),
        helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "w3", "b3"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "tiny_mlp", [_io("features", ["batch", 64])],
                              [_io("logits", ["batch", 10])], inits)
    return _save(graph, path)


def _ref(path: Path) -> ModelRef:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    return ModelRef(path=str(path), format="onnx", sha256=digest, size_bytes=len(data))


class Case:
    """A model on disk with its records, calibration data, evaluation inputs and FP32 reference outputs."""

    def __init__(self, path: Path, input_name: str, shape: tuple[int, ...]) -> None:
        self.path = path
        self.model = _ref(path)
        params = sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)
        kind = "cnn" if len(shape) == 3 else "other"
        self.assessment = Assessment(model=self.model, kind=kind, params=params)
        self.input_name = input_name
        rng = np.random.default_rng(42)
        samples = rng.standard_normal((32, *shape)).astype(np.float32)
        self.calibration = Dataset(path=None, sha256="x", inputs={input_name: samples})
        self.eval_inputs = rng.standard_normal((64, *shape)).astype(np.float32)
        session = OnnxRuntimeBackend().load(path=str(path), runtime={})
        self.reference = _run(session, input_name, self.eval_inputs)


def _run(session, name: str, inputs: np.ndarray) -> np.ndarray:
    return session.run({name: inputs})[0]


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Case:
    folder = tmp_path_factory.mktemp("cnn")
    uncentred = Case(_cnn(folder / "uncentred.onnx"), "input", (1, 8, 8))
    case = Case(_cnn(folder / "cnn.onnx", logits_bias=-uncentred.reference.mean(axis=0)), "input", (1, 8, 8))
    assert len(set(case.reference.argmax(axis=1))) >= 3, "the CNN predicts too few classes to test agreement"
    return case


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return Case(_mlp(tmp_path_factory.mktemp("mlp") / "mlp.onnx"), "features", (64,))


@pytest.fixture
def backend() -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend()


def _build(backend: OnnxRuntimeBackend, case: Case, out: Path, *, calibrate: bool = False,
           **recipe: object) -> tuple[Artifact, np.ndarray]:
    """Build, check the artifact record against the file, load it and run the evaluation inputs."""
    r = OrtRecipe(**recipe)
    artifact = backend.optimize(model=case.model, assessment=case.assessment, recipe=r, candidate="cand",
                                out_dir=out, calibration=case.calibration if calibrate else None)
    path = Path(artifact.path)
    assert path == out / "model.onnx" and path.is_file()
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"], "temporary files left behind"
    assert artifact.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert artifact.size_bytes == path.stat().st_size
    assert artifact.parent_sha256 == case.model.sha256
    assert (artifact.backend, artifact.candidate, artifact.precision) == ("onnxruntime", "cand", r.precision)
    assert artifact.runtime == r.runtime_options()
    assert {"onnxruntime", "onnx"} <= set(artifact.tool_versions)
    session = backend.load(path=artifact.path, runtime=artifact.runtime)
    assert session.input_names == [case.input_name]
    assert session.providers == ["CPUExecutionProvider"]
    return artifact, _run(session, case.input_name, case.eval_inputs)


def _op_types(path: str) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(path).graph.node)


def _activation_scales(path: str) -> dict[str, float]:
    graph = onnx.load(path).graph
    scalars = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    return {n: float(v) for n, v in scalars.items() if n.endswith("_scale") and v.size == 1}


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float(np.mean(np.sum(a * b, axis=1) / den))


def _reduce_range_note(artifact: Artifact) -> str:
    return next(n for n in artifact.notes if n.startswith("reduce_range: "))


def _max_weight_level(path: str) -> int:
    """The largest |value| among the quantized int8 weights: 127 at 8 bits, 64 with reduce_range."""
    graph = onnx.load(path).graph
    weights = [numpy_helper.to_array(t) for t in graph.initializer
               if t.data_type == TensorProto.INT8 and t.name.endswith("_quantized")]
    assert weights, "no quantized int8 weights"
    return max(int(np.abs(w.astype(np.int32)).max()) for w in weights)


def _as_the_graph_says(backend: OnnxRuntimeBackend, artifact: Artifact, case: Case) -> np.ndarray:
    """The QDQ model run with ONNX Runtime's optimizations off: QuantizeLinear/DequantizeLinear and the float
    ops run as written, no fused integer kernel, so nothing can saturate (the quantized graph's own answer)."""
    session = backend.load(path=artifact.path, runtime=artifact.runtime | {"graph_optimization": "disabled"})
    return _run(session, case.input_name, case.eval_inputs)


def _assert_close_int8(out: np.ndarray, ref: np.ndarray) -> None:
    assert np.isfinite(out).all()
    agreement, cosine = _agreement(out, ref), _cosine(out, ref)
    assert agreement >= 0.8 or cosine > 0.95, f"agreement {agreement:.3f}, cosine {cosine:.4f}"


# -- registry and declarations ---------------------------------------------------------------------


def test_registered(backend: OnnxRuntimeBackend) -> None:
    assert isinstance(backends.get("onnxruntime"), OnnxRuntimeBackend)
    assert backends.recipe_type("onnxruntime") is OrtRecipe
    assert backend.formats == {"onnx"} and backend.devices == {"cpu", "gpu", "npu"}
    assert backend.available()
    backend.check_available()


def test_every_recipe_field_documented() -> None:
    for name, field in OrtRecipe.model_fields.items():
        assert field.description, f"{name} has no description"


def test_module_import_does_not_import_onnxruntime() -> None:
    code = ("import sys, edgeopt.backends.onnxruntime as m;"
            "m.OrtRecipe(precision='int8', quantization='static');"
            "sys.exit('onnxruntime' in sys.modules or 'onnx' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -- FP32 / FP16 -----------------------------------------------------------------------------------


def test_fp32_copy_is_byte_identical(backend, cnn, tmp_path) -> None:
    artifact, out = _build(backend, cnn, tmp_path / "a", graph_optimization="disabled")
    assert artifact.sha256 == cnn.model.sha256
    assert artifact.runtime["graph_optimization"] == "all"  # the baseline runs as ONNX Runtime's default
    np.testing.assert_allclose(out, cnn.reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("level", ["basic", "all"])
def test_fp32_graph_optimized(backend, cnn, tmp_path, level) -> None:
    artifact, out = _build(backend, cnn, tmp_path / "a", graph_optimization=level)
    np.testing.assert_allclose(out, cnn.reference, atol=1e-4, rtol=1e-4)
    assert artifact.runtime["graph_optimization"] == ("disabled" if level == "all" else "all")
    assert any(f"level {level}" in note for note in artifact.notes)


def test_fp16(backend, cnn, mlp, tmp_path) -> None:
    for case in (cnn, mlp):
        artifact, out = _build(backend, case, tmp_path / case.input_name, precision="fp16")
        np.testing.assert_allclose(out, case.reference, atol=1e-2, rtol=1e-2)
        assert any(t.data_type == TensorProto.FLOAT16 for t in onnx.load(artifact.path).graph.initializer)
        assert artifact.size_bytes < case.model.size_bytes * 0.6


def test_fp16_keeps_excluded_ops_in_float(backend, mlp, tmp_path) -> None:
    artifact, out = _build(backend, mlp, tmp_path / "a", precision="fp16", op_types_to_exclude=("Gemm",))
    np.testing.assert_allclose(out, mlp.reference, atol=1e-2, rtol=1e-2)
    w3 = next(t for t in onnx.load(artifact.path).graph.initializer if t.name == "w3")
    assert w3.data_type == TensorProto.FLOAT


# -- INT8 ------------------------------------------------------------------------------------------


def test_dynamic_int8(backend, cnn, mlp, tmp_path) -> None:
    for case in (cnn, mlp):
        artifact, out = _build(backend, case, tmp_path / case.input_name, **DYNAMIC)
        ops = _op_types(artifact.path)
        assert ops["DynamicQuantizeLinear"] and (ops["MatMulInteger"] or ops["ConvInteger"]), ops
        _assert_close_int8(out, case.reference)
        # MatMulInteger saturates without VNNI, ConvInteger does not: only the MLP gets 7-bit weights there
        reduced = SATURATES and case is mlp
        assert _reduce_range_note(artifact).startswith("reduce_range: on" if reduced else "reduce_range: off")
        assert _max_weight_level(artifact.path) <= 64 if reduced else _max_weight_level(artifact.path) > 64
    assert artifact.size_bytes < mlp.model.size_bytes * 0.5


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_static_int8(backend, mlp, tmp_path, method) -> None:
    extra = {"entropy_bins": 256} if method == "entropy" else {}  # the entropy search is slow; keep it small
    artifact, out = _build(backend, mlp, tmp_path / "a", calibrate=True, **STATIC, calibration_method=method,
                           calibration_samples=16, **extra)
    ops = _op_types(artifact.path)
    assert ops["QuantizeLinear"] and ops["DequantizeLinear"], ops
    _assert_close_int8(out, mlp.reference)
    assert artifact.size_bytes < mlp.model.size_bytes * 0.5
    assert f"calibrated with {method} on 16 samples" in artifact.notes


def test_entropy_clips_ranges_unlike_minmax(backend, mlp, tmp_path) -> None:
    minmax, _ = _build(backend, mlp, tmp_path / "m", calibrate=True, **STATIC, calibration_samples=16)
    entropy, _ = _build(backend, mlp, tmp_path / "e", calibrate=True, **STATIC, calibration_samples=16,
                        calibration_method="entropy", entropy_bins=256)
    wide, narrow = _activation_scales(minmax.path), _activation_scales(entropy.path)
    assert wide.keys() == narrow.keys() and wide
    assert all(narrow[k] <= wide[k] * 1.001 for k in wide)
    assert any(narrow[k] < wide[k] * 0.99 for k in wide), "entropy ranges are min-max ranges"
    assert "entropy threshold searched over 256 histogram bins" in entropy.notes


def test_static_int8_cnn(backend, cnn, tmp_path) -> None:
    artifact, out = _build(backend, cnn, tmp_path / "a", calibrate=True, **STATIC)
    ops = _op_types(artifact.path)
    assert ops["QuantizeLinear"] and ops["DequantizeLinear"], ops
    # Measured: cosine 0.996 / agreement 1.0 at 8-bit weights with exact kernels (VNNI, or the graph run as
    # written), 0.990 / 0.94 with reduce_range's 7-bit weights (x86-64 without VNNI), 0.705 / 0.77 when the
    # u8×s8 kernels saturate. The bounds sit between: they hold for every correct build and fail saturation.
    agreement, cosine = _agreement(out, cnn.reference), _cosine(out, cnn.reference)
    assert cosine > 0.98 and agreement >= 0.85, f"agreement {agreement:.3f}, cosine {cosine:.4f}"
    # fewer samples than asked: uses them all and says so
    assert "calibrated with minmax on 32 samples" in artifact.notes
    assert "calibration data has 32 samples, fewer than the 128 asked" in artifact.notes


def test_static_int8_reduce_range_follows_this_cpu(backend, cnn, tmp_path) -> None:
    """The automatic choice on this machine: 7-bit weights exactly where the kernels could saturate, and
    then the fused integer kernels compute what the quantized graph says."""
    artifact, out = _build(backend, cnn, tmp_path / "a", calibrate=True, **STATIC)
    note = _reduce_range_note(artifact)
    if SATURATES:
        assert note.startswith("reduce_range: on (7-bit weights) — this CPU has no VNNI"), note
        assert "ONNX Runtime recommends it to avoid U8S8 saturation" in note
        assert _max_weight_level(artifact.path) <= 64
    else:
        assert note.startswith("reduce_range: off — ") and "set by the recipe" not in note, note
        assert _max_weight_level(artifact.path) == 127
    # requantization rounding differs slightly between fused kernels and the float ops (cosine 0.99999
    # measured); saturation moves whole outputs (0.70 on this model)
    assert _cosine(out, _as_the_graph_says(backend, artifact, cnn)) > 0.999


@pytest.mark.skipif(not SATURATES, reason="this CPU has VNNI/AMX or is not x86-64: its u8×s8 kernels do not "
                    "saturate, so turning reduce_range off loses nothing here")
def test_static_int8_without_reduce_range_saturates_on_this_cpu(backend, cnn, tmp_path) -> None:
    """What the automatic reduce_range protects on this CPU: forced off, the fused u8×s8 kernels saturate
    and the output leaves both the FP32 model and the quantized graph's own answer."""
    artifact, out = _build(backend, cnn, tmp_path / "a", calibrate=True, **STATIC, reduce_range=False)
    note = _reduce_range_note(artifact)
    assert note.startswith("reduce_range: off, set by the recipe — this CPU has no VNNI: U8S8"), note
    assert _max_weight_level(artifact.path) == 127
    # measured here: cosine 0.705 to FP32 and to the graph run as written (0.996 between those two)
    assert _cosine(out, _as_the_graph_says(backend, artifact, cnn)) < 0.95
    assert _cosine(out, cnn.reference) < 0.95


def _cpu(arch: str, *flags: str) -> dict[str, object]:
    return {"arch": arch, "isa_flags": frozenset(flags)}


#: CPU classes CI runs on, as fingerprints spell them (edgeopt.hardware.ISA_FLAGS), and two more
AVX2_ONLY = _cpu("x86_64", "sse4.2", "avx", "avx2", "fma", "f16c")  # AMD EPYC Zen 3
AMD_VNNI = _cpu("x86_64", "avx2", "fma", "avx512f", "avx512bw", "avx512-vnni", "avx512-bf16")  # AMD EPYC Zen 4
XEON_AMX = _cpu("x86_64", "avx2", "avx512f", "avx512-vnni", "avx512-bf16", "amx", "amx-int8", "amx-bf16")
AVX512_NO_VNNI = _cpu("x86_64", "avx2", "fma", "avx512f", "avx512bw")  # Skylake-SP: saturates too
CLIENT_AVX_VNNI = _cpu("x86_64", "avx2", "fma", "avx-vnni")  # Alder Lake: VNNI without AVX-512
ARM = _cpu("arm64", "neon", "dotprod", "i8mm")


@pytest.mark.parametrize("cpu", [AVX2_ONLY, AVX512_NO_VNNI])
def test_reduce_range_choice_without_vnni(cpu) -> None:
    on, note = choose_reduce_range(recipe=OrtRecipe(**STATIC), **cpu)
    assert on and note == ("reduce_range: on (7-bit weights) — this CPU has no VNNI (avx512-vnni, avx-vnni, amx, "
                           "amx-int8); ONNX Runtime recommends it to avoid U8S8 saturation")
    assert choose_reduce_range(recipe=OrtRecipe(**STATIC, activation_type="int8"), **cpu)[0]  # S8S8 runs as U8S8
    assert choose_reduce_range(recipe=OrtRecipe(**DYNAMIC), **cpu)[0]  # MatMulInteger saturates
    off, note = choose_reduce_range(recipe=OrtRecipe(**DYNAMIC), quantizes_conv=True, **cpu)
    assert not off and "ConvInteger does not saturate" in note
    off, note = choose_reduce_range(recipe=OrtRecipe(**STATIC, weight_type="uint8"), **cpu)
    assert not off and note == "reduce_range: off — U8U8 does not saturate"


@pytest.mark.parametrize(("cpu", "has"), [(AMD_VNNI, "avx512-vnni"), (XEON_AMX, "avx512-vnni, amx, amx-int8"),
                                          (CLIENT_AVX_VNNI, "avx-vnni")])
def test_reduce_range_choice_with_vnni_keeps_8_bit_weights(cpu, has) -> None:
    for recipe in (OrtRecipe(**STATIC), OrtRecipe(**DYNAMIC)):
        off, note = choose_reduce_range(recipe=recipe, **cpu)
        assert not off and note.startswith(f"reduce_range: off — this CPU has {has}: no U8S8 saturation"), note


def test_reduce_range_choice_off_arm_and_off_the_cpu() -> None:
    assert choose_reduce_range(recipe=OrtRecipe(**STATIC), **ARM) == (
        False, "reduce_range: off — arm64: its int8 dot products do not saturate")
    assert choose_reduce_range(recipe=OrtRecipe(**STATIC, execution_provider="cuda"), **AVX2_ONLY) == (
        False, "reduce_range: off — it runs on the cuda provider, not this CPU's int8 kernels")
    assert choose_reduce_range(recipe=OrtRecipe(**STATIC, execution_provider="openvino"), **AVX2_ONLY)[0]


def test_reduce_range_set_by_the_recipe_wins() -> None:
    off, note = choose_reduce_range(recipe=OrtRecipe(**STATIC, reduce_range=False), **AVX2_ONLY)
    assert not off and note == ("reduce_range: off, set by the recipe — this CPU has no VNNI: U8S8 kernels may "
                                "saturate (ONNX Runtime recommends reduce_range)")
    on, note = choose_reduce_range(recipe=OrtRecipe(**DYNAMIC, reduce_range=True), quantizes_conv=True, **AMD_VNNI)
    assert on and note == "reduce_range: on (7-bit weights), set by the recipe"


def test_static_int8_excludes_nodes_and_op_types(backend, mlp, tmp_path) -> None:
    artifact, _ = _build(backend, mlp, tmp_path / "a", calibrate=True, **STATIC, calibration_samples=8,
                         nodes_to_exclude=("fc",), op_types_to_exclude=("Add",))
    graph = onnx.load(artifact.path).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    fc = next(n for n in graph.node if n.name == "fc")
    assert producers.get(fc.input[1]) != "DequantizeLinear", "the excluded node got quantized weights"
    assert next(t for t in graph.initializer if t.name == fc.input[1]).data_type == TensorProto.FLOAT
    for add in (n for n in graph.node if n.op_type == "Add"):
        assert producers.get(add.input[1]) != "DequantizeLinear", "an excluded op type got quantized inputs"


# -- failures --------------------------------------------------------------------------------------


def test_static_without_calibration_is_missing_data(backend, cnn, tmp_path) -> None:
    with pytest.raises(CandidateFailed) as err:
        _build(backend, cnn, tmp_path / "a", **STATIC)
    assert err.value.reason == "missing-data"
    assert str(err.value) == "cand: static INT8 needs calibration data; pass --calibration DATA"


def test_calibration_for_other_inputs_is_missing_data(backend, cnn, tmp_path) -> None:
    wrong = Dataset(path=None, sha256="y", inputs={"pixels": np.zeros((4, 1, 8, 8), np.float32)})
    with pytest.raises(CandidateFailed) as err:
        backend.optimize(model=cnn.model, assessment=cnn.assessment, candidate="cand", out_dir=tmp_path / "a",
                         recipe=OrtRecipe(**STATIC), calibration=wrong)
    assert err.value.reason == "missing-data" and "input(s) input (has: pixels)" in str(err.value)
    assert list((tmp_path / "a").iterdir()) == []


def _broken(tmp_path: Path, content: bytes) -> tuple[ModelRef, Assessment]:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    ref = _ref(bad)
    return ref, Assessment(model=ref, kind="other", params=0)


def test_broken_model_is_build_error(backend, tmp_path) -> None:
    ref, assessment = _broken(tmp_path, b"not an onnx model")
    with pytest.raises(CandidateFailed) as err:
        backend.optimize(model=ref, assessment=assessment, candidate="cand", recipe=OrtRecipe(),
                         out_dir=tmp_path / "a")
    assert err.value.reason == "build-error"
    assert str(err.value).startswith("cand: graph optimization (all) failed: ") and "\n" not in str(err.value)
    assert list((tmp_path / "a").iterdir()) == []


def test_unloadable_copy_fails_verification(backend, tmp_path) -> None:
    ref, assessment = _broken(tmp_path, b"\x00garbage")
    with pytest.raises(CandidateFailed) as err:
        backend.optimize(model=ref, assessment=assessment, candidate="cand",
                         recipe=OrtRecipe(graph_optimization="disabled"), out_dir=tmp_path / "a")
    assert err.value.reason == "build-error"
    assert str(err.value).startswith("cand: the built model does not load and run: ")
    assert list((tmp_path / "a").iterdir()) == []


def test_non_onnx_model_is_refused(backend, cnn, tmp_path) -> None:
    ref = cnn.model.model_copy(update={"format": "gguf"})
    with pytest.raises(CandidateFailed, match="onnxruntime builds onnx models, got 'gguf'"):
        backend.optimize(model=ref, assessment=cnn.assessment, candidate="cand", recipe=OrtRecipe(),
                         out_dir=tmp_path / "a")


def test_pre_processing_failure_falls_back_to_the_raw_model(backend, mlp, tmp_path, monkeypatch) -> None:
    from onnxruntime.quantization import shape_inference

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("symbolic shape inference\nfailed")

    monkeypatch.setattr(shape_inference, "quant_pre_process", fail)
    artifact, out = _build(backend, mlp, tmp_path / "a", **DYNAMIC)
    assert "pre-processing skipped: symbolic shape inference failed" in artifact.notes
    _assert_close_int8(out, mlp.reference)


@pytest.mark.parametrize(("exc", "reason"), [
    (RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for "
                  "ConvInteger(10) node with name 'conv1'"), "unsupported-op"),
    (MemoryError(), "oom"),
    (ValueError("shapes do not match"), "build-error"),
])
def test_toolchain_errors_are_classified(backend, mlp, tmp_path, monkeypatch, exc, reason) -> None:
    import onnxruntime.quantization

    def fail(*args: object, **kwargs: object) -> None:
        raise exc

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", fail)
    with pytest.raises(CandidateFailed) as err:
        _build(backend, mlp, tmp_path / "a", **DYNAMIC)
    assert err.value.reason == reason
    assert str(err.value).startswith("cand: dynamic quantization failed: ") and "\n" not in str(err.value)
    assert list((tmp_path / "a").iterdir()) == []


@pytest.mark.parametrize(("exc", "reason"), [
    (MemoryError(), "oom"),
    (RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for X(1)"),
     "unsupported-op"),
    (ValueError("Op type Foo is not supported"), "unsupported-op"),
    (RuntimeError("Failed to allocate memory for requested buffer of size 123"), "oom"),
    (RuntimeError("something else"), "build-error"),
])
def test_classify(exc, reason) -> None:
    assert classify(exc) == reason


def test_load_unavailable_provider(backend, cnn) -> None:
    with pytest.raises(CandidateFailed) as err:
        backend.load(path=str(cnn.path), runtime=OrtRecipe(execution_provider="cuda").runtime_options())
    assert err.value.reason == "unavailable"
    assert "CUDAExecutionProvider" in str(err.value) and "available: " in str(err.value)
    assert "CPUExecutionProvider" in str(err.value)


def test_load_session_options(backend, cnn) -> None:
    runtime = OrtRecipe(intra_op_threads=1, inter_op_threads=1, execution_mode="parallel").runtime_options()
    session = backend.load(path=str(cnn.path), runtime=runtime)
    np.testing.assert_allclose(_run(session, "input", cnn.eval_inputs), cnn.reference, atol=1e-5)
    options = session._session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)


def test_load_rejects_unknown_runtime_option(backend, cnn) -> None:
    with pytest.raises(ConfigError, match="'threads'; allowed: intra_op_threads"):
        backend.load(path=str(cnn.path), runtime={"threads": 2})
    with pytest.raises(ConfigError, match="execution_mode 'async'; allowed: .* sequential, parallel"):
        backend.load(path=str(cnn.path), runtime={"execution_mode": "async"})


# -- recipe validation -----------------------------------------------------------------------------


def test_recipe_defaults() -> None:
    r = OrtRecipe()
    assert (r.precision, r.quantization, r.graph_optimization) == ("fp32", "none", "all")
    assert OrtRecipe(**STATIC).reduce_range is None  # chosen from the CPU at build time
    assert not r.needs_calibration() and not OrtRecipe(**DYNAMIC).needs_calibration()
    assert OrtRecipe(**STATIC).needs_calibration()
    assert OrtRecipe(graph_optimization="disabled").runtime_options() == {
        "intra_op_threads": None, "inter_op_threads": None, "execution_mode": "sequential",
        "execution_provider": "cpu", "graph_optimization": "all"}


def test_recipe_bad_precision_names_allowed_and_received() -> None:
    with pytest.raises(ValidationError) as err:
        OrtRecipe(precision="int4")
    assert "'fp32', 'fp16' or 'int8'" in str(err.value) and "int4" in str(err.value)


def test_recipe_unknown_key_names_allowed_fields() -> None:
    with pytest.raises(ValidationError) as err:
        OrtRecipe.model_validate({"precison": "int8"})
    assert "'precison'" in str(err.value) and "allowed: precision, quantization" in str(err.value)


@pytest.mark.parametrize(("fields", "expected"), [
    ({"precision": "int8"}, "needs quantization 'dynamic' or 'static' (received 'none')"),
    ({"quantization": "dynamic"}, "precision 'fp32' needs quantization 'none' (received 'dynamic')"),
    ({**DYNAMIC, "calibration_method": "entropy"},
     "'calibration_method' applies only with quantization='static'"),
    ({**STATIC, "entropy_bins": 1024}, "'entropy_bins' applies only with calibration_method='entropy'"),
    ({"per_channel": False}, "'per_channel' applies only with precision='int8'"),
    ({"reduce_range": True}, "'reduce_range' applies only with precision='int8'"),
    ({"nodes_to_exclude": ("fc",)}, "'nodes_to_exclude' applies only with precision='fp16' or 'int8'"),
    ({"calibration_samples": 0}, "greater than 0"),
    ({"intra_op_threads": 0}, "greater than or equal to 1"),
    ({"execution_provider": "vulkan"}, "'cpu', 'cuda', 'tensorrt', 'coreml', 'openvino' or 'dml'"),
    ({"graph_optimization": "max"}, "'disabled', 'basic', 'extended' or 'all'"),
])
def test_recipe_inconsistent_values(fields, expected) -> None:
    with pytest.raises(ValidationError) as err:
        OrtRecipe(**fields)
    assert expected in str(err.value)


def test_recipe_is_frozen() -> None:
    with pytest.raises(ValidationError):
        OrtRecipe().precision = "fp16"  # type: ignore[misc]


# -- placement (where the nodes run) ---------------------------------------------------------------


def test_placement_is_read_from_a_profiled_run(backend, cnn, tmp_path) -> None:
    artifact, _ = _build(backend, cnn, tmp_path / "a", graph_optimization="basic")
    where = artifact.placement
    assert where["target"] == "CPUExecutionProvider" and where["target_share"] == 1.0
    assert 0 < where["nodes"] <= len(onnx.load(artifact.path).graph.node)  # the session may fuse more
    assert any(n.startswith("placement: CPUExecutionProvider 100% of") for n in artifact.notes)
    assert not list(tmp_path.glob("**/*.json")), "profiler traces left behind"


def test_placement_flags_a_fallback() -> None:
    from edgeopt.backends.ort_placement import PlacementReport

    partial = PlacementReport(target="CUDAExecutionProvider", nodes=10,
                              provider_shares={"CUDAExecutionProvider": 0.7, "CPUExecutionProvider": 0.3})
    assert partial.target_share == pytest.approx(0.7)
    assert partial.describe()[-1] == "FALLBACK: targets CUDAExecutionProvider but 30% of nodes run elsewhere"
    on_cpu = PlacementReport(target="CPUExecutionProvider", nodes=4, provider_shares={"CPUExecutionProvider": 1.0})
    assert len(on_cpu.describe()) == 1 and on_cpu.as_dict()["target_share"] == 1.0
