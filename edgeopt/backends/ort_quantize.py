"""ONNX Runtime quantization for the ORT backend: pre-processing, dynamic and static (QDQ) INT8.

``reduce_range`` (7-bit weights) is chosen from the CPU the build runs on when the recipe leaves it
unset (``choose_reduce_range``): on x86-64 without VNNI, ONNX Runtime's u8×s8 kernels can saturate.
``onnxruntime.quantization`` prints calibration progress and logs its warnings on the root logger;
both go to this module's debug log (``_stdout_to_log``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
from inspect import signature
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeopt.backends.base import STDOUT_LOCK, short_message
from edgeopt.errors import CandidateFailed
from edgeopt.hardware import VNNI_FLAGS, cpu_features, u8s8_saturates

if TYPE_CHECKING:
    from collections.abc import Collection, Iterator

    import numpy as np

    from edgeopt.backends.onnxruntime import OrtRecipe
    from edgeopt.data import Dataset

__all__ = ["choose_reduce_range", "pre_process", "quantize_dynamic", "quantize_static"]

log = logging.getLogger(__name__)

_CALIBRATION = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


#: builds run in threads of one process, and a failed shape inference dumps into the shared working
#: directory under a fixed name: one pre-processing at a time, so each clean-up removes its own dump
_PRE_PROCESS_LOCK = threading.Lock()


def pre_process(*, src: str, out: Path, candidate: str, notes: list[str]) -> str:
    """Shape inference and graph clean-up before quantization; the raw model if that fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _PRE_PROCESS_LOCK:
            try:
                quant_pre_process(src, str(out))
            finally:
                _remove_shape_inference_dump()
    except Exception as exc:  # noqa: BLE001 - pre-processing is an improvement, not a requirement
        log.info("%s: quantization pre-processing failed, quantizing the raw model: %s",
                    candidate, short_message(exc))
        notes.append(f"pre-processing skipped: {short_message(exc, 120)}")
        return src
    return str(out)


def _remove_shape_inference_dump() -> None:
    """onnxruntime's symbolic shape inference, when incomplete, dumps ``sym_shape_infer_temp.onnx``
    and its external data into the working directory: remove them, they are not ours to leave."""
    import onnx

    dump = Path("sym_shape_infer_temp.onnx")
    if not dump.is_file():
        return
    with contextlib.suppress(Exception):
        model = onnx.load(str(dump), load_external_data=False)
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        for loc in locations:
            if "/" not in loc and Path(loc).is_file():
                Path(loc).unlink()
    dump.unlink(missing_ok=True)


def _op_types(registry: dict[str, Any], recipe: OrtRecipe) -> list[str] | None:
    """The op types to quantize: ``op_types_to_quantize`` if given, else the registry's minus the
    excluded ones; None (the quantizer's default) when the recipe names neither."""
    if recipe.op_types_to_quantize:
        return sorted(set(recipe.op_types_to_quantize) - set(recipe.op_types_to_exclude))
    return sorted(set(registry) - set(recipe.op_types_to_exclude)) if recipe.op_types_to_exclude else None


def _excluded_nodes(src: str, recipe: OrtRecipe, notes: list[str]) -> list[str] | None:
    """``nodes_to_exclude``, plus every MatMul of two activations when the recipe keeps those in float
    (attention's Q·Kᵀ and scores·V: quantizing them per tensor costs transformers most accuracy)."""
    nodes = list(recipe.nodes_to_exclude)
    if not recipe.quantize_activation_matmuls:
        import onnx

        graph = onnx.load(src, load_external_data=False).graph
        constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                             for o in n.output}
        both = [n.name for n in graph.node if n.op_type == "MatMul" and not set(n.input) & constants]
        nodes += [n for n in both if n not in nodes]
        notes.append(f"kept in float: {len(both)} MatMul(s) of two activations")
    return nodes or None


#: fused contrib operators (e.g. ``Attention``) have no ONNX shape inference: their outputs are float
_QUANT_OPTIONS = {"DefaultTensorType": 1}  # onnx.TensorProto.FLOAT


#: execution providers whose quantized ops run on this CPU's integer kernels (OpenVINO's: on its default CPU)
_CPU_KERNEL_PROVIDERS = ("cpu", "openvino")
#: ONNX Runtime's shorthand for a type in a format name (U8S8: uint8 activations, int8 weights)
_FORMAT = {"uint8": "U8", "int8": "S8"}


def _quant_type(quant_type: Any, name: str) -> Any:
    return quant_type.QInt8 if name == "int8" else quant_type.QUInt8


