"""Fidelity and accuracy of outputs against the baseline's: edgeopt.evaluate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeopt.errors import CandidateFailed, DataError, ModelError
from edgeopt.evaluate import EVALUATORS, evaluate_outputs, evaluator_for, load_outputs
from edgeopt.records import EvalResult

# --- shared factories -------------------------------------------------------------------------


def logits(n: int = 10, classes: int = 4, seed: int = 0) -> np.ndarray:
    """Logits [n, classes] whose argmax is ``i % classes`` for sample i, with a clear margin."""
    rng = np.random.default_rng(seed)
    out = rng.normal(0.0, 0.1, size=(n, classes)).astype(np.float32)
    out[np.arange(n), np.arange(n) % classes] += 5.0
    return out


def evaluate(outputs: np.ndarray, baseline: np.ndarray, labels: np.ndarray | None = None, **kw) -> EvalResult:
    return evaluate_outputs(candidate="cand", outputs=outputs, baseline_outputs=baseline, labels=labels, **kw)


# --- agreement, cosine, max abs error ---------------------------------------------------------


def test_identical_outputs_agree_fully() -> None:
    base = logits()
    r = evaluate(base.copy(), base)
    assert r.metric == "top1_agreement"
    assert r.top1_agreement == 1.0
    assert r.value == 1.0 and r.baseline == 1.0 and r.delta == 0.0
    assert r.cosine_mean == pytest.approx(1.0) and r.cosine_min == pytest.approx(1.0)
    assert r.max_abs_error == 0.0
    assert r.samples == 10
    assert r.candidate == "cand"


def test_one_flipped_argmax_in_ten_gives_agreement_point_nine() -> None:
    base = logits()
    cand = base.copy()
    cand[3] = cand[3, ::-1]  # sample 3's argmax moves from class 3 to class 0
    r = evaluate(cand, base)
    assert r.top1_agreement == pytest.approx(0.9)
    assert r.value == pytest.approx(0.9)
    assert r.delta == pytest.approx(-0.1)
    assert r.cosine_min < 0.5 < r.cosine_mean < 1.0
    assert r.max_abs_error == pytest.approx(float(np.max(np.abs(cand - base))))


def test_cosine_and_max_abs_error_by_hand() -> None:
    base = np.array([[1.0, 0.0], [3.0, 4.0]])
    cand = np.array([[1.0, 1.0], [3.0, 4.5]])
    r = evaluate(cand, base)
    cos0 = 1.0 / np.sqrt(2.0)
    cos1 = (9.0 + 18.0) / (5.0 * np.sqrt(9.0 + 20.25))
    assert r.cosine_min == pytest.approx(cos0)
    assert r.cosine_mean == pytest.approx((cos0 + cos1) / 2)
    assert r.max_abs_error == pytest.approx(1.0)


def test_zero_vectors() -> None:
    base = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    cand = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    r = evaluate(cand, base)
    assert r.cosine_min == 0.0  # one zero vector against a non-zero one
    assert r.cosine_mean == pytest.approx((1.0 + 0.0 + 1.0) / 3)  # two zero vectors agree


def test_large_finite_values_do_not_overflow_cosine() -> None:
    base = np.full((2, 8), 1e300)
    r = evaluate(base.copy(), base)
    assert r.cosine_mean == pytest.approx(1.0)


def test_embeddings_with_extra_axes_are_flattened_per_sample() -> None:
    base = np.random.default_rng(1).normal(size=(5, 3, 4))
    cand = base.copy()
    cand[0, 0] = cand[0, 0, ::-1] + 10.0  # change one position of sample 0
    r = evaluate(cand, base)
    assert r.samples == 5
    assert r.top1_agreement == pytest.approx(14 / 15)  # argmax over the last axis, 3 positions per sample
    assert r.cosine_min < 1.0 and r.cosine_mean < 1.0


def test_class_id_outputs_compare_as_predictions() -> None:
    base = np.array([0, 1, 2, 3])
    r = evaluate(np.array([0, 1, 2, 0]), base, labels=np.array([0, 1, 1, 3]))
    assert r.top1_agreement == pytest.approx(0.75)
    assert r.value == pytest.approx(0.5) and r.baseline == pytest.approx(0.75)


# --- labelled accuracy ------------------------------------------------------------------------


def test_labels_give_accuracy_of_candidate_and_baseline() -> None:
    base = logits()  # predicts i % 4
    cand = base.copy()
    cand[1] = cand[1, ::-1]  # sample 1 now predicts class 2
    labels = np.arange(10) % 4
    labels[[5, 6]] = 0  # the baseline (and the candidate) get samples 5 and 6 wrong
    r = evaluate(cand, base, labels)
    assert r.metric == "top1_accuracy"
    assert r.baseline == pytest.approx(8 / 10)
    assert r.value == pytest.approx(7 / 10)
    assert r.delta == pytest.approx(-0.1)
    assert r.top1_agreement == pytest.approx(0.9)


def test_labels_as_column_vector_are_accepted() -> None:
    base = logits()
    r = evaluate(base, base, (np.arange(10) % 4).reshape(10, 1))
    assert r.value == 1.0 and r.baseline == 1.0


def test_baseline_value_overrides_the_reference() -> None:
    base = logits()
    r = evaluate(base, base, np.arange(10) % 4, baseline_value=0.8)
    assert r.baseline == 0.8 and r.delta == pytest.approx(0.2)


def test_labels_that_do_not_match_raise_data_error() -> None:
    base = logits()
    with pytest.raises(DataError, match="labels"):
        evaluate(base, base, np.zeros(7, dtype=int))


# --- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_outputs_fail_the_candidate_as_accuracy(bad: float) -> None:
    base = logits()
    cand = base.copy()
    cand[2, 1] = bad
    with pytest.raises(CandidateFailed, match="NaN or inf") as info:
        evaluate(cand, base)
    assert info.value.reason == "accuracy"
    assert str(info.value).startswith("cand:")


def test_non_finite_baseline_outputs_fail() -> None:
    base = logits()
    bad = base.copy()
    bad[0, 0] = np.nan
    with pytest.raises(CandidateFailed, match="baseline") as info:
        evaluate(base, bad)
    assert info.value.reason == "accuracy"


def test_shape_mismatch_fails_the_candidate_as_accuracy() -> None:
    with pytest.raises(CandidateFailed, match="shape") as info:
        evaluate(logits(10, 4), logits(10, 5))
    assert info.value.reason == "accuracy"


def test_no_samples_is_a_data_error() -> None:
    empty = np.zeros((0, 4), dtype=np.float32)
    with pytest.raises(DataError, match="no samples"):
        evaluate(empty, empty)


# --- load_outputs -----------------------------------------------------------------------------


def test_load_outputs_reads_output_0(tmp_path: Path) -> None:
    arr = logits()
    path = tmp_path / "outputs.npz"
    np.savez(path, output_1=np.zeros(3), output_0=arr)
    np.testing.assert_array_equal(load_outputs(path), arr)


def test_load_outputs_without_output_0_fails(tmp_path: Path) -> None:
    path = tmp_path / "outputs.npz"
    np.savez(path, something=np.zeros(3))
    with pytest.raises(CandidateFailed, match="something") as info:
        load_outputs(path)
    assert info.value.reason == "accuracy"


@pytest.mark.parametrize("content", [None, b"not a zip file"])
def test_load_outputs_missing_or_corrupt_file_fails(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "outputs.npz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CandidateFailed) as info:
        load_outputs(path)
    assert info.value.reason == "accuracy"
    assert str(path) in str(info.value)


# --- registry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(EVALUATORS))
def test_every_registered_evaluator_handles_identical_outputs(kind: str) -> None:
    base = logits()
    r = evaluator_for(kind)(candidate="c", outputs=base, baseline_outputs=base, labels=np.arange(10) % 4)
    assert isinstance(r, EvalResult)
    assert r.delta == 0.0 and r.samples == 10


def test_unknown_kind_names_the_supported_ones() -> None:
    with pytest.raises(ModelError, match="cnn"):
        evaluator_for("llm")
