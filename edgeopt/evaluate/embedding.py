"""Fidelity of an encoder's sentence embeddings against the FP32 baseline's, on the same sentences.

An encoder's first output is ``last_hidden_state`` ``[N, seq, hidden]``. Sentence embeddings are
its mean over the real tokens (``attention_mask`` 1), as sentence-transformers computes them;
outputs that are already ``[N, hidden]`` are taken as the embeddings. Padding positions never
count: changing them changes no figure.

- cosine similarity of each sentence's embedding with the baseline's: mean and worst case;
- nearest-neighbour agreement (``top1_agreement``): share of sentences whose nearest other
  sentence (by cosine) is the same for the candidate as for the baseline;
- top-k neighbour overlap (``neighbour_overlap``): |candidate's k nearest ∩ baseline's| / k,
  averaged over sentences (logged, and returned by ``embedding_metrics``);
- largest absolute difference of any real token's output value.

The metric is ``cosine_mean`` with reference 1.0 (the baseline against itself).
"""

from __future__ import annotations

import logging

import numpy as np

from edgeopt.errors import CandidateFailed, DataError
from edgeopt.evaluate.fidelity import cosine_per_sample
from edgeopt.records import EvalResult

__all__ = ["embedding_metrics", "evaluate_embeddings", "mean_pool", "nearest_neighbours", "neighbour_overlap"]

log = logging.getLogger(__name__)


def _mask(attention_mask: np.ndarray | None, outputs: np.ndarray) -> np.ndarray:
    """Boolean ``[N, seq]`` mask of real tokens (all True when no mask is given)."""
    n, seq = outputs.shape[:2]
    if attention_mask is None:
        return np.ones((n, seq), dtype=bool)
    mask = np.asarray(attention_mask)
    if mask.shape != (n, seq):
        raise DataError(
            f"attention_mask of shape {list(mask.shape)} does not match outputs {list(outputs.shape)}; "
            "pass the evaluation data's attention_mask for the same samples"
        )
    return mask > 0


