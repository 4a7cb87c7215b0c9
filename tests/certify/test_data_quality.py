"""Data-quality check: real Great Expectations suites over the tiny CNN's calibration and evaluation data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("great_expectations")

from edgeopt.certify import data_quality
from edgeopt.data import Dataset, load_dataset
from edgeopt.records import TensorSpec

SIG = (TensorSpec(name="input", dtype="float32", shape=("batch", 1, 8, 8)),)


@pytest.fixture(scope="module")
def data(tiny) -> dict[str, Dataset]:
    return {"evaluation": load_dataset(tiny["eval"], signature=SIG, role="evaluation"),
            "calibration": load_dataset(tiny["calibration"], signature=SIG, role="calibration")}


def _with(data: Dataset, x: np.ndarray, labels: np.ndarray | None = None) -> Dataset:
    return Dataset(None, "test", {"input": x}, labels)


def _failed(result) -> list[str]:
    return [f["description"] for suite in result.evidence["suites"].values() for f in suite["failed"]]


def test_clean_data_passes_and_writes_each_suite(data, tmp_path):
    r = data_quality.check(signature=SIG, evaluation=data["evaluation"], calibration=data["calibration"],
                           out_dir=tmp_path)
    assert r.check == "data-quality" and r.status == "pass" and r.passed and r.reason is None
    assert "evaluation 120 samples" in r.summary and "calibration 64 samples" in r.summary and "KS D" in r.summary
    assert set(r.evidence["suites"]) == {"evaluation", "calibration", "shift"}
    assert all(s["success"] and s["expectations"] > 0 for s in r.evidence["suites"].values())
    # the evaluation suite holds the range expectations built from the calibration set
    lo, hi = r.evidence["value_range"]["input"]
    cal = data["calibration"].inputs["input"]
    width = float(cal.max() - cal.min())
    assert lo == pytest.approx(float(cal.min()) - 0.1 * width) and hi == pytest.approx(float(cal.max()) + 0.1 * width)
    assert r.evidence["shift"]["bonferroni_tests"] == 2 and r.duration_s > 0
    names = {Path(f).name for f in r.files}
    assert {"data-quality-evaluation.json", "data-quality-calibration.json", "data-quality-shift.json"} <= names
    for f in r.files:
        assert Path(f).is_file() and Path(f).parent == tmp_path
    doc = json.loads((tmp_path / "data-quality-evaluation.json").read_text())
    assert doc["success"] is True
    types = {res["expectation_config"]["type"] for res in doc["results"]}
    assert {"expect_column_values_to_be_unique", "expect_table_row_count_to_be_between",
            "expect_column_values_to_match_regex", "expect_column_values_to_be_in_set",
            "expect_table_columns_to_match_set"} <= types
    json.dumps(r.evidence, allow_nan=False)  # JSON-able as it is


def test_shifted_evaluation_fails_on_the_shift_suite_only(data, tmp_path):
    """No NaN, no out-of-range value, no duplicate: the distribution moved by half a standard deviation."""
    shifted = _with(data["evaluation"], data["evaluation"].inputs["input"] + np.float32(0.5))
    r = data_quality.check(signature=SIG, evaluation=shifted, calibration=data["calibration"], out_dir=tmp_path)
    assert r.status == "fail" and not r.passed
    suites = r.evidence["suites"]
    assert suites["evaluation"]["success"] and suites["calibration"]["success"] and not suites["shift"]["success"]
    assert "shift: 'input' per-sample mean differs between calibration and evaluation" in r.reason
    test = next(t for t in r.evidence["shift"]["tests"] if t["statistic"] == "per-sample mean")
    assert test["ks_d"] >= 0.1 and test["p_value"] < 0.01 / 2
    assert not json.loads((tmp_path / "data-quality-shift.json").read_text())["success"]


def test_duplicated_rows_fail_and_name_the_rows(data, tmp_path):
    x = data["evaluation"].inputs["input"].copy()
    x[5] = x[3]
    r = data_quality.check(signature=SIG, evaluation=_with(data["evaluation"], x), calibration=None,
                           out_dir=tmp_path)
    assert r.status == "fail" and _failed(r) == ["evaluation: no duplicate samples"]
    (failure,) = r.evidence["suites"]["evaluation"]["failed"]
    assert failure["column"] == "row_hash" and sorted(failure["partial_unexpected_index_list"]) == [3, 5]
    assert "evaluation: no duplicate samples (fails on 2 of 120 rows)" in r.reason
    assert r.evidence["shift"] is None and "not tested" in r.summary


def test_wrong_dtype_too_few_samples_and_nan_each_fail(data, tmp_path):
    x = data["evaluation"].inputs["input"][:20].astype(np.float64)
    x[7, 0, 0, 0] = np.nan
    r = data_quality.check(signature=SIG, evaluation=_with(data["evaluation"], x), calibration=None,
                           out_dir=tmp_path)
    assert r.status == "fail"
    assert set(_failed(r)) == {"evaluation: 'input' has dtype float32", "evaluation: at least 30 samples",
                               "evaluation: 'input' has no NaN or inf"}
    assert "(observed 20)" in r.reason
    nan = next(f for f in r.evidence["suites"]["evaluation"]["failed"] if f["column"] == "input__nonfinite")
    assert nan["partial_unexpected_index_list"] == [7]


def test_min_samples_is_a_parameter(data, tmp_path):
    few = _with(data["evaluation"], data["evaluation"].inputs["input"][:20])
    assert data_quality.check(signature=SIG, evaluation=few, calibration=None, out_dir=tmp_path,
                              min_samples=20).status == "pass"


def test_values_outside_the_widened_calibration_range_fail(data, tmp_path):
    x = data["evaluation"].inputs["input"].copy()
    x[11] *= 10.0  # one sample at ten times the scale (e.g. unnormalized)
    r = data_quality.check(signature=SIG, evaluation=_with(data["evaluation"], x), calibration=data["calibration"],
                           out_dir=tmp_path)
    assert r.status == "fail"
    failed = r.evidence["suites"]["evaluation"]["failed"]
    assert {f["column"] for f in failed} == {"input__min", "input__max"}
    assert all(f["partial_unexpected_index_list"] == [11] for f in failed)
    assert "calibration range widened" in r.reason


def test_shape_and_unknown_arrays_fail_the_schema(data, tmp_path):
    x = np.random.default_rng(0).standard_normal((40, 1, 8, 9)).astype(np.float32)
    odd = Dataset(None, "odd", {"input": x, "extra": np.zeros((40, 3), np.float32)})
    r = data_quality.check(signature=SIG, evaluation=odd, calibration=None, out_dir=tmp_path)
    assert r.status == "fail"
    assert set(_failed(r)) == {"evaluation: arrays are exactly the model inputs ['input']",
                               "evaluation: 'input' per-sample shape matches [1,8,8]"}


def test_problems_of_the_calibration_set_are_named_with_it(data, tmp_path):
    cal = data["calibration"].inputs["input"].copy()
    cal[1] = cal[0]
    r = data_quality.check(signature=SIG, evaluation=data["evaluation"],
                           calibration=_with(data["calibration"], cal), out_dir=tmp_path)
    assert r.status == "fail" and _failed(r) == ["calibration: no duplicate samples"]
    assert r.reason.startswith("1 expectation(s) failed: calibration: no duplicate samples")


def test_text_inputs_dynamic_dims_and_labels():
    """Suites follow the signature: dynamic dims accept any size; labels get their own expectations."""
    sig = (TensorSpec(name="input_ids", dtype="int64", shape=("batch", "seq")),
           TensorSpec(name="attention_mask", dtype="int64", shape=("batch", "seq")))
    ids = np.arange(4 * 7, dtype=np.int64).reshape(4, 7)
    data = Dataset(None, "t", {"input_ids": ids, "attention_mask": np.ones_like(ids)}, np.array([0, 1, 2, 3]))
    frame = data_quality.sample_frame(data)
    assert list(frame["input_ids__shape"].unique()) == ["[7]"] and frame["row_hash"].is_unique
    # attention masks repeat across samples; only whole samples must be unique
    assert frame["attention_mask__hash"].nunique() == 1
    specs = data_quality.expectations(signature=sig, frame=frame, role="evaluation", min_samples=2)
    regex = next(kw["regex"] for cls, kw, _ in specs if cls == "ExpectColumnValuesToMatchRegex"
                 and kw["column"] == "input_ids__shape")
    assert re.match(regex, "[7]") and re.match(regex, "[128]") and not re.match(regex, "[7,2]")
    assert any(kw.get("column") == "label" for _, kw, _ in specs)


def test_text_data_with_labels_passes_through_great_expectations(tmp_path):
    sig = (TensorSpec(name="input_ids", dtype="int64", shape=("batch", 16)),
           TensorSpec(name="attention_mask", dtype="int64", shape=("batch", 16)))
    rng = np.random.default_rng(3)
    ids = rng.integers(1, 500, (40, 16))
    mask = (np.arange(16)[None, :] < rng.integers(4, 16, (40, 1))).astype(np.int64)
    ev = Dataset(None, "t", {"input_ids": ids * mask, "attention_mask": mask}, rng.integers(0, 3, 40))
    r = data_quality.check(signature=sig, evaluation=ev, calibration=None, out_dir=tmp_path)
    assert r.status == "pass", r.reason
    bad = Dataset(None, "t", ev.inputs, np.r_[rng.integers(0, 3, 39), -1])
    r = data_quality.check(signature=sig, evaluation=bad, calibration=None, out_dir=tmp_path)
    assert r.status == "fail" and _failed(r) == ["evaluation: labels are class ids >= 0"]
