"""Memory figures of a measurement, through the real onnxruntime backend and real worker processes."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.bench import BenchSettings, measure
from edgeopt.bench.memory import MemoryProbe, delta_mb
from edgeopt.records import Artifact, HardwareFingerprint, TensorSpec

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="figures from /proc/self/status")

SIG = (TensorSpec(name="x", dtype="float32", shape=("batch", 16)),)
FAST = BenchSettings(warmup_runs=5, min_runs=100, min_duration_s=0.2, max_duration_s=10.0, timeout_s=120.0)
#: the large model's extra initializer: 3,276,800 x 16 float32 = 200 MiB
BIG_ROWS = 200 * 2**20 // (16 * 4)
#: graph optimization off: ONNX Runtime would otherwise fold Gather(constant) and drop the initializer
RUNTIME = {"intra_op_threads": 1, "graph_optimization": "disabled"}


def _model(path: Path, *, big_rows: int = 0) -> Path:
    """x [batch,16] -> (x + E[0] if big_rows) -> MatMul 16x8 -> Relu -> y [batch,8]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")]
    nodes, src = [], "x"
    if big_rows:  # one row of E is gathered at every run: E must stay resident
        inits += [numpy_helper.from_array(rng.standard_normal((big_rows, 16)).astype(np.float32), "e"),
                  numpy_helper.from_array(np.array([0], np.int64), "row")]
        nodes += [helper.make_node("Gather", ["e", "row"], ["g"]), helper.make_node("Add", ["x", "g"], ["xg"])]
        src = "xg"
    nodes += [helper.make_node("MatMul", [src, "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    graph = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])], inits)
    model = helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return path


def _artifact(path: Path, candidate: str) -> Artifact:
    return Artifact(candidate=candidate, backend="onnxruntime", path=str(path), sha256="0" * 64,
                    size_bytes=path.stat().st_size, parent_sha256="0" * 64, precision="fp32", runtime=RUNTIME)


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory, hardware: HardwareFingerprint) -> dict:
    """The small and the 200 MB model measured on synthetic inputs, the small one also on a 115 MB data file."""
    d = tmp_path_factory.mktemp("memory")
    small, big = _model(d / "small.onnx"), _model(d / "big.onnx", big_rows=BIG_ROWS)
    data = d / "eval.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((1_800_000, 16)).astype(np.float32))
    out = {}
    for name, path, data_path in (("small", small, None), ("big", big, None), ("small-data", small, data)):
        folder = d / name
        result = measure(artifact=_artifact(path, name), settings=FAST, signature=SIG, hardware=hardware,
                         out_dir=folder, data_path=str(data_path) if data_path else None)
        out[name] = (result, json.loads((folder / "result.json").read_text()))
    big.unlink()
    data.unlink()
    return out


def test_a_resident_initializer_shows_in_the_steady_figure(measured):
    small, big = measured["small"][0], measured["big"][0]
    extra = big.rss_steady_mb - small.rss_steady_mb
    # the 200 MiB initializer is the only difference; ONNX Runtime keeps one copy of it. +-15 % leaves
    # room for allocator rounding and arena chunks, and still tells one copy from none or from two
    # (the serialized model is a second 200 MB while loading, freed before the steady reading)
    assert extra == pytest.approx(200.0, rel=0.15), f"steady: small {small.rss_steady_mb:.1f}, big {big.rss_steady_mb:.1f}"
    assert small.rss_steady_mb < 10.0
    # loading holds the file's bytes and the tensors at once: the peak above the reference is higher
    assert big.rss_peak_model_mb >= big.rss_steady_mb + 100.0
    for r in (small, big):
        assert r.rss_peak_model_mb >= r.rss_steady_mb
        assert r.rss_peak_mb >= r.rss_peak_model_mb
        assert abs(r.rss_steady_file_mb) < 50.0  # the initializer is read into the heap, not mapped
        assert r.memory_source == "RssAnon + model-file pages the timed runs referenced; VmHWM reset at reference"
        assert r.rss_steady_mb_repeats == (r.rss_steady_mb,)


def test_evaluation_data_does_not_move_the_steady_figure(measured):
    synthetic, (with_data, payload) = measured["small"][0], measured["small-data"]
    assert abs(with_data.rss_steady_mb - synthetic.rss_steady_mb) < 3.0
    assert with_data.rss_peak_model_mb < 30.0
    # the whole process's peak does include the 110 MB of data it loaded
    assert with_data.rss_peak_mb > synthetic.rss_peak_mb + 80.0
    # the schema-2 figure stays in the worker's payload only, unclamped
    assert "rss_model_mb_v1" in payload and "rss_model_mb_v1" not in with_data.model_dump()
    assert math.isfinite(payload["rss_model_mb_v1"])


def test_figures_are_not_clamped():
    assert delta_mb(3.0, 5.0) == -2.0 and delta_mb(5.0, 5.0) == 0.0
    assert math.isnan(delta_mb(None, 5.0)) and math.isnan(delta_mb(3.0, math.nan))
    ballast = np.ones(48 * 2**20 // 8)  # 48 MB, touched, allocated before the reference point
    probe = MemoryProbe()
    probe.reference()
    del ballast
    figures = probe.steady(rss_after_data=0.0)
    assert figures["rss_steady_mb"] < -40.0  # freed after the reference: negative, as measured
    assert figures["memory_source"] == "RssAnon; VmHWM reset at reference"
    assert figures["rss_peak_model_mb"] > -1.0  # nothing grew: ~0 (the kernel's counters are approximate)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page reference bits are read from /proc (Linux)")
def test_mapped_weights_count_only_where_inference_reads_them(tmp_path):
    """A runtime that uses weights in place from a mapped file (OpenVINO's IR .bin) needs those pages:
    they count. Pages read once while loading and never again are reclaimable page cache: they do not."""
    used, once = tmp_path / "used.bin", tmp_path / "once.bin"
    for f in (used, once):
        np.ones(64 * 2**20 // 8).tofile(f)  # 64 MB each
    probe = MemoryProbe()
    probe.reference()
    a = np.memmap(used, dtype=np.float64, mode="r")
    b = np.memmap(once, dtype=np.float64, mode="r")
    assert float(b.sum()) > 0  # "compile time": both read
    probe.mark_working_set()
    assert float(a.sum()) > 0  # "inference": only the first read again
    figures = probe.steady(rss_after_data=0.0)
    assert figures["rss_steady_mapped_mb"] == pytest.approx(64.0, abs=4.0)
    assert figures["rss_steady_mb"] == pytest.approx(figures["rss_steady_anon_mb"] + figures["rss_steady_mapped_mb"])
    assert figures["rss_steady_file_mb"] > 120.0  # both still resident: reported, not gated
    del a, b
