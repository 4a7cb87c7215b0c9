"""The Olive backend: real Olive runs (olive-ai 0.13, offline) on the tiny CNN, fed our data.

Each Olive run costs ~15 s of process start-up (torch, transformers, Olive), so the runs are shared:
one run with two passes (two candidates) serves several tests; only what needs its own run has one.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest

from edgeopt import backends, workflow
from edgeopt.backends import olive_run
from edgeopt.backends.olive_worker import block_network
from edgeopt.data import load_dataset
from edgeopt.errors import CandidateFailed, ConfigError
from edgeopt.intake import assess
from edgeopt.profiles import load_profile
from tests.conftest import write_profile

olive_available = backends.get("olive").available()
needs_olive = pytest.mark.skipif(not olive_available, reason="olive-ai is not installed (extra 'olive')")

#: one Olive run, two outputs: the shape-inferred FP32 model and its static INT8 version on our data
TWO_PASSES = {"each_pass": True, "calibration_samples": 32,
              "passes": [{"type": "quant-preprocess", "name": "prep"},
                         {"type": "quantize-static", "name": "int8", "options": {"per_channel": True}}]}


def _build(tiny, recipe: dict, out: Path, calibration: Path | None = None, name: str = "c"):
    b = backends.get("olive")
    a = assess(str(tiny["model"]))
    cal = load_dataset(calibration, signature=a.inputs, role="calibration") if calibration else None
    return b.optimize(model=a.model, assessment=a, recipe=b.recipe_type.model_validate(recipe), candidate=name,
                      out_dir=out, calibration=cal)


def _input_scale(path: str) -> float:
    """The scale of the QuantizeLinear on the model's input (what calibration chose for it)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    return float(inits[q.input[1]])


@pytest.fixture(scope="session")
def two_outputs(tiny, tmp_path_factory):
    """Both candidates of TWO_PASSES, built as the flow builds them: one spec per output, one Olive run."""
    work = tmp_path_factory.mktemp("olive-two")
    a = assess(str(tiny["model"]))
    prof = load_profile(write_profile(work / "p.yaml", candidates=[
        {"name": "olive-two", "backend": "olive", "recipe": TWO_PASSES}]))
    specs, _ = workflow.plan(prof, source=a, converted=a)
    arts = [_build(tiny, s.recipe, work / "builds" / s.name, tiny["calibration"], name=s.name) for s in specs]
    return {"specs": specs, "artifacts": arts, "work": work}