def choose_reduce_range(*, recipe: OrtRecipe, arch: str, isa_flags: Collection[str],
                        quantizes_conv: bool = False) -> tuple[bool, str]:
    """``reduce_range`` for this build and the note that says why.

    The recipe's value when it sets one. Otherwise on only where the model runs on this CPU's u8×s8
    kernels (the CPU provider, or OpenVINO's, whose CPU kernels have the same issue), those can saturate
    (``u8s8_saturates``: x86-64 without VNNI/AMX) and the weights are int8: U8U8 does not saturate. Static INT8 runs every quantized op on those kernels; dynamic INT8 runs MatMuls on them
    but Convs as ``ConvInteger``, which computes exactly, so there 7-bit weights only cost accuracy:
    with a Conv to quantize (``quantizes_conv``), dynamic stays at 8 bits.
    """
    on_cpu = recipe.execution_provider in _CPU_KERNEL_PROVIDERS
    risk = on_cpu and u8s8_saturates(arch=arch, isa_flags=isa_flags) and recipe.weight_type == "int8"
    activations = "uint8" if recipe.quantization == "dynamic" else recipe.activation_type
    fmt = _FORMAT[activations] + _FORMAT[recipe.weight_type]
    if recipe.reduce_range is not None:
        state = "on (7-bit weights)" if recipe.reduce_range else "off"
        warning = (f" — this CPU has no VNNI: {fmt} kernels may saturate (ONNX Runtime recommends reduce_range)"
                   if risk and not recipe.reduce_range else "")
        return recipe.reduce_range, f"reduce_range: {state}, set by the recipe{warning}"
    if risk and recipe.quantization == "dynamic" and quantizes_conv:
        return False, ("reduce_range: off — this CPU has no VNNI, but its ConvInteger does not saturate and "
                       "7-bit weights would cost the Convs accuracy (MatMuls may saturate: set reduce_range to trade)")
    if risk:
        return True, (f"reduce_range: on (7-bit weights) — this CPU has no VNNI ({', '.join(VNNI_FLAGS)}); "
                      f"ONNX Runtime recommends it to avoid {fmt} saturation")
    if not on_cpu:
        why = f"it runs on the {recipe.execution_provider} provider, not this CPU's int8 kernels"
    elif arch != "x86_64":
        why = f"{arch}: its int8 dot products do not saturate"
    elif recipe.weight_type == "uint8":
        why = f"{fmt} does not saturate"
    else:
        why = f"this CPU has {', '.join(f for f in VNNI_FLAGS if f in isa_flags)}: no {fmt} saturation"
    return False, f"reduce_range: off — {why}"


def _reduce_range(src: str, recipe: OrtRecipe, op_types: list[str] | None, notes: list[str]) -> bool:
    """``choose_reduce_range`` for this machine's CPU; its note goes into ``notes``."""
    arch, flags = cpu_features()
    quantizes_conv = False
    asked = recipe.reduce_range is None and recipe.quantization == "dynamic" and (op_types is None or "Conv" in op_types)
    if asked and u8s8_saturates(arch=arch, isa_flags=flags):  # read the graph only when the answer matters
        import onnx

        graph = onnx.load(src, load_external_data=False).graph
        quantizes_conv = any(n.op_type == "Conv" and n.name not in recipe.nodes_to_exclude for n in graph.node)
    value, note = choose_reduce_range(recipe=recipe, arch=arch, isa_flags=flags, quantizes_conv=quantizes_conv)
    log.debug("%s", note)
    notes.append(note)
    return value


