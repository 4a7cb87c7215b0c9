"""The shapes a model's inputs run at: ``--shape NAME=1x3x640x640``, the profile's ``input_shapes``,
the evaluation data, the profile's batch size.

A model input's dims are static (ints) or dynamic (a symbol such as ``batch``, ``height``, or ``?``).
For each input, in order:

1. a ``--shape`` for it, else the profile's ``input_shapes`` entry for that name (a profile serves many
   models: entries for inputs a model does not have are ignored); checked for rank and static dims;
2. else its dynamic dims from the evaluation data (one array per input, samples on the first axis);
3. else, for text models (``encoder``/``llm``), the sequence dims take the profile's ``seq_len``;
4. else it is refused: one line names the input, its dynamic dims and the flag to use.

The batch axis (a dim whose symbol names a batch — ``batch``, ``batch_size``, ``N`` — else a dynamic
first axis) always takes the profile's batch size. The result maps each input to its full shape.

The shapes travel with each artifact as ``runtime["input_shapes"]`` (so that a benchmark's cache key
changes with them) and are taken out before a backend loads the model (``edgeopt.bench.shapes.split_runtime``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np

from edgeopt.errors import ConfigError
from edgeopt.records import TensorSpec

__all__ = ["INPUT_SHAPES_KEY", "SHAPE_SETTING_KEY", "batch_axis", "describe", "parse_shapes", "probe_feeds",
           "registered_signature", "resolve_shapes", "shape_settings", "shaped_signature"]

#: the runtime key that carries the shapes an artifact is measured at
INPUT_SHAPES_KEY = "input_shapes"
#: the runtime key that marks an artifact measured at one of several shape settings (its label, e.g. ``1x3x640x640``)
SHAPE_SETTING_KEY = "shape_setting"
_BATCH_SYMBOL = re.compile(r"^(n|b|bs|batch|batch_size|batchsize|.*batch.*)$", re.IGNORECASE)
_SHAPE = re.compile(r"^\d+(x\d+)*$")

Shapes = dict[str, tuple[int, ...]]


def _text(shape: Iterable[int | str]) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def describe(shapes: Mapping[str, Iterable[int]]) -> str:
    """``x=1x3x640x640, sr=scalar``."""
    return ", ".join(f"{name}={_text(shape)}" for name, shape in shapes.items())


def parse_shapes(values: Iterable[str], *, source: str = "--shape") -> Shapes:
    """``["x=1x3x640x640", "sr=scalar"]`` → ``{"x": (1, 3, 640, 640), "sr": ()}`` (``ConfigError`` on bad syntax)."""
    shapes: Shapes = {}
    for value in values:
        name, sep, dims = value.partition("=")
        name, dims = name.strip(), dims.strip().lower()
        if not sep or not name or not (dims == "scalar" or _SHAPE.match(dims)):
            raise ConfigError(f"{source} {value!r}: write NAME=DxDx... with positive integer dims "
                              "(e.g. input=1x3x640x640), or NAME=scalar for a 0-d input")
        parsed = () if dims == "scalar" else tuple(int(d) for d in dims.split("x"))
        if any(d <= 0 for d in parsed):
            raise ConfigError(f"{source} {value!r}: dims must be positive integers")
        if name in shapes:
            raise ConfigError(f"{source} {value!r}: input '{name}' is given twice")
        shapes[name] = parsed
    return shapes


def shape_settings(values: Iterable[str]) -> list[list[str]]:
    """``--shape`` values split into shape settings: an input given k times (``--shape image=1x3x320x320
    --shape image=1x3x640x640``) makes k settings, each with one of its shapes and every input given once;
    ``[values]`` when no input is repeated. ``ConfigError`` when repeated inputs disagree in count."""
    values = list(values)
    by_name: dict[str, list[str]] = {}
    for v in values:
        by_name.setdefault(v.partition("=")[0].strip(), []).append(v)
    counts = {n: len(vs) for n, vs in by_name.items() if len(vs) > 1}
    if not counts:
        return [values]
    if len(set(counts.values())) != 1:
        raise ConfigError("--shape: inputs given several times make one benchmark setting per shape, so each must "
                          "be given the same number of times (got " + ", ".join(f"{n} x{c}" for n, c in counts.items())
                          + ")")
    k = next(iter(counts.values()))
    return [[vs[i] if len(vs) > 1 else vs[0] for vs in by_name.values()] for i in range(k)]


def batch_axis(spec: TensorSpec) -> int | None:
    """The axis that carries the batch: a dynamic dim whose symbol names a batch, else a dynamic first axis."""
    named = [i for i, d in enumerate(spec.shape) if isinstance(d, str) and _BATCH_SYMBOL.match(d)]
    if named:
        return named[0]
    if spec.shape and not (isinstance(spec.shape[0], int) and spec.shape[0] > 0):
        return 0
    return None


def _dynamic(spec: TensorSpec, axis: int | None) -> list[tuple[int, str]]:
    return [(i, str(d)) for i, d in enumerate(spec.shape) if i != axis and not (isinstance(d, int) and d > 0)]


def _given(spec: TensorSpec, shape: tuple[int, ...], *, batch_size: int, source: str) -> tuple[int, ...]:
    want = "(" + ", ".join(map(str, spec.shape)) + ")"
    if len(shape) != len(spec.shape):
        raise ConfigError(f"{source} {spec.name}={_text(shape)}: the input has {len(spec.shape)} dims "
                          f"{want}, not {len(shape)}; give {len(spec.shape)} dims")
    axis = batch_axis(spec)
    out = []
    for i, (model_dim, dim) in enumerate(zip(spec.shape, shape, strict=True)):
        if isinstance(model_dim, int) and model_dim > 0 and model_dim != dim:
            raise ConfigError(f"{source} {spec.name}={_text(shape)}: dim {i} is fixed at {model_dim} in the model "
                              f"{want}, not {dim}")
        out.append(batch_size if i == axis else dim)
    return tuple(out)


def _from_data(spec: TensorSpec, arr: np.ndarray, *, batch_size: int) -> tuple[int, ...] | None:
    if arr.ndim == len(spec.shape) + 1:  # complete feeds: each sample is the whole input, batch included
        return tuple(int(d) for d in arr.shape[1:])
    axis = batch_axis(spec)
    if axis not in (0, None) or arr.ndim != len(spec.shape):
        return None  # the data's first axis is its sample axis: it stands for a leading batch axis only
    return tuple(batch_size if i == axis else (d if isinstance(d, int) and d > 0 else int(arr.shape[i]))
                 for i, d in enumerate(spec.shape))


def resolve_shapes(inputs: tuple[TensorSpec, ...], *, given: Mapping[str, tuple[int, ...]],
                   defaults: Mapping[str, tuple[int, ...]], batch_size: int,
                   data: Mapping[str, np.ndarray] | None = None, seq_len: int | None = None) -> Shapes:
    """The full shape of every input (see the module docstring); ``ConfigError`` with one line otherwise."""
    names = [s.name for s in inputs]
    unknown = [n for n in given if n not in names]
    if unknown:
        raise ConfigError(f"--shape {unknown[0]}=...: the model has no input '{unknown[0]}' "
                          f"(inputs: {', '.join(names)})")
    shapes: Shapes = {}
    for spec in inputs:
        axis = batch_axis(spec)
        if spec.name in given:
            shapes[spec.name] = _given(spec, tuple(given[spec.name]), batch_size=batch_size, source="--shape")
            continue
        if spec.name in defaults:
            shapes[spec.name] = _given(spec, tuple(defaults[spec.name]), batch_size=batch_size,
                                       source="profile input_shapes")
            continue
        open_dims = _dynamic(spec, axis)
        if data is not None and spec.name in data:
            found = _from_data(spec, data[spec.name], batch_size=batch_size)
            if found is not None:
                shapes[spec.name] = found
                continue
        if open_dims and seq_len is not None:
            open_dims = []
            fill = seq_len
        else:
            fill = 0
        if open_dims:
            example = "x".join(str(batch_size) if i == axis else (str(d) if isinstance(d, int) and d > 0 else
                               (str(d).upper() if str(d).isidentifier() else "N")) for i, d in enumerate(spec.shape))
            raise ConfigError(
                f"input '{spec.name}' (shape {', '.join(map(str, spec.shape))}) has dynamic dims "
                f"{', '.join(sym for _, sym in open_dims)} that nothing sets: give them with "
                f"--shape {spec.name}={example} (or the profile's input_shapes), or pass --eval data")
        shapes[spec.name] = tuple(batch_size if i == axis else (d if isinstance(d, int) and d > 0 else fill)
                                  for i, d in enumerate(spec.shape))
    return shapes


def shaped_signature(inputs: tuple[TensorSpec, ...], shapes: Mapping[str, Iterable[int]] | None) -> tuple[TensorSpec, ...]:
    """``inputs`` with their resolved dims fixed; a leading batch axis keeps its symbol (it is the data's
    sample axis, batched by the profile's batch size when the model runs)."""
    if not shapes:
        return inputs
    out = []
    for spec in inputs:
        shape = shapes.get(spec.name)
        if shape is None or len(tuple(shape)) != len(spec.shape):
            out.append(spec)
            continue
        axis = batch_axis(spec)
        dims = tuple(spec.shape[i] if i == axis == 0 else int(d) for i, d in enumerate(shape))
        out.append(spec.model_copy(update={"shape": dims}))
    return tuple(out)


def probe_feeds(inputs: tuple[TensorSpec, ...], shapes: Mapping[str, Iterable[int]], *,
                seed: int = 0) -> dict[str, np.ndarray] | None:
    """One feed at ``shapes`` for a build's check run (floats N(0, 1), integer ids 1, token types 0);
    None when a shape is missing (the backend then probes its own way)."""
    if not shapes or any(s.name not in shapes for s in inputs):
        return None
    rng, feeds = np.random.default_rng(seed), {}
    for spec in inputs:
        shape, dtype = tuple(int(d) for d in shapes[spec.name]), np.dtype(spec.dtype)
        if np.issubdtype(dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[spec.name] = (np.zeros if "type" in spec.name else np.ones)(shape, dtype=dtype)
    return feeds


def registered_signature(inputs: tuple[TensorSpec, ...], *, runtime: Mapping, input_shapes: Mapping[str, Iterable[int]],
                         per_sample_inputs: Iterable[str] = ()) -> tuple[TensorSpec, ...]:
    """The inputs of a registered artifact at the shapes it was optimized and measured at: its
    ``runtime["input_shapes"]`` (else the run's ``input_shapes``), for certification and cross-validation
    (generated inputs and data checks at those shapes, not at 1 for every open dim); inputs that ran at
    each sample's own shape keep their open dims."""
    shapes = runtime.get(INPUT_SHAPES_KEY) or input_shapes or {}
    skip = set(per_sample_inputs)
    return shaped_signature(inputs, {k: v for k, v in shapes.items() if k not in skip})
