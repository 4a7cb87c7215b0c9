from __future__ import annotations

import numpy as np
import pytest

from edgeopt.data import load_dataset, synthetic_dataset
from edgeopt.errors import DataError
from edgeopt.intake import assess


@pytest.fixture(scope="module")
def sig(tiny):
    return assess(tiny["model"]).inputs


def test_loads_valid_data(tiny, sig):
    ev = load_dataset(tiny["eval"], signature=sig, role="evaluation")
    assert ev.count == 120 and ev.labels is not None and ev.labels.shape == (120,)
    assert ev.sample(119, batch_size=2)["input"].shape == (2, 1, 8, 8)  # wraps around
    cal = load_dataset(tiny["calibration"], signature=sig, role="calibration")
    assert cal.labels is None and cal.count == 64


@pytest.mark.parametrize("arrays, pattern", [
    ({"image": np.zeros((4, 1, 8, 8), np.float32)}, r"do not match the model inputs \['input'\] \(missing: input\)"),
    ({"input": np.zeros((4, 1, 8, 8), np.float64)}, r"dtype float64, the model expects float32"),
    ({"input": np.zeros((4, 3, 8, 8), np.float32)}, r"shape \[4, 3, 8, 8\], the model expects \['batch', 1, 8, 8\]"),
    ({"input": np.zeros((4, 8, 8), np.float32)}, r"shape \[4, 8, 8\]"),
    ({"input": np.full((4, 1, 8, 8), np.inf, np.float32)}, r"256 NaN or inf values"),
    ({"input": np.zeros((0, 1, 8, 8), np.float32)}, r"contains no samples"),
    ({"input": np.zeros((4, 1, 8, 8), np.float32), "labels": np.zeros(3, np.int64)}, r"'labels' must be"),
])
def test_mismatched_data_is_one_line(tmp_path, sig, arrays, pattern):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=pattern) as info:
        load_dataset(path, signature=sig, role="calibration")
    assert "\n" not in str(info.value) and "calibration data" in str(info.value)


def test_missing_and_non_npz(tmp_path, sig):
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "none.npz", signature=sig, role="evaluation")
    bad = tmp_path / "d.npz"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="not a .npz file"):
        load_dataset(bad, signature=sig, role="evaluation")


def test_synthetic_follows_signature(sig):
    ds = synthetic_dataset(sig, count=5)
    assert ds.inputs["input"].shape == (5, 1, 8, 8) and ds.inputs["input"].dtype == np.float32
    assert ds.sha256 == synthetic_dataset(sig, count=5).sha256


def test_text_data_needs_a_tokenizer_beside_the_model(tiny, tmp_path):
    from edgeopt.workflow import prepare_data

    text = tmp_path / "s.txt"
    text.write_text("A sentence.\nAnother one.\n", encoding="utf-8")
    a = assess(tiny["model"])
    with pytest.raises(DataError, match="text data needs a text model with its tokenizer"):
        prepare_data(str(text), assessment=a, seq_len=16, work_dir=tmp_path / "w", role="evaluation")
    assert prepare_data(str(tiny["eval"]), assessment=a, seq_len=16, work_dir=tmp_path / "w",
                        role="evaluation") == str(tiny["eval"])
