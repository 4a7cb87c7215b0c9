"""Has production data moved away from what the model was calibrated on?

Each model input is compared feature by feature (a feature = one element of a sample's tensor; at
most ``MAX_FEATURES`` of them, evenly spaced, for large inputs) between the reference (the
calibration data) and a production sample:

* **PSI** (population stability index) per feature over ``BINS`` quantile bins of the reference:
  ``Σ (p_prod − p_ref) · ln(p_prod / p_ref)``, proportions floored at ``1e-4``. For two Gaussians that
  differ by a mean shift of ``d`` standard deviations it approaches ``d²`` (Jeffreys divergence) as the
  bins get finer; the usual reading: < 0.1 stable, 0.1–0.2 moderate, > 0.2 significant shift;
* **Kolmogorov–Smirnov** two-sample test per feature; a feature is flagged when its p-value is below
  ``ks_pvalue / features`` (Bonferroni: the chance of any false flag over all features stays ``ks_pvalue``).

An input has drifted when its mean PSI exceeds ``psi_threshold`` or more than ``KS_SHARE`` of its
features are flagged. Integer inputs (token ids of a text model) are not compared as numbers:
for those the caller passes the model's **embeddings** (its FP32 outputs, pooled over the sequence)
as the features, and the report adds the embedding shift: ``1 − cos(mean embedding of reference,
mean embedding of production)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgeopt.errors import DataError

__all__ = ["BINS", "KS_SHARE", "MAX_FEATURES", "DriftReport", "InputDrift", "compare", "embedding_shift", "pooled", "psi"]

BINS = 10
MAX_FEATURES = 1024
KS_SHARE = 0.05
_FLOOR = 1e-4


@dataclass(frozen=True)
class InputDrift:
    """One input (or the embeddings) compared feature by feature."""

    name: str
    features: int
    psi_mean: float
    psi_max: float
    ks_flagged: int
    drifted: bool

    @property
    def ks_share(self) -> float:
        return self.ks_flagged / self.features if self.features else math.nan


@dataclass(frozen=True)
class DriftReport:
    inputs: tuple[InputDrift, ...]
    psi_threshold: float
    ks_pvalue: float
    reference_samples: int
    production_samples: int
    embedding_shift: float | None = None

    @property
    def drifted(self) -> bool:
        return any(i.drifted for i in self.inputs)

    def summary(self) -> str:
        parts = [f"{i.name}: PSI mean {i.psi_mean:.3f} (max {i.psi_max:.3f}), KS flags {i.ks_flagged}/{i.features}"
                 + (" DRIFTED" if i.drifted else "") for i in self.inputs]
        if self.embedding_shift is not None:
            parts.append(f"embedding shift {self.embedding_shift:.4f}")
        verdict = "drift" if self.drifted else "no drift"
        return (f"{verdict} ({self.production_samples} production vs {self.reference_samples} reference samples; "
                f"PSI > {self.psi_threshold:g} or > {KS_SHARE:.0%} KS flags at {self.ks_pvalue:g}): "
                + "; ".join(parts))

    def metrics(self) -> dict[str, float]:
        m: dict[str, float] = {"drifted": float(self.drifted)}
        for i in self.inputs:
            m |= {f"{i.name}.psi_mean": i.psi_mean, f"{i.name}.psi_max": i.psi_max, f"{i.name}.ks_share": i.ks_share}
        if self.embedding_shift is not None:
            m["embedding_shift"] = self.embedding_shift
        return m


def psi(reference: np.ndarray, production: np.ndarray, *, bins: int = BINS) -> np.ndarray:
    """PSI of each column of ``production`` against the same column of ``reference`` (samples × features)."""
    ref, prod = np.asarray(reference, np.float64), np.asarray(production, np.float64)
    out = np.empty(ref.shape[1])
    for j in range(ref.shape[1]):
        edges = np.unique(np.quantile(ref[:, j], np.linspace(0, 1, bins + 1)[1:-1]))
        p = np.bincount(np.searchsorted(edges, ref[:, j], side="right"), minlength=edges.size + 1) / ref.shape[0]
        q = np.bincount(np.searchsorted(edges, prod[:, j], side="right"), minlength=edges.size + 1) / prod.shape[0]
        p, q = np.maximum(p, _FLOOR), np.maximum(q, _FLOOR)
        out[j] = float(np.sum((q - p) * np.log(q / p)))
    return out


def _features(arr: np.ndarray) -> np.ndarray:
    flat = np.asarray(arr).reshape(arr.shape[0], -1)
    if flat.shape[1] > MAX_FEATURES:
        flat = flat[:, np.linspace(0, flat.shape[1] - 1, MAX_FEATURES).astype(int)]
    return flat.astype(np.float64)


def _one(name: str, ref: np.ndarray, prod: np.ndarray, *, psi_threshold: float, ks_pvalue: float) -> InputDrift:
    from scipy.stats import ks_2samp

    r, p = _features(ref), _features(prod)
    values = psi(r, p)
    pvalues = np.atleast_1d(ks_2samp(r, p, axis=0).pvalue)
    pvalues = np.where(np.isnan(pvalues), 1.0, pvalues)  # a constant feature in both: no evidence of a shift
    flagged = int(np.sum(pvalues < ks_pvalue / r.shape[1]))
    drifted = bool(values.mean() > psi_threshold or flagged > KS_SHARE * r.shape[1])
    return InputDrift(name=name, features=r.shape[1], psi_mean=float(values.mean()), psi_max=float(values.max()),
                      ks_flagged=flagged, drifted=drifted)


def pooled(outputs: np.ndarray) -> np.ndarray:
    """Model outputs as one embedding per sample: a sequence axis (samples × tokens × dims) is averaged."""
    out = np.asarray(outputs, np.float64)
    return out.mean(axis=1) if out.ndim == 3 else out.reshape(out.shape[0], -1)


def embedding_shift(reference: np.ndarray, production: np.ndarray) -> float:
    """``1 − cos`` between the mean embeddings (rows = samples)."""
    a, b = np.asarray(reference, np.float64).mean(axis=0), np.asarray(production, np.float64).mean(axis=0)
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return 1.0 - float(a @ b) / norm if norm > 0 else math.nan


def compare(reference: dict[str, np.ndarray], production: dict[str, np.ndarray], *, psi_threshold: float = 0.2,
            ks_pvalue: float = 0.01, embeddings: tuple[np.ndarray, np.ndarray] | None = None) -> DriftReport:
    """Compare every float input of ``production`` with ``reference`` (name -> samples × ...); integer inputs
    are left to ``embeddings`` (reference, production: samples × dims), compared as features named
    ``embedding``. ``DataError`` when nothing can be compared or a sample set is too small."""
    if not (psi_threshold > 0 and 0 < ks_pvalue < 1):
        raise DataError(f"psi_threshold must be > 0 and ks_pvalue in (0, 1); got {psi_threshold}, {ks_pvalue}")
    pairs = {n: (reference[n], production[n]) for n in reference
             if n in production and np.issubdtype(reference[n].dtype, np.floating)}
    if embeddings is not None:
        pairs["embedding"] = embeddings
    if not pairs:
        raise DataError("no float input to compare and no embeddings: pass the model's outputs for integer "
                        "(token) inputs")
    n_ref = min(len(r) for r, _ in pairs.values())
    n_prod = min(len(p) for _, p in pairs.values())
    if n_ref < 2 * BINS or n_prod < 2 * BINS:
        raise DataError(f"drift needs at least {2 * BINS} samples on each side (got {n_ref} reference, "
                        f"{n_prod} production); pass a larger sample")
    results = tuple(_one(n, r, p, psi_threshold=psi_threshold, ks_pvalue=ks_pvalue) for n, (r, p) in pairs.items())
    shift = embedding_shift(*embeddings) if embeddings is not None else None
    return DriftReport(inputs=results, psi_threshold=psi_threshold, ks_pvalue=ks_pvalue, reference_samples=n_ref,
                       production_samples=n_prod, embedding_shift=shift)
