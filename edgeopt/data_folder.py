"""A folder of per-sample ``.npz`` feeds: inputs of varying size (images of different resolutions).

Each ``*.npz`` file in the folder is one sample: one array per model input at the input's full shape,
batch included (a complete feed, as ``edgeopt.data``'s second layout without the sample axis), plus an
optional integer ``labels`` array (``[batch]``: one class per row of the sample's batch). Samples are taken in file-name order (``0001.npz``, ``0002.npz``, ...):
the baseline and every candidate run the same files in the same order, each at its own shape.

Checked against the model's inputs, one line per problem, naming the file: array names, dtype, rank,
static dims (and the dims fixed by ``--shape`` or the profile, through the signature given), and dims
that share a symbol across inputs (``height`` of ``image`` and of ``mask``) must agree within a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.errors import DataError
from edgeopt.records import TensorSpec

__all__ = ["first_sample", "is_sample_folder", "load_folder"]

LABELS_KEY = "labels"


def is_sample_folder(path: str | Path | None) -> bool:
    return path is not None and Path(path).is_dir()


def _files(p: Path, role: str, signature: tuple[TensorSpec, ...]) -> list[Path]:
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix == ".npz")
    if not files:
        raise DataError(f"{role} data {p}: a folder with no .npz files; save one file per sample with numpy.savez "
                        f"(inputs: {', '.join(s.name for s in signature)}, each at its full shape)")
    return files


def _read(f: Path, role: str) -> dict[str, np.ndarray]:
    try:
        with np.load(f, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError) as exc:
        raise DataError(f"{role} data {f}: cannot be read ({exc}); re-save it with numpy.savez") from exc


def _check_sample(f: Path, arrays: dict[str, np.ndarray], *, signature: tuple[TensorSpec, ...], role: str) -> None:
    expected = {s.name: s for s in signature}
    names = set(arrays) - {LABELS_KEY}
    if names != set(expected):
        missing, unknown = sorted(set(expected) - names), sorted(names - set(expected))
        raise DataError(f"{role} data {f}: arrays {sorted(names)} do not match the model inputs {sorted(expected)}"
                        + (f" (missing: {', '.join(missing)})" if missing else "")
                        + (f" (unexpected: {', '.join(unknown)})" if unknown else "")
                        + f"; name one array per model input (plus optional '{LABELS_KEY}')")
    symbols: dict[str, tuple[str, int]] = {}
    for name, spec in expected.items():
        arr = arrays[name]
        want = "(" + ", ".join(map(str, spec.shape)) + ")"
        if arr.dtype != np.dtype(spec.dtype):
            raise DataError(f"{role} data {f}: input '{name}' has dtype {arr.dtype}, the model expects {spec.dtype}; "
                            f"convert it with .astype('{spec.dtype}')")
        if arr.ndim != len(spec.shape):
            raise DataError(f"{role} data {f}: input '{name}' has shape {list(arr.shape)}, the model expects {want}; "
                            "each file holds one sample at the input's full shape, batch included")
        for i, (d, got) in enumerate(zip(spec.shape, arr.shape, strict=True)):
            if isinstance(d, int) and d > 0 and d != got:
                raise DataError(f"{role} data {f}: input '{name}' has shape {list(arr.shape)}, the run needs "
                                f"{want} (dim {i} is {d}): this input takes one shape, so every sample must have it")
            if isinstance(d, str) and d not in ("?", ""):
                seen = symbols.setdefault(d, (name, int(got)))
                if seen[1] != got:
                    raise DataError(f"{role} data {f}: input '{name}' has {d}={got} where input '{seen[0]}' has "
                                    f"{d}={seen[1]}; the inputs of one sample must agree on their shared dims")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise DataError(f"{role} data {f}: input '{name}' contains NaN or inf values; clean or drop this sample")
    labels = arrays.get(LABELS_KEY)
    if labels is not None and (labels.ndim > 1 or not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(f"{role} data {f}: '{LABELS_KEY}' must be a 1-D integer array (one class per row of the "
                        f"sample's batch); got shape {list(labels.shape)} dtype {labels.dtype}")


def _objects(items: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, a in enumerate(items):
        out[i] = a
    return out


def load_folder(p: Path, *, signature: tuple[TensorSpec, ...], role: str) -> dict[str, Any]:
    """The folder's samples, checked: ``{"inputs": {name: object array of per-sample arrays}, "labels": ...}``."""
    files = _files(p, role, signature)
    samples = []
    for f in files:
        arrays = _read(f, role)
        _check_sample(f, arrays, signature=signature, role=role)
        samples.append(arrays)
    with_labels = [LABELS_KEY in s for s in samples]
    if any(with_labels) and not all(with_labels):
        missing = files[with_labels.index(False)]
        raise DataError(f"{role} data {p}: some files have '{LABELS_KEY}' and {missing.name} has none; give labels "
                        "in every file or in none")
    labels = np.concatenate([np.ravel(s[LABELS_KEY]) for s in samples]) if all(with_labels) else None
    inputs = {s.name: _objects([smp[s.name] for smp in samples]) for s in signature}
    return {"inputs": inputs, "labels": labels}


def first_sample(path: str | Path, *, signature: tuple[TensorSpec, ...]) -> dict[str, np.ndarray]:
    """The first file's arrays with a sample axis of one in front (complete feeds, for ``resolve_shapes``)."""
    f = _files(Path(path), "evaluation", signature)[0]
    return {k: v[None] for k, v in _read(f, "evaluation").items() if k != LABELS_KEY}
