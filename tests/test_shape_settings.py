"""Several shapes of one input as separate benchmark settings: parsing, checks, and the combined verdict."""

from __future__ import annotations

import pytest

from edgeopt import workflow
from edgeopt.comparison import combine_shape_verdicts
from edgeopt.errors import ConfigError
from edgeopt.input_shapes import shape_settings
from edgeopt.intake import assess
from edgeopt.profiles import load_profile
from edgeopt.records import CandidateOutcome, CandidateSpec, Failure, GateVerdict
from tests.conftest import write_profile
from tests.realworld_models import make_dynamic_hw


def test_an_input_given_twice_makes_two_settings_the_others_go_with_each():
    assert shape_settings(["x=1x3x32x32", "sr=scalar", "x=1x3x64x64"]) == [
        ["x=1x3x32x32", "sr=scalar"], ["x=1x3x64x64", "sr=scalar"]]
    assert shape_settings(["x=1x3x32x32"]) == [["x=1x3x32x32"]]
    with pytest.raises(ConfigError, match=r"each must be given the same number of times \(got x x2, m x3\)$"):
        shape_settings(["x=1x3x32x32", "x=1x3x64x64", "m=1x1", "m=1x2", "m=1x3"])


@pytest.fixture(scope="module")
def hw(tmp_path_factory):
    d = tmp_path_factory.mktemp("shape-settings")
    return {"a": assess(make_dynamic_hw(d / "hw.onnx")), "profile": load_profile(str(write_profile(d / "p.yaml"))),
            "dir": d}


def test_extra_settings_are_resolved_and_labelled(hw):
    shapes = ["x=1x3x32x32", "x=1x3x64x48"]
    a = workflow.resolve_input_shapes(hw["a"], shapes=shapes, profile=hw["profile"], evaluation=None, seq_len=128)
    assert a.input_shapes == {"x": (1, 3, 32, 32)}  # the first shape is the candidates' own setting
    assert workflow.extra_shape_settings(a, shapes=shapes, profile=hw["profile"], evaluation=None, seq_len=128) == [
        ("1x3x64x48", {"x": (1, 3, 64, 48)})]


@pytest.mark.parametrize("shapes, evaluation, expected", [
    (["x=1x3x32x32", "x=1x3x64x64"], "eval.npz", (r"--shape gives 2 shape settings, measured on generated inputs at "
     r"each shape; --eval data has one shape: drop --eval \(or give one --shape per input\)$")),
    (["x=1x3x32x32", "x=1x3x32x32"], None, r"the shape settings repeat one another \(1x3x32x32, 1x3x32x32\)"),
    (["x=1x3x32x32", "x=1x4x64x64"], None, r"--shape x=1x4x64x64: dim 1 is fixed at 3 in the model"),
])
def test_bad_shape_settings_are_one_line(hw, shapes, evaluation, expected):
    a = workflow.resolve_input_shapes(hw["a"], shapes=shapes, profile=hw["profile"], evaluation=None, seq_len=128)
    with pytest.raises(ConfigError, match=expected) as info:
        workflow.extra_shape_settings(a, shapes=shapes, profile=hw["profile"], evaluation=evaluation, seq_len=128)
    assert "\n" not in str(info.value)


def _outcome(name, *statuses, failed=False):
    verdicts = tuple(GateVerdict(gate=f"g{i}", metric="m", comparator=">=", threshold=1.0, measured=1.0, margin=0.0,
                                 passed=s == "pass", status=s) for i, s in enumerate(statuses))
    return CandidateOutcome.model_construct(
        spec=CandidateSpec(name=name, backend="onnxruntime"), artifact=None, evaluation=None, baseline=None,
        benchmark=None if failed else "measured", verdicts=verdicts,
        failure=Failure(stage="benchmark", reason="crash", message="x") if failed else None)


@pytest.mark.parametrize("own, other, expected", [
    (("pass", "pass"), ("pass", "pass"), "pass"),
    (("pass", "pass"), ("pass", "fail"), "fail"),          # fails at the other shape: fails
    (("pass", "pass"), ("pass", "uncertain"), "uncertain"),
    (("pass", "pass"), None, "fail"),                      # not measured at the other shape: fails
])
def test_a_candidate_passes_only_if_it_passes_at_every_shape(own, other, expected):
    variant = _outcome("c-1x3x64x64", *(other or ("pass",)), failed=other is None)
    out = combine_shape_verdicts([_outcome("c", *own), variant], {"c-1x3x64x64": "c"})
    every = out[0].verdicts[-1]
    assert every.gate == "every-shape" and every.status == expected
    assert out[0].passed is (expected == "pass")
    assert out[1] is variant  # the variant's own row keeps its own verdicts


def test_a_profile_list_of_shapes_makes_settings_unless_eval_data_or_shape_decide(hw):
    prof = load_profile(str(write_profile(hw["dir"] / "lists.yaml"))).model_copy(
        update={"input_shapes": {"x": ["1x3x32x32", "1x3x64x64"], "other": ["1x1", "1x2"]}})
    a = workflow.resolve_input_shapes(hw["a"], shapes=[], profile=prof, evaluation=None, seq_len=128)
    assert a.input_shapes == {"x": (1, 3, 32, 32)}
    assert workflow.extra_shape_settings(a, shapes=[], profile=prof, evaluation=None, seq_len=128) == [
        ("1x3x64x64", {"x": (1, 3, 64, 64)})]  # ('other' is not an input of this model: ignored)
    assert workflow.extra_shape_settings(a, shapes=["x=1x3x48x48"], profile=prof, evaluation=None, seq_len=128) == []
    assert workflow.extra_shape_settings(a, shapes=[], profile=prof, evaluation="eval.npz", seq_len=128) == []
