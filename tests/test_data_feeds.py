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


def test_each_sample_runs_from_the_initial_state_it_gives(stateful, tmp_path):
    """The state input of each complete feed is the state that sample's run starts from (zeros for a fresh
    one, or a state carried over from earlier audio): the outputs are those of the model run from it."""
    import onnxruntime as ort

    from edgeopt.data import file_sha256
    from edgeopt.records import Artifact

    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 10, 1, 8)).astype(np.float32)
    state = np.stack([np.zeros((1, 1, 16), np.float32), np.ones((1, 1, 16), np.float32),
                      np.zeros((1, 1, 16), np.float32), rng.standard_normal((1, 1, 16)).astype(np.float32)])
    np.savez(tmp_path / "states.npz", x=x, state=state, sr=np.full((4,), 0.5, np.float32))
    prof = load_profile(str(write_profile(tmp_path / "p.yaml")))
    a = workflow.resolve_input_shapes(stateful["a"], shapes=[], profile=prof, evaluation=str(tmp_path / "states.npz"),
                                      seq_len=128)
    model = a.model.path  # the model itself as an ONNX Runtime artifact, as the optimize flow's baseline
    art = Artifact(candidate="baseline-fp32", backend="onnxruntime", path=model, sha256=file_sha256(model),
                   size_bytes=a.model.size_bytes, parent_sha256=a.model.sha256, precision="fp32",
                   runtime={"intra_op_threads": 1}, placement={"target": "CPUExecutionProvider"})
    out = np.load(workflow.run_outputs(art, profile=prof, assessment=a, evaluation=str(tmp_path / "states.npz"),
                                       work_dir=tmp_path / "work"))["output_0"].reshape(4, 10, 1, 16)
    sess = ort.InferenceSession(a.model.path, providers=["CPUExecutionProvider"])
    for i in range(4):
        expected = sess.run(["y"], {"x": x[i], "state": state[i], "sr": np.array(0.5, np.float32)})[0]
        np.testing.assert_allclose(out[i], expected, rtol=1e-5, atol=1e-6)
    # the state matters: sample 1 run from a zero state instead of its own would differ
    assert not np.allclose(out[1], sess.run(["y"], {"x": x[1], "state": state[0], "sr": np.array(0.5, np.float32)})[0])
