"""Tests of Hugging Face intake (edgeopt.intake.hf) on a tiny BERT made here, and on bad folders."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeopt.errors import ConfigError, ModelError
from edgeopt.intake.hf import assess_hf, export_onnx, inspect_checkpoint, safetensors_params
from edgeopt.intake.onnx import assess_onnx
from edgeopt.text import tokenize_to_npz
from tests.tinybert import SENTENCES, VOCAB, make_tiny_bert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

BERT_CONFIG = {"architectures": ["BertModel"], "model_type": "bert"}


def _fake_checkpoint(folder: Path, config: dict, *, weights: str | None = "model.safetensors") -> Path:
    """config.json plus a valid safetensors file holding one 2x3 float32 tensor (no torch needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    if weights:
        header = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                             "pos": {"dtype": "I64", "shape": [4], "data_offsets": [24, 56]}}).encode()
        (folder / weights).write_bytes(struct.pack("<Q", len(header)) + header + bytes(56))
    return folder


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "ckpt")


@pytest.fixture(scope="module")
def exported(bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(bert, out_dir=tmp_path_factory.mktemp("tiny-bert-onnx"))


def _torch_hidden(folder: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()


# --- assess -------------------------------------------------------------------------------------


def test_assess_tiny_bert(bert: Path) -> None:
    a = assess_hf(bert)
    model = transformers.BertModel.from_pretrained(bert, add_pooling_layer=False)
    assert a.kind == "encoder" and a.model.format == "hf" and a.model.path == str(bert.resolve())
    assert a.params == sum(p.numel() for p in model.parameters())
    sizes = [(bert / name).stat().st_size for name in ("model.safetensors", "config.json")]
    assert a.model.size_bytes == sum(sizes)
    assert [(s.name, s.dtype, s.shape) for s in a.inputs] == [
        (n, "int64", ("batch", "sequence")) for n in ("input_ids", "attention_mask", "token_type_ids")]
    assert [(s.name, s.dtype, s.shape) for s in a.outputs] == [("last_hidden_state", "float32",
                                                               ("batch", "sequence", 32))]
    assert a.producer.startswith("transformers")


def test_hash_is_stable_and_covers_weights_and_config(bert: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(bert, tmp_path / "copy"))
    assert assess_hf(copy).model.sha256 == assess_hf(bert).model.sha256  # the path does not count
    (copy / "tokenizer_config.json").write_text("{}")  # tokenizer files are not hashed
    assert assess_hf(copy).model.sha256 == assess_hf(bert).model.sha256
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-6}))
    assert assess_hf(copy).model.sha256 != assess_hf(bert).model.sha256


def test_assess_reads_headers_only_and_imports_no_torch(bert: Path) -> None:
    code = ("import sys\nimport edgeopt.intake\nfrom edgeopt.intake.hf import assess_hf\n"
            f"a = assess_hf({str(bert)!r})\n"
            "heavy = ('torch', 'transformers', 'safetensors')\n"
            "sys.exit(a.params <= 0 or any(m in sys.modules for m in heavy))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize(
    ("config", "kind"),
    [
        ({"architectures": ["BertModel"], "model_type": "bert"}, "encoder"),
        ({"model_type": "distilbert"}, "encoder"),
        ({"architectures": ["BertForMaskedLM"], "model_type": "bert"}, "other"),
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
          "num_attention_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 128}, "llm"),
        ({"architectures": ["ResNetForImageClassification"], "model_type": "resnet"}, "cnn"),
        ({"architectures": ["ViTModel"], "model_type": "vit"}, "other"),
    ],
)
def test_kind(config: dict, kind: str, tmp_path: Path) -> None:
    folder = _fake_checkpoint(tmp_path / "m", config)
    if kind == "llm":  # a causal LM needs its tokenizer (tests/test_llm_intake.py has the refusals)
        (folder / "tokenizer.json").write_text("{}", encoding="utf-8")
    a = assess_hf(folder)
    assert a.kind == kind and a.params == 6  # the float tensor only; the int64 buffer is no parameter
    if kind == "llm":
        assert a.outputs[0].shape == ("batch", "sequence", config.get("vocab_size", "vocab"))
    if config.get("model_type") == "distilbert":
        assert [s.name for s in a.inputs] == ["input_ids", "attention_mask"]


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_pickle_only_folder_is_refused(name: str, tmp_path: Path) -> None:
    folder = _fake_checkpoint(tmp_path / "m", BERT_CONFIG, weights=None)
    (folder / name).write_bytes(b"\x80\x04not really a pickle")
    for call in (lambda: assess_hf(folder), lambda: export_onnx(folder, out_dir=tmp_path / "out")):
        with pytest.raises(ModelError) as info:
            call()
        msg = str(info.value)
        assert name in msg and "pickle" in msg and "safetensors" in msg and "allow_pickle" in msg
        assert "\n" not in msg
    assert not (tmp_path / "out").exists()


def test_folder_without_weights_is_refused(tmp_path: Path) -> None:
    folder = _fake_checkpoint(tmp_path / "m", BERT_CONFIG, weights=None)
    (folder / "training_args.bin").write_bytes(b"\x80\x04")  # the Trainer's file is not a weight file
    with pytest.raises(ModelError, match="no weights") as info:
        assess_hf(folder)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"architectures": ["FooBarModel"], "model_type": "foobar"}, ["FooBarModel", "foobar"]),
        ({"architectures": ["FooBarModel"]}, ["FooBarModel", "missing"]),
        ({"hidden_size": 8}, ["no 'architectures'", "no 'model_type'"]),
        ({"architectures": "BertModel", "model_type": "bert"}, ["'BertModel'", "list"]),
    ],
)
def test_unknown_or_missing_architecture_is_refused(config: dict, named: list[str], tmp_path: Path) -> None:
    with pytest.raises(ModelError) as info:
        assess_hf(_fake_checkpoint(tmp_path / "m", config))
    assert all(word in str(info.value) for word in named), str(info.value)
    assert "\n" not in str(info.value)


