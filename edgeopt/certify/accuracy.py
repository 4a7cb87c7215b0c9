"""Accuracy check: the candidate against its FP32 baseline on the evaluation data, with a confidence
interval, judged at the interval's lower bound.

Both models run over every evaluation sample, each in a fresh supervised process (``bench.infer``).
One score per sample, then the metric:

    labels (cnn, other)   top-1 accuracy of each; metric: candidate accuracy / baseline accuracy
                          (the baseline's accuracy over the same resampled samples); threshold
                          ``gates["accuracy_ratio_min"]``
    no labels (cnn, ...)  top-1 agreement with the baseline (share of equal argmax); threshold
                          ``gates["accuracy_ratio_min"]`` (the baseline agrees with itself: 1.0)
    encoder               mean cosine similarity of the sentence embeddings (outputs mean-pooled over
                          the ``attention_mask``'s real tokens) with the baseline's; threshold
                          ``gates["cosine_min"]`` when set, else ``gates["accuracy_ratio_min"]``

The interval is a paired percentile bootstrap over samples (``paired_bootstrap``): each resample draws
sample indices with replacement, the same indices for the candidate and the baseline, from a seeded
generator (the same outputs always give the same interval). Certification is conservative: the
check passes only when the interval's lower bound meets the threshold; an interval wholly below it
fails, and an interval that straddles it fails too (the data cannot show the candidate is good enough).
A figure that cannot be measured (a run failed, non-finite outputs) fails the check with its reason.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgeopt import bench
from edgeopt.certify.records import CheckResult
from edgeopt.data import load_dataset
from edgeopt.errors import CandidateFailed, DataError
from edgeopt.evaluate.embedding import mean_pool
from edgeopt.evaluate.fidelity import cosine_per_sample, load_outputs, predictions
from edgeopt.profiles import Gates
from edgeopt.records import Artifact, TensorSpec

__all__ = ["CHECK", "SEED", "BootstrapInterval", "check", "paired_bootstrap", "per_sample_agreement", "settle"]

log = logging.getLogger(__name__)

CHECK = "accuracy"
#: seed of the bootstrap's generator
SEED = 20261209
Settled = Literal["pass", "fail", "uncertain"]

_REL_TOLERANCE = 1e-9  # a threshold met exactly passes, as in edgeopt.gates
_MAX_DRAWS = 4_000_000  # resampled indices held at once (resamples × samples, in chunks)


@dataclass(frozen=True)
class BootstrapInterval:
    """A statistic over samples with its percentile bootstrap interval (NaN when it cannot be formed)."""

    point: float
    low: float
    high: float
    confidence: float
    resamples: int
    samples: int
    statistic: str

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.point, self.low, self.high))


def _ratio(cand: np.ndarray, base: np.ndarray) -> np.ndarray:
    """cand / base where base > 0, else cand (as ``edgeopt.gates.quality_ratio``)."""
    positive = base > 0
    return np.where(positive, cand / np.where(positive, base, 1.0), cand)


def paired_bootstrap(candidate: np.ndarray, baseline: np.ndarray | None = None, *, confidence: float = 0.95,
                     resamples: int = 2000, seed: int = SEED) -> BootstrapInterval:
    """Percentile bootstrap interval of ``mean(candidate)``, or with ``baseline`` of the ratio
    ``mean(candidate) / mean(baseline)`` (the raw mean when the baseline's is 0), over samples.

    ``candidate`` and ``baseline`` hold one score per sample (1/0 correct, agreement, cosine), the
    same samples in the same order; each resample draws the same indices for both (paired). NaN
    everywhere when there are no samples or a score is not finite. The interval is widened to contain
    the point when the resampled distribution is lopsided.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    c = np.asarray(candidate, dtype=np.float64).ravel()
    b = None if baseline is None else np.asarray(baseline, dtype=np.float64).ravel()
    if b is not None and b.shape != c.shape:
        raise ValueError(f"paired scores need the same samples: {c.size} candidate, {b.size} baseline")
    statistic = "mean" if b is None else "ratio of means"
    n = c.size
    if n == 0 or not np.isfinite(c).all() or (b is not None and not np.isfinite(b).all()):
        nan = math.nan
        return BootstrapInterval(nan, nan, nan, confidence, resamples, n, statistic)
    point = float(c.mean()) if b is None else float(_ratio(np.array(c.mean()), np.array(b.mean())))
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, _MAX_DRAWS // n))
    parts = []
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        means = c[idx].mean(axis=1)
        parts.append(means if b is None else _ratio(means, b[idx].mean(axis=1)))
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.concatenate(parts), [alpha, 1.0 - alpha])
    return BootstrapInterval(point, float(min(low, point)), float(max(high, point)), confidence, resamples, n,
                             statistic)