@needs_olive
def test_one_run_yields_a_candidate_per_pass(two_outputs, tiny):
    import onnx
    import onnxruntime

    specs, (prep, int8) = two_outputs["specs"], two_outputs["artifacts"]
    assert [s.name for s in specs] == ["olive-two.prep", "olive-two.int8"]
    runs = [p for p in (two_outputs["work"] / "builds" / ".olive-runs").iterdir() if p.is_dir()]
    assert len(runs) == 1, "both candidates come from one Olive run"
    assert all(f"olive run {runs[0].name}" in " ".join(a.notes) for a in (prep, int8))
    assert olive_run._read(runs[0]).network_attempts == ()  # not even telemetry tried to connect
    assert prep.precision == "fp32" and int8.precision == "int8" and prep.sha256 != int8.sha256
    ops = {a.candidate: {n.op_type for n in onnx.load(a.path).graph.node} for a in (prep, int8)}
    assert "QuantizeLinear" not in ops[prep.candidate] and "QuantizeLinear" in ops[int8.candidate]
    # lineage: each candidate keeps Olive's config and log, and names the passes that made it
    assert {Path(e).name for e in int8.evidence} >= {"olive_config.json", "olive.log"}
    assert "olive passes: prep -> int8" in int8.notes[0] and "olive passes: prep (" in prep.notes[0]
    # calibrated on our data: the input's range is the one edgeopt's own static min-max INT8 takes from the
    # same 32 samples (Olive's dummy or Hub data would give another)
    ort = backends.get("onnxruntime")
    a = assess(str(tiny["model"]))
    own = ort.optimize(model=a.model, assessment=a, candidate="own", out_dir=two_outputs["work"] / "own",
                       recipe=ort.recipe_type(precision="int8", quantization="static", calibration_samples=32),
                       calibration=load_dataset(tiny["calibration"], signature=a.inputs, role="calibration"))
    assert _input_scale(int8.path) == pytest.approx(_input_scale(own.path), rel=1e-4)
    # the INT8 model still classifies like the FP32 one on the evaluation data
    x = np.load(tiny["eval"])["input"]
    ref = onnxruntime.InferenceSession(str(tiny["model"]), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = backends.get("olive").load(path=int8.path, runtime=int8.runtime).run({"input": x})[0]
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.9


@pytest.mark.heavy
@needs_olive
def test_static_quantization_calibrates_on_our_data(two_outputs, tiny, tmp_path):
    """Scaling our calibration data by 8 scales the input's quantization range by 8: Olive used our data
    (not dummy or hub data)."""
    scaled = tmp_path / "scaled.npz"
    np.savez(scaled, input=(np.load(tiny["calibration"])["input"] * 8).astype(np.float32))
    recipe = {**TWO_PASSES, "each_pass": False}
    art = _build(tiny, recipe, tmp_path / "out", scaled)
    base = _input_scale(two_outputs["artifacts"][1].path)
    assert _input_scale(art.path) == pytest.approx(8 * base, rel=0.02)
    assert "calibrated on the first 32 samples of scaled.npz" in art.notes


#: Olive's search over two calibration methods: one Olive run, one candidate per point
SEARCH = {"calibration_samples": 32,
          "passes": [{"type": "quantize-static", "name": "int8", "options": {"per_channel": True},
                      "search": {"calibrate_method": ["MinMax", "Percentile"]}}]}


@needs_olive
def test_a_search_yields_a_candidate_per_point_from_one_olive_run(tiny, tmp_path):
    """Issue 11: Olive's search produces several models; each point is a candidate, built from one Olive run,
    calibrated on our data with the point's method, and only the listed parameter varies (Olive's own
    default search space, e.g. quant_preprocess on/off, would otherwise double the points)."""
    a = assess(str(tiny["model"]))
    prof = load_profile(write_profile(tmp_path / "p.yaml", candidates=[
        {"name": "olive-search", "backend": "olive", "recipe": SEARCH}]))
    specs, _ = workflow.plan(prof, source=a, converted=a)
    assert [s.name for s in specs] == ["olive-search.minmax", "olive-search.percentile"]
    arts = [_build(tiny, s.recipe, tmp_path / "builds" / s.name, tiny["calibration"], name=s.name) for s in specs]
    (run,) = [p for p in (tmp_path / "builds" / ".olive-runs").iterdir() if p.is_dir()]
    result = olive_run._read(run)
    assert result.error is None and result.network_attempts == ()
    assert len([m for m in result.all_models if not m["pruned"]]) == 2, "exactly the two listed points ran"
    assert {m["config"]["calibrate_method"] for m in result.all_models} == {"MinMax", "Percentile"}
    assert arts[0].sha256 != arts[1].sha256 and all(x.precision == "int8" for x in arts)
    assert "search point int8.calibrate_method=MinMax of 2" in arts[0].notes[0]
    # the MinMax point is calibrated as edgeopt's own static min-max INT8 on the same 32 samples
    ort = backends.get("onnxruntime")
    own = ort.optimize(model=a.model, assessment=a, candidate="own", out_dir=tmp_path / "own",
                       recipe=ort.recipe_type(precision="int8", quantization="static", calibration_samples=32),
                       calibration=load_dataset(tiny["calibration"], signature=a.inputs, role="calibration"))
    assert _input_scale(arts[0].path) == pytest.approx(_input_scale(own.path), rel=1e-4)
    # percentile calibration clips the input's range: a smaller scale than min-max's
    assert _input_scale(arts[1].path) < _input_scale(arts[0].path)
    config = json.loads((run / "olive_config.json").read_text())["passes"]["int8"][0]["config"]
    assert config["calibrate_method"] == ["MinMax", "Percentile"] and config["quant_preprocess"] in (True, False)


@needs_olive
def test_an_output_that_does_not_load_fails_the_candidate(two_outputs, tiny):
    """Olive's record says the model is there; it is truncated: the candidate fails as invalid-output."""
    work = two_outputs["work"]
    (run,) = [p for p in (work / "builds" / ".olive-runs").iterdir() if p.is_dir()]
    model = next(p for p in (run / "cache").rglob("*.onnx") if b"QuantizeLinear" in p.read_bytes())
    original = model.read_bytes()
    try:
        model.write_bytes(original[: len(original) // 3])
        with pytest.raises(CandidateFailed) as info:
            _build(tiny, {**TWO_PASSES, "output": "int8"}, work / "builds" / "again", tiny["calibration"])
    finally:
        model.write_bytes(original)
    assert info.value.reason == "invalid-output" and "does not load" in str(info.value)
    assert any(e.endswith("olive.log") for e in info.value.evidence)


@pytest.mark.heavy
@needs_olive
def test_olive_needing_the_network_fails_as_network(tmp_path):
    """An Olive workflow that starts from a Hugging Face Hub model id (as `olive optimize -m <id>` does): in
    edgeopt's Olive process the download is refused and the build fails as network, not as a build error."""
    from edgeopt.backends.olive import OliveRecipe, _chosen_model

    folder = tmp_path / "run"
    folder.mkdir()
    recipe = OliveRecipe.model_validate({"passes": ["quantize-dynamic"]})
    config = {"input_model": {"type": "HfModel", "config": {"model_path": "hf-internal-testing/tiny-random-BertModel",
                                                             "task": "feature-extraction"}},
              "passes": {"convert": [{"type": "OnnxConversion", "config": {}}],
                         "quantize-dynamic": [{"type": "OnnxDynamicQuantization", "config": {}}]},
              "engine": {"evaluate_input_model": False, "output_dir": str(folder / "output"),
                         "cache_dir": str(folder / "cache")}}
    (folder / "olive_config.json").write_text(json.dumps(config), encoding="utf-8")
    result = olive_run._run_process(folder, timeout_s=600)
    with pytest.raises(CandidateFailed) as info:
        _chosen_model(result, index=0, chosen=recipe.passes[0], recipe=recipe, candidate="c", evidence=())
    assert info.value.reason == "network", str(info.value)


def test_the_olive_process_cannot_reach_the_network():
    attempts: list[str] = []
    original = (socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo)
    try:
        block_network(attempts)
        with pytest.raises(OSError, match="network access is blocked"):
            socket.getaddrinfo("huggingface.co", 443)
        with socket.socket() as s, pytest.raises(OSError, match="network access is blocked"):
            s.connect(("192.0.2.1", 443))
        with socket.socket() as s:  # loopback stays open (a local server is not the network): refused, not blocked
            s.connect_ex(("127.0.0.1", 9))
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = original
    assert attempts == ["huggingface.co:443", "192.0.2.1:443"]


@pytest.mark.parametrize(("recipe", "says"), [
    ({"passes": ["quantize-foo"]}, "recipe.passes.0.type: Input should be 'transformer-optimization'"),
    ({"passes": [{"type": "quantize-static", "options": {"calibrate": "MinMax"}}]},
     "unknown option(s) 'calibrate' for Olive pass 'quantize-static' (allowed: per_channel"),
    ({"passes": ["fp16", "fp16"]}, "pass name(s) fp16 used twice"),
    ({"passes": [{"type": "quantize-static", "search": {"calibrate_method": ["MinMax"]}}]},
     "search 'calibrate_method' of Olive pass 'quantize-static' needs two or more distinct values"),
    ({"passes": [{"type": "quantize-static", "options": {"per_channel": True}, "search": {"per_channel": [True, False]}}]},
     "'per_channel' is both a fixed option and searched"),
    ({"passes": [{"type": "quantize-static", "search": {"calibrate": ["MinMax", "Entropy"]}}]},
     "unknown option(s) 'calibrate' for Olive pass 'quantize-static'"),
    ({"each_pass": True, "passes": [{"type": "quantize-static", "search": {"per_channel": [True, False]}}]},
     "each_pass and a pass 'search' cannot be combined"),
    ({"passes": ["fp16"], "output": "int8"}, "output 'int8' is not one of the passes (allowed: fp16)"),
])
def test_bad_recipes_are_one_line_profile_errors(tmp_path, recipe, says):
    path = write_profile(tmp_path / "p.yaml", candidates=[{"name": "o", "backend": "olive", "recipe": recipe}])
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_profiles_carry_olive_candidates():
    intel = {c.name: c for c in load_profile("intel-cpu").candidates if c.backend == "olive"}
    assert intel["olive-int8-static"].kinds == ("cnn",)
    recipe = backends.recipe_type("olive").model_validate(intel["olive-bert"].recipe)
    assert list(recipe.outputs()) == ["fused", "int8"] and recipe.needs_calibration()
    gpu = {c.name: c.recipe.get("execution_provider") for c in load_profile("nvidia-gpu").candidates
           if c.backend == "olive"}
    assert set(gpu.values()) == {"cuda", "tensorrt"}


@needs_olive
def test_cuda_recipe_builds_on_a_gpu_host(tiny, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA execution provider on this host (onnxruntime-gpu and an NVIDIA GPU needed)")
    art = _build(tiny, {"execution_provider": "cuda", "passes": [{"type": "fp16"}]}, tmp_path / "out")
    assert art.precision == "fp16" and art.placement["target"] == "CUDAExecutionProvider"
