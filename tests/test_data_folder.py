"""A folder of per-sample .npz feeds: images of different resolutions, checked against the signature."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from edgeopt import workflow
from edgeopt.data import load_dataset
from edgeopt.errors import DataError
from edgeopt.intake import assess
from edgeopt.profiles import load_profile
from tests.conftest import write_profile
from tests.realworld_models import _save, make_dynamic_hw

SIZES = [(32, 48), (64, 40), (48, 48)]


def _images(folder, sizes, *, labels=False, seed=0):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        extra = {"labels": np.array([i % 4])} if labels else {}
        np.savez(folder / f"{i:03d}.npz", x=rng.standard_normal((1, 3, h, w)).astype(np.float32), **extra)
    return folder


@pytest.fixture(scope="module")
def hw(tmp_path_factory):
    d = tmp_path_factory.mktemp("folder")
    return {"a": assess(make_dynamic_hw(d / "hw.onnx")), "imgs": _images(d / "imgs", SIZES, labels=True),
            "profile": load_profile(str(write_profile(d / "p.yaml"))), "dir": d}


def test_each_file_is_one_sample_at_its_own_shape(hw):
    ds = load_dataset(hw["imgs"], signature=hw["a"].inputs, role="evaluation")
    assert ds.count == 3 and ds.per_sample and ds.feeds == {"x"}
    assert [ds.sample(i)["x"].shape for i in range(3)] == [(1, 3, h, w) for h, w in SIZES]  # file-name order
    assert ds.labels.tolist() == [0, 1, 2]
    assert ds.head(2).count == 2 and ds.head(2).labels.tolist() == [0, 1]


def test_the_run_takes_the_first_samples_shape_and_leaves_the_per_sample_dims_open(hw):
    a = workflow.resolve_input_shapes(hw["a"], shapes=[], profile=hw["profile"], evaluation=str(hw["imgs"]),
                                      seq_len=128)
    assert a.input_shapes == {"x": (1, 3, 32, 48)} and a.per_sample_inputs == ("x",)
    cal, ev = workflow.check_data(a, calibration=str(hw["imgs"]), evaluation=str(hw["imgs"]))
    assert cal.count == ev.count == 3
    # the folder's digest keys every build and measurement: a changed sample changes it
    before = workflow.data_sha(str(hw["imgs"]))
    changed = _images(hw["dir"] / "changed", [*SIZES[:2], (48, 40)], labels=True)
    assert workflow.data_sha(str(changed)) != before


def test_samples_of_different_sizes_where_a_shape_is_fixed_is_one_line(hw):
    a = workflow.resolve_input_shapes(hw["a"], shapes=["x=1x3x32x48"], profile=hw["profile"],
                                      evaluation=str(hw["imgs"]), seq_len=128)
    assert a.per_sample_inputs == ()  # --shape fixes the input: every sample must have that shape
    with pytest.raises(DataError, match=r"001\.npz: input 'x' has shape \[1, 3, 64, 40\], the run needs "
                                        r"\(batch, 3, 32, 48\) \(dim 2 is 32\): this input takes one shape, so "
                                        r"every sample must have it$") as info:
        workflow.check_data(a, calibration=None, evaluation=str(hw["imgs"]))
    assert "\n" not in str(info.value)


def test_inputs_of_one_sample_must_agree_on_shared_dims(tmp_path):
    graph = helper.make_graph([helper.make_node("Add", ["image", "mask"], ["y"])], "two_inputs", [
        helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, "height", "width"]),
        helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, "height", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, "height", "width"])])
    a = assess(_save(graph, tmp_path / "two.onnx"))
    (tmp_path / "d").mkdir()
    np.savez(tmp_path / "d" / "a.npz", image=np.zeros((1, 1, 8, 8), np.float32), mask=np.zeros((1, 1, 8, 8), np.float32))
    np.savez(tmp_path / "d" / "b.npz", image=np.zeros((1, 1, 8, 8), np.float32), mask=np.zeros((1, 1, 6, 8), np.float32))
    with pytest.raises(DataError, match=r"b\.npz: input 'mask' has height=6 where input 'image' has height=8; the "
                                        r"inputs of one sample must agree on their shared dims$"):
        load_dataset(tmp_path / "d", signature=a.inputs, role="calibration")


@pytest.mark.parametrize("make, expected", [
    (lambda d: None, r"a folder with no \.npz files; save one file per sample"),
    (lambda d: np.savez(d / "0.npz", x=np.zeros((3, 32, 32), np.float32)),
     (r"0\.npz: input 'x' has shape \[3, 32, 32\], the model expects \(batch, 3, height, width\); each file holds "
     r"one sample at the input's full shape, batch included$")),
    (lambda d: np.savez(d / "0.npz", x=np.zeros((1, 4, 32, 32), np.float32)),
     r"0\.npz: input 'x' has shape \[1, 4, 32, 32\], the run needs \(batch, 3, height, width\) \(dim 1 is 3\)"),
    (lambda d: np.savez(d / "0.npz", image=np.zeros((1, 3, 32, 32), np.float32)),
     r"0\.npz: arrays \['image'\] do not match the model inputs \['x'\] \(missing: x\) \(unexpected: image\)"),
])
def test_bad_sample_files_are_one_line(hw, tmp_path, make, expected):
    (tmp_path / "d").mkdir()
    make(tmp_path / "d")
    with pytest.raises(DataError, match=expected) as info:
        load_dataset(tmp_path / "d", signature=hw["a"].inputs, role="evaluation")
    assert "\n" not in str(info.value)


def test_a_dense_model_is_calibrated_measured_and_evaluated_image_by_image(tmp_path):
    """Without Prefect: ORT static INT8 calibrated on the folder; baseline and candidate measured on the same
    images in the same order, each at its own size; the masks compared pixel by pixel."""
    import json
    from pathlib import Path

    import onnxruntime as ort

    from edgeopt.records import HardwareFingerprint
    from tests.realworld_models import make_dense_hw

    sizes = [(24, 32), (40, 24), (32, 32)]
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        np.savez(imgs / f"{i:03d}.npz", image=rng.standard_normal((1, 3, h, w)).astype(np.float32))
    prof = load_profile(str(write_profile(tmp_path / "p.yaml", benchmark={
        "warmup_runs": 1, "min_runs": 10, "min_duration_s": 0.05})))
    a = workflow.resolve_input_shapes(assess(make_dense_hw(tmp_path / "dense.onnx")), shapes=[], profile=prof,
                                      evaluation=str(imgs), seq_len=128)
    hw = HardwareFingerprint(hostname="test-host", os="linux", arch="x86_64", cpu_model="test-cpu",
                             isa_flags=(), cores_physical=2, cores_logical=2, ram_mb=1024, python="3.11",
                             tool_versions={"onnxruntime": ort.__version__})
    specs = [prof.baseline.spec(baseline=True), prof.candidate_specs(("ort-int8-static-minmax",), kind=a.kind)[0]]
    outputs = {}
    for spec in specs:
        art = workflow.build(spec, assessment=a, calibration=str(imgs), work_dir=tmp_path / "work", hardware=hw)
        result = workflow.measure(art, profile=prof, assessment=a, hardware=hw, evaluation=str(imgs),
                                  work_dir=tmp_path / "work")
        fed = json.loads((Path(result.samples_path).parent / "result.json").read_text())["feed_shapes"]
        assert fed == [{"image": [1, 3, h, w]} for h, w in sorted(sizes)], spec.name
        outputs[spec.name] = workflow.run_outputs(art, profile=prof, assessment=a, evaluation=str(imgs),
                                                  work_dir=tmp_path / "work", hardware=hw)
    ev = workflow.evaluate(specs[1].name, outputs=outputs[specs[1].name], baseline_outputs=outputs[specs[0].name],
                           assessment=a, evaluation=str(imgs), max_samples=prof.benchmark.max_eval_samples)
    assert ev.samples == sum(h * w for h, w in sizes)  # one row per pixel, 4 classes each
    assert 0.5 < ev.top1_agreement <= 1.0



def test_a_dense_prediction_is_compared_pixel_by_pixel_over_its_classes(tmp_path):
    """A mask ``[N, C, H, W]`` of one size: top-1 over the class axis at each pixel (not over the width)."""
    from tests.realworld_models import make_dense_hw

    a = assess(make_dense_hw(tmp_path / "dense.onnx"))
    base = np.random.default_rng(0).standard_normal((2, 4, 3, 5)).astype(np.float32)
    cand = base.copy()
    pixel = cand[1, :, 2, 4]
    cand[1, :, 2, 4] = pixel[[1, 2, 3, 0]] if pixel.argmax() != pixel[[1, 2, 3, 0]].argmax() else -pixel
    np.savez(tmp_path / "base.npz", output_0=base)
    np.savez(tmp_path / "cand.npz", output_0=cand)
    ev = workflow.evaluate("c", outputs=str(tmp_path / "cand.npz"), baseline_outputs=str(tmp_path / "base.npz"),
                           assessment=a, evaluation=None, max_samples=64)
    assert ev.samples == 2 * 3 * 5 and ev.top1_agreement == pytest.approx(1 - 1 / 30)


@pytest.mark.heavy  # ~10-20 s: NNCF's quantization and an OpenVINO inference process
def test_nncf_calibrates_on_a_folder_of_images_of_different_sizes(tmp_path):
    from tests.realworld_models import make_dense_hw

    sizes = [(32, 48), (64, 40), (48, 48)]
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        np.savez(imgs / f"{i:03d}.npz", image=rng.standard_normal((1, 3, h, w)).astype(np.float32))
    prof = load_profile(str(write_profile(tmp_path / "p.yaml", candidates=[
        {"name": "ov-int8", "backend": "openvino", "recipe": {"precision": "int8"}}])))
    a = workflow.resolve_input_shapes(assess(make_dense_hw(tmp_path / "dense.onnx")), shapes=[], profile=prof,
                                      evaluation=str(imgs), seq_len=128)
    spec = prof.candidate_specs(("ov-int8",), kind=a.kind)[0]
    art = workflow.build(spec, assessment=a, calibration=str(imgs), work_dir=tmp_path / "work")
    assert "int8" in art.precision
    out = workflow.run_outputs(art, profile=prof, assessment=a, evaluation=str(imgs), work_dir=tmp_path / "work")
    assert np.load(out)["output_0"].shape == (sum(h * w for h, w in sizes), 4)  # each image at its own size
