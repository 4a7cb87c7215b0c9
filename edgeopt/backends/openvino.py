"""OpenVINO backend: ONNX → IR (FP32, FP16 weights), NNCF INT8 PTQ (with optional accuracy control)
and NNCF weight compression (INT8 / INT4), compiled with latency or throughput hints.

Public surface: ``OpenVinoRecipe``, ``OpenVinoBackend``, ``OpenVinoSession``, ``ExecutionReport``,
``inspect_compiled`` and ``ir_sha256``. ``openvino`` and ``nncf`` are imported inside the functions,
so recipes validate without them; the measuring process imports only ``openvino``.

An artifact is a folder holding ``model.xml`` + ``model.bin``; its sha256 covers both files.

Trap handled here: on CPUs with AVX512-BF16 / AMX, OpenVINO's default inference precision is bf16, so
an "FP32" IR silently runs in bf16. Recipes default to ``inference_precision='f32'``; every build is
compiled once and the precision it actually executes in (the compiled model's hint and the exec
graph's ``runtimePrecision`` per node) goes into ``Artifact.precision``, ``notes`` and ``runtime``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import shutil
import tempfile
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from edgeopt.backends.base import Backend, Recipe
from edgeopt.errors import BackendUnavailable, CandidateFailed, ConfigError
from edgeopt.records import Artifact

if TYPE_CHECKING:
    from collections.abc import Iterator

    from edgeopt.data import Dataset
    from edgeopt.records import Assessment, ModelRef

__all__ = ["ExecutionReport", "OpenVinoBackend", "OpenVinoRecipe", "OpenVinoSession", "inspect_compiled",
           "ir_sha256"]

log = logging.getLogger(__name__)

IR_FILES = ("model.xml", "model.bin")
_RUNTIME_KEYS = ("device", "performance_hint", "inference_precision", "intra_op_threads", "num_streams",
                 "compiled")  # 'compiled': what the build read back from the compiled model (informational)
_NNCF_PRECISIONS = ("int8", "int8-weights", "int4-weights")
#: exec-graph layer types that do the arithmetic (their precision is what "executes in" means)
_HEAVY_LAYERS = frozenset({"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul",
                           "ScaledDotProductAttention", "RNNSeq", "RNNCell"})
_BOOKKEEPING_LAYERS = frozenset({"Const", "Input", "Output"})
_UNSUPPORTED_MARKERS = ("not supported", "unsupported", "does not support", "not implemented",
                        "cannot create", "no creator")
_OOM_MARKERS = ("bad_alloc", "failed to allocate", "out of memory", "cannot allocate memory")
_PRECISION_NAME = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}

#: fields that mean something only for some recipes: (fields, applies?, what they apply to)
_SCOPED_FIELDS: tuple[tuple[tuple[str, ...], Any, str], ...] = (
    (("preset", "model_type", "subset_size", "fast_bias_correction", "max_accuracy_drop"),
     lambda r: r.precision == "int8", "precision='int8'"),
    (("accuracy_metric",), lambda r: r.max_accuracy_drop is not None, "max_accuracy_drop set"),
    (("ignored_types", "ignored_names"), lambda r: r.precision in _NNCF_PRECISIONS,
     "precision 'int8', 'int8-weights' or 'int4-weights'"),
    (("sym",), lambda r: r.precision in ("int8-weights", "int4-weights"),
     "precision 'int8-weights' or 'int4-weights'"),
    (("group_size", "ratio"), lambda r: r.precision == "int4-weights", "precision='int4-weights'"),
)


class OpenVinoRecipe(Recipe):
    """How OpenVINO (and NNCF) build and run one candidate."""

    precision: Literal["fp32", "fp16", "int8", "int8-weights", "int4-weights"] = Field(
        default="fp32",
        description="what the IR holds: 'fp32' as converted; 'fp16' weights compressed to FP16 (computed in "
        "inference_precision); 'int8' NNCF post-training quantization of weights and activations (needs "
        "calibration data); 'int8-weights' / 'int4-weights' NNCF weight compression (no data needed)")
    inference_precision: Literal["auto", "f32", "bf16", "f16"] = Field(
        default="f32",
        description="precision the device computes the float parts in; 'auto' keeps the device default "
        "(bf16 on CPUs with AVX512-BF16 or AMX, so an FP32 IR runs in bf16)")
    performance_hint: Literal["latency", "throughput"] = Field(
        default="latency", description="OpenVINO performance hint the model is compiled with")
    device: Literal["CPU", "GPU", "NPU", "AUTO"] = Field(
        default="CPU", description="OpenVINO device the model is compiled for (AUTO lets OpenVINO choose)")
    intra_op_threads: int | None = Field(
        default=None, ge=1, description="inference threads (INFERENCE_NUM_THREADS); None: the profile's default")
    num_streams: int | None = Field(
        default=None, ge=1, description="parallel inference streams; None: what performance_hint chooses")
    preset: Literal["auto", "performance", "mixed"] = Field(
        default="auto",
        description="int8: 'performance' symmetric weights and activations, 'mixed' asymmetric activations; "
        "'auto' is NNCF's choice (mixed for transformers, else performance)")
    model_type: Literal["auto", "transformer", "none"] = Field(
        default="auto",
        description="int8: 'transformer' adds NNCF's attention patterns; 'auto' picks it when the model has "
        "MatMul and Softmax or an 'input_ids' input")
    subset_size: int = Field(default=300, gt=0, description="int8: calibration samples NNCF collects statistics on")
    fast_bias_correction: bool = Field(
        default=True, description="int8: NNCF's fast bias correction (False: slower, often more accurate)")
    ignored_types: tuple[str, ...] = Field(
        default=(), description="NNCF: OpenVINO op types kept in float (e.g. 'Softmax', 'Multiply'); types "
        "absent from the model are noted and skipped")
    ignored_names: tuple[str, ...] = Field(
        default=(), description="NNCF: node names kept in float (as OpenVINO reads them, usually the ONNX "
        "node names); a name not in the model fails the build")
    max_accuracy_drop: float | None = Field(
        default=None, gt=0, lt=1,
        description="int8: when set, NNCF quantize_with_accuracy_control reverts layers to float until the "
        "absolute drop of accuracy_metric against the FP32 model's outputs (on the calibration samples, no "
        "labels needed) is at most this")
    accuracy_metric: Literal["auto", "top1_agreement", "cosine"] = Field(
        default="auto", description="accuracy control metric vs FP32 outputs; 'auto': top1_agreement for "
        "CNNs, cosine otherwise")
    sym: bool = Field(default=False, description="weight compression: symmetric weights (no zero point)")
    group_size: int = Field(
        default=128, ge=-1, description="int4-weights: weights per quantization group (-1: per channel)")
    ratio: float = Field(
        default=1.0, gt=0, le=1,
        description="int4-weights: share of layers in INT4, the rest in INT8 (NNCF picks by sensitivity)")

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

    def runtime_options(self) -> dict[str, Any]:
        return {"device": self.device, "performance_hint": self.performance_hint,
                "inference_precision": self.inference_precision, "intra_op_threads": self.intra_op_threads,
                "num_streams": self.num_streams}


@dataclass(frozen=True)
class ExecutionReport:
    """Where and in what precision a compiled model runs, read back from OpenVINO's exec graph."""

    target: str
    devices: tuple[str, ...]
    inference_precision: str
    nodes: int
    #: runtime precision -> share of executed nodes (Const/Input/Output left out)
    precision_shares: dict[str, float] = field(default_factory=dict)
    #: the same over the arithmetic layers only (Convolution, FullyConnected, MatMul, ...)
    compute_shares: dict[str, float] = field(default_factory=dict)

    @property
    def target_share(self) -> float | None:
        """Share of nodes on the target device: 1.0 all there, 0.0 fallen back, None unknown (AUTO/mixed)."""
        if self.target == "AUTO" or not self.devices:
            return None
        on_target = [d.split(".")[0] == self.target for d in self.devices]
        return 1.0 if all(on_target) else 0.0 if not any(on_target) else None

    @property
    def executes_in(self) -> str:
        """The precision most arithmetic runs in ('u8', 'f32', 'bf16', ...)."""
        shares = self.compute_shares or self.precision_shares
        return max(shares, key=shares.__getitem__) if shares else self.inference_precision

    def describe(self) -> list[str]:
        def hist(shares: dict[str, float]) -> str:
            return ", ".join(f"{p} {s:.0%}" for p, s in shares.items())

        share = self.target_share
        where = "" if share is None else f"; {share:.0%} of nodes on target {self.target}"
        lines = [f"compiled for {self.target}: inference precision {self.inference_precision}, executes on "
                 f"{', '.join(self.devices)}{where}",
                 f"exec precision: {hist(self.precision_shares)} of {self.nodes} nodes"]
        if self.compute_shares:
            lines.append(f"exec precision of conv/matmul layers: {hist(self.compute_shares)}")
        if share == 0.0:
            lines.append(f"FALLBACK: targets {self.target} but runs on {', '.join(self.devices)}")
        return lines

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"target_share": self.target_share, "executes_in": self.executes_in}


