"""ONNX Runtime backend: FP32 graph optimization, FP16 conversion, dynamic and static (QDQ) INT8.

Public surface: ``OrtRecipe`` (the typed recipe), ``OnnxRuntimeBackend`` and ``OrtSession``.
``onnx`` and ``onnxruntime`` are imported inside the functions, so recipes validate without them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from pydantic import Field, model_validator

from edgeopt.backends import ort_quantize
from edgeopt.backends.base import Backend, Recipe, short_message
from edgeopt.backends.ort_placement import placement
from edgeopt.data import file_sha256
from edgeopt.errors import CandidateFailed, ConfigError
from edgeopt.input_shapes import probe_feeds
from edgeopt.records import Artifact

if TYPE_CHECKING:

    import numpy as np

    from edgeopt.data import Dataset
    from edgeopt.records import Assessment, ModelRef

__all__ = ["PROVIDERS", "OnnxRuntimeBackend", "OrtRecipe", "OrtSession", "classify"]

log = logging.getLogger(__name__)

Level = Literal["disabled", "basic", "extended", "all"]
Provider = Literal["cpu", "cuda", "tensorrt", "coreml", "openvino", "dml"]

#: recipe name -> ONNX Runtime execution provider
PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "dml": "DmlExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider", "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
           "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
_RUNTIME_KEYS = ("intra_op_threads", "inter_op_threads", "execution_mode", "execution_provider",
                 "graph_optimization")
#: lower-case fragments of toolchain messages that classify a failure
_UNSUPPORTED_MARKERS = ("not_implemented", "could not find an implementation", "not supported", "unsupported")
_OOM_MARKERS = ("bad_alloc", "failed to allocate memory", "out of memory")

#: fields that mean something only for some recipes: (fields, applies?, what they apply to)
_SCOPED_FIELDS: tuple[tuple[tuple[str, ...], Any, str], ...] = (
    (("entropy_bins",), lambda r: r.calibration_method == "entropy", "calibration_method='entropy'"),
    (("calibration_method", "calibration_samples", "activation_type"),
     lambda r: r.quantization == "static", "quantization='static'"),
    (("weight_type", "per_channel", "reduce_range"),
     lambda r: r.precision == "int8", "precision='int8'"),
    (("nodes_to_exclude", "op_types_to_exclude"),
     lambda r: r.precision != "fp32", "precision='fp16' or 'int8'"),
    (("op_types_to_quantize", "quantize_activation_matmuls"), lambda r: r.precision == "int8", "precision='int8'"),
    (("num_heads", "hidden_size"), lambda r: r.transformer_fusion != "none", "transformer_fusion='bert'"),
)


class OrtRecipe(Recipe):
    """How ONNX Runtime builds and runs one candidate."""

    precision: Literal["fp32", "fp16", "int8"] = Field(default="fp32", description="precision it computes in")
    quantization: Literal["none", "dynamic", "static"] = Field(
        default="none",
        description="INT8 scheme: 'dynamic' quantizes activations at run time (no data needed), 'static' "
        "inserts QuantizeLinear/DequantizeLinear pairs with ranges from calibration data; int8 needs "
        "'dynamic' or 'static', fp32/fp16 need 'none'")
    calibration_method: Literal["minmax", "entropy", "percentile"] = Field(
        default="minmax", description="how static INT8 turns calibration activations into ranges")
    entropy_bins: int = Field(
        default=512, ge=256,
        description="histogram bins the entropy method searches its clipping threshold over (128 quantized "
        "levels; onnxruntime's own 128 leave only the full range, i.e. min-max); more bins search finer "
        "and take longer (in onnxruntime's Python search, about half a second per tensor at 512)")
    calibration_samples: int = Field(
        default=128, gt=0, description="how many calibration samples (the first N, batch 1) static INT8 runs")
    per_channel: bool = Field(default=True, description="INT8: one weight scale per output channel")
    reduce_range: bool | None = Field(
        default=None,
        description="INT8: 7-bit weights, so that the u8×s8 kernels of x86-64 CPUs without VNNI cannot saturate "
        "(ONNX Runtime's advice for those CPUs; costs a bit of weight precision). None: chosen from the CPU "
        "the build runs on — on for int8 weights on x86-64 without VNNI/AMX (dynamic INT8: only if no Conv is "
        "quantized, its ConvInteger does not saturate), off elsewhere; the notes say which and why")
    activation_type: Literal["int8", "uint8"] = Field(
        default="uint8", description="static INT8 activation type (uint8 with int8 weights suits x86 VNNI)")
    weight_type: Literal["int8", "uint8"] = Field(
        default="int8", description="INT8 weight type; 'uint8' (U8U8) cannot saturate on x86-64 without VNNI "
        "either and keeps 8-bit weights, but runs on slower kernels than int8 with reduce_range")
    nodes_to_exclude: tuple[str, ...] = Field(default=(), description="node names kept in float (fp16/int8)")
    op_types_to_exclude: tuple[str, ...] = Field(default=(), description="op types kept in float (fp16/int8)")
    op_types_to_quantize: tuple[str, ...] = Field(
        default=(), description="int8: only these op types are quantized (e.g. [MatMul]); empty: every op type "
        "the quantizer supports")
    quantize_activation_matmuls: bool = Field(
        default=True, description="int8: False keeps MatMuls of two activations (attention's Q·Kᵀ and "
        "scores·V) in float")
    transformer_fusion: Literal["none", "bert"] = Field(
        default="none",
        description="'bert': ONNX Runtime's transformer optimizer fuses attention, layer norms and GELU into "
        "its contrib operators first (BERT-like encoders; fp32, or int8 quantized on top)")
    num_heads: int | None = Field(
        default=None, ge=1, description="transformer_fusion: attention heads; None: from the export's "
        "export.json, else read from the graph")
    hidden_size: int | None = Field(
        default=None, ge=1, description="transformer_fusion: hidden size; None: as num_heads")
    graph_optimization: Level = Field(
        default="all",
        description="level ONNX Runtime optimizes the fp32 graph at when building, saved into the artifact "
        "('all' may add hardware-specific fused ops); 'disabled' copies the model as-is (the FP32 baseline). "
        "fp16/int8 builds convert the original graph and are optimized when loaded")
    load_optimization: Level | None = Field(
        default=None,
        description="level the session optimizes at when the artifact is loaded; None: 'disabled' for a "
        "graph already optimized offline at 'all', else 'all' (ONNX Runtime's default)")
    intra_op_threads: int | None = Field(
        default=None, ge=1, description="threads inside one operator; None: the profile's default")
    inter_op_threads: int | None = Field(
        default=None, ge=1, description="threads across operators (parallel mode); None: profile's default")
    execution_mode: Literal["sequential", "parallel"] = Field(
        default="sequential", description="run independent operators one at a time or in parallel")
    execution_provider: Provider = Field(
        default="cpu",
        description="execution provider the session runs on (CPU is the fallback for the rest)")

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"unknown onnxruntime recipe field(s) {', '.join(map(repr, unknown))}; "
                                 f"allowed: {', '.join(cls.model_fields)}")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> OrtRecipe:
        if self.precision == "int8" and self.quantization == "none":
            raise ValueError("precision 'int8' needs quantization 'dynamic' or 'static' (received 'none')")
        if self.precision != "int8" and self.quantization != "none":
            raise ValueError(f"precision {self.precision!r} needs quantization 'none' "
                             f"(received {self.quantization!r}); use precision 'int8' to quantize")
        if self.transformer_fusion != "none" and self.precision == "fp16":
            raise ValueError("transformer_fusion applies with precision 'fp32' or 'int8' (received 'fp16')")
        for fields, applies, scope in _SCOPED_FIELDS:
            misplaced = [f for f in fields if f in self.model_fields_set]
            if misplaced and not applies(self):
                raise ValueError(f"{misplaced[0]!r} applies only with {scope} (received precision="
                                 f"{self.precision!r}, quantization={self.quantization!r}); remove it")
        return self

    def needs_calibration(self) -> bool:
        return self.quantization == "static"

    def runtime_options(self) -> dict[str, Any]:
        level = self.load_optimization
        if level is None:
            offline_all = (self.precision == "fp32" and self.graph_optimization == "all"
                           and self.transformer_fusion == "none")
            level = "disabled" if offline_all else "all"
        return {"intra_op_threads": self.intra_op_threads, "inter_op_threads": self.inter_op_threads,
                "execution_mode": self.execution_mode, "execution_provider": self.execution_provider,
                "graph_optimization": level}


class OrtSession:
    """An ``onnxruntime.InferenceSession`` behind the ``Session`` protocol."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.input_names: list[str] = [i.name for i in session.get_inputs()]
        self.output_names: list[str] = [o.name for o in session.get_outputs()]
        self.providers: list[str] = list(session.get_providers())

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self._session.run(None, feeds))


