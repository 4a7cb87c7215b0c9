"""Cross-validation matrix through the real runtimes (ONNX Runtime, OpenVINO) and real worker processes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeopt.bench import BenchSettings
from edgeopt.certify.crossval import (
    _reproduce,
    cross_validate,
    matrix_rows,
    runtimes_for,
    skipped_runtimes,
    write,
)
from edgeopt.certify.records import CrossValidation, MatrixCell, Subject
from edgeopt.data import file_sha256
from edgeopt.hardware import fingerprint
from edgeopt.intake import assess
from edgeopt.profiles import load_profile
from edgeopt.records import Artifact

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

FAST = BenchSettings(warmup_runs=2, min_runs=30, min_duration_s=0.2, max_duration_s=5.0, timeout_s=120.0)
ORT_RUNTIME = {"intra_op_threads": 1, "inter_op_threads": None, "execution_mode": "sequential",
               "execution_provider": "cpu", "graph_optimization": "all"}


def _artifact(path: Path, candidate: str) -> Artifact:
    return Artifact(candidate=candidate, backend="onnxruntime", path=str(path), sha256=file_sha256(path),
                    size_bytes=path.stat().st_size, parent_sha256="0" * 64, precision="fp32",
                    runtime=dict(ORT_RUNTIME), placement={"target": "CPUExecutionProvider", "target_share": 1.0})


def _subject(tiny: dict[str, Path], artifact_path: Path, recorded: dict[str, float] | None = None) -> Subject:
    return Subject(model_name="tiny", version="1", artifact=_artifact(artifact_path, "tiny-artifact"),
                   baseline=_artifact(tiny["model"], "baseline-fp32"), signature=assess(tiny["model"]).inputs,
                   kind="cnn", profile="intel-cpu", recorded=recorded or {})


# the shipped profile's run-to-run spread (a log-ratio standard deviation): two fresh processes of the
# same model on this host differ by about that much, so a speed-up interval is never narrower
SPREAD = load_profile("intel-cpu").benchmark.run_to_run_spread


def _run(tiny: dict[str, Path], artifact_path: Path, out_dir: Path, *, rounds: int = 2,
         recorded: dict[str, float] | None = None, run_to_run_sd: float = SPREAD) -> CrossValidation:
    return cross_validate(subject=_subject(tiny, artifact_path, recorded), evaluation_path=str(tiny["eval"]),
                          out_dir=out_dir, hardware=fingerprint(), settings=FAST, rounds=rounds, threads=1,
                          run_to_run_sd=run_to_run_sd)


def _cells(cv: CrossValidation) -> dict[str, MatrixCell]:
    return {f"{c.runtime}/{c.device}": c for c in cv.cells}


@pytest.fixture(scope="module")
def fp32(tiny, tmp_path_factory) -> CrossValidation:
    """The FP32 model itself (a copy) as the artifact: the same model as the baseline."""
    d = tmp_path_factory.mktemp("cv-fp32")
    model = Path(shutil.copyfile(tiny["model"], d / "artifact.onnx"))
    return _run(tiny, model, d / "out", recorded={"speedup_p50": 1.0, "speedup_ci_low": 0.8, "speedup_ci_high": 1.25})


def test_runtimes_of_an_onnx_file_and_an_ir(tiny, tmp_path):
    import openvino as ov

    art = _artifact(tiny["model"], "a")
    choices = runtimes_for(artifact=art, threads=2)
    labels = [(b, d) for b, d, _ in choices]
    assert labels[:1] == [("onnxruntime", "CPU")] and ("openvino", "CPU") in labels
    assert choices[0][2] == ORT_RUNTIME  # its own runtime options, its own thread count kept...
    ov_runtime = next(r for b, d, r in choices if b == "openvino")
    assert ov_runtime["intra_op_threads"] == 1 and ov_runtime["device"] == "CPU"  # ...and used elsewhere
    open_threads = art.model_copy(update={"runtime": ORT_RUNTIME | {"intra_op_threads": None}})
    assert {r["intra_op_threads"] for _, _, r in runtimes_for(artifact=open_threads, threads=2)} == {2}
    assert skipped_runtimes(artifact=art) == []

    ir = tmp_path / "ir"
    ir.mkdir()
    ov.save_model(ov.convert_model(str(tiny["model"])), str(ir / "model.xml"), compress_to_fp16=False)
    ir_art = art.model_copy(update={"backend": "openvino", "path": str(ir),
                                    "runtime": {"device": "CPU", "performance_hint": "latency",
                                                "inference_precision": "f32", "intra_op_threads": None,
                                                "num_streams": None, "compiled": {"target": "CPU"}}})
    ir_choices = runtimes_for(artifact=ir_art, threads=1)
    assert [(b, d) for b, d, _ in ir_choices] == [("openvino", "CPU")]
    assert ir_choices[0][2]["intra_op_threads"] == 1
    assert any(s.startswith("onnxruntime: loads ONNX files") for s in skipped_runtimes(artifact=ir_art))


def test_fp32_artifact_is_faithful_everywhere_and_reproduces(fp32):
    cells = _cells(fp32)
    assert set(cells) == {"onnxruntime/CPU", "openvino/CPU"}
    for cell in cells.values():
        assert cell.status == "ok", cell
        assert cell.cosine_vs_baseline > 0.9999 and cell.top1_vs_baseline == 1.0
        assert cell.max_abs_vs_baseline < 1e-3
        assert cell.rounds == 2 and math.isfinite(cell.speedup_p50)
        assert cell.latency_ms_p50_ci[0] <= cell.latency_ms_p50 <= cell.latency_ms_p50_ci[1]
        assert cell.latency_ms_p50 > 0
    ort = cells["onnxruntime/CPU"]
    # the same model as the baseline, same runtime and threads: its speed-up interval contains 1 (a
    # fresh process each: their difference is what the run-to-run floor is there for; with 2 rounds and
    # no floor a 7% gap between two copies of one model once excluded 1)...
    assert ort.speedup_ci[0] <= 1.0 <= ort.speedup_ci[1], ort
    # ...and the floor is there: the interval is at least point ×/÷ e^(1.96·spread)
    band = math.exp(1.959964 * SPREAD)
    assert ort.speedup_ci[0] <= ort.speedup_p50 / band * (1 + 1e-6)
    assert ort.speedup_ci[1] >= ort.speedup_p50 * band * (1 - 1e-6)
    assert 0.5 < ort.speedup_p50 < 2.0
    assert ort.placement_share == 1.0 and cells["openvino/CPU"].placement_share is None
    assert fp32.agreement["onnxruntime/CPU~openvino/CPU"] > 0.9999
    assert fp32.reproducible is True and fp32.verdict == "pass"
    assert "only the ratio is compared" in fp32.summary


def test_matrix_rows_and_write(fp32, tmp_path):
    rows = matrix_rows(fp32)
    assert [r["runtime"] for r in rows] == ["onnxruntime", "openvino"]
    assert set(rows[0]) == {"runtime", "device", "status", "p50 ms [CI]", "speed-up [CI]", "cosine", "top-1",
                            "max abs", "placement", "note"}
    assert rows[0]["placement"] == "100%" and "[" in rows[0]["speed-up [CI]"]
    path = write(fp32, out_dir=tmp_path)
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert path.name == "matrix.json" and doc["verdict"] == "pass" and len(doc["cells"]) == 2


def test_damaged_weights_are_unfaithful(tiny, tmp_path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(tiny["model"]))
    for init in model.graph.initializer:
        if init.name == "w2":
            w = numpy_helper.to_array(init)
            w = w + np.random.default_rng(7).standard_normal(w.shape).astype(np.float32) * 2 * np.abs(w).max()
            init.CopyFrom(numpy_helper.from_array(w, "w2"))
    damaged = tmp_path / "damaged.onnx"
    onnx.save(model, str(damaged))
    cv = _run(tiny, damaged, tmp_path / "out", rounds=1)  # one round: the interval of one process's samples
    cells = _cells(cv)
    assert cells["onnxruntime/CPU"].rounds == 1 and math.isfinite(cells["onnxruntime/CPU"].speedup_ci[1])
    assert cells["onnxruntime/CPU"].status == "unfaithful"
    assert cells["onnxruntime/CPU"].cosine_vs_baseline < 0.99
    assert cv.verdict == "fail" and cv.reproducible is None  # nothing recorded
    assert "nothing recorded" in cv.summary


def test_other_runtime_failing_is_information_only(tiny, tmp_path):
    """An ONNX Runtime contrib op (com.microsoft Inverse, here of an identity: the outputs do not change)
    that OpenVINO cannot read: its cell fails with the harness's reason, the verdict still passes."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(tiny["model"]))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    gemm.output[0] = "raw"
    model.graph.initializer.append(numpy_helper.from_array(np.eye(2, dtype=np.float32), "eye"))
    model.graph.node.extend([
        helper.make_node("Inverse", ["eye"], ["inv"], domain="com.microsoft"),
        helper.make_node("Sub", ["inv", "eye"], ["zero"]),
        helper.make_node("ReduceSum", ["zero"], ["zsum"], keepdims=1),
        helper.make_node("Add", ["raw", "zsum"], ["logits"]),
    ])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    contrib = tmp_path / "contrib.onnx"
    onnx.save(model, str(contrib))
    cv = _run(tiny, contrib, tmp_path / "out", rounds=1)
    cells = _cells(cv)
    assert cells["onnxruntime/CPU"].status == "ok" and cells["onnxruntime/CPU"].cosine_vs_baseline > 0.9999
    failed = cells["openvino/CPU"]
    assert failed.status == "failed" and failed.message and "\n" not in failed.message
    assert math.isnan(failed.speedup_p50) and failed.rounds == 0
    assert cv.verdict == "pass" and cv.agreement == {}
    assert "openvino/CPU failed" in cv.summary


