"""Shared fixtures: isolated Prefect/MLflow stores, a tiny real ONNX CNN with data, fast profiles."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Isolate every store before prefect or mlflow is imported anywhere.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="edgeopt-tests-"))
os.environ["EDGEOPT_HOME"] = str(_SESSION_DIR / "home")
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect")
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(_SESSION_DIR / "prefect-results")
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(_SESSION_DIR / "prefect-results")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def make_tiny_cnn(path: Path, *, seed: int = 0, channels: int = 16) -> Path:
    """A small real CNN (Conv-Relu-Conv-Relu-GAP-Gemm), input 'input' [batch,1,8,8] → 'logits' [batch,4]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((channels, 1, 3, 3)).astype(np.float32) * 0.5
    b1 = rng.standard_normal(channels).astype(np.float32) * 0.1
    w2 = rng.standard_normal((channels, channels, 3, 3)).astype(np.float32) * (1 / channels) ** 0.5
    b2 = rng.standard_normal(channels).astype(np.float32) * 0.1
    wf = rng.standard_normal((channels, 4)).astype(np.float32)
    bf = np.zeros(4, np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny-cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"),
                                                     (wf, "wf"), (bf, "bf"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _run(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The tiny CNN with calibration data and labelled evaluation data (labels from the FP32 model,
    a tenth of them changed, so the baseline accuracy is ~0.9 and measurable)."""
    d = tmp_path_factory.mktemp("tiny")
    model = make_tiny_cnn(d / "tiny.onnx")
    rng = np.random.default_rng(1)
    cal = rng.standard_normal((64, 1, 8, 8)).astype(np.float32)
    ev = rng.standard_normal((120, 1, 8, 8)).astype(np.float32)
    labels = _run(model, ev).argmax(axis=1).astype(np.int64)
    labels[::10] = (labels[::10] + 1) % 4
    np.savez(d / "calibration.npz", input=cal)
    np.savez(d / "eval.npz", input=ev, labels=labels)
    return {"model": model, "calibration": d / "calibration.npz", "eval": d / "eval.npz", "dir": d}


def write_profile(path: Path, *, gates: dict | None = None, candidates: list[dict] | None = None,
                  benchmark: dict | None = None) -> Path:
    """A fast profile for tests: short benchmarks, the given gates and candidates."""
    doc = {
        "description": "test profile",
        "hardware": {"arch": "x86_64", "device": "cpu", "threads": 1},
        # run_to_run_spread 0: these tests judge one run's rounds; the host's run-to-run floor under the
        # speed-up intervals has its own tests (tests/test_reproducibility.py, tests/flows/test_integrity.py)
        "benchmark": {"warmup_runs": 3, "min_runs": 30, "min_duration_s": 0.2, "timeout_s": 120, "repeats": 1,
                      "run_to_run_spread": 0.0, **(benchmark or {})},
        "gates": gates or {},
        "candidates": candidates or [
            {"name": "ort-fp32-optimized", "backend": "onnxruntime", "recipe": {"graph_optimization": "all"}},
            {"name": "ort-int8-dynamic", "backend": "onnxruntime", "recipe": {"precision": "int8", "quantization": "dynamic"}},
            {"name": "ort-int8-static-minmax", "backend": "onnxruntime",
             "recipe": {"precision": "int8", "quantization": "static", "calibration_method": "minmax"}},
        ],
    }
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def make_mlp(path: Path, *, seed: int = 0, width: int = 1024, depth: int = 3) -> Path:
    """A weight-heavy MLP ('x' [batch,256] → 'logits' [batch,10]): memory-bound at batch 1, so INT8
    weights make it measurably faster and smaller."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes, prev, dim = [], [], "x", 256
    for i in range(depth):
        w = (rng.standard_normal((dim, width)) / np.sqrt(dim)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]), helper.make_node("Relu", [f"m{i}"], [f"h{i}"])]
        prev, dim = f"h{i}", width
    inits.append(numpy_helper.from_array((rng.standard_normal((dim, 10)) / np.sqrt(dim)).astype(np.float32), "wo"))
    nodes.append(helper.make_node("MatMul", [prev, "wo"], ["logits"]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="session")
def mlp(tmp_path_factory) -> dict[str, Path]:
    import onnxruntime as ort

    d = tmp_path_factory.mktemp("mlp")
    model = make_mlp(d / "mlp.onnx")
    rng = np.random.default_rng(2)
    ev = rng.standard_normal((100, 256)).astype(np.float32)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    labels = sess.run(None, {"x": ev})[0].argmax(axis=1).astype(np.int64)
    np.savez(d / "calibration.npz", x=rng.standard_normal((32, 256)).astype(np.float32))
    np.savez(d / "eval.npz", x=ev, labels=labels)
    return {"model": model, "calibration": d / "calibration.npz", "eval": d / "eval.npz", "dir": d}


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT checkpoint made here, its ONNX export (tokenizer and export.json beside it), and
    token data of real short sentences (the tokenizer is nearly character-level): calibration and
    evaluation sets kept apart, padded to 64 tokens."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from edgeopt.intake.hf import export_onnx
    from edgeopt.text import default_sentences, tokenize_to_npz
    from tests.tinybert import make_tiny_bert

    d = tmp_path_factory.mktemp("tiny-bert")
    ckpt = make_tiny_bert(d / "ckpt")
    model = export_onnx(ckpt, out_dir=d / "onnx")
    sentences = [s for s in default_sentences(count=500, seed=3) if len(s) < 60][:64]
    (d / "calibration.txt").write_text("\n".join(sentences[:32]) + "\n", encoding="utf-8")
    (d / "eval.txt").write_text("\n".join(sentences[32:]) + "\n", encoding="utf-8")
    cal = tokenize_to_npz(sentences[:32], tokenizer_dir=model.parent, out_path=d / "calibration.npz", seq_len=64)
    ev = tokenize_to_npz(sentences[32:], tokenizer_dir=model.parent, out_path=d / "eval.npz", seq_len=64)
    return {"ckpt": ckpt, "model": model, "calibration": cal, "eval": ev, "dir": d}


#: training steps of the tests' tiny Llama: enough for peaked next-token distributions (the zoo's full
#: build trains for edgeopt.zoo.llama.STEPS)
TINY_LLAMA_STEPS = 40


@pytest.fixture(scope="session")
def digits_resnet_zoo(tmp_path_factory) -> Path:
    """The reference ResNet built once per session (its training is the suite's most expensive setup);
    the folder holding ``digits-resnet/``. Tests that need it in their own home copy it there."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from edgeopt import zoo

    out = tmp_path_factory.mktemp("zoo-resnet")
    zoo.build("digits-resnet", out_dir=out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> dict[str, Path]:
    """The zoo's tiny Llama briefly trained (its tokenizer, config and texts), and its F16 GGUF."""
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    from edgeopt.convert.hf_gguf import convert_hf_to_gguf
    from edgeopt.zoo.llama import build_into

    folder = tmp_path_factory.mktemp("tiny-llama")
    meta = build_into("tiny-llama", folder, description="tests", steps=TINY_LLAMA_STEPS)
    f16 = convert_hf_to_gguf(folder / "hf", folder / "model-f16.gguf")
    return {"folder": folder, "hf": folder / "hf", "f16": f16, "calibration": folder / "calibration.txt",
            "eval": folder / "eval.txt", "meta": meta}
