"""NNCF for the OpenVINO backends: post-training INT8 quantization (optionally accuracy-controlled)
and weight compression of an ONNX model read by OpenVINO, with NNCF's output sent to the debug log.

``Builder`` is the ONNX → (NNCF) → IR step of ``OpenVinoBackend``; optimum-intel's backend uses the
import, quieting and stable-naming helpers.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeopt.backends.base import STDOUT_LOCK, short_message
from edgeopt.backends.openvino import OpenVinoRecipe, classify
from edgeopt.errors import BackendUnavailable, CandidateFailed, ConfigError
from edgeopt.hardware import cpu_features, u8s8_saturates

if TYPE_CHECKING:
    from collections.abc import Iterator

    from edgeopt.data import Dataset
    from edgeopt.records import Assessment

__all__ = ["Builder", "NncfToDebug", "fidelity_fn", "import_nncf", "quiet_nncf", "stable_names"]

log = logging.getLogger(__name__)


class Builder:
    """ONNX → (NNCF) → IR folder for one recipe; returns notes; classifies toolchain failures."""

    def __init__(self, *, recipe: OpenVinoRecipe, assessment: Assessment, candidate: str) -> None:
        self.recipe, self.assessment, self.candidate = recipe, assessment, candidate

    def build(self, *, src: str, out: Path, calibration: Dataset | None) -> list[str]:
        import openvino as ov

        r, step = self.recipe, "reading the ONNX model"
        try:
            # read_model and ov.convert_model use the same ONNX frontend; convert_model also sends
            # telemetry from a subprocess (1-3 s per build here, offline), which a build must not wait on
            model = ov.Core().read_model(src)
            notes = [f"ONNX read by OpenVINO {ov.get_version().split('-')[0]}"]
            if r.precision == "int8":
                step = "NNCF quantization"
                assert calibration is not None  # checked in optimize()
                model = self._quantize(model, calibration, notes)
            elif r.precision != "fp32" and r.precision != "fp16":
                step = "NNCF weight compression"
                model = self._compress(model, notes)
            step = "saving the IR"
            stable_names(model)
            out.mkdir()
            ov.save_model(model, str(out / "model.xml"), compress_to_fp16=r.precision == "fp16")
            return [*notes, "IR weights: fp16" if r.precision == "fp16" else f"IR: {r.precision}"]
        except (CandidateFailed, BackendUnavailable, ConfigError):
            raise
        except Exception as exc:  # toolchain errors of every kind are classified here
            log.debug("%s: %s failed", self.candidate, step, exc_info=True)
            raise CandidateFailed(classify(exc), f"{self.candidate}: {step} failed: {short_message(exc)}") from exc

    def _ignored_scope(self, nncf: Any, model: Any, notes: list[str]) -> Any:
        r = self.recipe
        if not (r.ignored_types or r.ignored_names):
            return None
        names = {op.get_friendly_name() for op in model.get_ops()}
        types = {op.get_type_name() for op in model.get_ops()}
        missing = [n for n in r.ignored_names if n not in names]
        if missing:
            raise CandidateFailed("build-error", f"{self.candidate}: ignored_names {missing} are not "
                                  f"nodes of the model (some nodes: {', '.join(sorted(names)[:8])})")
        kept = [t for t in r.ignored_types if t in types]
        if len(kept) < len(r.ignored_types):
            absent = sorted(set(r.ignored_types) - types)
            notes.append(f"ignored_types not in this model: {', '.join(absent)}")
        notes.append(f"kept in float: {', '.join([*r.ignored_names, *kept]) or 'nothing'}")
        return nncf.IgnoredScope(names=list(r.ignored_names), types=kept, validate=False)

    def _quantize(self, model: Any, calibration: Dataset, notes: list[str]) -> Any:
        nncf = import_nncf()
        r, names = self.recipe, [i.get_any_name() for i in model.inputs]
        missing = sorted(set(names) - set(calibration.inputs))
        if missing:
            raise CandidateFailed("missing-data", f"{self.candidate}: calibration data has no array for "
                                  f"input(s) {', '.join(missing)}")
        items = [{n: calibration.sample(i)[n] for n in names} for i in range(calibration.count)]
        model_type = r.model_type
        if model_type == "auto":
            types = {op.get_type_name() for op in model.get_ops()}
            attention = "MatMul" in types and "Softmax" in types
            model_type = "transformer" if attention or any("input_ids" in n for n in names) else "none"
        subset = min(r.subset_size, len(items))
        kwargs: dict[str, Any] = {
            "subset_size": subset, "fast_bias_correction": r.fast_bias_correction,
            "target_device": getattr(nncf.TargetDevice, "ANY" if r.device == "AUTO" else r.device),
            "ignored_scope": self._ignored_scope(nncf, model, notes),
            "model_type": nncf.ModelType.TRANSFORMER if model_type == "transformer" else None,
            "preset": None if r.preset == "auto" else getattr(nncf.QuantizationPreset, r.preset.upper())}
        notes.append(f"NNCF INT8 PTQ: preset {r.preset}, model_type {model_type}, {subset} of "
                     f"{len(items)} calibration samples, fast_bias_correction {r.fast_bias_correction}")
        advanced = self._overflow_fix(nncf, notes)
        if r.accuracy_control and r.max_accuracy_drop is None:
            raise ConfigError(f"{self.candidate}: accuracy_control needs max_accuracy_drop (the flow sets it "
                              "from the profile's gates; set it in the recipe when building directly)")
        if r.max_accuracy_drop is None:
            with quiet_nncf():
                return nncf.quantize(model, nncf.Dataset(items), advanced_parameters=advanced, **kwargs)
        metric = r.control_metric(self.assessment.kind)
        # NNCF validates subsets of the raw items, so each carries its index into the FP32 outputs
        indexed = list(enumerate(items))
        validate = fidelity_fn(model, items, metric)
        with quiet_nncf():
            quantized = nncf.quantize_with_accuracy_control(
                model, nncf.Dataset(items), nncf.Dataset(indexed, lambda item: item[1]), validate,
                max_drop=r.max_accuracy_drop, drop_type=nncf.DropType.ABSOLUTE,
                advanced_quantization_parameters=advanced, **kwargs)
        import openvino as ov

        compiled = ov.Core().compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        achieved, _ = validate(compiled, indexed)
        notes.append(f"accuracy control: {metric} vs FP32 outputs on {len(items)} calibration samples "
                     f"{achieved:.4f} (max absolute drop {r.max_accuracy_drop})")
        return quantized

    def _overflow_fix(self, nncf: Any, notes: list[str]) -> Any:
        """NNCF's overflow fix on every Conv/MatMul (7-bit weights) where the CPU's u8×s8 kernels saturate
        (x86-64 without VNNI/AMX); None (NNCF's default: the first Conv only) elsewhere."""
        arch, flags = cpu_features()
        if self.recipe.device not in ("CPU", "AUTO") or not u8s8_saturates(arch=arch, isa_flags=flags):
            return None
        notes.append("NNCF overflow fix: enable (7-bit weights on every Conv/MatMul) — this CPU has no VNNI; "
                     "its u8×s8 kernels saturate otherwise")
        return nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix.ENABLE)

    def _compress(self, model: Any, notes: list[str]) -> Any:
        nncf = import_nncf()
        r = self.recipe
        bits = "INT4" if r.precision == "int4-weights" else "INT8"
        mode = getattr(nncf.CompressWeightsMode, f"{bits}_{'SYM' if r.sym else 'ASYM'}")
        kwargs: dict[str, Any] = {"mode": mode, "ignored_scope": self._ignored_scope(nncf, model, notes)}
        if bits == "INT4":
            kwargs |= {"group_size": r.group_size, "ratio": r.ratio}
        notes.append(f"NNCF weight compression {mode.value}"
                     + (f", group size {r.group_size}, ratio {r.ratio}" if bits == "INT4" else ""))
        with quiet_nncf():
            return nncf.compress_weights(model, **kwargs)


