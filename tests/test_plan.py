"""Which candidates a model gets (``workflow.plan``), what they are built from, and the gates of its kind."""

from __future__ import annotations

import pytest

from edgeopt import intake, workflow
from edgeopt.backends.openvino import OpenVinoRecipe
from edgeopt.errors import ConfigError
from edgeopt.profiles import Gates, load_profile
from tests.test_gates import BASE, bench, evaluation, outcome


@pytest.fixture(scope="module")
def cnn(tiny):
    return intake.assess(str(tiny["model"]))


@pytest.fixture(scope="module")
def encoder(tiny_bert):
    return intake.assess(str(tiny_bert["ckpt"])), intake.assess(str(tiny_bert["model"]))


def _recipe(specs, name):
    return next(s for s in specs if s.name == name).recipe


def test_a_cnn_gets_no_encoder_recipes_and_a_top1_budget(cnn) -> None:
    prof = load_profile("intel-cpu")
    specs, skipped = workflow.plan(prof, source=cnn, converted=cnn)
    names = [s.name for s in specs]
    assert "ort-int8-dynamic" in names and not any(n.startswith("ort-bert") for n in names)
    assert any(s.startswith("ort-bert-fp32: applies to encoder models, this one is cnn") for s in skipped)
    # NNCF accuracy control: top-1 agreement may drop by 1 - accuracy_ratio_min
    assert _recipe(specs, "ov-int8-accuracy")["max_accuracy_drop"] == pytest.approx(1 - prof.gates.accuracy_ratio_min)
    assert "max_accuracy_drop" not in _recipe(specs, "ov-int8")


def test_an_encoder_gets_its_recipes_and_a_cosine_budget(encoder) -> None:
    source, converted = encoder
    assert (source.model.format, converted.model.format, converted.kind) == ("hf", "onnx", "encoder")
    prof = load_profile("intel-cpu")
    specs, _ = workflow.plan(prof, source=source, converted=converted)
    names = [s.name for s in specs]
    assert {"ort-bert-fp32", "ort-bert-int8-dynamic", "ov-int8"} <= set(names)
    assert _recipe(specs, "ov-int8-accuracy")["max_accuracy_drop"] == pytest.approx(1 - 0.99)
    for s in specs:  # the ONNX backends build from the converted model, optimum-intel from the checkpoint
        want = source if s.backend == "optimum-intel" else converted
        assert workflow.build_input(s, source=source, converted=converted) is want
    assert {"oi-int8", "oi-int8-weights"} <= set(names)


def test_checkpoint_recipes_are_skipped_for_an_onnx_encoder(encoder) -> None:
    _, converted = encoder  # given as ONNX: there is no checkpoint for optimum-intel to export
    specs, skipped = workflow.plan(load_profile("intel-cpu"), source=converted, converted=converted)
    assert "oi-int8" not in [s.name for s in specs] and "ort-bert-fp32" in [s.name for s in specs]
    assert any(s.startswith("oi-int8: the optimum-intel backend builds hf models, this one is onnx") for s in skipped)
    with pytest.raises(ConfigError, match="oi-int8: the optimum-intel backend builds hf models"):
        workflow.plan(load_profile("intel-cpu"), only=("oi-int8",), source=converted, converted=converted)


def test_asking_for_a_recipe_of_another_kind_is_an_error(cnn) -> None:
    with pytest.raises(ConfigError, match="ort-bert-fp32 apply to encoder models; this model is cnn"):
        workflow.plan(load_profile("intel-cpu"), only=("ort-bert-fp32",), source=cnn, converted=cnn)


def test_accuracy_control_budget_from_gates() -> None:
    r = OpenVinoRecipe(precision="int8", accuracy_control=True)
    assert r.from_gates(gates=Gates(cosine_min=0.98), kind="encoder") == {"max_accuracy_drop": pytest.approx(0.02)}
    assert r.from_gates(gates=Gates(accuracy_ratio_min=0.9), kind="encoder") == {"max_accuracy_drop": pytest.approx(0.1)}
    assert r.from_gates(gates=Gates(accuracy_ratio_min=0.97, cosine_min=0.98), kind="cnn") == {
        "max_accuracy_drop": pytest.approx(0.03)}
    # a budget written in the recipe wins; no accuracy control, nothing to fill in
    assert OpenVinoRecipe(precision="int8", max_accuracy_drop=0.2).from_gates(gates=Gates(), kind="cnn") == {}
    assert OpenVinoRecipe(precision="int8").from_gates(gates=Gates(), kind="cnn") == {}
    with pytest.raises(ValueError, match="'accuracy_control' applies only with precision='int8'"):
        OpenVinoRecipe(precision="fp32", accuracy_control=True)


def test_gates_follow_the_model_kind() -> None:
    prof = load_profile("intel-cpu")
    base = outcome("baseline", BASE, evaluation("baseline", value=1.0, cosine=1.0), baseline=True)
    # 2.5x faster, 60% less memory, and a cosine of 0.97: enough for a CNN's gates, not an encoder's
    cand = outcome("cand", bench(p50=8.0, rss_model=40.0), evaluation(value=0.97, cosine=0.97))
    as_cnn = workflow.with_gates([base, cand], profile=prof, kind="cnn")[1]
    as_encoder = workflow.with_gates([base, cand], profile=prof, kind="encoder")[1]
    assert as_cnn.passed and "cosine" not in [v.gate for v in as_cnn.verdicts]
    cosine = next(v for v in as_encoder.verdicts if v.gate == "cosine")
    assert not as_encoder.passed and not cosine.passed and cosine.threshold == 0.99