def inspect_compiled(compiled: Any, *, target: str) -> ExecutionReport:
    """Read devices, inference precision and the per-node runtime precision of a compiled model."""
    precisions: Counter[str] = Counter()
    compute: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer, precision = str(info["layerType"].astype(str)), str(info["runtimePrecision"].astype(str))
        if layer in _BOOKKEEPING_LAYERS:
            continue
        precisions[precision] += 1
        if layer in _HEAVY_LAYERS:
            compute[precision] += 1
    try:
        devices = tuple(str(d) for d in compiled.get_property("EXECUTION_DEVICES"))
    except RuntimeError:  # pragma: no cover - a plugin without the property
        devices = (target,)
    try:
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
    except RuntimeError:  # pragma: no cover - a plugin without the property
        precision = "n/a"
    total, heavy = sum(precisions.values()), sum(compute.values())
    return ExecutionReport(
        target=target, devices=devices, inference_precision=precision, nodes=total, precision_shares={p: n / total for p, n in precisions.most_common()},
        compute_shares={p: n / heavy for p, n in compute.most_common()} if heavy else {})


class OpenVinoSession:
    """An OpenVINO compiled model and one infer request behind the ``Session`` protocol."""

    def __init__(self, compiled: Any, *, device: str) -> None:
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self.device = device
        self.input_names: list[str] = [i.get_any_name() for i in compiled.inputs]
        self.output_names: list[str] = [o.get_any_name() for o in compiled.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        # inputs are read in place (no copy); outputs are copied, the caller may keep them across runs
        return list(self._request.infer(feeds, share_inputs=True, share_outputs=False).to_tuple())

    def execution(self) -> ExecutionReport:
        """Where and in what precision this session runs (fallback detection)."""
        return inspect_compiled(self._compiled, target=self.device)


def ir_sha256(folder: str | Path) -> str:
    """sha256 over an IR folder's ``model.xml`` and ``model.bin`` (names and bytes, in that order)."""
    h = hashlib.sha256()
    for name in IR_FILES:
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
    if any(m in text for m in _UNSUPPORTED_MARKERS):
        return "unsupported-op"
    return "build-error"


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

    def optimize(self, *, model: ModelRef, assessment: Assessment, recipe: Recipe, candidate: str,
                 out_dir: Path, calibration: Dataset | None = None) -> Artifact:
        if not isinstance(recipe, OpenVinoRecipe):
            raise ConfigError(f"{candidate}: the openvino backend needs an OpenVinoRecipe, "
                              f"got {type(recipe).__name__}")
        if model.format not in self.formats:
            raise CandidateFailed("build-error", f"{candidate}: openvino builds onnx models, got {model.format!r}")
        if recipe.needs_calibration() and calibration is None:
            raise CandidateFailed("missing-data",
                                  f"{candidate}: NNCF INT8 needs calibration data; pass --calibration DATA")
        self.check_available()
        if recipe.precision in _NNCF_PRECISIONS and importlib.util.find_spec("nncf") is None:
            raise BackendUnavailable(self.name, self.extra, "missing: nncf")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        final = out_dir / "model"
        log.info("%s: building OpenVINO %s from %s", candidate, recipe.precision, model.path)
        with tempfile.TemporaryDirectory(prefix=".build-", dir=out_dir) as tmp:
            built = Path(tmp) / "model"
            notes = _Builder(recipe=recipe, assessment=assessment, candidate=candidate).build(
                src=model.path, out=built, calibration=calibration)
            report = self._check(built, recipe=recipe, candidate=candidate, assessment=assessment)
            if final.exists():
                shutil.rmtree(final)
            os.replace(built, final)
        precision = _precision_label(recipe.precision, report)
        notes += report.describe()
        size = sum((final / n).stat().st_size for n in IR_FILES)
        log.info("%s: built %s (%d bytes), executes as %s", candidate, final, size, precision)
        return Artifact(candidate=candidate, backend=self.name, path=str(final), sha256=ir_sha256(final),
                        size_bytes=size, parent_sha256=model.sha256, precision=precision,
                        runtime=recipe.runtime_options() | {"compiled": report.as_dict()},
                        tool_versions=self.tool_versions(), notes=tuple(notes))

    def load(self, *, path: str, runtime: dict[str, Any]) -> OpenVinoSession:
        import openvino as ov

        device, config = _compile_config(runtime, who=str(path))
        return OpenVinoSession(ov.Core().compile_model(str(_xml(path)), device, config), device=device)

    def _check(self, folder: Path, *, recipe: OpenVinoRecipe, candidate: str,
               assessment: Assessment) -> ExecutionReport:
        """Compile the built IR as the benchmark will, run it once, and read back how it executes."""
        from edgeopt.data import synthetic_dataset

        try:
            session = self.load(path=str(folder), runtime=recipe.runtime_options())
            session.run(synthetic_dataset(assessment.inputs, count=1).sample(0))
            return session.execution()
        except (CandidateFailed, ConfigError):
            raise
        except Exception as exc:
            raise CandidateFailed(classify(exc), f"{candidate}: the built IR does not compile or run on "
                                  f"{recipe.device}: {_short(exc)}") from exc


def _xml(path: str | Path) -> Path:
    p = Path(path)
    return p / "model.xml" if p.is_dir() else p


def _compile_config(runtime: dict[str, Any], *, who: str) -> tuple[str, dict[str, Any]]:
    """``runtime_options()`` -> (device, compile properties); ConfigError or CandidateFailed('unavailable')."""
    import openvino as ov

    unknown = sorted(set(runtime) - set(_RUNTIME_KEYS))
    if unknown:
        raise ConfigError(f"unknown openvino runtime option(s) {', '.join(map(repr, unknown))}; "
                          f"allowed: {', '.join(_RUNTIME_KEYS)}")
    device = runtime.get("device") or "CPU"
    hint = runtime.get("performance_hint") or "latency"
    precision = runtime.get("inference_precision") or "auto"
    allowed = OpenVinoRecipe.model_fields
    for key, value in (("device", device), ("performance_hint", hint), ("inference_precision", precision)):
        choices = allowed[key].annotation.__args__  # type: ignore[union-attr]
        if value not in choices:
            raise ConfigError(f"{who}: {key} {value!r} is not allowed (allowed: {', '.join(choices)})")
    core = ov.Core()
    if device != "AUTO" and device not in {d.split(".")[0] for d in core.available_devices}:
        raise CandidateFailed("unavailable", f"{who}: OpenVINO device {device} is not available here "
                              f"(available: {', '.join(core.available_devices)})")
    config: dict[str, Any] = {"PERFORMANCE_HINT": hint.upper()}
    if precision != "auto":
        config["INFERENCE_PRECISION_HINT"] = precision
    if runtime.get("intra_op_threads"):
        config["INFERENCE_NUM_THREADS"] = int(runtime["intra_op_threads"])
    if runtime.get("num_streams"):
        config["NUM_STREAMS"] = int(runtime["num_streams"])
    return device, config


def _precision_label(precision: str, report: ExecutionReport) -> str:
    """What the artifact executes in: 'fp32', 'bf16', 'int8+fp32', 'fp16w+fp32', 'int4w+fp32', ..."""
    floats = {p: s for p, s in (report.compute_shares or report.precision_shares).items() if p in _PRECISION_NAME}
    float_part = _PRECISION_NAME[max(floats, key=floats.__getitem__)] if floats else \
        _PRECISION_NAME.get(report.inference_precision, report.inference_precision)
    prefix = {"fp32": "", "fp16": "fp16w+", "int8": "int8+", "int8-weights": "int8w+", "int4-weights": "int4w+"}
    return prefix[precision] + float_part


class _Builder:
    """ONNX → (NNCF) → IR folder for one recipe; returns notes; classifies toolchain failures."""

    def __init__(self, *, recipe: OpenVinoRecipe, assessment: Assessment, candidate: str) -> None:
        self.recipe, self.assessment, self.candidate = recipe, assessment, candidate

    def build(self, *, src: str, out: Path, calibration: Dataset | None) -> list[str]:
        import openvino as ov

        r, step = self.recipe, "reading the ONNX model"
        try:
            # Core.read_model and ov.convert_model share the ONNX frontend; convert_model also sends
            # telemetry from a subprocess (1-3 s offline), which an offline build does not want.
            model = ov.Core().read_model(src)
            notes = [f"ONNX read by OpenVINO {ov.get_version().split('-')[0]}"]
            if r.precision == "int8":
                step = "NNCF quantization"
                assert calibration is not None  # checked in optimize()
                model = self._quantize(model, calibration, notes)
            elif r.precision in ("int8-weights", "int4-weights"):
                step = "NNCF weight compression"
                model = self._compress(model, notes)
            step = "saving the IR"
            out.mkdir()
            ov.save_model(model, str(out / "model.xml"), compress_to_fp16=r.precision == "fp16")
            notes.append("IR weights: fp16" if r.precision == "fp16" else f"IR: {r.precision}")
            return notes
        except (CandidateFailed, BackendUnavailable):
            raise
        except Exception as exc:  # toolchain errors of every kind are classified here
            log.debug("%s: %s failed", self.candidate, step, exc_info=True)
            raise CandidateFailed(classify(exc), f"{self.candidate}: {step} failed: {_short(exc)}") from exc

    def _ignored_scope(self, nncf: Any, model: Any, notes: list[str]) -> Any:
        r = self.recipe
        if not (r.ignored_types or r.ignored_names):
            return None
        names = {op.get_friendly_name() for op in model.get_ops()}
        types = {op.get_type_name() for op in model.get_ops()}
        missing = [n for n in r.ignored_names if n not in names]
        if missing:
            raise CandidateFailed("build-error", f"{self.candidate}: ignored_names {missing} are not nodes of "
                                  f"the model (some nodes: {', '.join(sorted(names)[:8])})")
        absent = [t for t in r.ignored_types if t not in types]
        if absent:
            notes.append(f"ignored_types not in this model: {', '.join(absent)}")
        kept = [t for t in r.ignored_types if t in types]
        notes.append(f"kept in float: {', '.join(list(r.ignored_names) + kept)}")
        return nncf.IgnoredScope(names=list(r.ignored_names), types=kept, validate=False)

    def _quantize(self, model: Any, calibration: Dataset, notes: list[str]) -> Any:
        nncf = _import_nncf()
        r, a = self.recipe, self.assessment
        names = [i.get_any_name() for i in model.inputs]
        missing = sorted(set(names) - set(calibration.inputs))
        if missing:
            raise CandidateFailed("missing-data", f"{self.candidate}: calibration data has no array for "
                                  f"input(s) {', '.join(missing)}")
        items = [{n: calibration.sample(i)[n] for n in names} for i in range(calibration.count)]
        model_type = r.model_type
        if model_type == "auto":
            ops = a.op_histogram
            attention = "MatMul" in ops and "Softmax" in ops
            model_type = "transformer" if attention or any("input_ids" in s.name for s in a.inputs) else "none"
        subset = min(r.subset_size, len(items))
        kwargs: dict[str, Any] = {
            "subset_size": subset, "fast_bias_correction": r.fast_bias_correction,
            "target_device": getattr(nncf.TargetDevice, "ANY" if r.device == "AUTO" else r.device),
            "ignored_scope": self._ignored_scope(nncf, model, notes),
            "model_type": nncf.ModelType.TRANSFORMER if model_type == "transformer" else None,
            "preset": None if r.preset == "auto" else getattr(nncf.QuantizationPreset, r.preset.upper())}
        notes.append(f"NNCF INT8 PTQ: preset {r.preset}, model_type {model_type}, {subset} of "
                     f"{len(items)} calibration samples, fast_bias_correction {r.fast_bias_correction}")
        dataset = nncf.Dataset(items)
        with _quiet_nncf():
            if r.max_accuracy_drop is None:
                return nncf.quantize(model, dataset, **kwargs)
            metric = r.accuracy_metric if r.accuracy_metric != "auto" else (
                "top1_agreement" if a.kind == "cnn" else "cosine")
            validate = _fidelity_fn(model, items, metric)
            quantized = nncf.quantize_with_accuracy_control(
                model, dataset, nncf.Dataset(items), validate, max_drop=r.max_accuracy_drop,
                drop_type=nncf.DropType.ABSOLUTE, **kwargs)
        import openvino as ov

        achieved, _ = validate(ov.Core().compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}),
                               items)
        notes.append(f"accuracy control: {metric} vs FP32 outputs on {len(items)} calibration samples "
                     f"{achieved:.4f} (max absolute drop {r.max_accuracy_drop})")
        return quantized

    def _compress(self, model: Any, notes: list[str]) -> Any:
        nncf = _import_nncf()
        r = self.recipe
        bits = "INT4" if r.precision == "int4-weights" else "INT8"
        mode = getattr(nncf.CompressWeightsMode, f"{bits}_{'SYM' if r.sym else 'ASYM'}")
        kwargs: dict[str, Any] = {"mode": mode, "ignored_scope": self._ignored_scope(nncf, model, notes)}
        if bits == "INT4":
            kwargs |= {"group_size": r.group_size, "ratio": r.ratio}
        notes.append(f"NNCF weight compression {mode.value}"
                     + (f", group size {r.group_size}, ratio {r.ratio}" if bits == "INT4" else ""))
        with _quiet_nncf():
            return nncf.compress_weights(model, **kwargs)


