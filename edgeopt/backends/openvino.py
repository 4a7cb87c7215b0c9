"""OpenVINO backend: ONNX → IR (FP32, FP16 weights), NNCF INT8 PTQ (optionally accuracy-controlled) and
NNCF weight compression (INT8 / INT4). Toolchains are imported inside functions (recipes validate
without them; the measuring process needs only ``openvino``). An artifact is a folder with ``model.xml``
and ``model.bin``; its sha256 covers both (``ir_sha256``).

Trap: on CPUs with AVX512-BF16 / AMX, OpenVINO's default inference precision is bf16, so an "FP32" IR runs
in bf16. Recipes default to ``inference_precision='f32'``; each build is compiled once and what it really
executes in (precision hint, exec-graph ``runtimePrecision`` per node, devices) goes into
``Artifact.precision``, ``notes`` and ``runtime['compiled']``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import numpy as np
from pydantic import Field, model_validator

from edgeopt.backends.base import Backend, Recipe, short_message
from edgeopt.errors import BackendUnavailable, CandidateFailed, ConfigError
from edgeopt.input_shapes import probe_feeds
from edgeopt.records import Artifact

if TYPE_CHECKING:

    from edgeopt.data import Dataset
    from edgeopt.profiles import Gates
    from edgeopt.records import Assessment, ModelRef

__all__ = ["ExecutionReport", "OpenVinoBackend", "OpenVinoRecipe", "OpenVinoSession", "check_ir", "classify",
           "finish_ir", "inspect_compiled", "ir_sha256"]

log = logging.getLogger(__name__)

IR_FILES = ("model.xml", "model.bin")
#: 'compiled' is what the build read back from the compiled model: informational, ignored by load()
_RUNTIME_KEYS = ("device", "performance_hint", "inference_precision", "intra_op_threads", "num_streams",
                 "compiled")
_NNCF_PRECISIONS = ("int8", "int8-weights", "int4-weights")
#: exec-graph layer types that do the arithmetic, and bookkeeping ones left out of the histograms
_HEAVY_LAYERS = frozenset({"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul",
                           "ScaledDotProductAttention", "RNNSeq", "RNNCell"})
_BOOKKEEPING_LAYERS = frozenset({"Const", "Input", "Output"})
_UNSUPPORTED_MARKERS = ("not supported", "unsupported", "does not support", "not implemented",
                        "cannot create", "no creator", "no conversion rule", "wasn't fully converted")
_OOM_MARKERS = ("bad_alloc", "failed to allocate", "out of memory", "cannot allocate memory")
_FLOAT_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
_LABEL_PREFIX = {"fp32": "", "fp16": "fp16w+", "int8": "int8+", "int8-weights": "int8w+",
                 "int4-weights": "int4w+"}

#: fields that mean something only for some recipes: (fields, applies?, what they apply to)
_SCOPED_FIELDS: tuple[tuple[tuple[str, ...], Any, str], ...] = (
    (("preset", "model_type", "subset_size", "fast_bias_correction", "max_accuracy_drop", "accuracy_control"),
     lambda r: r.precision == "int8", "precision='int8'"),
    (("accuracy_metric",), lambda r: r.max_accuracy_drop is not None or r.accuracy_control,
     "accuracy_control or max_accuracy_drop set"),
    (("ignored_types", "ignored_names"), lambda r: r.precision in _NNCF_PRECISIONS,
     "precision 'int8', 'int8-weights' or 'int4-weights'"),
    (("sym",), lambda r: r.precision in ("int8-weights", "int4-weights"),
     "precision 'int8-weights' or 'int4-weights'"),
    (("group_size", "ratio"), lambda r: r.precision == "int4-weights", "precision='int4-weights'"),
)


class OpenVinoRecipe(Recipe):
    """How OpenVINO (and NNCF) build and run one candidate."""

    precision: Literal["fp32", "fp16", "int8", "int8-weights", "int4-weights"] = Field(
        default="fp32", description="what the IR holds: 'fp32' as converted; 'fp16' FP16 weights (computed "
        "in inference_precision); 'int8' NNCF post-training quantization (needs calibration data); "
        "'int8-weights' / 'int4-weights' NNCF weight compression (no data needed)")
    inference_precision: Literal["auto", "f32", "bf16", "f16"] = Field(
        default="f32", description="precision the device computes float parts in; 'auto': the device default "
        "(bf16 on CPUs with AVX512-BF16 or AMX, where an FP32 IR then runs in bf16)")
    performance_hint: Literal["latency", "throughput"] = Field(
        default="latency", description="OpenVINO performance hint the model is compiled with")
    device: Literal["CPU", "GPU", "NPU", "AUTO"] = Field(
        default="CPU", description="OpenVINO device to compile for (AUTO: OpenVINO chooses)")
    intra_op_threads: int | None = Field(
        default=None, ge=1, description="INFERENCE_NUM_THREADS; None: the profile's default")
    num_streams: int | None = Field(
        default=None, ge=1, description="parallel inference streams; None: what performance_hint chooses")
    preset: Literal["auto", "performance", "mixed"] = Field(
        default="auto", description="int8: 'performance' symmetric, 'mixed' asymmetric activations; "
        "'auto': NNCF's choice (mixed for transformers, else performance)")
    model_type: Literal["auto", "transformer", "none"] = Field(
        default="auto", description="int8: 'transformer' adds NNCF's attention patterns; 'auto': transformer "
        "when the model has MatMul and Softmax or an 'input_ids' input")
    subset_size: int = Field(default=300, gt=0, description="int8: calibration samples NNCF uses")
    fast_bias_correction: bool = Field(
        default=True, description="int8: NNCF's fast bias correction (False: slower, often more accurate)")
    ignored_types: tuple[str, ...] = Field(
        default=(), description="NNCF: OpenVINO op types kept in float (e.g. 'Softmax'); absent: noted")
    ignored_names: tuple[str, ...] = Field(
        default=(), description="NNCF: node names kept in float (usually the ONNX node names); unknown fails")
    accuracy_control: bool = Field(
        default=False, description="int8: NNCF quantize_with_accuracy_control keeps layers in float until "
        "accuracy_metric vs the FP32 outputs on the calibration samples drops by at most max_accuracy_drop; "
        "left unset, that comes from the profile's gates (cosine: 1 - cosine_min; top-1 agreement: "
        "1 - accuracy_ratio_min)")
    max_accuracy_drop: float | None = Field(
        default=None, gt=0, lt=1, description="int8: the largest absolute drop accuracy control allows "
        "(setting it turns accuracy control on)")
    accuracy_metric: Literal["auto", "top1_agreement", "cosine"] = Field(
        default="auto", description="accuracy control metric; 'auto': top1_agreement for CNNs, else cosine")
    sym: bool = Field(default=False, description="weight compression: symmetric weights (no zero point)")
    group_size: int = Field(default=128, ge=-1, description="int4-weights: group size (-1: per channel)")
    ratio: float = Field(
        default=1.0, gt=0, le=1, description="int4-weights: share of layers in INT4, the rest INT8")

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"unknown openvino recipe field(s) {', '.join(map(repr, unknown))}; "
                                 f"allowed: {', '.join(cls.model_fields)}")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> OpenVinoRecipe:
        for fields, applies, scope in _SCOPED_FIELDS:
            misplaced = [f for f in fields if f in self.model_fields_set]
            if misplaced and not applies(self):
                raise ValueError(f"{misplaced[0]!r} applies only with {scope} (received precision="
                                 f"{self.precision!r}); remove it")
        if self.group_size == 0:
            raise ValueError("group_size must be -1 (per channel) or a positive group size (received 0)")
        return self

    def needs_calibration(self) -> bool:
        return self.precision == "int8"

    def control_metric(self, kind: str) -> str:
        """The accuracy-control metric for a ``kind`` of model."""
        if self.accuracy_metric != "auto":
            return self.accuracy_metric
        return "top1_agreement" if kind == "cnn" else "cosine"

    def from_gates(self, *, gates: Gates, kind: str) -> dict[str, Any]:
        if not self.accuracy_control or self.max_accuracy_drop is not None:
            return {}
        if self.control_metric(kind) == "cosine" and gates.cosine_min is not None:
            return {"max_accuracy_drop": round(1.0 - gates.cosine_min, 6)}
        return {"max_accuracy_drop": round(1.0 - gates.accuracy_ratio_min, 6)}

    def runtime_options(self) -> dict[str, Any]:
        return {"device": self.device, "performance_hint": self.performance_hint,
                "inference_precision": self.inference_precision, "intra_op_threads": self.intra_op_threads,
                "num_streams": self.num_streams}


@dataclass(frozen=True)
class ExecutionReport:
    """Where and in what precision a compiled model runs, read back from OpenVINO (fallback detection)."""

    target: str
    devices: tuple[str, ...]
    inference_precision: str
    nodes: int
    #: runtime precision -> share of executed nodes (Const/Input/Output left out), most common first
    precision_shares: dict[str, float] = field(default_factory=dict)
    #: the same over the arithmetic layers only (Convolution, FullyConnected, MatMul, ...)
    compute_shares: dict[str, float] = field(default_factory=dict)

    @property
    def target_share(self) -> float | None:
        """Share of nodes on the target device: 1.0 all, 0.0 fell back, None unknown (AUTO, mixed)."""
        on_target = [d.split(".")[0] == self.target for d in self.devices]
        if self.target == "AUTO" or not on_target:
            return None
        return 1.0 if all(on_target) else 0.0 if not any(on_target) else None

    def describe(self) -> list[str]:
        def hist(shares: dict[str, float]) -> str:
            return ", ".join(f"{p} {s:.0%}" for p, s in shares.items())

        share, devices = self.target_share, ", ".join(self.devices)
        where = "" if share is None else f"; {share:.0%} of nodes on target {self.target}"
        lines = [(f"compiled for {self.target}: inference precision {self.inference_precision}, "
                  f"executes on {devices}{where}"),
                 f"exec precision: {hist(self.precision_shares)} of {self.nodes} nodes"]
        if self.compute_shares:
            lines.append(f"exec precision of conv/matmul layers: {hist(self.compute_shares)}")
        if share == 0.0:
            lines.append(f"FALLBACK: targets {self.target} but runs on {devices}")
        return lines

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"devices": list(self.devices), "target_share": self.target_share}


def _property(compiled: Any, name: str, default: Any) -> Any:
    try:
        return compiled.get_property(name)
    except RuntimeError:  # pragma: no cover - a plugin without the property
        return default


def inspect_compiled(compiled: Any, *, target: str) -> ExecutionReport:
    """Devices, inference precision and per-node runtime precision of a compiled model."""
    precisions: Counter[str] = Counter()
    compute: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer, precision = str(info["layerType"].astype(str)), str(info["runtimePrecision"].astype(str))
        if layer not in _BOOKKEEPING_LAYERS:
            precisions[precision] += 1
            compute[precision] += layer in _HEAVY_LAYERS
    hint = _property(compiled, "INFERENCE_PRECISION_HINT", "n/a")
    total, heavy = sum(precisions.values()), sum(compute.values())
    return ExecutionReport(
        target=target, devices=tuple(map(str, _property(compiled, "EXECUTION_DEVICES", [target]))),
        inference_precision=hint.to_string() if hasattr(hint, "to_string") else str(hint), nodes=total,
        precision_shares={p: n / total for p, n in precisions.most_common()},
        compute_shares={p: n / heavy for p, n in compute.most_common() if n} if heavy else {})


class OpenVinoSession:
    """An OpenVINO compiled model behind the ``Session`` protocol, one infer request per calling thread.

    An infer request holds its inputs and outputs: two threads sharing one would read each other's
    results (seen in the certification's stress check). Each thread gets its own, created on its
    first call; the compiled model runs them concurrently.
    """

    def __init__(self, compiled: Any, *, device: str) -> None:
        self._compiled = compiled
        self._local = threading.local()
        self._local.request = compiled.create_infer_request()  # the loading thread's, made now
        self.device = device
        self.input_names: list[str] = [i.get_any_name() for i in compiled.inputs]
        self.output_names: list[str] = [o.get_any_name() for o in compiled.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        # inputs are read in place; outputs are copied (callers keep them across runs)
        return list(request.infer(feeds, share_inputs=True, share_outputs=False).to_tuple())

    def probe_feeds(self, *, seed: int = 0) -> dict[str, np.ndarray]:
        """Random inputs of the compiled model's shapes (dynamic dimensions set to 1)."""
        rng, feeds = np.random.default_rng(seed), {}
        for port in self._compiled.inputs:
            shape = [d.get_length() if d.is_static else 1 for d in port.get_partial_shape()]
            dtype = port.get_element_type().to_dtype()
            data = rng.standard_normal(shape) if np.issubdtype(dtype, np.floating) else np.ones(shape)
            feeds[port.get_any_name()] = data.astype(dtype)
        return feeds

    def execution(self) -> ExecutionReport:
        """Where and in what precision this session runs (share on the target, precision histogram)."""
        return inspect_compiled(self._compiled, target=self.device)


def ir_sha256(folder: str | Path) -> str:
    """sha256 of an IR folder: for each file in name order (model.bin, model.xml): name, NUL, bytes.

    The same as a folder hash over sorted relative paths, the IR folder holding only these two files.
    """
    h = hashlib.sha256()
    for name in sorted(IR_FILES):
        h.update(name.encode() + b"\0")
        with open(Path(folder) / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def classify(exc: BaseException) -> str:
    """The ``CandidateFailed`` reason for a toolchain exception."""
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or any(m in text for m in _OOM_MARKERS):
        return "oom"
    return "unsupported-op" if any(m in text for m in _UNSUPPORTED_MARKERS) else "build-error"


class OpenVinoBackend(Backend):
    """Builds OpenVINO IR candidates from ONNX models, quantized or compressed with NNCF."""

    name: ClassVar[str] = "openvino"
    formats: ClassVar[frozenset[str]] = frozenset({"onnx"})
    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "gpu", "npu"})
    extra: ClassVar[str] = "openvino"
    recipe_type: ClassVar[type[Recipe]] = OpenVinoRecipe
    #: the measuring process needs only the runtime; nncf is checked when a recipe uses it
    requires: ClassVar[tuple[str, ...]] = ("openvino",)
    distributions: ClassVar[tuple[str, ...]] = ("openvino", "nncf")
    calibrated_recipe: ClassVar[str] = "NNCF INT8"

    def optimize(self, *, model: ModelRef, assessment: Assessment, recipe: Recipe, candidate: str,
                 out_dir: Path, calibration: Dataset | None = None) -> Artifact:
        self.check_request(model=model, recipe=recipe, candidate=candidate, calibration=calibration)
        recipe = cast(OpenVinoRecipe, recipe)  # check_request raised for any other type
        if recipe.precision in _NNCF_PRECISIONS and importlib.util.find_spec("nncf") is None:
            raise BackendUnavailable(self.name, self.extra, "missing: nncf")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        final = out_dir / "model"
        log.info("%s: building OpenVINO %s from %s", candidate, recipe.precision, model.path)
        # built in a private folder inside out_dir; only the compiled-and-run IR folder moves out
        with tempfile.TemporaryDirectory(prefix=".build-", dir=out_dir) as tmp:
            built = Path(tmp) / "model"
            from edgeopt.backends.ov_nncf import Builder

            notes = Builder(recipe=recipe, assessment=assessment, candidate=candidate).build(
                src=model.path, out=built, calibration=calibration)
            return finish_ir(built=built, final=final, recipe=recipe, candidate=candidate, model=model,
                             backend=self.name, notes=notes, tool_versions=self.tool_versions(),
                             feeds=probe_feeds(assessment.inputs, assessment.input_shapes))

    def load(self, *, path: str, runtime: dict[str, Any]) -> OpenVinoSession:
        """Compile ``path`` (IR folder or its model.xml); nothing else: the harness measures load time."""
        import openvino as ov

        core = ov.Core()
        device, config = _compile_config(runtime, core=core, who=str(path))
        xml = Path(path) / "model.xml" if Path(path).is_dir() else Path(path)
        return OpenVinoSession(core.compile_model(str(xml), device, config), device=device)

    def warm(self, *, runtime: dict[str, Any]) -> None:
        """Compile and run a tiny IR (MatMul 16x16 + Relu) as ``load`` would: loads the device plugin and
        the IR reader before the measuring process's memory reference point."""
        import openvino as ov
        from openvino import opset13 as ops

        from edgeopt.backends.base import WARM_SIZE

        x = ops.parameter([1, WARM_SIZE], np.float32, name="x")
        y = ops.relu(ops.matmul(x, ops.constant(np.eye(WARM_SIZE, dtype=np.float32)), False, False))
        with tempfile.TemporaryDirectory(prefix="edgeopt-warm-") as tmp:
            ov.save_model(ov.Model([y], [x], "warm"), str(Path(tmp) / "model.xml"), compress_to_fp16=False)
            session = self.load(path=tmp, runtime=runtime)
            session.run({"x": np.ones((1, WARM_SIZE), dtype=np.float32)})
            del session


