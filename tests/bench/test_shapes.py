"""Sequence shapes (edgeopt.bench.shapes): real and bucketed lengths from the attention mask."""

from __future__ import annotations

import numpy as np
import pytest

from edgeopt.bench.shapes import pad_outputs, sequence_length, split_runtime, trim
from edgeopt.errors import DataError


def _feed(lengths: list[int], full: int = 16) -> dict[str, np.ndarray]:
    mask = np.zeros((len(lengths), full), dtype=np.int64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = np.arange(len(lengths) * full, dtype=np.int64).reshape(len(lengths), full) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
            "scale": np.ones((len(lengths), 3), dtype=np.float32)}


def test_split_runtime_takes_the_choice_out() -> None:
    rest, choice = split_runtime({"intra_op_threads": 1, "sequence": {"mode": "dynamic", "buckets": []}})
    assert rest == {"intra_op_threads": 1} and choice == {"mode": "dynamic", "buckets": []}
    assert split_runtime({"sequence": {"mode": "fixed"}}) == ({}, None)
    assert split_runtime({"a": 1}) == ({"a": 1}, None)


def test_dynamic_cuts_every_sequence_input_to_the_longest_real_length() -> None:
    feed = _feed([5, 9])
    cut, full, used = trim(feed, {"mode": "dynamic"})
    assert (full, used) == (16, 9)
    assert {k: v.shape for k, v in cut.items()} == {"input_ids": (2, 9), "attention_mask": (2, 9),
                                                   "token_type_ids": (2, 9), "scale": (2, 3)}
    np.testing.assert_array_equal(cut["input_ids"], feed["input_ids"][:, :9])
    assert cut["attention_mask"].sum() == 14  # no real token lost


@pytest.mark.parametrize("lengths, buckets, want", [
    ([5], (8, 12, 16), 8), ([8], (8, 12, 16), 8), ([9], (8, 12, 16), 12), ([15], (4, 8), 16), ([0], (), 1),
])
def test_bucketed_rounds_up_to_the_smallest_bucket_that_fits(lengths, buckets, want) -> None:
    mode = "bucketed" if buckets else "dynamic"
    assert sequence_length(_feed(lengths), {"mode": mode, "buckets": list(buckets)}) == want


def test_outputs_are_padded_back_with_zeros() -> None:
    hidden = np.ones((2, 9, 4), dtype=np.float32)
    pooled = np.ones((2, 4), dtype=np.float32)
    padded_hidden, same_pooled = pad_outputs([hidden, pooled], full=16, used=9)
    assert padded_hidden.shape == (2, 16, 4) and not padded_hidden[:, 9:].any() and padded_hidden[:, :9].all()
    assert same_pooled is pooled or np.array_equal(same_pooled, pooled)
    assert pad_outputs([hidden], full=9, used=9)[0] is hidden


def test_inputs_without_a_mask_are_a_data_error() -> None:
    with pytest.raises(DataError, match="needs a 2-D 'attention_mask' input.*text models only"):
        trim({"input": np.zeros((1, 3, 8, 8), np.float32)}, {"mode": "dynamic"})


# -- through the harness, on a tiny BERT in real worker processes ----------------------------------


def test_dynamic_sequences_measured_and_evaluated_in_the_worker(tiny_bert, tmp_path) -> None:
    from edgeopt import intake
    from edgeopt.bench import BenchSettings, infer, measure
    from edgeopt.hardware import fingerprint
    from edgeopt.records import Artifact

    a = intake.assess(str(tiny_bert["model"]))
    lengths = np.load(tiny_bert["eval"])["attention_mask"].sum(axis=1)
    assert lengths.max() <= 64 and lengths.mean() < 50  # real sentences, padded to 64

    def artifact(**runtime) -> Artifact:
        return Artifact(candidate="b", backend="onnxruntime", path=str(tiny_bert["model"]), sha256="0" * 64,
                        size_bytes=1, parent_sha256="0" * 64, precision="fp32",
                        runtime={"intra_op_threads": 1, **runtime})

    settings = BenchSettings(warmup_runs=2, min_runs=20, min_duration_s=0.1, timeout_s=120, eval_samples=16)
    hw, data = fingerprint(), str(tiny_bert["eval"])
    fixed = measure(artifact=artifact(), settings=settings, signature=a.inputs, hardware=hw,
                    out_dir=tmp_path / "fixed", data_path=data)
    dyn = measure(artifact=artifact(sequence={"mode": "dynamic", "buckets": []}), settings=settings,
                  signature=a.inputs, hardware=hw, out_dir=tmp_path / "dyn", data_path=data)
    bkt = measure(artifact=artifact(sequence={"mode": "bucketed", "buckets": [32, 48]}), settings=settings,
                  signature=a.inputs, hardware=hw, out_dir=tmp_path / "bkt", data_path=data)
    assert (fixed.sequence, fixed.seq_len_mean) == ("fixed", 64.0)
    assert dyn.sequence == "dynamic" and dyn.seq_len_mean == pytest.approx(float(lengths[:16].mean()))
    assert bkt.sequence == "bucketed" and dyn.seq_len_mean < bkt.seq_len_mean < 64.0
    # outputs padded back to 64; the real positions match the fixed-length run's
    ref = np.load(infer(artifact=artifact(), signature=a.inputs, out_path=tmp_path / "f.npz", data_path=data,
                        max_samples=16, timeout_s=120))["output_0"]
    got = np.load(infer(artifact=artifact(sequence={"mode": "dynamic", "buckets": []}), signature=a.inputs,
                        out_path=tmp_path / "d.npz", data_path=data, max_samples=16, timeout_s=120))["output_0"]
    assert got.shape == ref.shape
    mask = np.load(tiny_bert["eval"])["attention_mask"][:16].astype(bool)
    np.testing.assert_allclose(got[mask], ref[mask], atol=1e-4)
    assert not got[~mask].any()
