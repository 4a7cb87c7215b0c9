"""optimum-intel backend: a tiny BERT checkpoint exported, compressed and quantized, compared with torch."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

pytest.importorskip("optimum.intel", reason="optimum-intel is not installed (pip install 'edgeopt[openvino]')")
pytest.importorskip("nncf", reason="nncf is not installed (pip install 'edgeopt[openvino]')")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ov = pytest.importorskip("openvino")

from edgeopt.backends import optimum_intel
from edgeopt.backends.openvino import OpenVinoRecipe, ir_sha256
from edgeopt.backends.optimum_intel import OptimumIntelBackend, OptimumIntelRecipe
from edgeopt.data import Dataset, path_sha256
from edgeopt.errors import BackendUnavailable, CandidateFailed
from edgeopt.intake.hf import assess_hf
from edgeopt.records import Artifact, Assessment, ModelRef

VOCAB, SEQ = 100, 16
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def _tokens(rng: np.random.Generator, count: int, length: int, *, pad: bool) -> dict[str, np.ndarray]:
    """int64 feeds; with ``pad`` every row after the first is padded at its end, by more for each row."""
    ids = rng.integers(1, VOCAB, (count, length), dtype=np.int64)
    mask = np.ones_like(ids)
    if pad:
        for row in range(1, count):
            mask[row, max(1, length - row * length // (count + 1)):] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


class Tiny:
    """A 2-layer BERT (hidden 32) saved as a checkpoint folder, its torch model and its records."""

    def __init__(self, folder: Path) -> None:
        torch.manual_seed(0)
        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
        self.torch_model = transformers.BertModel(config).eval()
        self.torch_model.save_pretrained(folder, safe_serialization=True)
        self.folder = folder
        self.assessment = assess_hf(folder)
        self.model = self.assessment.model
        rng = np.random.default_rng(1)
        self.calibration = Dataset(path=None, sha256="cal", inputs=_tokens(rng, 24, SEQ, pad=False))
        # a length the exporter's dummy inputs did not have, with padding
        self.feeds = _tokens(rng, 4, 11, pad=True)

    def reference(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return self.torch_model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Tiny:
    """Built here, not conftest's ``tiny_bert``: no ONNX export or tokenizer needed, and torch's model kept."""
    return Tiny(tmp_path_factory.mktemp("tiny-bert") / "hf")


@pytest.fixture(scope="module")
def backend() -> OptimumIntelBackend:
    return OptimumIntelBackend()


def _build(backend: OptimumIntelBackend, tiny: Tiny, out: Path, **recipe: object) -> Artifact:
    r = OptimumIntelRecipe(**recipe)
    return backend.optimize(model=tiny.model, assessment=tiny.assessment, recipe=r, candidate="cand", out_dir=out,
                            calibration=tiny.calibration if r.needs_calibration() else None)


@pytest.fixture(scope="module")
def builds(backend, bert, tmp_path_factory) -> dict[str, Artifact]:
    """One artifact per precision, built once for the module."""
    root = tmp_path_factory.mktemp("builds")
    return {p: _build(backend, bert, root / p, precision=p) for p in ("fp32", "int8-weights", "int8")}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def _constant_bytes(art: Artifact) -> Counter[str]:
    model = ov.Core().read_model(str(Path(art.path) / "model.xml"))
    sizes: Counter[str] = Counter()
    for op in model.get_ops():
        if op.get_type_name() == "Constant":
            sizes[op.get_element_type().get_type_name()] += op.get_byte_size()
    return sizes


def _run(backend: OptimumIntelBackend, art: Artifact, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = backend.load(path=art.path, runtime=art.runtime | {"intra_op_threads": 1})
    assert session.input_names == INPUTS and session.output_names == ["last_hidden_state"]
    return session.run(feeds)[0]


# -- builds ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "int8-weights", "int8"])
def test_artifact_is_a_complete_ir_folder(builds, bert, precision):
    art = builds[precision]
    folder = Path(art.path)
    assert folder.name == "model" and sorted(p.name for p in folder.parent.iterdir()) == ["model"], "leftovers"
    assert sorted(p.name for p in folder.iterdir()) == ["model.bin", "model.xml"]
    assert art.sha256 == ir_sha256(folder) == path_sha256(folder)
    assert art.size_bytes == sum(p.stat().st_size for p in folder.iterdir())
    assert (art.backend, art.parent_sha256) == ("optimum-intel", bert.model.sha256)
    assert {"optimum-intel", "openvino", "nncf", "transformers"} <= set(art.tool_versions)
    assert art.runtime["compiled"]["devices"] == ["CPU"] and art.runtime["compiled"]["target_share"] == 1.0
    assert art.placement == art.runtime["compiled"]
    assert art.runtime["inference_precision"] == "f32" and art.runtime["compiled"]["inference_precision"] == "f32"
    assert any("export (feature-extraction, OVModelForFeatureExtraction)" in n for n in art.notes)
    assert any(n.startswith("exec precision:") for n in art.notes)


def test_fp32_matches_torch(backend, builds, bert):
    art = builds["fp32"]
    assert art.precision == "fp32"
    assert art.runtime["compiled"]["compute_shares"] == {"f32": 1.0}
    out = _run(backend, art, bert.feeds)
    np.testing.assert_allclose(out, bert.reference(bert.feeds), rtol=1e-4, atol=1e-4)


def test_rebuild_is_byte_identical_and_silent(backend, builds, bert, tmp_path, capfd):
    capfd.readouterr()
    again = _build(backend, bert, tmp_path, precision="int8")
    out, err = capfd.readouterr()
    assert again.sha256 == builds["int8"].sha256, "the same recipe and data must give the same IR bytes"
    assert (out, err) == ("", ""), "a build must not print (progress bars, load reports, warnings)"


def test_int8_weights(backend, builds, bert):
    art, fp32 = builds["int8-weights"], builds["fp32"]
    assert art.precision == "int8w+fp32"
    assert any("OVWeightQuantizationConfig: int8_asym" in n for n in art.notes)
    weights, float_weights = _constant_bytes(art), _constant_bytes(fp32)
    assert weights["u8"] > 0.2 * float_weights["f32"] and weights["f32"] < 0.1 * float_weights["f32"]
    assert set(art.runtime["compiled"]["compute_shares"]) & {"u8", "i8"}
    assert _cosine(_run(backend, art, bert.feeds), bert.reference(bert.feeds)) > 0.999


def test_int8_static_quantizes(backend, builds, bert):
    art = builds["int8"]
    assert art.precision == "int8+fp32"
    model = ov.Core().read_model(str(Path(art.path) / "model.xml"))
    assert Counter(op.get_type_name() for op in model.get_ops())["FakeQuantize"] >= 8
    assert _constant_bytes(art)["i8"] > 0
    assert set(art.runtime["compiled"]["compute_shares"]) & {"u8", "i8"}
    assert any("model_type transformer" in n and "24 of 24 calibration samples" in n for n in art.notes)
    assert _cosine(_run(backend, art, bert.feeds), bert.reference(bert.feeds)) > 0.98


# -- failures ----------------------------------------------------------------------------------------


def test_int8_needs_calibration(backend, bert, tmp_path):
    with pytest.raises(CandidateFailed) as info:
        backend.optimize(model=bert.model, assessment=bert.assessment, candidate="cand",
                         recipe=OptimumIntelRecipe(precision="int8"), out_dir=tmp_path)
    assert info.value.reason == "missing-data" and "--calibration" in str(info.value)
    assert not (tmp_path / "model").exists()


def test_calibration_without_an_input_is_missing_data(backend, bert, tmp_path):
    partial = Dataset(path=None, sha256="p", inputs={k: v for k, v in bert.calibration.inputs.items()
                                                     if k != "token_type_ids"})
    with pytest.raises(CandidateFailed, match="no array for input.s. token_type_ids") as info:
        backend.optimize(model=bert.model, assessment=bert.assessment, candidate="cand",
                         recipe=OptimumIntelRecipe(precision="int8"), out_dir=tmp_path, calibration=partial)
    assert info.value.reason == "missing-data"
    assert list(tmp_path.iterdir()) == [], "the private build folder is removed"


def _copy(tiny: Tiny, folder: Path, *, weights: bool = True, **config: object) -> ModelRef:
    folder.mkdir()
    doc = json.loads((tiny.folder / "config.json").read_text()) | config
    (folder / "config.json").write_text(json.dumps(doc))
    if weights:
        shutil.copy2(tiny.folder / "model.safetensors", folder / "model.safetensors")
    return ModelRef(path=str(folder), format="hf", sha256="0" * 64, size_bytes=1)


@pytest.mark.parametrize(("case", "reason", "message"), [
    ("no-weights", "build-error", "cand: optimum-intel export failed: .*no file named model.safetensors"),
    ("unknown-architecture", "unsupported-op", "cand: optimum-intel export failed: .*model type `frobnicator`"),
])
def test_export_failures_are_classified(backend, bert, tmp_path, case, reason, message):
    if case == "no-weights":
        ref = _copy(bert, tmp_path / "src", weights=False)
    else:
        ref = _copy(bert, tmp_path / "src", model_type="frobnicator", architectures=["FrobModel"])
    with pytest.raises(CandidateFailed, match=message) as info:
        backend.optimize(model=ref, assessment=Assessment(model=ref, kind="other", params=0), candidate="cand",
                         recipe=OptimumIntelRecipe(), out_dir=tmp_path / "out")
    assert info.value.reason == reason and "\n" not in str(info.value)
    assert list((tmp_path / "out").iterdir()) == [], "nothing half-written"


def test_onnx_models_are_refused(backend, tmp_path):
    ref = ModelRef(path=str(tmp_path / "m.onnx"), format="onnx", sha256="0" * 64, size_bytes=1)
    with pytest.raises(CandidateFailed, match="optimum-intel builds hf models, got 'onnx'") as info:
        backend.optimize(model=ref, assessment=Assessment(model=ref, kind="cnn", params=0), candidate="cand",
                         recipe=OptimumIntelRecipe(), out_dir=tmp_path)
    assert info.value.reason == "build-error"


def test_missing_toolchain_names_the_extra(backend, bert, tmp_path, monkeypatch):
    assert optimum_intel._found("no_such_package.sub") is False  # find_spec itself raises for this
    monkeypatch.setattr(optimum_intel, "_found", lambda module: module != "optimum.intel")
    with pytest.raises(BackendUnavailable, match=r"edgeopt\[optimum-intel\].*missing: optimum-intel"):
        backend.optimize(model=bert.model, assessment=bert.assessment, candidate="cand",
                         recipe=OptimumIntelRecipe(), out_dir=tmp_path)


# -- recipes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("recipe", "message"), [
    ({"precision": "fp16"}, "'fp32', 'int8-weights', 'int4-weights' or 'int8'"),
    ({"task": "translation"}, "'feature-extraction', 'text-classification' or 'text-generation'"),
    ({"precison": "int8"}, "unknown optimum-intel recipe field(s) 'precison'; allowed: precision, task"),
    ({"device": "TPU"}, "'CPU', 'GPU', 'NPU' or 'AUTO'"),
    ({"inference_precision": "f64"}, "'auto', 'f32', 'bf16' or 'f16'"),
    ({"intra_op_threads": 0}, "greater than or equal to 1"),
    ({"sym": True}, ("'sym' applies only with precision 'int8' or 'int8-weights' or 'int4-weights' "
                     "(received precision='fp32')")),
    ({"precision": "int8-weights", "group_size": 64}, "'group_size' applies only with precision 'int4-weights'"),
    ({"precision": "int4-weights", "subset_size": 10}, "'subset_size' applies only with precision 'int8'"),
    ({"precision": "int4-weights", "group_size": 0}, "group_size must be -1"),
    ({"precision": "int4-weights", "ratio": 1.5}, "less than or equal to 1"),
])
def test_bad_recipes_name_allowed_values(recipe, message):
    with pytest.raises(ValidationError) as info:
        OptimumIntelRecipe.model_validate(recipe)
    assert message in str(info.value)


def test_recipe_contract():
    assert all(f.description for f in OptimumIntelRecipe.model_fields.values())
    assert OptimumIntelRecipe(precision="int8").needs_calibration()
    assert not any(OptimumIntelRecipe(precision=p).needs_calibration() for p in ("fp32", "int8-weights",
                                                                                  "int4-weights"))
    # the runtime fields are the openvino backend's: same choices, defaults and options for load()
    for name in ("device", "performance_hint", "inference_precision", "intra_op_threads", "num_streams"):
        mine, theirs = OptimumIntelRecipe.model_fields[name], OpenVinoRecipe.model_fields[name]
        assert (mine.annotation, mine.default, mine.description) == (theirs.annotation, theirs.default,
                                                                      theirs.description)
    options = {"device": "AUTO", "performance_hint": "throughput", "intra_op_threads": 2, "num_streams": 2}
    assert OptimumIntelRecipe(**options).runtime_options() == OpenVinoRecipe(**options).runtime_options()
    assert OptimumIntelRecipe(task="causal-lm").task == "text-generation"
    assert OptimumIntelRecipe(task="sequence-classification").task == "text-classification"


def test_quantization_config_translation():
    assert OptimumIntelRecipe().quantization_config() is None
    w8 = OptimumIntelRecipe(precision="int8-weights", sym=True).quantization_config()
    assert (type(w8).__name__, w8.bits, w8.sym) == ("OVWeightQuantizationConfig", 8, True)
    w4 = OptimumIntelRecipe(precision="int4-weights", group_size=64, ratio=0.8).quantization_config()
    assert (w4.bits, w4.sym, w4.group_size, w4.ratio) == (4, False, 64, 0.8)
    q = OptimumIntelRecipe(precision="int8", subset_size=50).quantization_config(samples=200)
    assert (type(q).__name__, q.model_type, q.sym, q.num_samples) == ("OVQuantizationConfig", "transformer",
                                                                      False, 50)
    assert OptimumIntelRecipe(precision="int8").quantization_config(samples=20).num_samples == 20


def test_measured_by_the_harness(backend, builds, bert, tmp_path):
    from edgeopt import backends, bench
    from edgeopt.hardware import fingerprint

    if "optimum-intel" not in backends.names():
        pytest.skip("optimum-intel is not in the backend registry yet")
    art = builds["int8-weights"]
    art = art.model_copy(update={"runtime": art.runtime | {"intra_op_threads": 1}})
    settings = bench.BenchSettings(warmup_runs=2, min_runs=20, min_duration_s=0)
    result = bench.measure(artifact=art, settings=settings, signature=bert.assessment.inputs,
                           hardware=fingerprint(), out_dir=tmp_path / "bench")
    assert result.samples >= 20 and result.threads == 1 and result.size_bytes == art.size_bytes


def test_int4_weights(backend, builds, bert, tmp_path):
    art = _build(backend, bert, tmp_path, precision="int4-weights", group_size=16, sym=True)
    assert art.precision == "int4w+fp32"
    assert any("int4_sym, group size 16, ratio 1.0" in n for n in art.notes)
    assert _constant_bytes(art)["i4"] > 0
    assert _cosine(_run(backend, art, bert.feeds), bert.reference(bert.feeds)) > 0.95