def quantize_dynamic(*, src: str, out: Path, recipe: OrtRecipe) -> list[str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    notes = [f"dynamic int8: uint8 activations, {recipe.weight_type} weights"
             + (", per-channel" if recipe.per_channel else "")]
    excluded = _excluded_nodes(src, recipe, notes)
    op_types = _op_types(IntegerOpsRegistry, recipe)
    reduce_range = _reduce_range(src, recipe, op_types, notes)
    with _stdout_to_log():
        quantize_dynamic(src, str(out), per_channel=recipe.per_channel, reduce_range=reduce_range,
                         weight_type=_quant_type(QuantType, recipe.weight_type), op_types_to_quantize=op_types,
                         nodes_to_exclude=excluded, extra_options=_QUANT_OPTIONS)
    return notes


def quantize_static(*, src: str, out: Path, recipe: OrtRecipe, candidate: str,
                     calibration: Dataset) -> list[str]:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry

    graph = onnx.load(src, load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    needed = [i.name for i in graph.input if i.name not in initializers]
    missing = sorted(set(needed) - set(calibration.inputs))
    if missing:
        raise CandidateFailed("missing-data", f"{candidate}: calibration data has no array for input(s) "
                              f"{', '.join(missing)} (has: {', '.join(sorted(calibration.inputs))})")
    count = min(recipe.calibration_samples, calibration.count)
    method = getattr(CalibrationMethod, _CALIBRATION[recipe.calibration_method])
    op_types = _op_types(QDQRegistry, recipe)
    notes = [f"static int8 (QDQ): {recipe.activation_type} activations, {recipe.weight_type} weights"
             + (", per-channel" if recipe.per_channel else ""),
             f"calibrated with {recipe.calibration_method} on {count} samples"]
    if count < recipe.calibration_samples:
        notes.append(f"calibration data has {count} samples, fewer than the "
                     f"{recipe.calibration_samples} asked")
    reduce_range = _reduce_range(src, recipe, op_types, notes)
    cache: Path | None = None
    if recipe.calibration_method == "entropy":
        reader = _DatasetReader(calibration, needed, count)
        cache = _entropy_ranges(src=src, work=out.parent, reader=reader, method=method,
                                op_types=op_types or list(QDQRegistry), bins=recipe.entropy_bins)
        notes.append(f"entropy threshold searched over {recipe.entropy_bins} histogram bins" if cache else
                     "entropy ranges from onnxruntime's 128-bin histogram (close to min-max)")
    with _stdout_to_log():
        quantize_static(src, str(out), _DatasetReader(calibration, needed, count),
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                        per_channel=recipe.per_channel, reduce_range=reduce_range,
                        activation_type=_quant_type(QuantType, recipe.activation_type),
                        weight_type=_quant_type(QuantType, recipe.weight_type),
                        nodes_to_exclude=_excluded_nodes(src, recipe, notes), calibrate_method=method,
                        calibration_providers=["CPUExecutionProvider"], extra_options=_QUANT_OPTIONS,
                        **({"calibration_cache_path": str(cache)} if cache else {}))
    return notes


def _entropy_ranges(*, src: str, work: Path, reader: _DatasetReader, method: Any, op_types: list[str],
                    bins: int) -> Path | None:
    """Entropy ranges from a ``bins``-bin histogram, saved as a calibration cache for ``quantize_static``.

    ``quantize_static`` makes the entropy histogram with as many bins as quantized levels (128), which
    leaves one candidate threshold, the full range: min-max under another name. None if this
    onnxruntime cannot take ranges from a calibration cache.
    """
    from onnxruntime.quantization import calibrate, quantize_static

    if "calibration_cache_path" not in signature(quantize_static).parameters:
        return None
    calibrator = calibrate.create_calibrator(
        Path(src), op_types, augmented_model_path=str(work / "augmented.onnx"), calibrate_method=method,
        providers=["CPUExecutionProvider"], extra_options={"num_bins": bins, "num_quantized_bins": 128})
    with _stdout_to_log():
        calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
    del calibrator
    cache = work / "entropy-ranges.json"
    calibrate.save_tensors_data(ranges, cache)
    return cache


class _DatasetReader:
    """ONNX Runtime calibration data reader: the first ``count`` samples, one at a time (batch 1)."""

    def __init__(self, data: Dataset, names: list[str], count: int) -> None:
        self._data, self._names, self._count, self._next = data, names, count, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._count:
            return None
        self._next += 1
        feeds = self._data.sample(self._next - 1)
        return {name: feeds[name] for name in self._names}

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return self._count


class _QuantizerToDebug(logging.Filter):
    """Root-logger records from onnxruntime's quantization package become debug records here."""

    def filter(self, record: logging.LogRecord) -> bool:
        if f"onnxruntime{os.sep}quantization" not in record.pathname:
            return True
        log.debug("onnxruntime: %s", record.getMessage())
        return False


@contextlib.contextmanager
def _stdout_to_log() -> Iterator[None]:
    """onnxruntime's calibrators print progress; send it to the debug log instead of stdout.

    ``redirect_stdout`` swaps a process-wide object: the lock keeps builds running in threads of one
    process (a flow's task runner) from restoring each other's streams out of order.
    """
    buffer = io.StringIO()
    quiet = _QuantizerToDebug()
    root = logging.getLogger()
    with STDOUT_LOCK, contextlib.redirect_stdout(buffer):
        root.addFilter(quiet)  # its warnings go to the root logger ("Axis 1 is out-of-range ...")
        try:
            yield
        finally:
            root.removeFilter(quiet)
    if buffer.getvalue().strip():
        log.debug("onnxruntime: %s", " | ".join(buffer.getvalue().strip().splitlines()))