def _fidelity_fn(model: Any, items: list[dict[str, np.ndarray]], metric: str) -> Any:
    """An NNCF validation_fn: agreement of the first output with the FP32 model's, per sample (no labels)."""
    import openvino as ov

    reference = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    expected = [np.asarray(reference(feeds)[0], dtype=np.float64).ravel() for feeds in items]

    def validate(compiled: Any, data: Any) -> tuple[float, list[float]]:
        scores = []
        for i, feeds in enumerate(data):
            got, want = np.asarray(compiled(feeds)[0], dtype=np.float64).ravel(), expected[i]
            if metric == "top1_agreement":
                scores.append(float(got.argmax() == want.argmax()))
            else:
                scores.append(float(got @ want / max(np.linalg.norm(got) * np.linalg.norm(want), 1e-12)))
        return float(np.mean(scores)), scores

    return validate


def _import_nncf() -> Any:
    # nncf 3.4 reads NNCF_CI only to replace its telemetry (GA4, sent from a subprocess) with a stub:
    # builds run offline and must not wait on the network
    os.environ.setdefault("NNCF_CI", "1")
    import nncf

    return nncf


_NNCF_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """NNCF logs to stdout with its own handler and draws progress bars there: send both to our log.

    Both are process-wide objects; the lock keeps concurrent builds from restoring them out of order.
    """
    nncf_log = logging.getLogger("nncf")
    buffer = io.StringIO()
    with _NNCF_LOCK:
        handlers, propagate = nncf_log.handlers[:], nncf_log.propagate
        nncf_log.handlers, nncf_log.propagate = [], True
        try:
            with contextlib.redirect_stdout(buffer):
                yield
        finally:
            nncf_log.handlers, nncf_log.propagate = handlers, propagate
    if buffer.getvalue().strip():
        log.debug("nncf: %s", " | ".join(buffer.getvalue().strip().splitlines()))


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