def classify(exc: BaseException) -> str:
    """The ``CandidateFailed`` reason for a toolchain exception."""
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or any(m in text for m in _OOM_MARKERS):
        return "oom"
    if any(m in text for m in _UNSUPPORTED_MARKERS):
        return "unsupported-op"
    return "build-error"


class OnnxRuntimeBackend(Backend):
    """Builds ONNX candidates with ONNX Runtime's optimizer, float16 converter and quantizer."""

    name: ClassVar[str] = "onnxruntime"
    formats: ClassVar[frozenset[str]] = frozenset({"onnx"})
    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "gpu", "npu"})
    extra: ClassVar[str] = "onnxruntime"
    recipe_type: ClassVar[type[Recipe]] = OrtRecipe
    requires: ClassVar[tuple[str, ...]] = ("onnxruntime",)
    distributions: ClassVar[tuple[str, ...]] = ("onnxruntime", "onnx")
    calibrated_recipe: ClassVar[str] = "static INT8"

    def optimize(self, *, model: ModelRef, assessment: Assessment, recipe: Recipe, candidate: str,
                 out_dir: Path, calibration: Dataset | None = None) -> Artifact:
        self.check_request(model=model, recipe=recipe, candidate=candidate, calibration=calibration)
        recipe = cast(OrtRecipe, recipe)  # check_request raised for any other type
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        final = out_dir / "model.onnx"
        log.info("%s: building %s (%s) from %s", candidate, recipe.precision, recipe.quantization, model.path)
        # everything is built in a private folder inside out_dir; only the verified model moves out
        with tempfile.TemporaryDirectory(prefix=".build-", dir=out_dir) as tmp:
            built = Path(tmp) / "model.onnx"
            notes = self._build(model=model, recipe=recipe, candidate=candidate, out=built,
                                calibration=calibration)
            try:  # loaded and run once as the benchmark will, with the profiler saying where nodes ran
                opts, providers = _session_options(recipe.runtime_options(), who=candidate)
                where = placement(str(built), options=opts, providers=providers,  # at the run's shapes, if set
                                  feeds=probe_feeds(assessment.inputs, assessment.input_shapes))
            except CandidateFailed:
                raise
            except Exception as exc:
                message = f"{candidate}: the built model does not load and run: {short_message(exc)}"
                raise CandidateFailed(classify(exc), message) from exc
            notes += where.describe()
            os.replace(built, final)
        size = final.stat().st_size
        log.info("%s: built %s (%d bytes)", candidate, final, size)
        return Artifact(candidate=candidate, backend=self.name, path=str(final), sha256=file_sha256(final),
                        size_bytes=size, parent_sha256=model.sha256, precision=recipe.precision,
                        runtime=recipe.runtime_options(), tool_versions=self.tool_versions(),
                        notes=tuple(notes), placement=where.as_dict())

    def load(self, *, path: str, runtime: dict[str, Any]) -> OrtSession:
        import onnxruntime as ort

        opts, providers = _session_options(runtime, who=str(path))
        return OrtSession(ort.InferenceSession(str(path), sess_options=opts, providers=providers))

    # -- building ---------------------------------------------------------------------------------

    def _build(self, *, model: ModelRef, recipe: OrtRecipe, candidate: str, out: Path,
               calibration: Dataset | None) -> list[str]:
        step = "build"
        try:
            notes: list[str] = []
            src = model.path
            if recipe.transformer_fusion != "none":
                from edgeopt.backends.ort_transformers import fuse

                step = f"{recipe.transformer_fusion} transformer fusion"
                fused = out.parent / "fused.onnx"
                notes += fuse(src=src, out=fused if recipe.precision != "fp32" else out,
                              model_type=recipe.transformer_fusion, num_heads=recipe.num_heads,
                              hidden_size=recipe.hidden_size, candidate=candidate)
                if recipe.precision == "fp32":
                    return notes
                src = str(fused)
            if recipe.precision == "fp32" and recipe.graph_optimization == "disabled":
                step = "copy"
                shutil.copyfile(model.path, out)
                return ["copied unchanged"]
            if recipe.precision == "fp32":
                step = f"graph optimization ({recipe.graph_optimization})"
                return _optimize_graph(src=model.path, out=out, recipe=recipe, candidate=candidate)
            if recipe.precision == "fp16":
                step = "fp16 conversion"
                return _to_fp16(src=model.path, out=out, recipe=recipe)
            step = "quantization pre-processing"
            src = ort_quantize.pre_process(src=src, out=out.parent / "preprocessed.onnx", candidate=candidate,
                               notes=notes)
            if recipe.quantization == "dynamic":
                step = "dynamic quantization"
                return notes + ort_quantize.quantize_dynamic(src=src, out=out, recipe=recipe)
            assert calibration is not None  # checked in optimize()
            step = "static quantization"
            return notes + ort_quantize.quantize_static(src=src, out=out, recipe=recipe, candidate=candidate,
                                            calibration=calibration)
        except CandidateFailed:
            raise
        except Exception as exc:  # toolchain errors of every kind are classified here
            log.debug("%s: %s failed", candidate, step, exc_info=True)
            raise CandidateFailed(classify(exc), f"{candidate}: {step} failed: {short_message(exc)}") from exc


