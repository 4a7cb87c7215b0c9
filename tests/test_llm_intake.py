"""LLM intake: llama-like Hugging Face configs and GGUF files (written here with gguf's own writer)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeopt.errors import ModelError
from edgeopt.intake import assess

gguf = pytest.importorskip("gguf")

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 256,
         "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3,
         "max_position_embeddings": 1024, "intermediate_size": 512}


def _checkpoint(folder: Path, config: dict, *, tokenizer: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(24))
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}", encoding="utf-8")
    return folder


def _gguf(path: Path, *, arch: str = "llama", tokenizer: bool = True) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(1)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"t{i}" for i in range(32)])
    w.add_tensor("token_embd.weight", np.ones((32, 64), dtype=np.float16))
    w.add_tensor("blk.0.attn_q.weight", np.ones((64, 64), dtype=np.float16))
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_hf_llama_reports_llm_facts(tmp_path: Path) -> None:
    a = assess(_checkpoint(tmp_path / "m", LLAMA))
    m = a.llm
    assert a.kind == "llm" and m is not None and m.family == "llama" and m.context_length == 1024
    assert (m.vocab_size, m.layers, m.heads, m.kv_heads, m.head_dim) == (300, 3, 4, 2, 64)
    assert m.kv_cache_bytes_per_token == 2 * 3 * 2 * 64 * 2 and m.tokenizer == "tokenizer.json"


@pytest.mark.parametrize(("config", "tokenizer", "expected"), [
    ({**LLAMA, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, True, "supported llama-like"),
    (LLAMA, False, "no tokenizer"),
    ({**LLAMA, "num_attention_heads": 0}, True, "num_attention_heads"),
])
def test_hf_llm_refusals_are_one_line(tmp_path: Path, config: dict, tokenizer: bool, expected: str) -> None:
    with pytest.raises(ModelError, match=expected) as info:
        assess(_checkpoint(tmp_path / "m", config, tokenizer=tokenizer))
    assert "\n" not in str(info.value)


def test_gguf_reports_types_context_vocab_and_tokenizer(tmp_path: Path) -> None:
    a = assess(_gguf(tmp_path / "m.gguf"))
    m = a.llm
    assert a.kind == "llm" and a.model.format == "gguf" and a.params == 32 * 64 + 64 * 64 + 64
    assert m is not None and m.tensor_types == {"F16": 2, "F32": 1} and m.file_type == "MOSTLY_F16"
    assert (m.context_length, m.vocab_size, m.kv_heads, m.head_dim, m.tokenizer) == (256, 32, 1, 16, "gpt2")
    assert m.kv_cache_bytes_per_token == 2 * 1 * 1 * 16 * 2


@pytest.mark.parametrize(("damage", "expected"), [
    ("truncate", "truncated"),
    ("garbage", "not a readable GGUF"),
    ("arch", "architecture 'gpt2' is not supported"),
    ("no-tokenizer", "without an embedded tokenizer"),
])
def test_bad_gguf_is_refused_in_one_line(tmp_path: Path, damage: str, expected: str) -> None:
    path = _gguf(tmp_path / "m.gguf", arch="gpt2" if damage == "arch" else "llama",
                 tokenizer=damage != "no-tokenizer")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 3000])
    elif damage == "garbage":
        path.write_bytes(data[:4] + b"\xff" * 64)
    with pytest.raises(ModelError, match=expected) as info:
        assess(path)
    assert "\n" not in str(info.value)


def test_cli_assess_prints_llm_facts_and_fails_cleanly(tmp_path: Path) -> None:
    good, bad = _gguf(tmp_path / "m.gguf"), tmp_path / "bad.gguf"
    bad.write_bytes(good.read_bytes()[:200])
    cli = [sys.executable, "-m", "flows.cli", "assess"]
    r = subprocess.run([*cli, str(good)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert "kind=llm" in r.stdout and "context 256" in r.stdout and "F16×2" in r.stdout and "gpt2" in r.stdout
    r = subprocess.run([*cli, str(bad)], capture_output=True, text=True, check=False)
    assert r.returncode != 0 and "error:" in r.stderr and "Traceback" not in r.stderr