def check_ir(folder: Path, *, recipe: Any, candidate: str,
             feeds: dict[str, np.ndarray] | None = None) -> ExecutionReport:
    """Compile the built IR as the benchmark will, run it once (on ``feeds``, else dynamic dims at 1),
    read back how it executes."""
    try:
        session = OpenVinoBackend().load(path=str(folder), runtime=recipe.runtime_options())
        session.run(feeds if feeds is not None else session.probe_feeds())
        return session.execution()
    except (CandidateFailed, ConfigError):
        raise
    except Exception as exc:
        raise CandidateFailed(classify(exc), f"{candidate}: the built IR does not compile or run on "
                              f"{recipe.device}: {short_message(exc)}") from exc


def finish_ir(*, built: Path, final: Path, recipe: Any, candidate: str, model: ModelRef, backend: str,
              notes: list[str], tool_versions: dict[str, str], feeds: dict[str, np.ndarray] | None = None) -> Artifact:
    """Check the IR folder ``built`` (compiled and run once, on ``feeds`` if given: the run's input
    shapes), move it to ``final`` and describe it.

    ``recipe`` is an OpenVINO-style recipe (``precision``, ``device``, ``runtime_options()``).
    """
    report = check_ir(built, recipe=recipe, candidate=candidate, feeds=feeds)
    if final.exists():
        shutil.rmtree(final)
    os.replace(built, final)
    # the float part: the compiled precision hint, else (AUTO has none) the exec graph's main float type
    floats = [p for p in [report.inference_precision, *report.compute_shares, *report.precision_shares]
              if p in _FLOAT_NAMES]
    precision = _LABEL_PREFIX[recipe.precision] + (_FLOAT_NAMES[floats[0]] if floats else "unknown")
    size = sum((final / n).stat().st_size for n in IR_FILES)
    log.info("%s: built %s (%d bytes), executes as %s", candidate, final, size, precision)
    return Artifact(candidate=candidate, backend=backend, path=str(final), sha256=ir_sha256(final),
                    size_bytes=size, parent_sha256=model.sha256, precision=precision,
                    runtime=recipe.runtime_options() | {"compiled": report.as_dict()},
                    tool_versions=tool_versions, notes=tuple(notes + report.describe()),
                    placement=report.as_dict())


