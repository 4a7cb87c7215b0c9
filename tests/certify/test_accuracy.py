"""Accuracy check: real models run by the benchmark harness; the bootstrap checked against closed forms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper
from scipy.stats import norm

from edgeopt.certify import accuracy
from edgeopt.certify.accuracy import paired_bootstrap, settle
from edgeopt.data import file_sha256
from edgeopt.records import Artifact, TensorSpec

SIG = (TensorSpec(name="input", dtype="float32", shape=("batch", 1, 8, 8)),)
GATES = {"accuracy_ratio_min": 0.95}


def _artifact(path: Path, name: str) -> Artifact:
    return Artifact(candidate=name, backend="onnxruntime", path=str(path), sha256=file_sha256(path),
                    size_bytes=path.stat().st_size, parent_sha256="0" * 64, precision="fp32",
                    runtime={"intra_op_threads": 1})


def _logits(model: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def _edit(src: Path, dst: Path, **initializers: np.ndarray) -> Path:
    """A copy of the model with some weights replaced."""
    model = onnx.load(str(src))
    for init in model.graph.initializer:
        if init.name in initializers:
            init.CopyFrom(numpy_helper.from_array(initializers[init.name].astype(np.float32), init.name))
    onnx.save(model, str(dst))
    return dst


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory) -> dict[str, Path]:
    from onnxruntime.quantization import quantize_dynamic

    d = tmp_path_factory.mktemp("accuracy-models")
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tiny["model"])).graph.initializer}
    with np.load(tiny["eval"]) as npz:
        x, labels = npz["input"], npz["labels"]
    quantize_dynamic(str(tiny["model"]), str(d / "int8.onnx"))
    # straddling: a bias towards class 2 (no sample's label) flips exactly 6 of the baseline's correct
    # predictions, so the accuracy ratio is 102/108 = 0.944 with an interval around the 0.95 gate
    logits = _logits(tiny["model"], x)
    assert (logits.argmax(axis=1) == 0).all()  # the tiny CNN predicts class 0 everywhere
    margin = logits[:, 0] - logits[:, 2]
    order = np.argsort(margin)
    correct = labels[order] == 0
    cut = int(np.searchsorted(np.cumsum(correct), 6, side="left")) + 1  # the first `cut` samples hold 6 correct ones
    assert margin[order[cut]] - margin[order[cut - 1]] > 1e-3  # far from any rounding difference
    bias = weights["bf"].copy()
    bias[2] += (margin[order[cut - 1]] + margin[order[cut]]) / 2
    return {
        "int8": d / "int8.onnx",
        "damaged": _edit(tiny["model"], d / "damaged.onnx", wf=-weights["wf"]),  # classifier weights negated
        "straddle": _edit(tiny["model"], d / "straddle.onnx", bf=bias),
        "nan": _edit(tiny["model"], d / "nan.onnx", bf=np.full(4, np.nan)),
    }


@pytest.fixture(scope="module")
def unlabelled(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("unlabelled") / "eval.npz"
    with np.load(tiny["eval"]) as npz:
        np.savez(path, input=npz["input"])
    return path


def _check(candidate: Path, tiny, tmp_path: Path, *, data: Path | None = None, gates: dict = GATES,
           kind: str = "cnn"):
    return accuracy.check(artifact=_artifact(candidate, "candidate"), baseline=_artifact(tiny["model"], "fp32"),
                          signature=SIG, evaluation_path=str(data or tiny["eval"]), kind=kind, gates=gates,
                          out_dir=tmp_path)


# ------------------------------------------------------------------------------------ real models
def test_the_baseline_itself_passes(tiny, tmp_path):
    r = _check(tiny["model"], tiny, tmp_path)
    assert r.check == "accuracy" and r.status == "pass" and r.reason is None
    e = r.evidence
    assert e["metric"] == "top1_accuracy_ratio" and e["labels"] and e["samples"] == 120
    assert e["point"] == e["ci_low"] == e["ci_high"] == 1.0 and e["verdict"] == "pass"
    assert e["candidate_value"] == e["baseline_value"] == pytest.approx(0.9)  # a tenth of the labels changed
    assert e["threshold"] == 0.95 and e["confidence"] == 0.95 and e["resamples"] == 2000
    assert "[1.0000, 1.0000]" in r.summary and ">= 0.95 at the lower bound: pass" in r.summary
    assert {Path(f).name for f in r.files} == {"accuracy-candidate-outputs.npz", "accuracy-baseline-outputs.npz",
                                               "accuracy-scores.json"}
    scores = json.loads((tmp_path / "accuracy-scores.json").read_text())
    assert len(scores["candidate"]) == 120 and scores["interval"]["low"] == 1.0
    json.dumps(e, allow_nan=False)


def test_an_int8_candidate_passes(tiny, models, tmp_path):
    r = _check(models["int8"], tiny, tmp_path)
    assert r.status == "pass" and r.evidence["ci_low"] >= 0.95


def test_a_damaged_model_fails_below_the_interval(tiny, models, tmp_path):
    r = _check(models["damaged"], tiny, tmp_path)
    assert r.status == "fail" and r.evidence["verdict"] == "fail"
    assert r.evidence["ci_high"] < 0.95 and "wholly below the threshold 0.95" in r.reason


def test_an_interval_straddling_the_gate_fails(tiny, models, tmp_path):
    r = _check(models["straddle"], tiny, tmp_path)
    e = r.evidence
    assert e["point"] == pytest.approx(102 / 108) and e["candidate_value"] == pytest.approx(102 / 120)
    assert e["ci_low"] < 0.95 < e["ci_high"] and e["verdict"] == "uncertain"
    assert r.status == "fail" and "straddles the threshold 0.95" in r.reason
    # the same figures pass a gate the lower bound clears
    assert _check(models["straddle"], tiny, tmp_path, gates={"accuracy_ratio_min": 0.85}).status == "pass"


def test_without_labels_agreement_with_the_baseline_is_judged(tiny, models, unlabelled, tmp_path):
    good = _check(models["int8"], tiny, tmp_path / "good", data=unlabelled)
    assert good.status == "pass" and good.evidence["metric"] == "top1_agreement"
    assert good.evidence["baseline_value"] is None and not good.evidence["labels"]
    bad = _check(models["damaged"], tiny, tmp_path / "bad", data=unlabelled)
    assert bad.status == "fail" and bad.evidence["point"] == 0.0


def test_nan_outputs_fail_with_the_reason(tiny, models, tmp_path):
    r = _check(models["nan"], tiny, tmp_path)
    assert r.status == "fail" and r.evidence["failed"] == "candidate"
    assert r.evidence["failure_reason"] == "accuracy" and "NaN" in r.reason


def test_unusable_evaluation_data_fails(tiny, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, other=np.zeros((4, 3), np.float32))
    r = _check(tiny["model"], tiny, tmp_path, data=bad)
    assert r.status == "fail" and r.reason.startswith("evaluation data unusable")


# ---------------------------------------------------------------------------------------- encoder
def _encoder(path: Path, table: np.ndarray) -> Path:
    """Token embeddings masked by attention_mask: input_ids, attention_mask [batch, 8] → [batch, 8, hidden]."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", 8])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", 8])
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", 8, table.shape[1]])
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]),
             helper.make_node("Mul", ["emb", "m3"], ["last_hidden_state"])]
    inits = [numpy_helper.from_array(table.astype(np.float32), "table"),
             numpy_helper.from_array(np.array([2], np.int64), "axis")]
    graph = helper.make_graph(nodes, "enc", [ids, mask], [out], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


def test_encoders_are_judged_by_the_cosine_of_their_pooled_embeddings(tmp_path):
    rng = np.random.default_rng(5)
    table = rng.standard_normal((50, 6))
    lengths = rng.integers(2, 9, 40)
    mask = (np.arange(8)[None, :] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, 50, (40, 8)) * mask  # id 0 pads
    data = tmp_path / "text.npz"
    np.savez(data, input_ids=ids, attention_mask=mask)
    sig = (TensorSpec(name="input_ids", dtype="int64", shape=("batch", 8)),
           TensorSpec(name="attention_mask", dtype="int64", shape=("batch", 8)))
    base = _artifact(_encoder(tmp_path / "base.onnx", table), "fp32")
    near = table + rng.standard_normal(table.shape) * 0.01
    candidates = {"near": near, "other": rng.standard_normal((50, 6))}
    results = {name: accuracy.check(artifact=_artifact(_encoder(tmp_path / f"{name}.onnx", t), name), baseline=base,
                                    signature=sig, evaluation_path=str(data), kind="encoder",
                                    gates={"accuracy_ratio_min": 0.95, "cosine_min": 0.99}, out_dir=tmp_path / name)
               for name, t in candidates.items()}
    assert results["near"].status == "pass" and results["near"].evidence["metric"] == "cosine_mean"
    assert results["near"].evidence["threshold"] == 0.99
    assert results["near"].evidence["threshold_source"] == "gates.cosine_min"
    assert results["other"].status == "fail" and results["other"].evidence["ci_high"] < 0.99


# ------------------------------------------------------------------------------------- statistics
def test_paired_bootstrap_agrees_with_the_normal_binomial_interval():
    """One proportion, n = 5000: the percentile bootstrap and p ± z·√(p(1-p)/n) agree within 0.0015
    (a fifth of the half-width 0.0083; resampling error ~0.0003, lattice step 0.0002)."""
    n, p = 5000, 0.9
    scores = np.zeros(n)
    scores[: int(n * p)] = 1.0
    iv = paired_bootstrap(scores, confidence=0.95, resamples=2000)
    half = norm.ppf(0.975) * np.sqrt(p * (1 - p) / n)
    assert iv.point == pytest.approx(p) and iv.samples == n and iv.statistic == "mean"
    assert iv.low == pytest.approx(p - half, abs=0.0015) and iv.high == pytest.approx(p + half, abs=0.0015)


def test_paired_ratio_agrees_with_the_delta_method():
    """Ratio of paired means: Var(c̄/b̄) ≈ Var(c - R·b) / (n·b̄²). Pairing matters: the candidate is
    right wherever the baseline is, except on 3% of samples, so the interval is far narrower than
    for independent samples."""
    rng = np.random.default_rng(11)
    n = 4000
    base = (rng.random(n) < 0.9).astype(float)
    cand = base * (rng.random(n) >= 0.03)
    r = cand.mean() / base.mean()
    half = norm.ppf(0.975) * np.std(cand - r * base) / (np.sqrt(n) * base.mean())
    iv = paired_bootstrap(cand, base, resamples=2000)
    assert iv.point == pytest.approx(r) and iv.statistic == "ratio of means"
    assert iv.low == pytest.approx(r - half, abs=0.2 * half) and iv.high == pytest.approx(r + half, abs=0.2 * half)
    unpaired = norm.ppf(0.975) * np.sqrt(cand.var() / base.mean() ** 2 + r**2 * base.var() / base.mean() ** 2) / np.sqrt(n)
    assert half < unpaired / 2


def test_settling_at_the_lower_bound():
    base = np.ones(100)
    straddle = paired_bootstrap(np.r_[np.ones(96), np.zeros(4)], base)
    assert straddle.low < 0.95 < straddle.high and settle(straddle, threshold=0.95) == "uncertain"
    # the same rate on 40x the samples clears the gate
    sure = paired_bootstrap(np.r_[np.ones(3840), np.zeros(160)], np.ones(4000))
    assert sure.low > 0.95 and settle(sure, threshold=0.95) == "pass"
    low = paired_bootstrap(np.r_[np.ones(80), np.zeros(20)], base)
    assert low.high < 0.95 and settle(low, threshold=0.95) == "fail"
    exact = paired_bootstrap(np.ones(10), np.ones(10))
    assert (exact.low, exact.high) == (1.0, 1.0) and settle(exact, threshold=1.0) == "pass"


def test_bootstrap_is_seeded_and_refuses_what_it_cannot_measure():
    x = np.random.default_rng(0).random(300)
    assert paired_bootstrap(x) == paired_bootstrap(x)
    assert paired_bootstrap(x, seed=1) != paired_bootstrap(x, seed=2)
    nan = paired_bootstrap(np.r_[x, np.nan])
    assert not nan.finite and settle(nan, threshold=0.5) == "fail"
    assert not paired_bootstrap(np.array([])).finite
    with pytest.raises(ValueError, match="same samples"):
        paired_bootstrap(x, x[:-1])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(x, confidence=1.5)
    # a baseline that never scores: the ratio falls back to the candidate's own mean (as the gates do)
    assert paired_bootstrap(np.ones(5), np.zeros(5)).point == 1.0
