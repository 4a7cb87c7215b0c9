"""Real-world models and bad names through the `edgeopt` command, as a user runs it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import write_profile
from tests.realworld_models import make_dynamic_hw, make_failing_reshape, make_if_network, make_stateful
from tests.test_cli import _registered, cli_env, run  # noqa: F401 - the fixture is used by name


def _one_error_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_assess_shows_ops_inside_control_flow(cli_env, tmp_path):  # noqa: F811
    model = make_if_network(tmp_path / "if.onnx")
    r = run(cli_env, "assess", model)
    assert r.returncode == 0, r.stderr
    assert "kind=cnn" in r.stdout and "params=160" in r.stdout
    assert "inside If/Loop/Scan: Conv×2, Flatten×2, GlobalAveragePool×2, Relu×2" in r.stdout
    assert "runtimes load opset: onnxruntime <= " in r.stdout


@pytest.mark.parametrize("name", ["../../etc/x", "a/b", "..", "with space", "-dash-first"])
def test_bad_model_name_is_refused_before_anything_is_written(cli_env, tiny, tmp_path, name):  # noqa: F811
    home = tmp_path / "home"
    env = {**cli_env, "EDGEOPT_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
    r = run(env, "optimize", tiny["model"], "--model-name", name)
    assert r.returncode == 2, r.stdout + r.stderr
    line = _one_error_line(r)
    assert f"--model-name {name!r} is not a valid name" in line
    assert "use letters, digits, '.', '_' and '-'" in line
    assert not home.exists()


def test_bad_registered_name_in_lifecycle_commands(cli_env):  # noqa: F811
    r = run(cli_env, "rollback", "../x")
    assert r.returncode == 2
    assert "model name '../x' is not a valid name" in _one_error_line(r)


def test_native_runtime_errors_go_to_the_build_log_not_the_terminal(cli_env, tmp_path):  # noqa: F811
    model = make_failing_reshape(tmp_path / "reshape.onnx")
    profile = write_profile(tmp_path / "p.yaml", candidates=[
        {"name": "ort-fp32-optimized", "backend": "onnxruntime", "recipe": {"graph_optimization": "all"}}])
    r = run(cli_env, "optimize", model, "--profile", profile)
    assert r.returncode == 2, r.stdout + r.stderr
    line = _one_error_line(r)  # ONNX Runtime's red [E:onnxruntime:...] lines no longer come first
    assert "the baseline baseline-fp32 could not be built" in line
    build_log = Path(re.search(r"\(build log: ([^)]+)\)", line).group(1))
    assert "[E:onnxruntime:" in build_log.read_text() and "Reshape" in build_log.read_text()
    assert _registered(Path(cli_env["EDGEOPT_HOME"])) == []


@pytest.fixture(scope="module")
def dynamic_hw(tmp_path_factory):
    d = tmp_path_factory.mktemp("dynamic-hw")
    profile = write_profile(d / "p.yaml", candidates=[
        {"name": "ort-fp32-optimized", "backend": "onnxruntime", "recipe": {"graph_optimization": "all"}},
        {"name": "ov-fp32", "backend": "openvino", "recipe": {"precision": "fp32"}}])
    return {"model": make_dynamic_hw(d / "dynamic_hw.onnx"), "profile": profile}


@pytest.mark.parametrize("shape, expected", [
    (None, (r"input 'x' \(shape batch, 3, height, width\) has dynamic dims height, width that nothing sets: "
           r"give them with --shape x=1x3xHEIGHTxWIDTH")),
    ("y=1x3x64x64", r"--shape y=\.\.\.: the model has no input 'y' \(inputs: x\)"),
    ("x=1x3x64", r"--shape x=1x3x64: the input has 4 dims \(batch, 3, height, width\), not 3"),
    ("x=1x4x64x64", r"--shape x=1x4x64x64: dim 1 is fixed at 3 in the model"),
    ("x=1x3x64xW", r"--shape 'x=1x3x64xW': write NAME=DxDx\.\.\. with positive integer dims"),
])
def test_bad_shapes_are_one_line_nonzero_exit_nothing_registered(cli_env, dynamic_hw, shape, expected):  # noqa: F811
    before = len(_registered(Path(cli_env["EDGEOPT_HOME"])))
    r = run(cli_env, "optimize", dynamic_hw["model"], "--profile", dynamic_hw["profile"],
            *(["--shape", shape] if shape else []))
    assert r.returncode == 2, r.stdout + r.stderr
    assert re.search(expected, _one_error_line(r))
    assert len(_registered(Path(cli_env["EDGEOPT_HOME"]))) == before


def test_dynamic_hw_model_runs_at_the_requested_shape(cli_env, dynamic_hw, tmp_path):  # noqa: F811
    import json

    import mlflow

    r = run(cli_env, "optimize", dynamic_hw["model"], "--profile", dynamic_hw["profile"], "--shape", "x=1x3x64x48",
            "--model-name", "dynamic-hw", "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "input shapes (batch included): x=1x3x64x48" in r.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["input_shapes"] == {"x": [1, 3, 64, 48]}
    by_name = {o["spec"]["name"]: o for o in report["outcomes"]}
    # the baseline and each candidate were fed 1x3x64x48 in their measuring processes; OpenVINO's
    # build check ran at that size too (at 1x1, the default for open dims, its MaxPool has no output)
    for name in ("baseline-fp32", "ort-fp32-optimized", "ov-fp32"):
        assert by_name[name]["failure"] is None, by_name[name]["failure"]
        assert by_name[name]["benchmark"]["input_shapes"] == {"x": [1, 3, 64, 48]}, name
    client = mlflow.MlflowClient(tracking_uri=report["tracking_uri"])
    assert client.get_run(report["mlflow_run_id"]).data.params["input_shape.x"] == "1x3x64x48"


@pytest.fixture(scope="module")
def stateful(tmp_path_factory):
    import numpy as np

    d = tmp_path_factory.mktemp("stateful")
    rng = np.random.default_rng(0)
    # complete feeds: a sample axis in front of each input's full shape (the state's batch is axis 1)
    np.savez(d / "data.npz", x=rng.standard_normal((12, 10, 1, 8)).astype(np.float32),
             state=np.zeros((12, 1, 1, 16), np.float32), sr=np.full((12,), 0.5, np.float32))
    np.savez(d / "bad.npz", x=rng.standard_normal((12, 10, 1, 8)).astype(np.float32),
             state=np.zeros((12, 2, 1, 16), np.float32), sr=np.full((12,), 0.5, np.float32))
    profile = write_profile(d / "p.yaml", candidates=[
        {"name": "ort-int8-static-minmax", "backend": "onnxruntime",
         "recipe": {"precision": "int8", "quantization": "static", "calibration_method": "minmax"}}])
    return {"model": make_stateful(d / "stateful.onnx"), "data": d / "data.npz", "bad": d / "bad.npz",
            "profile": profile}


def test_state_of_the_wrong_shape_is_one_line(cli_env, stateful):  # noqa: F811
    r = run(cli_env, "optimize", stateful["model"], "--profile", stateful["profile"], "--eval", stateful["bad"])
    assert r.returncode == 2, r.stdout + r.stderr
    assert "input 'state' has shape [12, 2, 1, 16]: complete feeds of [2, 1, 16], the model expects " \
           "[1, 'batch', 16]; give an array of shape (samples, 1, batch, 16)" in _one_error_line(r)


def test_stateful_model_with_a_scalar_input_is_calibrated_and_measured(cli_env, stateful, tmp_path):  # noqa: F811
    import json

    r = run(cli_env, "optimize", stateful["model"], "--profile", stateful["profile"], "--eval", stateful["data"],
            "--calibration", stateful["data"], "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "input shapes (batch included): x=10x1x8, state=1x1x16, sr=scalar" in r.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["input_shapes"] == {"x": [10, 1, 8], "state": [1, 1, 16], "sr": []}
    for o in report["outcomes"]:  # the static INT8 build consumed the complete feeds as calibration data
        assert o["failure"] is None, o["failure"]
        assert o["benchmark"]["input_shapes"] == {"x": [10, 1, 8], "state": [1, 1, 16], "sr": []}
        # outputs of complete feeds are compared row by row along their first axis: 12 samples x 10 steps
        assert o["evaluation"]["samples"] == 12 * 10


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    import numpy as np

    from tests.realworld_models import make_dense_hw

    d = tmp_path_factory.mktemp("dense")
    rng = np.random.default_rng(0)
    (d / "imgs").mkdir()
    for i, (h, w) in enumerate([(24, 32), (40, 24), (32, 32)]):  # one image per file, each at its own size
        np.savez(d / "imgs" / f"{i:03d}.npz", image=rng.standard_normal((1, 3, h, w)).astype(np.float32))
    profile = write_profile(d / "p.yaml", candidates=[
        {"name": "ort-int8-static-minmax", "backend": "onnxruntime",
         "recipe": {"precision": "int8", "quantization": "static", "calibration_method": "minmax"}}],
        benchmark={"warmup_runs": 1, "min_runs": 10, "min_duration_s": 0.05})
    return {"model": make_dense_hw(d / "dense.onnx"), "imgs": d / "imgs", "profile": profile, "dir": d}


@pytest.mark.heavy  # ~60-75 s on a loaded 2-core machine; tests/test_data_folder.py covers it without Prefect
def test_a_folder_of_images_of_different_sizes_calibrates_evaluates_and_measures(cli_env, dense, tmp_path):  # noqa: F811
    import json

    r = run(cli_env, "optimize", dense["model"], "--profile", dense["profile"], "--eval", dense["imgs"],
            "--calibration", dense["imgs"], "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "per-sample shapes: image ran at each sample's own shape" in r.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["per_sample_inputs"] == ["image"]
    sizes = [{"image": [1, 3, h, w]} for h, w in [(24, 32), (32, 32), (40, 24)]]
    for o in report["outcomes"]:  # the static INT8 build was calibrated on the folder
        assert o["failure"] is None, o["failure"]
        result = json.loads((Path(o["benchmark"]["samples_path"]).parent / "result.json").read_text())
        assert result["feed_shapes"] == sizes, o["spec"]["name"]  # each image measured at its own size
        # the mask is compared pixel by pixel with the baseline's, on the same images
        assert o["evaluation"]["samples"] == 24 * 32 + 40 * 24 + 32 * 32


def test_a_per_sample_file_that_disagrees_with_a_fixed_shape_is_one_line(cli_env, dense):  # noqa: F811
    before = len(_registered(Path(cli_env["EDGEOPT_HOME"])))
    r = run(cli_env, "optimize", dense["model"], "--profile", dense["profile"], "--eval", dense["imgs"],
            "--shape", "image=1x3x24x32")
    assert r.returncode == 2, r.stdout + r.stderr
    assert ("001.npz: input 'image' has shape [1, 3, 40, 24], the run needs (batch, 3, 24, 32) (dim 2 is 24): "
            "this input takes one shape, so every sample must have it") in _one_error_line(r)
    assert len(_registered(Path(cli_env["EDGEOPT_HOME"]))) == before


def test_several_shapes_with_eval_data_of_one_shape_is_one_line(cli_env, dense):  # noqa: F811
    before = len(_registered(Path(cli_env["EDGEOPT_HOME"])))
    r = run(cli_env, "optimize", dense["model"], "--profile", dense["profile"], "--eval", dense["imgs"],
            "--shape", "image=1x3x24x32", "--shape", "image=1x3x48x48")
    assert r.returncode == 2, r.stdout + r.stderr
    assert ("--shape gives 2 shape settings, measured on generated inputs at each shape; --eval data has one "
            "shape: drop --eval (or give one --shape per input)") in _one_error_line(r)
    assert len(_registered(Path(cli_env["EDGEOPT_HOME"]))) == before