def _session_options(runtime: dict[str, Any], *, who: str) -> tuple[Any, list[str]]:
    """``runtime_options()`` -> (SessionOptions, providers); ConfigError or CandidateFailed('unavailable')."""
    import onnxruntime as ort

    unknown = sorted(set(runtime) - set(_RUNTIME_KEYS))
    if unknown:
        raise ConfigError(f"unknown onnxruntime runtime option(s) {', '.join(map(repr, unknown))}; "
                          f"allowed: {', '.join(_RUNTIME_KEYS)}")
    provider_key = runtime.get("execution_provider") or "cpu"
    level = runtime.get("graph_optimization") or "all"
    mode = runtime.get("execution_mode") or "sequential"
    if provider_key not in PROVIDERS or level not in _LEVELS or mode not in ("sequential", "parallel"):
        raise ConfigError(f"{who}: execution_provider {provider_key!r} / graph_optimization {level!r} / "
                          f"execution_mode {mode!r}; allowed: {', '.join(PROVIDERS)} / {', '.join(_LEVELS)} / "
                          "sequential, parallel")
    provider, available = PROVIDERS[provider_key], ort.get_available_providers()
    if provider not in available:
        raise CandidateFailed("unavailable", f"{who}: execution provider {provider} is not available here "
                              f"(available: {', '.join(available)})")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = int(runtime.get("intra_op_threads") or 0)
    opts.inter_op_num_threads = int(runtime.get("inter_op_threads") or 0)
    opts.execution_mode = getattr(ort.ExecutionMode, f"ORT_{mode.upper()}")
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    return opts, [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]