def settle(interval: BootstrapInterval, *, threshold: float) -> Settled:
    """``pass`` when the lower bound meets ``threshold``, ``fail`` when the upper bound is below it,
    ``uncertain`` when the interval straddles it; ``fail`` when the interval is not finite."""
    if not interval.finite or not math.isfinite(threshold):
        return "fail"
    tol = _REL_TOLERANCE * max(1.0, abs(threshold))
    if interval.low >= threshold - tol:
        return "pass"
    return "fail" if interval.high < threshold - tol else "uncertain"


def per_sample_agreement(*, kind: str, outputs: np.ndarray, baseline_outputs: np.ndarray,
                         attention_mask: np.ndarray | None = None) -> tuple[str, np.ndarray]:
    """(metric name, one agreement score per sample) of a candidate's first output with the baseline's.

    Encoders: cosine of the mean-pooled sentence embeddings; other kinds: top-1 agreement (share of the
    sample's positions whose argmax equals the baseline's). Raises ``CandidateFailed("accuracy", ...)``
    when the shapes differ or an output is not finite.
    """
    out, base = np.asarray(outputs), np.asarray(baseline_outputs)
    if out.shape != base.shape:
        raise CandidateFailed("accuracy", f"output shape {list(out.shape)} differs from the baseline's "
                                          f"{list(base.shape)}")
    for who, arr in (("candidate", out), ("baseline", base)):
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise CandidateFailed("accuracy", f"the {who}'s outputs contain NaN or inf")
    if kind == "encoder":
        mask = attention_mask if out.ndim == 3 else None
        return "cosine_mean", cosine_per_sample(mean_pool(out, mask), mean_pool(base, mask))
    return "top1_agreement", (predictions(out) == predictions(base)).mean(axis=1).astype(np.float64)


def _threshold(gates: dict[str, Any], metric: str) -> tuple[float, str]:
    if metric == "cosine_mean" and gates.get("cosine_min") is not None:
        return float(gates["cosine_min"]), "gates.cosine_min"
    if gates.get("accuracy_ratio_min") is not None:
        return float(gates["accuracy_ratio_min"]), "gates.accuracy_ratio_min"
    default = Gates.model_fields["accuracy_ratio_min"].default
    return float(default), "default accuracy_ratio_min (not in the gates given)"


def _failed(reason: str, *, summary: str, evidence: dict[str, Any], files: list[str], start: float) -> CheckResult:
    log.warning("%s fail: %s", CHECK, reason)
    return CheckResult(check=CHECK, status="fail", summary=summary, reason=reason, evidence=evidence,
                       files=tuple(files), duration_s=time.perf_counter() - start)