def test_recorded_speedup_far_off_is_not_reproducible(tiny, tmp_path):
    model = Path(shutil.copyfile(tiny["model"], tmp_path / "artifact.onnx"))
    # three rounds: with two, Student's t (12.7 at 95%) stretches the interval of a ~30 us model on this
    # shared machine to several times either way, and a far-off claim could still overlap it
    cv = _run(tiny, model, tmp_path / "out", rounds=3,
              recorded={"speedup_p50": 10.0, "speedup_ci_low": 9.0, "speedup_ci_high": 11.0})
    own = _cells(cv)["onnxruntime/CPU"]
    assert own.status == "not-reproducible" and "NOT reproduced" in own.message
    assert cv.reproducible is False and cv.verdict == "not-reproducible"
    assert _cells(cv)["openvino/CPU"].status == "ok"


def test_absolute_p50_compared_only_on_the_same_hardware():
    hw = fingerprint()
    cell = MatrixCell(runtime="onnxruntime", device="CPU", status="ok", latency_ms_p50=1.0,
                      latency_ms_p50_ci=(0.9, 1.1), speedup_p50=2.0, speedup_ci=(1.8, 2.2), rounds=3)
    recorded = {"speedup_p50": 2.1, "speedup_ci_low": 2.0, "speedup_ci_high": 2.3, "latency_ms_p50": 5.0}
    ok, notes = _reproduce(cell, recorded, hardware=hw, recorded_hardware=hw)
    assert ok is False and "NOT reproduced" in notes[-1]  # 5 ms recorded, ~1 ms now, same machine
    other = hw.model_copy(update={"cpu_model": "another CPU"})
    ok, notes = _reproduce(cell, recorded, hardware=hw, recorded_hardware=other)
    assert ok is True and "only the ratio is compared" in notes[-1]
    ok, _ = _reproduce(cell, recorded | {"latency_ms_p50": 1.3}, hardware=hw, recorded_hardware=hw)
    assert ok is True
    assert _reproduce(cell, {"speedup_p50": 3.0}, hardware=hw, recorded_hardware=None)[0] is False