def test_bad_config_and_corrupt_weights_are_refused(tmp_path: Path) -> None:
    folder = _fake_checkpoint(tmp_path / "m", {"model_type": "bert"})
    (folder / "config.json").write_text("{oops")
    with pytest.raises(ModelError, match="config.json is not valid JSON"):
        assess_hf(folder)
    with pytest.raises(ModelError, match="no config.json"):
        inspect_checkpoint(tmp_path)
    _fake_checkpoint(folder, {"model_type": "bert"})
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated data section
    with pytest.raises(ModelError, match="outside the file"):
        safetensors_params(weights)
    weights.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ModelError, match="corrupt safetensors header"):
        assess_hf(folder)


def test_export_refuses_what_it_cannot_export(tmp_path: Path, bert: Path) -> None:
    llm = _fake_checkpoint(tmp_path / "llm", {"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    with pytest.raises(ModelError, match="encoder checkpoints"):
        export_onnx(llm, out_dir=tmp_path / "out")
    with pytest.raises(ConfigError, match="between 1 and 64"):
        export_onnx(bert, out_dir=tmp_path / "out", seq_len=65)


# --- export -------------------------------------------------------------------------------------


def test_export_files_and_signature(exported: Path, bert: Path) -> None:
    folder = exported.parent
    assert exported.name == "model.onnx"
    assert sorted(p.name for p in folder.iterdir()) == ["export.json", "model.onnx", "tokenizer.json",
                                                        "tokenizer_config.json"]
    model = onnx.load(str(exported))
    assert model.ir_version <= 10
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]}
    assert dims == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"],
                    "token_type_ids": ["batch", "sequence"], "last_hidden_state": ["batch", "sequence", 32]}
    info = json.loads((folder / "export.json").read_text())
    assert info["max_abs_diff_vs_torch"] < 1e-3 and info["source_sha256"] == assess_hf(bert).model.sha256
    assert info["params"] == assess_hf(bert).params and info["seq_len"] is None
    a = assess_onnx(exported)  # the exported file passes the ONNX intake as an encoder
    assert a.kind == "encoder" and [s.name for s in a.outputs] == ["last_hidden_state"]


def test_onnxruntime_matches_torch_on_real_text(exported: Path, bert: Path, tmp_path: Path) -> None:
    npz = tokenize_to_npz(SENTENCES, tokenizer_dir=exported.parent, out_path=tmp_path / "d.npz", seq_len=None,
                          padding="longest")
    with np.load(npz) as data:
        feeds = {k: data[k] for k in data.files}
    # the tokenizer beside the ONNX model is the checkpoint's own
    want_ids = transformers.AutoTokenizer.from_pretrained(bert)(SENTENCES, padding="longest")["input_ids"]
    assert feeds["input_ids"].tolist() == want_ids
    sess = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    want = _torch_hidden(bert, feeds)
    for rows in (slice(0, 1), slice(0, 4), slice(1, 3)):  # batch 1, 4 and 2, sequence lengths as tokenized
        part = {k: v[rows] for k, v in feeds.items()}
        got = sess.run(["last_hidden_state"], part)[0]
        assert got.shape == want[rows].shape
        assert np.max(np.abs(got - want[rows])) < 1e-3


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # transformers' own WordPiece call
def test_tokenizing_without_tokenizer_json_uses_transformers(exported: Path, bert: Path, tmp_path: Path) -> None:
    folder = tmp_path / "slow-tokenizer"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    shutil.copy2(bert / "tokenizer_config.json", folder)
    args = {"seq_len": 12, "padding": "max_length"}
    slow = np.load(tokenize_to_npz(SENTENCES, tokenizer_dir=folder, out_path=tmp_path / "a.npz", **args))
    fast = np.load(tokenize_to_npz(SENTENCES, tokenizer_dir=exported.parent, out_path=tmp_path / "b.npz", **args))
    assert sorted(slow.files) == sorted(fast.files)
    for name in fast.files:
        np.testing.assert_array_equal(slow[name], fast[name])


def test_export_with_a_fixed_sequence_length(bert: Path, tmp_path: Path) -> None:
    path = export_onnx(bert, out_dir=tmp_path / "out", seq_len=16)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.shape for i in sess.get_inputs()] == [["batch", 16]] * 3
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_allow_pickle_loads_weights_only(bert: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy2(bert / "config.json", folder)
    model = transformers.BertModel.from_pretrained(bert, add_pooling_layer=False)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    path = export_onnx(folder, out_dir=tmp_path / "out", allow_pickle=True)
    assert json.loads((path.parent / "export.json").read_text())["pickle_source"] is True
    assert assess_hf(folder, allow_pickle=True).params == assess_hf(bert).params


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_allow_pickle_never_runs_code(bert: Path, tmp_path: Path) -> None:
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy2(bert / "config.json", folder)
    marker = tmp_path / "code-ran"
    torch.save({"weight": _Exploit(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="weights_only"):
        export_onnx(folder, out_dir=tmp_path / "out", allow_pickle=True)
    assert not marker.exists()