def stable_names(model: Any) -> None:
    """Rename nodes with OpenVINO's default name ``<Type>_<n>`` (n: a process-wide counter, which NNCF
    copies into its clones) by type and position, so the same model always saves the same XML."""
    ops = model.get_ordered_ops()

    def default(op: Any) -> bool:
        name = op.get_friendly_name()
        auto = re.fullmatch(rf"{re.escape(op.get_type_name())}_\d+", name)
        return name == op.get_name() or auto is not None

    taken = {op.get_friendly_name() for op in ops if not default(op)}
    for i, op in enumerate(ops):
        if default(op):
            name = f"{op.get_type_name()}_{i}"
            while name in taken:
                name += "_"
            op.set_friendly_name(name)
            taken.add(name)


def fidelity_fn(model: Any, items: list[dict[str, np.ndarray]], metric: str) -> Any:
    """An NNCF validation_fn over ``(index, feeds)`` items: first output vs the FP32 model's, per sample.

    With an ``attention_mask`` input, token outputs are mean-pooled over the real tokens first (the
    sentence embeddings the encoder gates compare): padding positions say nothing about quality.
    """
    import openvino as ov

    from edgeopt.evaluate.embedding import mean_pool

    def vector(out: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
        arr = np.asarray(out, dtype=np.float64)
        mask = feeds.get("attention_mask")
        if mask is not None and arr.ndim == 3 and tuple(mask.shape) == arr.shape[:2]:
            arr = mean_pool(arr, mask)
        return arr.ravel()

    reference = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    expected = [vector(reference(feeds)[0], feeds) for feeds in items]

    def validate(compiled: Any, data: Any) -> tuple[float, list[float]]:
        scores = []
        for index, feeds in data:
            got, want = vector(compiled(feeds)[0], feeds), expected[index]
            if metric == "top1_agreement":
                scores.append(float(got.argmax() == want.argmax()))
            else:
                scores.append(float(got @ want / max(np.linalg.norm(got) * np.linalg.norm(want), 1e-12)))
        return float(np.mean(scores)), scores

    return validate


def import_nncf() -> Any:
    # nncf 3.4 reads NNCF_CI only to swap its telemetry (GA4, sent from a subprocess) for a stub:
    # builds run offline and must not wait on the network
    os.environ.setdefault("NNCF_CI", "1")
    import nncf

    return nncf


class NncfToDebug(logging.Handler):
    """Forwards NNCF's records to this module's logger, its INFO chatter (tables, timings) as DEBUG."""

    def emit(self, record: logging.LogRecord) -> None:
        level = record.levelno if record.levelno > logging.INFO else logging.DEBUG
        log.log(level, "nncf: %s", record.getMessage())


@contextlib.contextmanager
def quiet_nncf() -> Iterator[None]:
    """NNCF logs to stdout through its own handler and draws progress bars there: send both to our log.

    Both are process-wide. The lock is the one the onnxruntime backend holds while it swaps sys.stdout,
    so concurrent builds (threads of one flow) never restore each other's streams out of order.
    """
    nncf_log, buffer = logging.getLogger("nncf"), io.StringIO()
    with STDOUT_LOCK:
        handlers, propagate = nncf_log.handlers[:], nncf_log.propagate
        nncf_log.handlers, nncf_log.propagate = [NncfToDebug()], False
        try:
            with contextlib.redirect_stdout(buffer):
                yield
        finally:
            nncf_log.handlers, nncf_log.propagate = handlers, propagate
    if buffer.getvalue().strip():
        log.debug("nncf: %s", " | ".join(buffer.getvalue().strip().splitlines()))