def check(*, artifact: Artifact, baseline: Artifact, signature: tuple[TensorSpec, ...], evaluation_path: str,
          kind: str, gates: dict[str, Any], out_dir: Path, confidence: float = 0.95,
          resamples: int = 2000) -> CheckResult:
    """Accuracy (with labels) or agreement with the baseline, with a paired bootstrap interval, against
    the profile's gate at the interval's lower bound (see the module doc)."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"confidence": confidence, "resamples": resamples, "seed": SEED, "kind": kind,
                "evaluation": str(evaluation_path), "interval": "paired percentile bootstrap over samples"}
    files: list[str] = []
    try:
        data = load_dataset(evaluation_path, signature=signature, role="evaluation")
    except DataError as exc:
        return _failed(f"evaluation data unusable: {exc}", summary="accuracy: not measured (evaluation data "
                       "unusable)", evidence=settings, files=files, start=start)
    outputs = {}
    for who, art in (("candidate", artifact), ("baseline", baseline)):
        try:
            path = bench.infer(artifact=art, signature=signature, out_path=out_dir / f"accuracy-{who}-outputs.npz",
                               data_path=str(evaluation_path))
            files.append(str(path))
            outputs[who] = load_outputs(path)
        except CandidateFailed as exc:
            return _failed(f"the {who} ({art.candidate}) could not be run on the evaluation data: "
                           f"{exc.reason}: {exc}", summary=f"accuracy: not measured ({who} run failed)",
                           evidence=settings | {"failed": who, "failure_reason": exc.reason}, files=files,
                           start=start)

    labels = None if kind == "encoder" else data.labels
    try:
        if labels is not None:
            metric = "top1_accuracy_ratio"
            cand_scores, base_scores = _correct(outputs["candidate"], labels), _correct(outputs["baseline"], labels)
        else:
            metric, cand_scores = per_sample_agreement(kind=kind, outputs=outputs["candidate"],
                                                       baseline_outputs=outputs["baseline"],
                                                       attention_mask=data.inputs.get("attention_mask"))
            base_scores = None
    except (CandidateFailed, DataError) as exc:
        return _failed(f"outputs cannot be compared: {exc}", summary="accuracy: not measured (outputs unusable)",
                       evidence=settings, files=files, start=start)

    interval = paired_bootstrap(cand_scores, base_scores, confidence=confidence, resamples=resamples)
    threshold, source = _threshold(gates, metric)
    verdict = settle(interval, threshold=threshold)
    values = {"candidate_value": float(np.mean(cand_scores)),
              "baseline_value": None if base_scores is None else float(np.mean(base_scores))}
    evidence = settings | values | {
        "metric": metric, "samples": interval.samples, "point": interval.point, "ci_low": interval.low,
        "ci_high": interval.high, "statistic": interval.statistic, "threshold": threshold,
        "threshold_source": source, "comparator": ">= (at the interval's lower bound)", "verdict": verdict,
        "margin_low": interval.low - threshold, "labels": labels is not None,
        "labels_ignored": kind == "encoder" and data.labels is not None,
    }
    scores_path = out_dir / "accuracy-scores.json"
    scores_path.write_text(json.dumps({"metric": metric, "candidate": cand_scores.tolist(),
                                       "baseline": None if base_scores is None else base_scores.tolist(),
                                       "interval": asdict(interval)}), encoding="utf-8")
    files.append(str(scores_path))
    reference = (f"; candidate {values['candidate_value']:.4f}, baseline {values['baseline_value']:.4f}"
                 if base_scores is not None else "")
    summary = (f"accuracy: {metric} {interval.point:.4f} [{interval.low:.4f}, {interval.high:.4f}] "
               f"({confidence:.0%} paired bootstrap, {resamples} resamples, {interval.samples} samples{reference}) "
               f"vs >= {threshold:.4g} at the lower bound: {verdict}")
    if verdict == "pass":
        log.info("%s pass: %s", CHECK, summary)
        return CheckResult(check=CHECK, status="pass", summary=summary, evidence=evidence, files=tuple(files),
                           duration_s=time.perf_counter() - start)
    if not interval.finite:
        reason = f"{metric} could not be measured (not finite over {interval.samples} samples)"
    elif verdict == "uncertain":
        reason = (f"{metric} interval [{interval.low:.4f}, {interval.high:.4f}] straddles the threshold "
                  f"{threshold:.4g}: the evaluation data cannot show the candidate meets it (certification "
                  "needs the lower bound above it; more samples narrow the interval)")
    else:
        reason = (f"{metric} {interval.point:.4f}, interval [{interval.low:.4f}, {interval.high:.4f}] wholly "
                  f"below the threshold {threshold:.4g}")
    return _failed(reason, summary=summary, evidence=evidence, files=files, start=start)


def _correct(outputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per sample: the share of its predictions equal to its label(s)."""
    preds = predictions(np.asarray(outputs))
    lab = np.asarray(labels)
    if lab.shape[0] != preds.shape[0] or lab.size != preds.size:
        raise DataError(f"labels of shape {list(lab.shape)} do not match {preds.shape[0]} samples with "
                        f"{preds.shape[1]} prediction(s) each")
    if np.asarray(outputs).dtype.kind == "f" and not np.isfinite(outputs).all():
        raise CandidateFailed("accuracy", "outputs contain NaN or inf")
    return (preds == lab.reshape(preds.shape)).mean(axis=1).astype(np.float64)
