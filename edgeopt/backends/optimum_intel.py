"""optimum-intel backend: a Hugging Face checkpoint → OpenVINO IR through optimum-intel's exporter (the
"optimum-intel route", measured beside the ONNX → IR route of ``edgeopt.backends.openvino``), optionally
compressed (INT8 / INT4 weights) or quantized (static INT8) with optimum-intel's NNCF configurations.

The artifact is the same as the openvino backend's: a folder with ``model.xml`` and ``model.bin``, hashed by
``ir_sha256``, loaded by ``OpenVinoBackend.load`` (the measuring process needs only ``openvino``: optimum-intel,
torch and transformers are checked when a build starts). Each build is compiled and run once; what it really
executes in goes into ``Artifact.precision`` (the openvino backend's labels), ``notes`` and ``runtime['compiled']``.

Traps: with no quantization config the exporter compresses models of 1B+ parameters to INT8 weights on its own
(we always pass ``OVConfig(dtype='fp32')``); OpenVINO's converter sends telemetry (~2.5 s per export offline),
which is declined for the export only (``CI=true``, what its opt-in check reads).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

from pydantic import Field, field_validator, model_validator

from edgeopt.backends.base import Backend, Recipe, short_message
from edgeopt.backends.openvino import (
    OpenVinoBackend,
    OpenVinoRecipe,
    OpenVinoSession,
    classify,
    finish_ir,
)
from edgeopt.backends.ov_nncf import import_nncf, quiet_nncf, stable_names
from edgeopt.errors import BackendUnavailable, CandidateFailed, ConfigError
from edgeopt.records import Artifact

if TYPE_CHECKING:
    from collections.abc import Iterator

    from edgeopt.data import Dataset
    from edgeopt.records import Assessment, ModelRef

__all__ = ["OptimumIntelBackend", "OptimumIntelRecipe"]

log = logging.getLogger(__name__)

#: recipe task (optimum's name) -> optimum-intel model class
_MODEL_CLASSES = {"feature-extraction": "OVModelForFeatureExtraction",
                 "text-classification": "OVModelForSequenceClassification",
                 "text-generation": "OVModelForCausalLM"}
_TASK_SYNONYMS = {"sequence-classification": "text-classification", "causal-lm": "text-generation"}
#: the runtime fields, shared with OpenVinoRecipe (the same FieldInfo, so the same defaults and checks)
_RUNTIME_FIELDS = ("device", "performance_hint", "inference_precision", "intra_op_threads", "num_streams")
_OV_FIELDS = OpenVinoRecipe.model_fields
_SCOPED_FIELDS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("sym",), ("int8", "int8-weights", "int4-weights")),
    (("group_size", "ratio"), ("int4-weights",)),
    (("subset_size",), ("int8",)),
)
#: loggers forwarded to this module's logger while building (NNCF's: by quiet_nncf)
_NOISY_LOGGERS = ("optimum", "torch")


class OptimumIntelRecipe(Recipe):
    """How optimum-intel exports (and compresses or quantizes) one candidate, and how OpenVINO runs it."""

    precision: Literal["fp32", "int8-weights", "int4-weights", "int8"] = Field(
        default="fp32", description="what the IR holds: 'fp32' as exported; 'int8-weights' / 'int4-weights' "
        "OVWeightQuantizationConfig(bits=8 / 4) weight compression (no data needed); 'int8' static INT8 with "
        "OVQuantizationConfig (model_type transformer, SmoothQuant; needs calibration data)")
    task: Literal["feature-extraction", "text-classification", "text-generation"] = Field(
        default="feature-extraction", description="optimum export task; picks OVModelForFeatureExtraction, "
        "OVModelForSequenceClassification or OVModelForCausalLM (exported without KV cache: one forward pass). "
        "'sequence-classification' and 'causal-lm' are read as their optimum synonyms")
    sym: bool = Field(default=False, description="weights: symmetric (no zero point); int8: symmetric "
                      "activations too (NNCF preset 'performance' instead of 'mixed')")
    group_size: int = Field(default=128, ge=-1, description="int4-weights: group size (-1: per channel)")
    ratio: float = Field(default=1.0, gt=0, le=1,
                         description="int4-weights: share of layers in INT4, the rest INT8")
    subset_size: int = Field(default=300, gt=0, description="int8: calibration samples NNCF uses (the same "
                             "default as the openvino backend, so both routes calibrate alike)")
    device: Literal["CPU", "GPU", "NPU", "AUTO"] = _OV_FIELDS["device"]
    performance_hint: Literal["latency", "throughput"] = _OV_FIELDS["performance_hint"]
    inference_precision: Literal["auto", "f32", "bf16", "f16"] = _OV_FIELDS["inference_precision"]
    intra_op_threads: int | None = _OV_FIELDS["intra_op_threads"]
    num_streams: int | None = _OV_FIELDS["num_streams"]

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"unknown optimum-intel recipe field(s) {', '.join(map(repr, unknown))}; "
                                 f"allowed: {', '.join(cls.model_fields)}")
        return data

    @field_validator("task", mode="before")
    @classmethod
    def _task_synonym(cls, value: Any) -> Any:
        return _TASK_SYNONYMS.get(value, value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> OptimumIntelRecipe:
        for fields, precisions in _SCOPED_FIELDS:
            misplaced = [f for f in fields if f in self.model_fields_set]
            if misplaced and self.precision not in precisions:
                raise ValueError(f"{misplaced[0]!r} applies only with precision "
                                 f"{' or '.join(map(repr, precisions))} (received precision={self.precision!r}); "
                                 "remove it")
        if self.group_size == 0:
            raise ValueError("group_size must be -1 (per channel) or a positive group size (received 0)")
        return self

    def needs_calibration(self) -> bool:
        return self.precision == "int8"

    def runtime_options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _RUNTIME_FIELDS}

    def _saturates(self) -> bool:
        """True where the CPU's u8×s8 kernels saturate (x86-64 without VNNI/AMX): NNCF's overflow fix is
        then enabled on every layer (7-bit weights), as for the openvino backend's INT8."""
        from edgeopt.hardware import cpu_features, u8s8_saturates

        arch, flags = cpu_features()
        return self.device in ("CPU", "AUTO") and u8s8_saturates(arch=arch, isa_flags=flags)

    def quantization_config(self, *, samples: int = 0) -> Any:
        """This recipe as optimum-intel's config (None for fp32); ``samples``: calibration samples given."""
        from optimum.intel import OVQuantizationConfig, OVWeightQuantizationConfig

        if self.precision == "int8":
            return OVQuantizationConfig(sym=self.sym, num_samples=min(self.subset_size, samples) or None,
                                        overflow_fix="enable" if self._saturates() else "disable")
        if self.precision == "int8-weights":
            return OVWeightQuantizationConfig(bits=8, sym=self.sym)
        if self.precision == "int4-weights":
            return OVWeightQuantizationConfig(bits=4, sym=self.sym, group_size=self.group_size, ratio=self.ratio)
        return None


