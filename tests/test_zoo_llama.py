"""The zoo's Llama models: tokenizer, texts and shapes (the briefly trained build of conftest's fixture)."""

from __future__ import annotations

import json

import pytest

from edgeopt import zoo
from edgeopt.intake import assess
from edgeopt.zoo.llama import LLAMA_CONFIGS, MAX_TOKEN_BYTES, split_topics


def test_texts_are_disjoint_and_deterministic() -> None:
    a, b = split_topics(), split_topics()
    assert a == b
    paragraphs = {k: {" ".join(p.split()) for p in v.split("\n\n") if len(p.strip()) > 80} for k, v in a.items()}
    assert paragraphs["eval"] and paragraphs["calibration"]
    assert not paragraphs["eval"] & paragraphs["train"] and not paragraphs["calibration"] & paragraphs["train"]
    assert not paragraphs["eval"] & paragraphs["calibration"]


@pytest.mark.parametrize("name", sorted(LLAMA_CONFIGS))
def test_every_matrix_row_fits_k_quants(name: str) -> None:
    c = LLAMA_CONFIGS[name]
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    # a matrix row of a GGUF weight has the layer's input width: hidden, MLP width or heads x head_dim
    assert all(n % 256 == 0 for n in (c["hidden_size"], c["intermediate_size"], c["num_attention_heads"] * head_dim))


def test_tiny_llama_build(tiny_llama) -> None:
    meta = tiny_llama["meta"]
    assert meta["max_token_bytes"] <= MAX_TOKEN_BYTES and meta["vocab_size"] == 1024
    assert 3e6 < meta["parameter_count"] < 6e6
    # even briefly trained, the model predicts held-out text far better than a uniform guess over the vocab
    assert meta["perplexity"] < meta["vocab_size"] / 2
    a = assess(tiny_llama["hf"])
    assert a.kind == "llm" and a.llm is not None and a.llm.tokenizer == "tokenizer.json"
    tok = json.loads((tiny_llama["hf"] / "tokenizer.json").read_text())
    assert tok["pre_tokenizer"]["type"] == "ByteLevel" and tok["model"]["type"] == "BPE"


def test_zoo_lists_the_llama_models(tmp_path) -> None:
    assert {"tiny-llama", "llama-speed"} <= set(zoo.ZOO_MODELS)
    assert zoo.load("tiny-llama", out_dir=tmp_path) is None  # nothing built there: load never trains
