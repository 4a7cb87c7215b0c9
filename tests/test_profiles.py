from __future__ import annotations

import pytest
import yaml

from edgeopt.errors import ConfigError
from edgeopt.hardware import fingerprint
from edgeopt.profiles import host_mismatches, list_profiles, load_profile

SHIPPED = ("intel-cpu", "apple-silicon", "nvidia-gpu", "arm64")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_load_and_validate(name):
    p = load_profile(name)
    assert p.name == name
    assert p.candidates
    assert p.baseline.spec(baseline=True).baseline


def test_list_profiles_has_the_four_targets():
    assert set(SHIPPED) <= set(list_profiles())


def test_default_gates_are_the_workflow_defaults():
    g = load_profile("intel-cpu").gates
    assert (g.accuracy_ratio_min, g.speedup_min, g.memory_reduction_min) == (0.95, 2.0, 0.5)


def _write(tmp_path, doc) -> str:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return str(path)


BASE = {"hardware": {"arch": "x86_64"},
        "candidates": [{"name": "a", "backend": "onnxruntime", "recipe": {}}]}


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.update(speed=1), r"p\.yaml: speed: unknown key 'speed' \(allowed: name, description, hardware"),
    (lambda d: d.update(gates={"speedup_min": "fast"}), r"gates\.speedup_min: .*valid number.*got 'fast'"),
    (lambda d: d.update(gates={"speedup": 2}), r"gates\.speedup: unknown key 'speedup' \(allowed: accuracy_ratio_min"),
    (lambda d: d["hardware"].update(arch="sparc"), r"hardware\.arch: Input should be 'x86_64' or 'arm64' \(got 'sparc'\)"),
    (lambda d: d.update(candidates=[]), r"candidates: the candidate list is empty"),
    (lambda d: d["candidates"][0].update(backend="tflite"), r"candidates\[0\]: unknown backend 'tflite' \(allowed: onnxruntime"),
    (lambda d: d["candidates"][0].update(recipe={"precision": "int4"}),
     r"candidates\[0\]: recipe\.precision: .*'fp32', 'fp16' or 'int8'.*got 'int4'"),
    (lambda d: d.pop("hardware"), r"hardware: required field is missing"),
    (lambda d: d.update(kind_gates={"vision": {"cosine_min": 0.9}}), r"kind_gates\.vision.*'cnn', 'encoder', 'llm'"),
    (lambda d: d.update(kind_gates={"encoder": {"cosine": 0.9}}),
     r"kind_gates\.encoder\.cosine: unknown key 'cosine' \(allowed: accuracy_ratio_min"),
    (lambda d: d["candidates"][0].update(kinds=["image"]), r"candidates\[0\]\.kinds\[0\]: .*'cnn', 'encoder'"),
])
def test_wrong_profile_is_one_line_naming_file_field_allowed_and_given(tmp_path, mutate, expected):
    import copy

    doc = copy.deepcopy(BASE)
    mutate(doc)
    with pytest.raises(ConfigError, match=expected) as info:
        load_profile(_write(tmp_path, doc))
    assert "\n" not in str(info.value)
    assert str(tmp_path / "p.yaml") in str(info.value)


def test_missing_and_unknown_profiles(tmp_path):
    with pytest.raises(ConfigError, match="unknown profile 'nope' \\(allowed: .*intel-cpu"):
        load_profile("nope")
    with pytest.raises(ConfigError, match="no such file"):
        load_profile(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_profile(_write(tmp_path, "a: [1,\n"))


def test_candidate_filter_names_allowed_values():
    p = load_profile("intel-cpu")
    assert [s.name for s in p.candidate_specs(("ort-int8-dynamic",))] == ["ort-int8-dynamic"]
    with pytest.raises(ConfigError, match="unknown candidate\\(s\\) nope \\(allowed: ort-fp32-optimized"):
        p.candidate_specs(("nope",))


def test_kind_gates_override_only_their_kind(tmp_path):
    doc = {**BASE, "gates": {"speedup_min": 1.5},
           "kind_gates": {"encoder": {"cosine_min": 0.99, "accuracy_ratio_min": 0.98}}}
    p = load_profile(_write(tmp_path, doc))
    enc, cnn = p.gates_for("encoder"), p.gates_for("cnn")
    assert (enc.cosine_min, enc.accuracy_ratio_min, enc.speedup_min) == (0.99, 0.98, 1.5)
    assert (cnn.cosine_min, cnn.accuracy_ratio_min, cnn.speedup_min) == (None, 0.95, 1.5)
    shipped = load_profile("intel-cpu")
    assert shipped.gates_for("encoder").cosine_min == 0.99 and shipped.gates_for("cnn").cosine_min is None


def test_candidates_for_a_kind(tmp_path):
    doc = {**BASE, "candidates": [{"name": "all", "backend": "onnxruntime"},
                                  {"name": "enc", "backend": "onnxruntime", "kinds": ["encoder"]}]}
    p = load_profile(_write(tmp_path, doc))
    assert [s.name for s in p.candidate_specs(kind="encoder")] == ["all", "enc"]
    assert [s.name for s in p.candidate_specs(kind="cnn")] == ["all"]
    assert [s.name for s in p.candidate_specs()] == ["all", "enc"]
    with pytest.raises(ConfigError, match="candidate\\(s\\) enc apply to encoder models; this model is cnn"):
        p.candidate_specs(("enc",), kind="cnn")
    intel = load_profile("intel-cpu")
    assert "ort-bert-fp32" in [s.name for s in intel.candidate_specs(kind="encoder")]
    assert "ort-bert-fp32" not in [s.name for s in intel.candidate_specs(kind="cnn")]


def test_host_mismatch_is_reported():
    fp = fingerprint()
    if fp.arch == "x86_64" and "avx2" in fp.isa_flags:
        assert host_mismatches(load_profile("intel-cpu"), fp) == []
    other = "arm64" if fp.arch == "x86_64" else "intel-cpu"
    assert any("architecture" in p for p in host_mismatches(load_profile(other), fp))


def test_intel_cpu_has_q4_0_read_in_beside_q4_0_mapped():
    """Q4_0 with mmap off keeps only llama.cpp's repacked copy of the weights resident (issue 8's table in
    benchmarks/README.md): the same quant type as llamacpp-q4_0, only the runtime setting differs."""
    from edgeopt.backends.llamacpp import LlamaCppRecipe

    specs = {s.name: s for s in load_profile("intel-cpu").candidate_specs(kind="llm")}
    read_in = LlamaCppRecipe.model_validate(specs["llamacpp-q4_0-nommap"].recipe)
    mapped = LlamaCppRecipe.model_validate(specs["llamacpp-q4_0"].recipe)
    assert (read_in.quant, read_in.runtime_options()["mmap"]) == ("Q4_0", False)
    assert (mapped.quant, mapped.runtime_options()["mmap"]) == ("Q4_0", True)
