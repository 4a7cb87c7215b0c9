"""Input shapes for dynamic dims: --shape, the profile's input_shapes, the evaluation data, the batch size."""

from __future__ import annotations

import numpy as np
import pytest

from edgeopt import workflow
from edgeopt.errors import ConfigError
from edgeopt.input_shapes import batch_axis, parse_shapes, probe_feeds, resolve_shapes, shaped_signature
from edgeopt.intake import assess
from edgeopt.profiles import load_profile
from tests.conftest import write_profile
from tests.realworld_models import make_dynamic_hw, make_stateful


@pytest.fixture(scope="module")
def dyn(tmp_path_factory):
    return assess(make_dynamic_hw(tmp_path_factory.mktemp("shapes") / "dyn.onnx"))


def test_parse_shapes():
    assert parse_shapes(["x=1x3x640x640", "sr=scalar"]) == {"x": (1, 3, 640, 640), "sr": ()}
    for bad in ("x", "x=", "x=1x3xq", "=1x2", "x=0x3"):
        with pytest.raises(ConfigError, match="NAME=DxDx|positive") as info:
            parse_shapes([bad])
        assert "\n" not in str(info.value)


def test_batch_axis_is_found_by_name_or_leading_dynamic_dim(tmp_path):
    rnn = assess(make_stateful(tmp_path / "s.onnx"))
    axes = {s.name: batch_axis(s) for s in rnn.inputs}
    assert axes == {"x": 1, "state": 1, "sr": None}


def test_given_shape_and_batch_size(dyn):
    shapes = resolve_shapes(dyn.inputs, given={"x": (1, 3, 64, 48)}, defaults={}, batch_size=2)
    assert shapes == {"x": (2, 3, 64, 48)}  # the batch dim takes the profile's batch size
    (sig,) = shaped_signature(dyn.inputs, shapes)
    assert sig.shape == ("batch", 3, 64, 48)


def test_profile_default_applies_and_the_flag_wins(dyn, tmp_path):
    prof = load_profile(str(write_profile(tmp_path / "p.yaml")))
    prof = prof.model_copy(update={"input_shapes": {"x": "1x3x32x32", "not_in_this_model": "1x2"}})
    a = workflow.resolve_input_shapes(dyn, shapes=[], profile=prof, evaluation=None, seq_len=128)
    assert a.input_shapes == {"x": (1, 3, 32, 32)}
    a = workflow.resolve_input_shapes(dyn, shapes=["x=1x3x40x24"], profile=prof, evaluation=None, seq_len=128)
    assert a.input_shapes == {"x": (1, 3, 40, 24)}


def test_dims_from_the_evaluation_data(dyn, tmp_path):
    np.savez(tmp_path / "eval.npz", x=np.zeros((5, 3, 20, 28), np.float32))
    prof = load_profile(str(write_profile(tmp_path / "p.yaml")))
    a = workflow.resolve_input_shapes(dyn, shapes=[], profile=prof, evaluation=str(tmp_path / "eval.npz"), seq_len=128)
    assert a.input_shapes == {"x": (1, 3, 20, 28)}
    # data of another size than --shape asks for is refused by the data check, in one line
    b = workflow.resolve_input_shapes(dyn, shapes=["x=1x3x64x64"], profile=prof, evaluation=str(tmp_path / "eval.npz"),
                                      seq_len=128)
    with pytest.raises(Exception, match=r"input 'x' has shape \[5, 3, 20, 28\], the model expects"):
        workflow.check_data(b, calibration=None, evaluation=str(tmp_path / "eval.npz"))


@pytest.mark.parametrize("given, expected", [
    ({}, (r"^input 'x' \(shape batch, 3, height, width\) has dynamic dims height, width that nothing sets: "
         r"give them with --shape x=1x3xHEIGHTxWIDTH \(or the profile's input_shapes\), or pass --eval data$")),
    ({"y": (1, 3, 8, 8)}, r"^--shape y=\.\.\.: the model has no input 'y' \(inputs: x\)$"),
    ({"x": (1, 3, 8)}, r"^--shape x=1x3x8: the input has 4 dims \(batch, 3, height, width\), not 3; give 4 dims$"),
    ({"x": (1, 4, 8, 8)}, r"^--shape x=1x4x8x8: dim 1 is fixed at 3 in the model \(batch, 3, height, width\), not 4$"),
])
def test_bad_shapes_are_one_line(dyn, given, expected):
    with pytest.raises(ConfigError, match=expected):
        resolve_shapes(dyn.inputs, given=given, defaults={}, batch_size=1)


def test_probe_feeds_at_the_shapes(dyn):
    feeds = probe_feeds(dyn.inputs, {"x": (1, 3, 12, 10)})
    assert feeds["x"].shape == (1, 3, 12, 10) and feeds["x"].dtype == np.float32
    assert probe_feeds(dyn.inputs, {}) is None