def _compile_config(runtime: dict[str, Any], *, core: Any, who: str) -> tuple[str, dict[str, Any]]:
    """``runtime_options()`` -> (device, properties); ConfigError, or CandidateFailed('unavailable')."""
    unknown = sorted(set(runtime) - set(_RUNTIME_KEYS))
    if unknown:
        raise ConfigError(f"unknown openvino runtime option(s) {', '.join(map(repr, unknown))}; "
                          f"allowed: {', '.join(_RUNTIME_KEYS)}")
    values = {"device": runtime.get("device") or "CPU", "performance_hint": runtime.get("performance_hint")
              or "latency", "inference_precision": runtime.get("inference_precision") or "f32"}
    for key, value in values.items():
        choices = OpenVinoRecipe.model_fields[key].annotation.__args__  # type: ignore[union-attr]
        if value not in choices:
            raise ConfigError(f"{who}: runtime option {key}={value!r} is not allowed "
                              f"(allowed: {', '.join(choices)})")
    device = values["device"]
    # listing devices probes every plugin (~65 ms here): only for devices other than the CPU
    if device not in ("CPU", "AUTO") and device not in {d.split(".")[0] for d in core.available_devices}:
        raise CandidateFailed("unavailable", f"{who}: OpenVINO device {device} is not available here "
                              f"(available: {', '.join(core.available_devices)})")
    config: dict[str, Any] = {"PERFORMANCE_HINT": values["performance_hint"].upper()}
    if values["inference_precision"] != "auto":
        config["INFERENCE_PRECISION_HINT"] = values["inference_precision"]
    if runtime.get("intra_op_threads"):
        config["INFERENCE_NUM_THREADS"] = int(runtime["intra_op_threads"])
    if runtime.get("num_streams"):
        config["NUM_STREAMS"] = int(runtime["num_streams"])
    return device, config
