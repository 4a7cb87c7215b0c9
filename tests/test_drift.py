"""Drift between calibration and production data (edgeopt.drift), checked against what theory says.

For two Gaussians a mean shift of d standard deviations has Jeffreys divergence d², and a variance
ratio r has (r + 1/r − 2) / 2; PSI over quantile bins approaches it from below. What this protects:
a PSI that means what its name says, and a drift verdict that neither fires on a fresh sample of the
same data nor misses a half-sigma shift.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeopt.drift import compare, embedding_shift, psi
from edgeopt.errors import DataError

RNG = np.random.default_rng(11)
REF = {"x": RNG.standard_normal((4000, 8)).astype(np.float32)}


def test_a_fresh_sample_of_the_same_data_is_not_drift() -> None:
    same = {"x": RNG.standard_normal((2000, 8)).astype(np.float32)}
    rep = compare(REF, same)
    assert not rep.drifted and rep.inputs[0].psi_mean < 0.02 and rep.inputs[0].ks_flagged == 0, rep.summary()


@pytest.mark.parametrize(("transform", "jeffreys", "captured"), [
    (lambda z: z + 0.5, 0.25, 0.7),                     # a mean shift of half a sigma
    (lambda z: z * 1.5, (2.25 + 1 / 2.25 - 2) / 2, 0.5),  # a wider spread: it lives in the tails, which 10 bins coarsen
])
def test_a_shift_is_drift_and_psi_approaches_the_jeffreys_divergence(transform, jeffreys, captured) -> None:
    moved = {"x": transform(RNG.standard_normal((4000, 8))).astype(np.float32)}
    rep = compare(REF, moved)
    d = rep.inputs[0]
    assert rep.drifted and d.drifted and d.ks_flagged == d.features == 8, rep.summary()
    # ten quantile bins capture most of it, never more than the continuous divergence (plus sampling noise)
    assert captured * jeffreys < d.psi_mean < 1.1 * jeffreys, (d.psi_mean, jeffreys)


def test_psi_of_identical_columns_is_zero() -> None:
    assert psi(REF["x"], REF["x"]) == pytest.approx(np.zeros(8))


def test_integer_inputs_are_compared_through_embeddings() -> None:
    ids = {"input_ids": RNG.integers(0, 100, (100, 16))}
    with pytest.raises(DataError, match="embeddings"):
        compare(ids, ids)
    emb_ref = RNG.standard_normal((100, 4)) + 3.0
    rep = compare(ids, ids, embeddings=(emb_ref, emb_ref + RNG.standard_normal((100, 4)) * 0.01))
    assert [i.name for i in rep.inputs] == ["embedding"] and rep.embedding_shift < 1e-3


def test_embedding_shift_is_one_minus_cosine() -> None:
    assert embedding_shift(np.array([[1.0, 0.0]] * 3), np.array([[0.0, 2.0]] * 3)) == pytest.approx(1.0)
    assert embedding_shift(np.array([[1.0, 1.0]]), np.array([[2.0, 2.0]])) == pytest.approx(0.0, abs=1e-12)


def test_too_few_samples_or_a_bad_threshold_is_one_clear_error() -> None:
    with pytest.raises(DataError, match="at least 20 samples"):
        compare(REF, {"x": REF["x"][:5]})
    with pytest.raises(DataError, match="psi_threshold"):
        compare(REF, REF, psi_threshold=0.0)
