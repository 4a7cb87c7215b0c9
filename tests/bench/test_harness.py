"""Tests of the benchmark harness, through the real onnxruntime backend and real worker processes."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from edgeopt.bench import BenchSettings, infer, measure, min_samples_for, relative_spread, summarize
from edgeopt.bench.supervise import classify_exit
from edgeopt.bench.worker import FAULT_ENV
from edgeopt.errors import CandidateFailed, ConfigError, DataError, ModelError
from edgeopt.records import Artifact, TensorSpec

ort = pytest.importorskip("onnxruntime")

SIG = (TensorSpec(name="x", dtype="float32", shape=("batch", 16)),)
FAST = BenchSettings(warmup_runs=5, min_runs=200, min_duration_s=0.3, max_duration_s=10.0, timeout_s=60.0)


# ------------------------------------------------------------------------------------- fixtures
def _save(path: Path, nodes: list, inputs: list, outputs: list, inits: tuple = ()) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, list(inits))
    model = helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return path


def _artifact(path: Path, candidate: str = "tiny", runtime: dict | None = None) -> Artifact:
    return Artifact(candidate=candidate, backend="onnxruntime", path=str(path), sha256="0" * 64,
                    size_bytes=path.stat().st_size, parent_sha256="0" * 64, precision="fp32",
                    runtime={"intra_op_threads": 1} if runtime is None else runtime)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32), "w")
    x16 = helper.make_tensor_value_info("x", TensorProto.INT16, ["batch", 16])
    y16 = helper.make_tensor_value_info("y", TensorProto.INT16, ["batch", 16])
    sqrt_out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])
    garbage = d / "garbage.onnx"
    garbage.write_bytes(os.urandom(512))
    return {
        "mlp": _save(d / "mlp.onnx", [helper.make_node("MatMul", ["x", "w"], ["h"]),
                                      helper.make_node("Relu", ["h"], ["y"])], [x], [y], (w,)),
        # finite only for non-negative inputs: tells whether the data file was used
        "sqrt": _save(d / "sqrt.onnx", [helper.make_node("Sqrt", ["x"], ["y"])], [x], [sqrt_out]),
        # ONNX allows Relu on int16, ONNX Runtime has no kernel for it
        "relu16": _save(d / "relu16.onnx", [helper.make_node("Relu", ["x"], ["y"])], [x16], [y16]),
        "garbage": garbage,
    }


@pytest.fixture(scope="module")
def positive_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "eval.npz"
    x = np.abs(np.random.default_rng(1).standard_normal((10, 16))).astype(np.float32)
    np.savez(path, x=x, labels=np.arange(10) % 8)
    return path


def _result_json(out_dir: Path) -> dict:
    return json.loads((out_dir / "result.json").read_text())


# ---------------------------------------------------------------------------------------- measure
def test_measure_reports_a_consistent_summary(models, hardware, tmp_path):
    r = measure(artifact=_artifact(models["mlp"]), settings=FAST, signature=SIG, hardware=hardware,
                out_dir=tmp_path)
    assert r.candidate == "tiny" and r.hardware == hardware and r.threads == 1 and r.batch_size == 1
    assert r.samples >= FAST.min_runs
    assert r.duration_s >= FAST.min_duration_s
    assert r.latency_ms_min <= r.latency_ms_p50 <= r.latency_ms_p90 <= r.latency_ms_p95
    assert r.latency_ms_p95 <= r.latency_ms_p99 <= r.latency_ms_max
    samples = np.load(r.samples_path)
    assert samples.dtype == np.float64 and samples.shape == (r.samples,)
    assert np.median(samples) == pytest.approx(r.latency_ms_p50)
    assert r.latency_ms_mean == pytest.approx(samples.mean())
    assert r.throughput_per_s == pytest.approx(r.samples / (samples.sum() / 1000.0))
    assert r.rss_peak_mb > 0 and r.rss_steady_mb < r.rss_peak_mb and r.rss_peak_model_mb < r.rss_peak_mb
    assert r.memory_source == "RssAnon + model-file pages the timed runs referenced; VmHWM reset at reference"
    assert r.rss_steady_mb_repeats == (r.rss_steady_mb,) and r.repeat_sample_counts == (r.samples,)
    assert r.audit_path == str(tmp_path / "audit.npz") and r.audit_repeat_ratio is not None
    payload = _result_json(tmp_path)
    assert "rss_model_mb_v1" in payload and "rss_model_mb_v1" not in r.model_dump()
    assert r.load_time_ms > 0
    assert r.size_bytes == models["mlp"].stat().st_size
    assert _result_json(tmp_path)["distinct_inputs"] == FAST.eval_samples


def test_measure_stops_at_max_runs(models, hardware, tmp_path):
    settings = BenchSettings(warmup_runs=0, min_runs=50, max_runs=50, min_duration_s=5.0, max_duration_s=10.0)
    r = measure(artifact=_artifact(models["mlp"]), settings=settings, signature=SIG, hardware=hardware,
                out_dir=tmp_path)
    assert r.samples == 50 and r.duration_s < 5.0


def test_each_measurement_runs_in_a_fresh_process_with_its_own_peak(models, hardware, tmp_path):
    ballast = np.ones(400 * 2**20 // 8)  # 400 MB resident in this process while the workers run
    results, pids = [], []
    for i in range(2):
        out = tmp_path / str(i)
        results.append(measure(artifact=_artifact(models["mlp"]), settings=FAST, signature=SIG,
                               hardware=hardware, out_dir=out))
        pids.append(_result_json(out)["pid"])
    assert ballast.sum() > 0
    assert len(set(pids)) == 2 and os.getpid() not in pids
    # getrusage's ru_maxrss would report this process's 400 MB in the child; the worker's own peak does not
    assert all(r.rss_peak_mb < 300 for r in results)
    assert relative_spread([r.latency_ms_p50 for r in results]) >= 0


def test_measure_uses_the_data_file(models, hardware, tmp_path, positive_data):
    art = _artifact(models["sqrt"], candidate="sqrt")
    settings = FAST.model_copy(update={"eval_samples": 4, "batch_size": 2})
    r = measure(artifact=art, settings=settings, signature=SIG, hardware=hardware, out_dir=tmp_path / "data",
                data_path=str(positive_data))
    assert r.samples >= FAST.min_runs and r.batch_size == 2
    assert _result_json(tmp_path / "data")["distinct_inputs"] == 2  # 4 samples in batches of 2
    # without the data, synthetic normal inputs include negatives: sqrt gives NaN → accuracy
    with pytest.raises(CandidateFailed) as err:
        measure(artifact=art, settings=FAST, signature=SIG, hardware=hardware, out_dir=tmp_path / "synthetic")
    assert err.value.reason == "accuracy" and "sqrt" in str(err.value)


def test_mismatched_data_file_raises_data_error(models, hardware, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, z=np.zeros((4, 16), np.float32))
    with pytest.raises(DataError, match="do not match the model inputs"):
        measure(artifact=_artifact(models["mlp"]), settings=FAST, signature=SIG, hardware=hardware,
                out_dir=tmp_path / "out", data_path=str(bad))


# --------------------------------------------------------------------------------------- failures
def test_garbage_model_is_a_build_error(models, hardware, tmp_path):
    with pytest.raises(CandidateFailed) as err:
        measure(artifact=_artifact(models["garbage"], candidate="junk"), settings=FAST, signature=SIG,
                hardware=hardware, out_dir=tmp_path)
    assert err.value.reason == "build-error"
    assert "junk" in str(err.value) and "\n" not in str(err.value)


def test_missing_kernel_is_unsupported_op(models, hardware, tmp_path):
    sig = (TensorSpec(name="x", dtype="int16", shape=("batch", 16)),)
    with pytest.raises(CandidateFailed) as err:
        measure(artifact=_artifact(models["relu16"], candidate="relu16"), settings=FAST, signature=sig,
                hardware=hardware, out_dir=tmp_path)
    assert err.value.reason == "unsupported-op"


@pytest.mark.parametrize(("fault", "reason", "update"), [
    ("segfault", "crash", {}),
    ("abort", "crash", {}),
    ("nan", "accuracy", {}),
    ("hang", "timeout", {"timeout_s": 3.0}),
    ("oom", "oom", {"memory_limit_mb": 350.0}),
])
def test_worker_faults_are_classified(fault, reason, update, models, hardware, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, fault)
    with pytest.raises(CandidateFailed) as err:
        measure(artifact=_artifact(models["mlp"], candidate=f"fault-{fault}"),
                settings=FAST.model_copy(update=update), signature=SIG, hardware=hardware, out_dir=tmp_path)
    assert err.value.reason == reason
    assert f"fault-{fault}" in str(err.value) and "\n" not in str(err.value)
    if fault == "oom":
        assert "memory limit of 350 MB" in str(err.value)  # the parent's watchdog fired
    if fault in ("segfault", "abort"):
        assert ("SIGSEGV" if fault == "segfault" else "SIGABRT") in str(err.value)
    if fault == "hang":  # the whole process group is gone
        job = str(tmp_path / "job.json")
        assert not [p for p in psutil.process_iter(["cmdline"]) if job in (p.info["cmdline"] or [])]


def test_memory_error_in_the_worker_is_oom(models, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "oom")  # without a limit the fault allocates 2 GB then raises MemoryError
    with pytest.raises(CandidateFailed) as err:
        infer(artifact=_artifact(models["mlp"]), signature=SIG, out_path=tmp_path / "o.npz", timeout_s=60)
    assert err.value.reason == "oom" and "MemoryError" in str(err.value)


@pytest.mark.parametrize(("rc", "stderr", "reason"), [
    (-9, "", "oom"),
    (-11, "Fatal Python error: Segmentation fault", "crash"),
    (-6, "terminate called after throwing an instance of 'std::bad_alloc'", "oom"),
    (1, "onnxruntime...NotImplemented: [ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : x", "unsupported-op"),
    (1, "Traceback...\nRuntimeError: Failed to allocate memory for requested buffer", "oom"),
    (1, "Traceback (most recent call last):\nValueError: boom", "crash"),
    (0, "", "crash"),
])
def test_exit_classification(rc, stderr, reason):
    err = classify_exit(rc, stderr, candidate="c", what="benchmark", where="")
    assert err.reason == reason
    if reason == "crash" and rc == 1:
        assert "ValueError: boom" in str(err)


def test_preflight_errors(models, hardware, tmp_path):
    with pytest.raises(ConfigError, match="unknown backend"):
        measure(artifact=_artifact(models["mlp"]).model_copy(update={"backend": "nope"}), settings=FAST,
                signature=SIG, hardware=hardware, out_dir=tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        measure(artifact=_artifact(models["mlp"]).model_copy(update={"path": str(tmp_path / "none.onnx")}),
                settings=FAST, signature=SIG, hardware=hardware, out_dir=tmp_path)


# ------------------------------------------------------------------------------------------ infer
def test_infer_matches_onnxruntime(models, tmp_path, positive_data):
    out = infer(artifact=_artifact(models["mlp"]), signature=SIG, out_path=tmp_path / "outputs.npz",
                data_path=str(positive_data), batch_size=4)
    x = np.load(positive_data)["x"]
    session = ort.InferenceSession(str(models["mlp"]), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})[0]
    with np.load(out, allow_pickle=False) as npz:
        assert list(npz["output_names"]) == ["y"]
        assert npz["output_0"].shape == (10, 8)  # 10 samples in batches of 4: the last batch trimmed
        np.testing.assert_allclose(npz["output_0"], expected, rtol=1e-5, atol=1e-6)
    assert not list(tmp_path.glob(".outputs.npz.*"))  # the worker's folder is removed on success

    head = infer(artifact=_artifact(models["mlp"]), signature=SIG, out_path=tmp_path / "head.npz",
                 data_path=str(positive_data), max_samples=3)
    with np.load(head) as npz:
        np.testing.assert_allclose(npz["output_0"], expected[:3], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- lock
def test_lock_serializes_measurements(models, hardware, tmp_path):
    lock = tmp_path / "bench.lock"
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            measure(artifact=_artifact(models["mlp"]), settings=FAST, signature=SIG, hardware=hardware,
                    out_dir=tmp_path / str(i), lock_path=lock)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    results = [_result_json(tmp_path / str(i)) for i in range(2)]
    spans = sorted((r["started_unix"], r["finished_unix"]) for r in results)
    assert spans[0][1] <= spans[1][0], f"measurements overlapped: {spans}"


# --------------------------------------------------------------------------------- settings, stats
def test_settings_are_validated():
    with pytest.raises(ValidationError, match="min_runs"):
        BenchSettings(min_runs=10, max_runs=5)
    with pytest.raises(ValidationError, match="min_duration_s"):
        BenchSettings(min_duration_s=10, max_duration_s=5)
    with pytest.raises(ValidationError):
        BenchSettings(warmups=3)
    with pytest.raises(ValidationError):
        FAST.min_runs = 1


def test_stats():
    s = summarize(np.arange(1, 101, dtype=np.float64))
    assert (s.samples, s.latency_ms_p50, s.latency_ms_min, s.latency_ms_max) == (100, 50.5, 1.0, 100.0)
    assert s.latency_ms_p99 == pytest.approx(99.01)
    assert s.throughput_per_s(batch_size=2) == pytest.approx(2 * 100 / 5.05)
    assert min_samples_for(99) == 100 and min_samples_for(50) == 2
    assert relative_spread([1.0, 1.1, 0.9]) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        summarize(np.array([1.0, np.nan]))
