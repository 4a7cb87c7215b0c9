"""Complete-feed data: a leading sample axis in front of each input's full shape (non-leading batch
axes, scalars, recurrent states)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeopt import workflow
from edgeopt.data import load_dataset, synthetic_dataset
from edgeopt.errors import DataError
from edgeopt.input_shapes import shaped_signature
from edgeopt.intake import assess
from edgeopt.profiles import load_profile
from tests.conftest import write_profile
from tests.realworld_models import make_stateful


@pytest.fixture(scope="module")
def stateful(tmp_path_factory):
    d = tmp_path_factory.mktemp("feeds")
    rng = np.random.default_rng(0)
    np.savez(d / "eval.npz", x=rng.standard_normal((6, 10, 1, 8)).astype(np.float32),
             state=np.zeros((6, 1, 1, 16), np.float32), sr=np.full((6,), 0.5, np.float32))
    return {"a": assess(make_stateful(d / "s.onnx")), "eval": d / "eval.npz", "dir": d}


def test_complete_feeds_are_loaded_and_fed_as_they_are(stateful):
    ds = load_dataset(stateful["eval"], signature=stateful["a"].inputs, role="evaluation")
    assert ds.feeds == {"x", "state", "sr"} and ds.count == 6
    feed = ds.sample(2, batch_size=1)
    assert {k: v.shape for k, v in feed.items()} == {"x": (10, 1, 8), "state": (1, 1, 16), "sr": ()}
    assert isinstance(feed["sr"], np.ndarray)  # a 0-d array, not a numpy scalar (runtimes refuse those)
    assert ds.head(3).feeds == ds.feeds


def test_shapes_come_from_complete_feeds(stateful, tmp_path):
    prof = load_profile(str(write_profile(tmp_path / "p.yaml")))
    a = workflow.resolve_input_shapes(stateful["a"], shapes=[], profile=prof, evaluation=str(stateful["eval"]),
                                      seq_len=128)
    assert a.input_shapes == {"x": (10, 1, 8), "state": (1, 1, 16), "sr": ()}
    workflow.check_data(a, calibration=str(stateful["eval"]), evaluation=str(stateful["eval"]))


def test_a_state_of_the_wrong_shape_is_one_line(stateful):
    rng = np.random.default_rng(1)
    bad = stateful["dir"] / "bad.npz"
    np.savez(bad, x=rng.standard_normal((6, 10, 1, 8)).astype(np.float32),
             state=np.zeros((6, 2, 1, 16), np.float32), sr=np.full((6,), 0.5, np.float32))
    with pytest.raises(DataError, match=r"input 'state' has shape \[6, 2, 1, 16\]: complete feeds of \[2, 1, 16\], "
                                        r"the model expects \[1, 'batch', 16\]; give an array of shape "
                                        r"\(samples, 1, batch, 16\)$") as info:
        load_dataset(bad, signature=stateful["a"].inputs, role="evaluation")
    assert "\n" not in str(info.value)


def test_synthetic_data_makes_complete_feeds_where_the_first_axis_is_not_a_batch(stateful):
    sig = shaped_signature(stateful["a"].inputs, {"x": (10, 1, 8), "state": (1, 1, 16), "sr": ()})
    ds = synthetic_dataset(sig, count=4)
    assert ds.feeds == {"x", "state", "sr"}
    assert {k: v.shape for k, v in ds.sample(0).items()} == {"x": (10, 1, 8), "state": (1, 1, 16), "sr": ()}