def _optimize_graph(*, src: str, out: Path, recipe: OrtRecipe, candidate: str) -> list[str]:
    import onnxruntime as ort

    runtime = recipe.runtime_options() | {"graph_optimization": recipe.graph_optimization}
    opts, providers = _session_options(runtime, who=candidate)
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(src, sess_options=opts, providers=providers)
    notes = [f"graph optimized offline at level {recipe.graph_optimization} for {providers[0]}"]
    if recipe.graph_optimization == "all":
        notes.append("level 'all' may save hardware-specific fused ops: rebuild per machine")
    return notes


def _to_fp16(*, src: str, out: Path, recipe: OrtRecipe) -> list[str]:
    import onnx

    try:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    except ImportError:  # pragma: no cover - depends on the onnxruntime build
        from onnxconverter_common.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(recipe.op_types_to_exclude))
    converted = convert_float_to_float16(onnx.load(src), keep_io_types=True, op_block_list=block,
                                         node_block_list=list(recipe.nodes_to_exclude) or None)
    onnx.save(converted, str(out))
    notes = ["fp16 weights and compute, fp32 inputs/outputs"]
    if recipe.nodes_to_exclude or recipe.op_types_to_exclude:
        notes.append(f"kept in fp32: {', '.join(recipe.nodes_to_exclude + recipe.op_types_to_exclude)}")
    return notes
