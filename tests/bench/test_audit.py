"""The audit of a measurement (MLPerf TEST01 / TEST04 style), through real onnxruntime workers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.bench import AUDIT_REPEAT_RATIO_MIN, BenchSettings, check_outputs, infer, measure
from edgeopt.bench.audit import repeat_ratio
from edgeopt.bench.worker import FAULT_ENV
from edgeopt.data import synthetic_dataset
from edgeopt.errors import CandidateFailed
from edgeopt.hardware import fingerprint
from edgeopt.records import Artifact, BenchmarkResult, HardwareFingerprint, TensorSpec

ort = pytest.importorskip("onnxruntime")

SIG = (TensorSpec(name="x", dtype="float32", shape=("batch", 16)),)
TWO = (*SIG, TensorSpec(name="z", dtype="float32", shape=("batch", 8)))
TEXT = tuple(TensorSpec(name=n, dtype="int64", shape=("batch", "sequence")) for n in ("input_ids", "attention_mask"))
FAST = BenchSettings(warmup_runs=5, min_runs=200, min_duration_s=0.3, max_duration_s=10.0, timeout_s=60.0)
DYNAMIC = {"sequence": {"mode": "dynamic", "buckets": []}}


# ------------------------------------------------------------------------------------- fixtures
def _save(path: Path, nodes: list, inputs: list, outputs: list, inits: list) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, inits)
    path.write_bytes(helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17)])
                     .SerializeToString())
    return path


def _artifact(path: Path, candidate: str, runtime: dict | None = None) -> Artifact:
    return Artifact(candidate=candidate, backend="onnxruntime", path=str(path), sha256="0" * 64,
                    size_bytes=path.stat().st_size, parent_sha256="0" * 64, precision="fp32",
                    runtime={"intra_op_threads": 1, **(runtime or {})})


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")
    emb = numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "emb")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])
    mlp = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    axes = [numpy_helper.from_array(np.array([-1], np.int64), "last"),
            numpy_helper.from_array(np.array([1], np.int64), "seq_axis")]
    text = [  # hidden = emb[ids] * mask (per token), pooled = sum over the sequence
        helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "last"], ["m3"]),
        helper.make_node("Mul", ["e", "m3"], ["hidden"]),
        helper.make_node("ReduceSum", ["hidden", "seq_axis"], ["pooled"], keepdims=0),
    ]
    return {
        "mlp": _save(d / "mlp.onnx", mlp, [x], [y], [w]),
        "two": _save(d / "two.onnx", [*mlp[:1], helper.make_node("Relu", ["h"], ["r"]),
                                      helper.make_node("Add", ["r", "z"], ["y"])], [x, z], [y], [w]),
        "text": _save(d / "text.onnx", text, [ids, mask],
                      [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "sequence", 8]),
                       helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 8])], [emb, *axes]),
    }


@pytest.fixture(scope="module")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 token sequences of 3..16 real tokens, padded to 16."""
    rng = np.random.default_rng(2)
    lengths = rng.integers(3, 17, 12)
    mask = (np.arange(16)[None, :] < lengths[:, None]).astype(np.int64)
    path = tmp_path_factory.mktemp("data") / "text.npz"
    np.savez(path, input_ids=rng.integers(1, 32, (12, 16)) * mask, attention_mask=mask)
    return path


def _measure_and_infer(art: Artifact, sig: tuple, hardware: HardwareFingerprint, tmp_path: Path, *,
                       settings: BenchSettings = FAST, data_path: str | None = None, batch_size: int = 1,
                       max_samples: int | None = None) -> tuple[BenchmarkResult, Path]:
    settings = settings.model_copy(update={"batch_size": batch_size})
    r = measure(artifact=art, settings=settings, signature=sig, hardware=hardware, out_dir=tmp_path / "bench",
                data_path=data_path)
    out = infer(artifact=art, signature=sig, out_path=tmp_path / "outputs.npz", data_path=data_path,
                batch_size=batch_size, max_samples=max_samples)
    return r, out


