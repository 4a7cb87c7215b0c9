"""Calibration and evaluation data: loading, validation against a model's inputs, synthesis.

Format (what ``--calibration`` / ``--eval`` accept for tensor models): a ``.npz`` file with one
array per model input, named as the input; an optional ``labels`` array (integer class per sample)
makes evaluation report labelled accuracy. Each array is read in one of two layouts, told apart by
its rank:

- **samples** (rank of the input): samples along the first axis, which stands for the model's batch
  axis (``input: [N, 3, 224, 224]`` for ``[batch, 3, 224, 224]``); batches are made of rows.
- **complete feeds** (rank of the input + 1): a leading sample axis in front of the input's full shape,
  batch included (``state: [N, 2, 1, 128]`` for ``[2, batch, 128]``, ``sr: [N]`` for a scalar): each
  sample is fed as it is. For inputs whose batch is not the first axis, scalars, and recurrent states
  (give the initial state of each sample this way, e.g. zeros).

A **folder** of ``.npz`` files holds one sample per file (each input at its full shape, batch included),
for inputs of varying size; see ``edgeopt.data_folder``.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from edgeopt.errors import DataError
from edgeopt.records import TensorSpec

__all__ = ["LABELS_KEY", "SYNTHETIC_SAMPLES", "Dataset", "file_sha256", "is_complete_feed", "load_dataset",
           "path_sha256", "synthetic_dataset", "write_synthetic"]

log = logging.getLogger(__name__)

LABELS_KEY = "labels"
Role = Literal["calibration", "evaluation", "production"]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def path_sha256(path: str | Path) -> str:
    """sha256 of a model file, or of a model folder: each file's relative path, NUL, bytes, sorted by path."""
    p = Path(path)
    if not p.is_dir():
        return file_sha256(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(f.relative_to(p).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Dataset:
    """Validated samples for a model's inputs (first axis = sample; for a folder of per-sample feeds, an
    object array of each sample's own array)."""

    path: str | None
    sha256: str
    inputs: dict[str, np.ndarray] = field(repr=False)
    labels: np.ndarray | None = field(default=None, repr=False)
    #: inputs stored as complete feeds (``arr[i]`` is sample i's whole input, batch included)
    feeds: frozenset[str] = field(default=frozenset())

    @property
    def count(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def sample(self, index: int, *, batch_size: int = 1) -> dict[str, np.ndarray]:
        """Feeds for samples ``index .. index+batch_size`` (wrapping around); a complete-feed input is
        sample ``index``'s own (it carries its batch)."""
        n = self.count
        idx = [(index + k) % n for k in range(batch_size)]
        # np.array: a scalar input's sample stays a 0-d array (indexing gives a numpy scalar)
        return {name: np.array(arr[index % n]) if name in self.feeds else arr[idx] for name, arr in self.inputs.items()}

    def head(self, count: int) -> Dataset:
        count = min(count, self.count)
        labels = None if self.labels is None else self.labels[:count]
        return Dataset(self.path, self.sha256, {k: v[:count] for k, v in self.inputs.items()}, labels, self.feeds)

    @property
    def per_sample(self) -> bool:
        """A folder of per-sample feeds (each sample at its own shape)."""
        return any(v.dtype == object for v in self.inputs.values())


def _dims_match(expected: tuple[int | str, ...], got: tuple[int, ...]) -> bool:
    """Samples layout: the data's first axis is the sample axis; it stands for the model's batch axis."""
    if len(expected) != len(got) or not expected:
        return False
    return _static_match(expected[1:], got[1:])


def _static_match(expected: tuple[int | str, ...], got: tuple[int, ...]) -> bool:
    return len(expected) == len(got) and all(not (isinstance(e, int) and e > 0) or e == g
                                             for e, g in zip(expected, got, strict=True))


def is_complete_feed(spec: TensorSpec, arr: np.ndarray) -> bool:
    """Whether ``arr`` holds complete feeds of ``spec`` (one more axis than the input: the sample axis)."""
    return arr.ndim == len(spec.shape) + 1


def load_dataset(path: str | Path, *, signature: tuple[TensorSpec, ...], role: Role) -> Dataset:
    """Load ``path`` and check it against the model inputs in ``signature``.

    Raises ``DataError`` with one line naming the file, the input and what to change.
    """
    p = Path(path)
    if p.is_dir():  # one sample per file, each at its own shape
        from edgeopt.data_folder import load_folder

        loaded = load_folder(p, signature=signature, role=role)
        return Dataset(str(p.resolve()), path_sha256(p), loaded["inputs"], loaded["labels"],
                       frozenset(loaded["inputs"]))
    if not p.is_file():
        raise DataError(f"{role} data {p}: no such file; pass an existing .npz file or a folder of per-sample .npz files")
    if p.suffix != ".npz" or not zipfile.is_zipfile(p):
        raise DataError(
            f"{role} data {p}: not a .npz file; save one array per model input with numpy.savez "
            f"(inputs: {', '.join(s.name for s in signature)})"
        )
    try:
        with np.load(p, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{role} data {p}: cannot be read ({exc}); re-save it with numpy.savez") from exc

    labels = arrays.pop(LABELS_KEY, None)
    expected = {s.name: s for s in signature}
    missing = sorted(set(expected) - set(arrays))
    unknown = sorted(set(arrays) - set(expected))
    if missing or unknown:
        raise DataError(
            f"{role} data {p}: arrays {sorted(arrays)} do not match the model inputs {sorted(expected)}"
            + (f" (missing: {', '.join(missing)})" if missing else "")
            + (f" (unexpected: {', '.join(unknown)})" if unknown else "")
            + f"; name one array per model input (plus optional '{LABELS_KEY}')"
        )
    counts = set()
    for name, arr in arrays.items():
        spec = expected[name]
        if arr.dtype != np.dtype(spec.dtype):
            raise DataError(
                f"{role} data {p}: input '{name}' has dtype {arr.dtype}, the model expects {spec.dtype}; "
                f"convert it with .astype('{spec.dtype}')"
            )
        complete = is_complete_feed(spec, arr)
        if complete and not _static_match(spec.shape, arr.shape[1:]):
            raise DataError(
                f"{role} data {p}: input '{name}' has shape {list(arr.shape)}: complete feeds of "
                f"{list(arr.shape[1:])}, the model expects {list(spec.shape)}; give an array of shape "
                f"(samples, {', '.join(map(str, spec.shape))})"
            )
        if not complete and not _dims_match(spec.shape, arr.shape):
            raise DataError(
                f"{role} data {p}: input '{name}' has shape {list(arr.shape)}, the model expects "
                f"{list(spec.shape)} with samples along the first axis"
                + ("" if spec.shape and isinstance(spec.shape[0], str) else
                   f", or complete feeds of shape (samples, {', '.join(map(str, spec.shape))})")
            )
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise DataError(
                f"{role} data {p}: input '{name}' contains {bad} NaN or inf values; "
                "clean or drop those samples before using it"
            )
        counts.add(arr.shape[0])
    if len(counts) != 1:
        raise DataError(f"{role} data {p}: inputs have different sample counts {sorted(counts)}; align them")
    (count,) = counts
    if count == 0:
        raise DataError(f"{role} data {p}: contains no samples")
    if labels is not None and (
        labels.ndim != 1 or labels.shape[0] != count or not np.issubdtype(labels.dtype, np.integer)
    ):
        raise DataError(
            f"{role} data {p}: '{LABELS_KEY}' must be a 1-D integer array with one class per sample "
            f"({count}); got shape {list(labels.shape)} dtype {labels.dtype}"
        )
    feeds = frozenset(n for n, arr in arrays.items() if is_complete_feed(expected[n], arr))
    return Dataset(str(p.resolve()), file_sha256(p), arrays, labels, feeds)


def _concrete_shape(spec: TensorSpec, batch_size: int, dynamic_size: int) -> tuple[int, ...]:
    dims = []
    for i, d in enumerate(spec.shape):
        if isinstance(d, int) and d > 0:
            dims.append(d)
        else:
            dims.append(batch_size if i == 0 else dynamic_size)
    return tuple(dims)


def synthetic_dataset(signature: tuple[TensorSpec, ...], *, count: int = 16, seed: int = 0,
                      dynamic_size: int = 16) -> Dataset:
    """Random inputs shaped like the model's signature, for when no evaluation data is given."""
    rng = np.random.default_rng(seed)
    inputs: dict[str, np.ndarray] = {}
    feeds = set()
    for spec in signature:
        if spec.shape and not (isinstance(spec.shape[0], int) and spec.shape[0] > 0):
            shape = _concrete_shape(spec, count, dynamic_size)  # samples replace the leading batch axis
        else:  # a static first axis or a scalar: complete feeds
            shape = (count, *_concrete_shape(spec, 1, dynamic_size))
            feeds.add(spec.name)
        dtype = np.dtype(spec.dtype)
        if np.issubdtype(dtype, np.floating):
            arr = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            arr = rng.integers(0, 2, shape).astype(dtype)
        else:
            arr = rng.integers(0, 2, shape).astype(dtype)
        inputs[spec.name] = arr
    digest = hashlib.sha256(repr((seed, count, dynamic_size, signature)).encode()).hexdigest()
    return Dataset(None, f"synthetic-{digest[:16]}", inputs, None, frozenset(feeds))


#: samples in the generated calibration/evaluation file of ``--synthetic-data``
SYNTHETIC_SAMPLES = 32


def write_synthetic(signature: tuple[TensorSpec, ...], *, out_dir: Path, count: int = SYNTHETIC_SAMPLES,
                    seed: int = 0) -> Path:
    """Generated data at ``signature``'s shapes (floats N(0, 1), integers 0/1) as an ``.npz`` in the layouts
    ``load_dataset`` reads, named by its digest (``--synthetic-data``: no real inputs, no labels)."""
    ds = synthetic_dataset(signature, count=count, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{ds.sha256}.npz"
    if not path.is_file():
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **ds.inputs)
        tmp.replace(path)
    return path