class OptimumIntelBackend(Backend):
    """Builds OpenVINO IR candidates from Hugging Face checkpoints with optimum-intel's exporter."""

    name: ClassVar[str] = "optimum-intel"
    formats: ClassVar[frozenset[str]] = frozenset({"hf"})
    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "gpu", "npu"})
    extra: ClassVar[str] = "optimum-intel"
    recipe_type: ClassVar[type[Recipe]] = OptimumIntelRecipe
    #: the measuring process needs only the runtime (optimum-intel imports in ~10 s); the build's
    #: toolchain (optimum-intel, torch, transformers, nncf) is checked when a build starts
    requires: ClassVar[tuple[str, ...]] = ("openvino",)
    distributions: ClassVar[tuple[str, ...]] = ("optimum-intel", "optimum", "openvino", "nncf", "transformers",
                                                "torch")
    calibrated_recipe: ClassVar[str] = "optimum-intel static INT8"

    def optimize(self, *, model: ModelRef, assessment: Assessment, recipe: Recipe, candidate: str,
                 out_dir: Path, calibration: Dataset | None = None) -> Artifact:
        self.check_request(model=model, recipe=recipe, candidate=candidate, calibration=calibration)
        recipe = cast(OptimumIntelRecipe, recipe)  # check_request raised for any other type
        needed = {"optimum.intel": "optimum-intel", "torch": "torch", "transformers": "transformers"}
        if recipe.precision != "fp32":
            needed["nncf"] = "nncf"
        missing = [dist for module, dist in needed.items() if not _found(module)]
        if missing:
            raise BackendUnavailable(self.name, self.extra, f"missing: {', '.join(missing)}")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        final = out_dir / "model"
        log.info("%s: exporting %s (%s) with optimum-intel, %s", candidate, model.path, recipe.task,
                 recipe.precision)
        # built in a private folder inside out_dir; only the compiled-and-run IR folder moves out
        with tempfile.TemporaryDirectory(prefix=".build-", dir=out_dir) as tmp:
            built = Path(tmp) / "model"
            notes = _build(recipe, src=model.path, tmp=Path(tmp), out=built, calibration=calibration,
                           candidate=candidate)
            return finish_ir(built=built, final=final, recipe=recipe, candidate=candidate, model=model,
                             backend=self.name, notes=notes, tool_versions=self.tool_versions())

    def load(self, *, path: str, runtime: dict[str, Any]) -> OpenVinoSession:
        """Compile ``path`` as the openvino backend does (the artifacts are the same kind of IR folder)."""
        return OpenVinoBackend().load(path=path, runtime=runtime)

    def warm(self, *, runtime: dict[str, Any]) -> None:
        """Warm the OpenVINO runtime as the openvino backend does (the same loader)."""
        OpenVinoBackend().warm(runtime=runtime)