# ------------------------------------------------------------------------------- honest models
def test_a_normal_model_passes_both_audits(models, hardware, tmp_path):
    r, outputs = _measure_and_infer(_artifact(models["mlp"], "mlp"), SIG, hardware, tmp_path)
    assert r.audit_repeat_ratio is not None and r.audit_repeat_ratio >= AUDIT_REPEAT_RATIO_MIN
    with np.load(r.audit_path) as npz:
        assert list(npz["index"]) == list(range(16)) and npz["output_0"].shape == (16, 8)
    check_outputs(benchmark=r, outputs_path=str(outputs))
    ratios = json.loads((tmp_path / "bench" / "result.json").read_text())["audit_repeat_ratios"]
    assert ratios and all(kind == "same-shape input" for _, kind in ratios)  # measured side by side


def test_synthetic_rows_do_not_depend_on_the_count(models, hardware, tmp_path):
    # edgeopt.data draws each input after the previous one: with two inputs, 'z' changes with the count
    a, b = synthetic_dataset(TWO, count=64), synthetic_dataset(TWO, count=100)
    assert not np.array_equal(a.inputs["z"][:16], b.inputs["z"][:16])
    # the worker's synthetic rows are the same for measure (64 samples) and infer (100)
    r, outputs = _measure_and_infer(_artifact(models["two"], "two"), TWO, hardware, tmp_path, max_samples=100)
    check_outputs(benchmark=r, outputs_path=str(outputs))


def test_rows_of_a_data_file_in_batches(models, hardware, tmp_path):
    data = tmp_path / "eval.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((10, 16)).astype(np.float32))
    # 10 samples in batches of 2: 5 full batches captured; the evaluation run's 5 samples hold 2 full batches
    r, outputs = _measure_and_infer(_artifact(models["mlp"], "mlp"), SIG, hardware, tmp_path, data_path=str(data),
                                    batch_size=2, max_samples=5)
    with np.load(r.audit_path) as npz:
        assert list(npz["index"]) == list(range(10))
    check_outputs(benchmark=r, outputs_path=str(outputs))


def test_a_dynamic_sequence_artifact_passes(models, hardware, tmp_path, text_data):
    art = _artifact(models["text"], "text-dynamic", DYNAMIC)
    r, outputs = _measure_and_infer(art, TEXT, hardware, tmp_path, data_path=str(text_data), batch_size=2)
    assert r.sequence == "dynamic" and r.seq_len_mean < 16
    with np.load(r.audit_path) as npz, np.load(outputs) as ref:
        assert npz["output_0"].shape == (12, 16, 8) and npz["output_1"].shape == (12, 8)  # padded back to 16
        np.testing.assert_array_equal(npz["output_0"], ref["output_0"])
    check_outputs(benchmark=r, outputs_path=str(outputs))
    assert r.audit_repeat_ratio >= AUDIT_REPEAT_RATIO_MIN
    ratios = json.loads((tmp_path / "bench" / "result.json").read_text())["audit_repeat_ratios"]
    assert any(kind == "same-shape input" for _, kind in ratios)  # lengths change between the loop's inputs


# ------------------------------------------------------------------------------ injected faults
def test_cached_results_fail_the_repeat_audit(models, hardware, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "cached")
    with pytest.raises(CandidateFailed) as err:
        measure(artifact=_artifact(models["mlp"], "cached"), settings=FAST, signature=SIG, hardware=hardware,
                out_dir=tmp_path)
    assert err.value.reason == "audit"
    assert "cached" in str(err.value) and "faster" in str(err.value) and "\n" not in str(err.value)


def test_outputs_that_drift_in_the_timed_loop_fail_check_outputs(models, hardware, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "drift")  # the infer job runs with it too: no timed loop there
    r, outputs = _measure_and_infer(_artifact(models["mlp"], "drift"), SIG, hardware, tmp_path)
    with pytest.raises(CandidateFailed) as err:
        check_outputs(benchmark=r, outputs_path=str(outputs))
    assert err.value.reason == "audit"
    assert "timed outputs differ from the evaluation run's for the same inputs" in str(err.value)
    assert "max abs diff" in str(err.value) and "at sample" in str(err.value)


