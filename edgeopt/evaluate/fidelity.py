"""Accuracy and fidelity of a candidate's outputs against the FP32 baseline's, on the same samples.

Works on the first model output of each sample (samples along the first axis): class logits
``[N, C]``, per-position logits ``[N, T, C]``, embeddings ``[N, D]`` or anything ``[N, ...]``.
Outputs of shape ``[N]`` are taken as class ids (a model that emits its prediction).

- top-1 agreement: share of predictions (argmax over the last axis) equal to the baseline's;
- cosine similarity of each sample's flattened output with the baseline's (two zero vectors
  agree perfectly, 1.0; a zero vector against a non-zero one, 0.0); mean and minimum;
- largest absolute difference of any element;
- with labels, top-1 accuracy of the candidate and of the baseline; without, the agreement
  (the baseline agrees with itself: 1.0).
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np

from edgeopt.errors import CandidateFailed, DataError
from edgeopt.records import EvalResult

__all__ = ["OUTPUT_KEY", "cosine_per_sample", "evaluate_outputs", "load_outputs", "predictions"]

log = logging.getLogger(__name__)

#: Name of the first model output in the ``.npz`` file the benchmark worker writes.
OUTPUT_KEY = "output_0"

_REAL_KINDS = "biuf"  # bool, signed and unsigned integers, floats


def load_outputs(path: str | Path, *, key: str = OUTPUT_KEY) -> np.ndarray:
    """The array ``key`` (default ``output_0``) of an ``.npz`` written by the benchmark worker.

    A missing, unreadable or incomplete file makes the candidate's outputs unusable:
    ``CandidateFailed("accuracy", ...)`` naming the file and what it holds.
    """
    p = Path(path)
    if not p.is_file():
        raise CandidateFailed("accuracy", f"outputs file {p}: no such file (the benchmark worker wrote none)")
    try:
        with np.load(p, allow_pickle=False) as npz:
            if key not in npz.files:
                present = ", ".join(npz.files) or "none"
                raise CandidateFailed("accuracy", f"outputs file {p}: no array {key!r} (arrays: {present})")
            return np.asarray(npz[key])
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CandidateFailed("accuracy", f"outputs file {p}: not a readable .npz file ({exc})") from exc


def predictions(outputs: np.ndarray) -> np.ndarray:
    """Top-1 predictions, flattened per sample: ``[N, P]`` (P positions per sample, 1 for logits)."""
    n = outputs.shape[0]
    if outputs.ndim == 1:
        return outputs.reshape(n, 1)
    return np.argmax(outputs, axis=-1).reshape(n, -1)


def cosine_per_sample(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample of ``a`` with the same sample of ``b`` (flattened), ``[N]``.

    Each sample is scaled by its largest magnitude first, so large finite values do not overflow.
    Two zero vectors give 1.0; one zero vector gives 0.0.
    """
    n = a.shape[0]
    x = a.reshape(n, -1).astype(np.float64)
    y = b.reshape(n, -1).astype(np.float64)
    x = x / _row_scale(x)
    y = y / _row_scale(y)
    nx = np.linalg.norm(x, axis=1)
    ny = np.linalg.norm(y, axis=1)
    dot = np.einsum("ij,ij->i", x, y)
    both_nonzero = (nx > 0) & (ny > 0)
    cos = np.where(both_nonzero, dot / np.where(both_nonzero, nx * ny, 1.0), 0.0)
    cos = np.where((nx == 0) & (ny == 0), 1.0, cos)
    return np.clip(cos, -1.0, 1.0)


def _row_scale(x: np.ndarray) -> np.ndarray:
    scale = np.max(np.abs(x), axis=1, keepdims=True) if x.shape[1] else np.zeros((x.shape[0], 1))
    return np.where(scale > 0, scale, 1.0)


def _accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(preds == labels))


def _labels_like(labels: np.ndarray, preds: np.ndarray, candidate: str) -> np.ndarray:
    if labels.shape[0] != preds.shape[0] or labels.size != preds.size:
        raise DataError(
            f"{candidate}: labels of shape {labels.shape} do not match {preds.shape[0]} samples with "
            f"{preds.shape[1]} prediction(s) each; give one integer class per sample (and position)"
        )
    return labels.reshape(preds.shape)


def evaluate_outputs(
    *,
    candidate: str,
    outputs: np.ndarray,
    baseline_outputs: np.ndarray,
    labels: np.ndarray | None,
    baseline_value: float | None = None,
) -> EvalResult:
    """Compare a candidate's first output with the baseline's on the same ``N`` samples.

    ``labels`` (one class per sample, or per position) make the metric ``top1_accuracy`` of the
    candidate, with the baseline's accuracy as reference; without labels the metric is
    ``top1_agreement`` with the baseline (reference 1.0). ``baseline_value``, when given, replaces
    that reference (e.g. the baseline's accuracy measured elsewhere in the same run).

    Raises ``CandidateFailed("accuracy", ...)`` when the outputs are not finite or their shape
    differs from the baseline's; ``DataError`` when there are no samples or labels do not match.
    """
    out = np.asarray(outputs)
    base = np.asarray(baseline_outputs)
    if out.shape != base.shape:
        raise CandidateFailed(
            "accuracy", f"{candidate}: output shape {out.shape} differs from the baseline's {base.shape}"
        )
    if out.ndim == 0 or out.shape[0] == 0:
        raise DataError(f"{candidate}: no samples to evaluate (output shape {out.shape})")
    if out.dtype.kind not in _REAL_KINDS or base.dtype.kind not in _REAL_KINDS:
        raise CandidateFailed(
            "accuracy", f"{candidate}: outputs are not numeric (dtypes {out.dtype} and {base.dtype})"
        )
    if not np.all(np.isfinite(out)):
        raise CandidateFailed("accuracy", f"{candidate}: outputs contain NaN or inf")
    if not np.all(np.isfinite(base)):
        raise CandidateFailed("accuracy", f"{candidate}: the baseline's outputs contain NaN or inf")

    n = int(out.shape[0])
    preds = predictions(out)
    base_preds = predictions(base)
    agreement = float(np.mean(preds == base_preds))
    cos = cosine_per_sample(out, base)
    max_abs = float(np.max(np.abs(out.astype(np.float64) - base.astype(np.float64)))) if out.size else 0.0

    if labels is not None:
        lab = _labels_like(np.asarray(labels), preds, candidate)
        metric = "top1_accuracy"
        value = _accuracy(preds, lab)
        reference = _accuracy(base_preds, lab) if baseline_value is None else float(baseline_value)
    else:
        metric = "top1_agreement"
        value = agreement
        reference = 1.0 if baseline_value is None else float(baseline_value)

    result = EvalResult(
        candidate=candidate,
        metric=metric,
        value=value,
        baseline=reference,
        delta=value - reference,
        samples=n,
        top1_agreement=agreement,
        cosine_mean=float(np.mean(cos)),
        cosine_min=float(np.min(cos)),
        max_abs_error=max_abs,
    )
    log.debug("%s: %s %.4f (baseline %.4f), agreement %.4f, cosine mean %.5f over %d samples",
              candidate, metric, value, reference, agreement, result.cosine_mean, n)
    return result