def _found(module: str) -> bool:
    try:  # find_spec of 'a.b' imports 'a' and raises when 'a' is missing
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _build(recipe: OptimumIntelRecipe, *, src: str, tmp: Path, out: Path, calibration: Dataset | None,
           candidate: str) -> list[str]:
    """Export → (compress or quantize) → ``out/model.xml``; returns notes; classifies toolchain failures."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: everything is local
    nncf = import_nncf() if recipe.precision != "fp32" else None  # before optimum.intel, which imports it
    import openvino as ov
    import optimum.intel
    import transformers
    from optimum.exporters.openvino import main_export

    from edgeopt.intake.hf import quiet_transformers

    step = "export"
    try:
        with _quiet(), quiet_transformers(transformers):
            with _declined_telemetry():
                # dtype fp32: no fp16 weights, and no INT8 weights the exporter applies to 1B+ models unasked
                main_export(model_name_or_path=src, output=tmp / "export", task=recipe.task,
                            local_files_only=True, ov_config=optimum.intel.OVConfig(dtype="fp32"),
                            library_name="transformers")
            step = "loading the export"
            cls = getattr(optimum.intel, _MODEL_CLASSES[recipe.task])
            extra = {"use_cache": False} if recipe.task == "text-generation" else {}
            exported = cls.from_pretrained(str(tmp / "export"), compile=False, local_files_only=True, **extra)
            if len(exported.ov_models) != 1:
                raise CandidateFailed("build-error", f"{candidate}: optimum-intel exported "
                                      f"{len(exported.ov_models)} models ({', '.join(exported.ov_models)}); "
                                      "one model per candidate is supported")
            arch = (getattr(exported.config, "architectures", None) or [recipe.task])[0]
            notes = [f"optimum-intel export ({recipe.task}, {cls.__name__}) of {arch}, fp32 weights"]
            if recipe.precision != "fp32":
                step = "quantization" if recipe.precision == "int8" else "weight compression"
                notes.append(_quantize(exported, recipe, nncf, calibration, candidate))
            step = "saving the IR"
            (ov_model,) = exported.ov_models.values()
            # the default model name (Model<n>) and node names count exports process-wide: make them stable
            ov_model.set_friendly_name(arch)
            stable_names(ov_model)
            out.mkdir()
            ov.save_model(ov_model, str(out / "model.xml"), compress_to_fp16=False)
        return [*notes, f"IR: {recipe.precision}"]
    except (CandidateFailed, BackendUnavailable, ConfigError):
        raise
    except Exception as exc:  # toolchain errors of every kind are classified here
        log.debug("%s: %s failed", candidate, step, exc_info=True)
        raise CandidateFailed(_classify(exc), f"{candidate}: optimum-intel {step} failed: {short_message(exc)}") from exc


def _classify(exc: BaseException) -> str:
    """``classify``, plus an architecture transformers or the exporter does not know: 'unsupported-op'."""
    reason = classify(exc)
    return "unsupported-op" if reason == "build-error" and "recognize this architecture" in str(exc) else reason


def _quantize(exported: Any, recipe: OptimumIntelRecipe, nncf: Any, calibration: Dataset | None,
              candidate: str) -> str:
    """Compress or quantize ``exported`` in place with OVQuantizer; returns the note describing it."""
    from optimum.intel import OVConfig, OVQuantizer

    dataset, samples = None, 0
    if recipe.precision == "int8":
        assert calibration is not None  # check_request raised without it
        (ov_model,) = exported.ov_models.values()
        names = [i.get_any_name() for i in ov_model.inputs]
        missing = sorted(set(names) - set(calibration.inputs))
        if missing:
            raise CandidateFailed("missing-data", f"{candidate}: calibration data has no array for input(s) "
                                  f"{', '.join(missing)} (it has {', '.join(sorted(calibration.inputs))})")
        samples = calibration.count
        # one sample per item, as the openvino backend feeds NNCF; OVQuantizer wraps an nncf.Dataset as is
        items = [{n: calibration.sample(i)[n] for n in names} for i in range(samples)]
        dataset = nncf.Dataset(items)
    config = recipe.quantization_config(samples=samples)
    OVQuantizer(exported).quantize(calibration_dataset=dataset, ov_config=OVConfig(quantization_config=config))
    if recipe.precision == "int8":
        return (f"optimum-intel static INT8 (OVQuantizationConfig: model_type {config.model_type}, preset "
                f"{'performance' if config.sym else 'mixed'}, {config.num_samples} of {samples} calibration "
                f"samples, SmoothQuant NNCF default, overflow fix {config.overflow_fix}"
                f"{': this CPU has no VNNI, its u8xs8 kernels saturate otherwise' if config.overflow_fix == 'enable' else ''})")
    group = f", group size {config.group_size}, ratio {config.ratio}" if config.bits == 4 else ""
    return (f"optimum-intel weight compression (OVWeightQuantizationConfig: int{config.bits}_"
            f"{'sym' if config.sym else 'asym'}{group})")


class _ToDebug(logging.Handler):
    """Forwards a toolchain's records to this module's logger, its INFO chatter as DEBUG."""

    #: warnings that say nothing to a user of a local export (it looks the folder up as a hub id)
    BENIGN = ("Could not infer whether the model was already converted",)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        benign = record.levelno <= logging.INFO or message.startswith(self.BENIGN)
        log.log(logging.DEBUG if benign else record.levelno, "%s: %s", record.name.split(".")[0],
                " | ".join(message.splitlines()))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """optimum, torch and NNCF log and draw progress bars on stdout / stderr: send all of it to our log.

    ``quiet_nncf`` holds the process-wide lock for stdout swaps; stderr is swapped inside it.
    """
    buffer = io.StringIO()
    with quiet_nncf(), contextlib.redirect_stderr(buffer):
        loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
        saved = [(lg.handlers[:], lg.propagate) for lg in loggers]
        for lg in loggers:
            lg.handlers, lg.propagate = [_ToDebug()], False
        try:
            yield
        finally:
            for lg, (handlers, propagate) in zip(loggers, saved, strict=True):
                lg.handlers, lg.propagate = handlers, propagate
    if buffer.getvalue().strip():
        log.debug("stderr: %s", " | ".join(buffer.getvalue().strip().splitlines()[-20:]))


@contextlib.contextmanager
def _declined_telemetry() -> Iterator[None]:
    """OpenVINO's converter declines telemetry when ``CI=true`` (its only switch); set for the export only."""
    if "CI" in os.environ:
        yield
        return
    os.environ["CI"] = "true"
    try:
        yield
    finally:
        os.environ.pop("CI", None)
