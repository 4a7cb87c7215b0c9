"""A registered dynamic-shape model is certified and cross-validated at the shapes it was optimized at."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgeopt.bench import BenchSettings
from edgeopt.certify.crossval import cross_validate
from edgeopt.certify.records import Subject
from edgeopt.data import file_sha256
from edgeopt.hardware import fingerprint
from edgeopt.input_shapes import registered_signature
from edgeopt.intake import assess
from edgeopt.records import Artifact
from tests.realworld_models import make_dynamic_hw

RUNTIME = {"intra_op_threads": 1, "execution_mode": "sequential", "execution_provider": "cpu",
           "graph_optimization": "all"}


def _artifact(path: Path, candidate: str, shapes: dict) -> Artifact:
    return Artifact(candidate=candidate, backend="onnxruntime", path=str(path), sha256=file_sha256(path),
                    size_bytes=path.stat().st_size, parent_sha256="0" * 64, precision="fp32",
                    runtime=RUNTIME | {"input_shapes": shapes}, placement={"target": "CPUExecutionProvider"})


def test_the_signature_takes_the_registered_artifacts_shapes(tmp_path):
    inputs = assess(make_dynamic_hw(tmp_path / "hw.onnx")).inputs
    sig = registered_signature(inputs, runtime={"input_shapes": {"x": [1, 3, 64, 48]}}, input_shapes={"x": (1, 3, 8, 8)})
    assert sig[0].shape == ("batch", 3, 64, 48)  # the artifact's own shapes win over the run's
    assert registered_signature(inputs, runtime={}, input_shapes={"x": (1, 3, 32, 32)})[0].shape == ("batch", 3, 32, 32)
    # an input that ran at each sample's own shape (a folder of per-sample feeds) keeps its open dims
    assert registered_signature(inputs, runtime={}, input_shapes={"x": (1, 3, 32, 32)},
                                per_sample_inputs=("x",))[0].shape == ("batch", 3, "height", "width")


@pytest.mark.heavy  # ~20-40 s: every runtime that loads the model, in fresh processes
def test_cross_validation_runs_at_the_registered_shape(tmp_path):
    model = make_dynamic_hw(tmp_path / "hw.onnx")
    shapes = {"x": [1, 3, 64, 48]}
    a = assess(model).model_copy(update={"input_shapes": {"x": (1, 3, 64, 48)}})
    art = _artifact(Path(shutil.copyfile(model, tmp_path / "artifact.onnx")), "ort-fp32-optimized", shapes)
    subject = Subject(model_name="hw", version="1", artifact=art, baseline=_artifact(model, "baseline-fp32", shapes),
                      signature=registered_signature(a.inputs, runtime=art.runtime, input_shapes=a.input_shapes),
                      kind="cnn", profile="intel-cpu")
    cv = cross_validate(subject=subject, evaluation_path=None, out_dir=tmp_path / "out", hardware=fingerprint(),
                        settings=BenchSettings(warmup_runs=1, min_runs=10, min_duration_s=0.05, timeout_s=120.0),
                        rounds=1, threads=1, run_to_run_sd=0.0)
    assert {c.runtime for c in cv.cells} >= {"onnxruntime", "openvino"}
    for c in cv.cells:
        assert c.status != "failed", (c.runtime, c.message)
        assert c.cosine_vs_baseline > 0.99, (c.runtime, c.message)
    # every measuring process (each runtime and the baseline) fed the registered shape, not generic open dims
    fed = [json.loads(p.read_text())["input_shapes"] for p in (tmp_path / "out").rglob("result.json")]
    assert fed and all(f == {"x": [1, 3, 64, 48]} for f in fed), fed
