"""Tests of the reference model zoo (edgeopt.zoo): real training, real ONNX, real onnxruntime."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgeopt import zoo
from edgeopt.errors import BackendUnavailable, ConfigError

pytest.importorskip("torch")
pytest.importorskip("sklearn")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _ort_accuracy(entry: zoo.ZooEntry) -> float:
    data = np.load(entry.evaluation)
    logits = _session(entry.model).run(["logits"], {"input": data["input"]})[0]
    return float(np.mean(logits.argmax(axis=1) == data["labels"]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> zoo.ZooEntry:
    messages: list[str] = []
    entry = zoo.build("digits-tiny", out_dir=tmp_path_factory.mktemp("zoo"), progress=messages.append)
    assert any(m.startswith("epoch 1/") and "val_acc" in m for m in messages), messages
    return entry


def test_registry_matches_recipes() -> None:
    from edgeopt.zoo import digits

    assert set(zoo.ZOO_MODELS) == set(digits.RECIPES) | set(zoo._BUILDERS)
    assert all(desc and "\n" not in desc for desc in zoo.ZOO_MODELS.values())


def test_import_does_not_import_torch() -> None:
    code = "import sys, edgeopt.zoo; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_files_and_layout(tiny: zoo.ZooEntry) -> None:
    assert tiny.folder.name == "digits-tiny"
    for path in (tiny.model, tiny.calibration, tiny.evaluation, tiny.folder / "model.json"):
        assert path.is_file() and path.parent == tiny.folder
    # nothing else left behind: no temporary build folders, no external data files
    assert sorted(p.name for p in tiny.folder.iterdir()) == [
        "calibration.npz",
        "eval.npz",
        "model.json",
        "model.onnx",
    ]
    assert [p.name for p in tiny.folder.parent.iterdir()] == ["digits-tiny"]


def test_onnx_signature(tiny: zoo.ZooEntry) -> None:
    model = onnx.load(str(tiny.model))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and out.name == "logits"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert in_dims == ["batch", 1, 32, 32]
    assert out_dims == ["batch", 10]


@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_runs_batches(tiny: zoo.ZooEntry, batch: int) -> None:
    x = np.load(tiny.evaluation)["input"][:batch]
    (logits,) = _session(tiny.model).run(["logits"], {"input": x})
    assert logits.shape == (batch, 10) and logits.dtype == np.float32
    assert np.isfinite(logits).all()


def test_data_shapes_and_dtypes(tiny: zoo.ZooEntry) -> None:
    with np.load(tiny.calibration) as cal:
        assert sorted(cal.files) == ["input"]
        x = cal["input"]
        assert x.dtype == np.float32 and x.shape[1:] == (1, 32, 32) and 150 <= x.shape[0] <= 250
    with np.load(tiny.evaluation) as ev:
        assert sorted(ev.files) == ["input", "labels"]
        x, y = ev["input"], ev["labels"]
        assert x.dtype == np.float32 and x.shape[1:] == (1, 32, 32) and 300 <= x.shape[0] <= 400
        assert y.dtype == np.int64 and y.shape == (x.shape[0],)
        assert set(np.unique(y)) == set(range(10))  # stratified: every class is evaluated
    counts = tiny.metadata["counts"]
    assert counts["calibration"] == len(np.load(tiny.calibration)["input"])
    assert counts["evaluation"] == len(np.load(tiny.evaluation)["labels"])
    assert counts["train"] + counts["calibration"] + counts["evaluation"] <= 1797


def test_calibration_and_eval_are_disjoint(tiny: zoo.ZooEntry) -> None:
    cal = np.load(tiny.calibration)["input"]
    ev = np.load(tiny.evaluation)["input"]
    cal_rows = {row.tobytes() for row in cal.reshape(len(cal), -1)}
    ev_rows = {row.tobytes() for row in ev.reshape(len(ev), -1)}
    assert len(cal_rows) == len(cal) and len(ev_rows) == len(ev)
    assert not cal_rows & ev_rows


def test_accuracy_is_real_and_reproducible(tiny: zoo.ZooEntry) -> None:
    assert tiny.accuracy >= 0.85
    assert tiny.accuracy == tiny.metadata["accuracy"]
    assert _ort_accuracy(tiny) == pytest.approx(tiny.metadata["accuracy"], abs=1e-6)


def test_metadata(tiny: zoo.ZooEntry) -> None:
    meta = json.loads((tiny.folder / "model.json").read_text())
    assert meta == tiny.metadata
    assert meta["name"] == "digits-tiny"
    assert meta["description"] == zoo.ZOO_MODELS["digits-tiny"]
    assert isinstance(meta["seed"], int)
    assert meta["train_seconds"] > 0
    assert meta["parameter_count"] > 1000
    assert meta["torch_version"]
    assert meta["onnx_max_abs_diff_vs_torch"] < 1e-3


def test_second_build_is_fast_path(tiny: zoo.ZooEntry) -> None:
    mtime = tiny.model.stat().st_mtime_ns
    start = time.perf_counter()
    again = zoo.build("digits-tiny", out_dir=tiny.folder.parent)
    assert time.perf_counter() - start < 1.0
    assert again == tiny
    assert again.model.stat().st_mtime_ns == mtime
    assert zoo.load("digits-tiny", out_dir=tiny.folder.parent) == tiny


def test_incomplete_folder_is_rebuilt(tiny: zoo.ZooEntry, tmp_path: Path) -> None:
    broken = tmp_path / "digits-tiny"
    broken.mkdir()
    (broken / "model.json").write_text("{not json")
    assert zoo.load("digits-tiny", out_dir=tmp_path) is None
    entry = zoo.build("digits-tiny", out_dir=tmp_path)
    assert entry.accuracy == tiny.accuracy  # deterministic: same seed, recipe and thread count
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-tiny"]


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeopt.zoo import digits

    def boom(*args: object, **kwargs: object) -> float:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(digits, "train", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        zoo.build("digits-tiny", out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="digits-resnet.*digits-tiny"):
        zoo.build("imagenet-resnet", out_dir=tmp_path)
    with pytest.raises(ConfigError):
        zoo.load("imagenet-resnet", out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "edgeopt.zoo.digits", raising=False)
    monkeypatch.delattr(zoo, "digits", raising=False)
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(BackendUnavailable, match=r"edgeopt\[zoo\].*missing: torch") as info:
        zoo.build("digits-tiny", out_dir=tmp_path)
    assert info.value.backend == "zoo" and info.value.extra == "zoo"


@pytest.fixture(scope="module")
def resnet(digits_resnet_zoo: Path) -> zoo.ZooEntry:
    return zoo.build("digits-resnet", out_dir=digits_resnet_zoo)  # the session's build, not trained again


@pytest.mark.slow
def test_resnet_accuracy(resnet: zoo.ZooEntry) -> None:
    assert resnet.accuracy >= 0.95
    assert _ort_accuracy(resnet) == pytest.approx(resnet.accuracy, abs=1e-6)
    assert 11_000_000 <= resnet.metadata["parameter_count"] <= 11_300_000
    for batch in (1, 7):
        x = np.load(resnet.evaluation)["input"][:batch]
        assert _session(resnet.model).run(["logits"], {"input": x})[0].shape == (batch, 10)


def test_force_rebuilds_and_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeopt.zoo import digits

    builds: list[Path] = []

    def fake_build_into(name: str, folder: Path, **kwargs: object) -> dict[str, object]:
        builds.append(folder)
        assert folder.parent == tmp_path and folder.name.startswith(".")  # built beside the target
        for file in ("model.onnx", "calibration.npz", "eval.npz"):
            (folder / file).write_bytes(str(len(builds)).encode())
        counts = {"train": 1, "calibration": 1, "evaluation": 1}
        return {"name": name, "accuracy": 0.5 + len(builds) / 10, "train_seconds": 0.0, "counts": counts}

    monkeypatch.setattr(digits, "build_into", fake_build_into)
    first = zoo.build("digits-tiny", out_dir=tmp_path)
    assert zoo.build("digits-tiny", out_dir=tmp_path) == first and len(builds) == 1
    second = zoo.build("digits-tiny", out_dir=tmp_path, force=True)
    assert len(builds) == 2 and second.accuracy == pytest.approx(0.7)
    assert second.model.read_bytes() == b"2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-tiny"]