def mean_pool(outputs: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """Sentence embeddings ``[N, hidden]`` (float64): the mean of each sentence's real tokens.

    ``[N, hidden]`` outputs are returned as they are (in float64). A sentence without any real
    token gets a zero vector. Padding positions are ignored whatever they hold.
    """
    out = np.asarray(outputs)
    if out.ndim == 2:
        return out.astype(np.float64)
    if out.ndim != 3:
        raise DataError(f"encoder outputs must be [N, seq, hidden] or [N, hidden], got {list(out.shape)}")
    mask = _mask(attention_mask, out)
    summed = np.where(mask[..., None], out.astype(np.float64), 0.0).sum(axis=1)
    counts = mask.sum(axis=1, keepdims=True)
    return summed / np.maximum(counts, 1)


def nearest_neighbours(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Indices ``[N, k]`` of each row's ``k`` most cosine-similar other rows, nearest first."""
    e = np.asarray(embeddings, dtype=np.float64)
    n = e.shape[0]
    k = min(k, n - 1)
    if k <= 0:
        return np.zeros((n, 0), dtype=np.int64)
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    unit = e / np.where(norms > 0, norms, 1.0)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    # stable sort on the negated similarity: ties go to the lower index, the same for both sides
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def neighbour_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean share of each sentence's ``k`` nearest neighbours that ``a`` and ``b`` have in common.

    ``a`` and ``b`` are sentence embeddings ``[N, D]`` of the same sentences. 1.0 when every
    neighbour set is the same; with fewer than two sentences there is nothing to compare (1.0).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    na, nb = nearest_neighbours(a, k), nearest_neighbours(b, k)
    if na.shape[1] == 0:
        return 1.0
    shared = [len(set(x.tolist()) & set(y.tolist())) for x, y in zip(na, nb, strict=True)]
    return float(np.mean(shared) / na.shape[1])


def embedding_metrics(
    outputs: np.ndarray, baseline_outputs: np.ndarray, attention_mask: np.ndarray | None = None, *, k: int = 5
) -> dict[str, float]:
    """The figures of ``evaluate_embeddings`` as a dict (also ``knn_overlap`` at ``k``).

    Raises ``CandidateFailed("accuracy", ...)`` when the candidate's real-token outputs are not
    finite or its shape differs from the baseline's; ``DataError`` for no samples or a bad mask.
    """
    out, base = np.asarray(outputs), np.asarray(baseline_outputs)
    if out.shape != base.shape:
        raise CandidateFailed("accuracy",
                              f"output shape {out.shape} differs from the baseline's {base.shape}")
    if out.ndim not in (2, 3) or out.shape[0] == 0:
        raise DataError(f"encoder outputs must be [N, seq, hidden] or [N, hidden] with N > 0, "
                        f"got {list(out.shape)}")
    if out.dtype.kind != "f" or base.dtype.kind != "f":
        raise CandidateFailed("accuracy", f"encoder outputs must be floats, got {out.dtype} and {base.dtype}")
    real = _mask(attention_mask, out) if out.ndim == 3 else np.ones(out.shape[:1], dtype=bool)
    for name, arr in (("outputs", out), ("the baseline's outputs", base)):
        bad = int(np.count_nonzero(~np.isfinite(arr[real])))
        if bad:
            raise CandidateFailed("accuracy", f"{name} contain {bad} NaN or inf values at real tokens")
    if out.ndim == 3 and not np.all(np.isfinite(out)):
        log.warning("outputs hold NaN or inf at padding positions only; they do not count")
    emb, base_emb = mean_pool(out, attention_mask), mean_pool(base, attention_mask)
    cos = cosine_per_sample(emb, base_emb)
    diff = np.abs(out[real].astype(np.float64) - base[real].astype(np.float64))
    return {
        "cosine_mean": float(np.mean(cos)),
        "cosine_min": float(np.min(cos)),
        "top1_agreement": neighbour_overlap(emb, base_emb, 1),
        "knn_overlap": neighbour_overlap(emb, base_emb, k),
        "k": float(k),
        "max_abs_error": float(diff.max()) if diff.size else 0.0,
        "samples": float(out.shape[0]),
    }


def evaluate_embeddings(
    *,
    candidate: str,
    outputs: np.ndarray,
    baseline_outputs: np.ndarray,
    attention_mask: np.ndarray | None = None,
    k: int = 5,
    labels: np.ndarray | None = None,
    baseline_value: float | None = None,
) -> EvalResult:
    """Compare a candidate encoder's outputs with the baseline's on the same ``N`` sentences.

    ``attention_mask`` ``[N, seq]`` marks the real tokens (omit it only for unpadded data).
    The metric is ``cosine_mean`` (reference 1.0, or ``baseline_value`` when given);
    ``top1_agreement`` is the nearest-neighbour agreement. ``labels`` are accepted so that this
    function fits the ``Evaluator`` signature; sentence embeddings have no class labels, so they
    are ignored. Raises ``CandidateFailed("accuracy", ...)`` for NaN/inf or mismatched outputs.
    """
    try:
        m = embedding_metrics(outputs, baseline_outputs, attention_mask, k=k)
    except CandidateFailed as exc:
        raise CandidateFailed("accuracy", f"{candidate}: {exc}") from None
    except DataError as exc:
        raise DataError(f"{candidate}: {exc}") from None
    if labels is not None:
        log.debug("%s: labels ignored for sentence embeddings", candidate)
    reference = 1.0 if baseline_value is None else float(baseline_value)
    result = EvalResult(
        candidate=candidate,
        metric="cosine_mean",
        value=m["cosine_mean"],
        baseline=reference,
        delta=m["cosine_mean"] - reference,
        samples=int(m["samples"]),
        top1_agreement=m["top1_agreement"],
        cosine_mean=m["cosine_mean"],
        cosine_min=m["cosine_min"],
        max_abs_error=m["max_abs_error"],
    )
    log.info("%s: embedding cosine mean %.5f min %.5f, nearest-neighbour agreement %.4f, top-%d neighbour "
             "overlap %.4f, max abs error %.3g over %d sentences", candidate, m["cosine_mean"],
             m["cosine_min"], m["top1_agreement"], k, m["knn_overlap"], m["max_abs_error"], result.samples)
    return result