# ------------------------------------------------------------------------- check_outputs, unit
def _files(tmp_path: Path, timed: dict, evaluated: dict, *, batch_size: int = 1) -> tuple[BenchmarkResult, str]:
    rows = next(iter(timed.values())).shape[0]
    np.savez(tmp_path / "audit.npz", index=np.arange(rows), **timed)
    np.savez(tmp_path / "outputs.npz", output_names=np.asarray(["a"]), **evaluated)
    b = BenchmarkResult(candidate="c", samples=1, batch_size=batch_size, latency_ms_p50=1, latency_ms_p90=1,
                        latency_ms_p95=1, latency_ms_p99=1, latency_ms_mean=1, latency_ms_std=0, latency_ms_min=1,
                        latency_ms_max=1, throughput_per_s=1, rss_peak_mb=1, rss_steady_mb=1, rss_peak_model_mb=1,
                        load_time_ms=1, size_bytes=1, duration_s=1, audit_path=str(tmp_path / "audit.npz"),
                        hardware=fingerprint())
    return b, str(tmp_path / "outputs.npz")


def test_check_outputs_tolerance(tmp_path):
    ref = np.random.default_rng(3).standard_normal((20, 4)).astype(np.float32) * 10
    labels = np.arange(20)
    # reduction-order noise (1e-6 of the scale) passes
    b, out = _files(tmp_path, {"output_0": ref[:8] * (1 + 1e-6), "output_1": labels[:8]},
                    {"output_0": ref, "output_1": labels})
    check_outputs(benchmark=b, outputs_path=out)
    # a 1 % rescale does not
    b, out = _files(tmp_path, {"output_0": ref[:8] * 1.01}, {"output_0": ref})
    with pytest.raises(CandidateFailed, match=r"output_0 max abs diff .* at sample \d+ \(tolerance"):
        check_outputs(benchmark=b, outputs_path=out)
    # integer outputs must be equal
    b, out = _files(tmp_path, {"output_1": labels[:8] + (labels[:8] == 5)}, {"output_1": labels})
    with pytest.raises(CandidateFailed, match="at sample 5"):
        check_outputs(benchmark=b, outputs_path=out)


def test_check_outputs_compares_only_rows_of_full_evaluation_batches(tmp_path):
    ref = np.ones((5, 3), np.float32)
    timed = np.ones((8, 3), np.float32)
    timed[4:] = 7.0  # rows 4..7: beyond the evaluation run's 2 full batches of 2 (its 5th row wrapped around)
    b, out = _files(tmp_path, {"output_0": timed}, {"output_0": ref}, batch_size=2)
    check_outputs(benchmark=b, outputs_path=out)
    timed[3] = 7.0
    b, out = _files(tmp_path, {"output_0": timed}, {"output_0": ref}, batch_size=2)
    with pytest.raises(CandidateFailed, match="at sample 3"):
        check_outputs(benchmark=b, outputs_path=out)


# --------------------------------------------------------------------------- repeat_ratio, unit
class _Fake:
    """A 'runtime' taking 1 ms per run; with ``cache``, repeats of the last input take ~0."""

    def __init__(self, *, cache: bool) -> None:
        self.cache, self.last = cache, None

    def __call__(self, feed: dict[str, np.ndarray]) -> None:
        key = b"".join(v.tobytes() + str(v.shape).encode() for v in feed.values())
        if not (self.cache and key == self.last):
            time.sleep(0.001)
        self.last = key


@pytest.mark.parametrize("lengths", [(4, 4, 4, 4), (3, 5, 7, 9)])
def test_repeat_ratio(lengths):
    feeds = [{"ids": np.arange(n, dtype=np.int64)[None, :] + i} for i, n in enumerate(lengths)]
    honest = repeat_ratio(_Fake(cache=False), feeds, inputs=4, repeats=4)
    cached = repeat_ratio(_Fake(cache=True), feeds, inputs=4, repeats=4)
    assert honest.ratio > AUDIT_REPEAT_RATIO_MIN and cached.ratio < 0.1
    assert {kind for _, kind in honest.per_input} == {"same-shape input"}
