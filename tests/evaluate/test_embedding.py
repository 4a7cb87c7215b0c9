"""Tests of the encoder evaluator (edgeopt.evaluate.embedding): sentence-embedding fidelity."""

from __future__ import annotations

import numpy as np
import pytest

from edgeopt.errors import CandidateFailed, DataError
from edgeopt.evaluate import EVALUATORS, evaluate_embeddings, mean_pool, neighbour_overlap
from edgeopt.evaluate.embedding import embedding_metrics, nearest_neighbours


def _batch(n: int = 40, seq: int = 12, hidden: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token outputs [n, seq, hidden] with clustered sentence meanings, and a mask padding each row."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n, hidden)) * 3
    out = (centres[:, None, :] + rng.standard_normal((n, seq, hidden))).astype(np.float32)
    lengths = rng.integers(3, seq + 1, n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return out, mask


def test_identical_outputs_are_perfect() -> None:
    out, mask = _batch()
    r = evaluate_embeddings(candidate="c", outputs=out, baseline_outputs=out.copy(), attention_mask=mask)
    assert r.metric == "cosine_mean" and r.baseline == 1.0
    assert r.value == pytest.approx(1.0) and r.delta == pytest.approx(0.0, abs=1e-12)
    assert r.cosine_min == pytest.approx(1.0) and r.top1_agreement == 1.0
    assert r.max_abs_error == 0.0 and r.samples == 40


def test_perturbed_outputs_score_lower_and_more_noise_scores_lower_still() -> None:
    out, mask = _batch()
    rng = np.random.default_rng(1)
    small = out + rng.standard_normal(out.shape).astype(np.float32) * 0.3
    large = out + rng.standard_normal(out.shape).astype(np.float32) * 3.0
    r_small = evaluate_embeddings(candidate="s", outputs=small, baseline_outputs=out, attention_mask=mask)
    r_large = evaluate_embeddings(candidate="l", outputs=large, baseline_outputs=out, attention_mask=mask)
    assert 0.99 < r_small.cosine_mean < 1.0
    assert r_large.cosine_mean < r_small.cosine_mean
    assert r_large.cosine_min <= r_large.cosine_mean
    assert r_large.top1_agreement < 1.0 and r_large.delta < 0
    assert r_large.max_abs_error > r_small.max_abs_error > 0


def test_padding_positions_do_not_count() -> None:
    out, mask = _batch()
    changed = out.copy()
    changed[mask == 0] = 1e6  # wild values where the mask says padding
    changed[np.nonzero(mask == 0)[0][:3], -1] = np.nan  # even NaN there is ignored
    a = evaluate_embeddings(candidate="a", outputs=out, baseline_outputs=out, attention_mask=mask)
    b = evaluate_embeddings(candidate="b", outputs=changed, baseline_outputs=out, attention_mask=mask)
    assert b == a.model_copy(update={"candidate": "b"})
    # ... whereas without the mask the same change is visible
    c = evaluate_embeddings(candidate="c", outputs=np.nan_to_num(changed), baseline_outputs=out)
    assert c.cosine_mean < 0.99


def test_mean_pool_matches_a_hand_computation() -> None:
    out, mask = _batch(n=3, seq=5, hidden=4)
    want = np.stack([out[i, : mask[i].sum()].astype(np.float64).mean(axis=0) for i in range(3)])
    np.testing.assert_allclose(mean_pool(out, mask), want, rtol=1e-12)
    assert mean_pool(out[:, 0], None).shape == (3, 4)  # already pooled: returned as is


def test_nan_at_real_tokens_fails_the_candidate() -> None:
    out, mask = _batch()
    bad = out.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(CandidateFailed) as info:
        evaluate_embeddings(candidate="q", outputs=bad, baseline_outputs=out, attention_mask=mask)
    assert info.value.reason == "accuracy" and str(info.value).startswith("q:")
    with pytest.raises(CandidateFailed):
        evaluate_embeddings(candidate="q", outputs=out, baseline_outputs=np.full_like(out, np.inf),
                            attention_mask=mask)


def test_mismatched_shapes() -> None:
    out, mask = _batch()
    with pytest.raises(CandidateFailed) as info:
        evaluate_embeddings(candidate="x", outputs=out[:, :5], baseline_outputs=out, attention_mask=mask)
    assert info.value.reason == "accuracy"
    with pytest.raises(DataError, match="attention_mask"):
        evaluate_embeddings(candidate="x", outputs=out, baseline_outputs=out, attention_mask=mask[:, :5])
    with pytest.raises(DataError):
        evaluate_embeddings(candidate="x", outputs=out[:0], baseline_outputs=out[:0], attention_mask=mask[:0])


def test_neighbour_overlap() -> None:
    # four points on a line: 0-1 close, 2-3 close
    a = np.array([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [0.14, 0.99]])
    assert nearest_neighbours(a, 1).ravel().tolist() == [1, 0, 3, 2]
    assert neighbour_overlap(a, a, 1) == 1.0 and neighbour_overlap(a, a, 3) == 1.0  # k=3: everyone
    turn = np.array([[0.6, -0.8], [0.8, 0.6]])  # a rotation keeps every cosine, so every neighbour
    assert neighbour_overlap(a, a @ turn, 1) == 1.0
    moved = a.copy()
    moved[1] = [0.1, 1.0]  # point 1 now sits by 2 and 3
    assert neighbour_overlap(a, moved, 1) < 1.0
    assert neighbour_overlap(a[:1], a[:1], 5) == 1.0  # one sentence: nothing to compare
    with pytest.raises(ValueError):
        neighbour_overlap(a, a, 0)


def test_knn_overlap_figure_and_top1_agreement() -> None:
    out, mask = _batch(n=60)
    noisy = out + np.random.default_rng(3).standard_normal(out.shape).astype(np.float32) * 2.0
    m = embedding_metrics(noisy, out, mask, k=5)
    emb, base = mean_pool(noisy, mask), mean_pool(out, mask)
    assert m["knn_overlap"] == pytest.approx(neighbour_overlap(emb, base, 5))
    assert m["top1_agreement"] == pytest.approx(neighbour_overlap(emb, base, 1))
    assert 0.0 < m["knn_overlap"] < 1.0


def test_fits_the_evaluator_signature() -> None:
    out, mask = _batch()
    r = evaluate_embeddings(candidate="c", outputs=out, baseline_outputs=out, labels=None, baseline_value=0.5,
                            attention_mask=mask)
    assert r.baseline == 0.5 and r.delta == pytest.approx(0.5)
    assert set(EVALUATORS) >= {"encoder"}  # the registry keeps working beside it
