"""HF → GGUF conversion (own code over gguf-py), checked against the HF model with llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeopt.convert.hf_gguf import convert_hf_to_gguf, permute_rotary
from edgeopt.errors import ModelError

llama_cpp = pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

#: logits of the F16 GGUF vs the F32 checkpoint: F16 weights round each weight to ~1e-3 relative; on this
#: model's logits (magnitude ~10) that stays under this bound, while a mis-permuted q/k or a wrong tensor
#: moves logits by whole units
F16_LOGIT_TOL = 0.05
WINDOW = 96


@pytest.fixture(scope="module")
def hf_model(tiny_llama):
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_llama["hf"]), local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama["hf"]), local_files_only=True,
                                                              dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def gguf_model(tiny_llama):
    return llama_cpp.Llama(model_path=str(tiny_llama["f16"]), n_ctx=256, logits_all=True, n_threads=1,
                           verbose=False)


def test_tokenization_is_identical_on_held_out_text(tiny_llama, hf_model, gguf_model) -> None:
    text = tiny_llama["eval"].read_text(encoding="utf-8")[:6000]
    want = hf_model[0](text)["input_ids"]
    got = gguf_model.tokenize(text.encode(), add_bos=False, special=False)
    assert len(want) > 500 and got == want
    assert gguf_model.detokenize(got).decode() == text  # every token survives llama.cpp's detokenizer


def test_logits_match_within_tolerance_and_greedy_text_is_the_same(tiny_llama, hf_model, gguf_model) -> None:
    tok, model = hf_model
    ids = tok(tiny_llama["eval"].read_text(encoding="utf-8")[:2000])["input_ids"][:WINDOW]
    with torch.no_grad():
        want = model(torch.tensor(ids)[None]).logits[0].numpy()
    gguf_model.reset()
    gguf_model.eval(ids)
    got = np.asarray(gguf_model.scores[:WINDOW], dtype=np.float32)
    diff = float(np.abs(got - want).max())
    assert diff < F16_LOGIT_TOL, diff
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.97
    prompt = ids[:16]
    with torch.no_grad():
        hf_greedy = model.generate(torch.tensor(prompt)[None], max_new_tokens=20, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, 16:].tolist()
    ours = []
    for t in gguf_model.generate(prompt, temp=0.0, top_k=1, reset=True):
        ours.append(int(t))
        if len(ours) == 20:
            break
    assert ours == hf_greedy


def test_permute_is_the_converter_layout() -> None:
    w = np.arange(2 * 8 * 3).reshape(16, 3)  # 2 heads, head_dim 8 -> rows (0..3 | 4..7) interleaved per head
    p = permute_rotary(w, 2)
    assert p[:, 0].tolist()[:8] == [0, 12, 3, 15, 6, 18, 9, 21]
    assert not np.array_equal(permute_rotary(w, 4, 2), permute_rotary(w, 4))  # GQA uses the KV head count


def test_other_families_and_tokenizers_are_refused(tiny_llama, tmp_path: Path) -> None:
    import json
    import shutil

    folder = shutil.copytree(tiny_llama["hf"], tmp_path / "gemma")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    with pytest.raises(ModelError, match="'gemma' cannot be converted .* convertible: llama, mistral, qwen2, phi3$"):
        convert_hf_to_gguf(folder, tmp_path / "q.gguf")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="no tokenizer.json"):
        convert_hf_to_gguf(folder, tmp_path / "q.gguf")
    assert not (tmp_path / "q.gguf").exists()


# --- Qwen2 and Phi-3 checkpoints: random-initialised at small shapes, with the tiny Llama's tokenizer ---

#: logits of the F32 GGUF (run with an F32 KV cache) vs the HF model in float32: the two only differ in
#: summation order (~2e-5 measured); ten times Qwen2's RMS-norm epsilon already moves them by 0.014, a
#: halved RoPE base by whole units, a missing bias or an unfused-wrong qkv/gate_up by more
F32_LOGIT_TOL = 1e-3
FAMILY_GREEDY = 12
FAMILY_SHAPES = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "max_position_embeddings": 512, "bos_token_id": 0, "eos_token_id": 1,
                 "pad_token_id": None}  # head_dim 64, grouped-query attention 4/2 heads
PADDED_VOCAB = 8  # Qwen2 checkpoints pad the embedding rows past the tokenizer's ids


def _family_checkpoint(family: str, tok, folder: Path, *, vocab_size: int | None = None, **token_ids: int):
    """A random Qwen2 (tied embeddings, RoPE base 1e6, padded vocabulary), Phi-3 (fused projections) or Llama
    model; every parameter drawn at random (biases and norms too, so a misplaced one shows) and saved.
    ``vocab_size`` (default: the tokenizer's) and ``token_ids`` (``bos_token_id``...) override the config's."""
    torch.manual_seed(0)
    shapes = {**FAMILY_SHAPES, **token_ids}
    if family == "qwen2":
        config = transformers.Qwen2Config(vocab_size=len(tok) + PADDED_VOCAB, tie_word_embeddings=True, **shapes)
        config.rope_parameters = {"rope_theta": 1_000_000.0, "rope_type": "default"}
        model = transformers.Qwen2ForCausalLM(config)
    elif family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=vocab_size or len(tok), **shapes))
    else:
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(vocab_size=vocab_size or len(tok), **shapes))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.5 if p.ndim == 1 else 0.08)
    model.eval().save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return model


@pytest.fixture(scope="module", params=["qwen2", "phi3"])
def family(request, hf_model, tmp_path_factory) -> dict:
    """One family's checkpoint (folder named after the family), its HF model and both GGUFs opened."""
    name = request.param
    folder = tmp_path_factory.mktemp(f"{name}-ckpt") / name
    model = _family_checkpoint(name, hf_model[0], folder)
    ggufs = {p: convert_hf_to_gguf(folder, folder.parent / f"{name}-{p}.gguf", precision=p) for p in ("f32", "f16")}
    llamas = {p: llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, n_threads=1, verbose=False,
                                 type_k=0, type_v=0)  # GGML_TYPE_F32 KV cache: like for like with HF float32
              for p, path in ggufs.items()}
    return {"name": name, "folder": folder, "model": model, "gguf": ggufs, "llama": llamas}


def test_family_tokenization_is_identical(tiny_llama, hf_model, family) -> None:
    text = tiny_llama["eval"].read_text(encoding="utf-8")[:6000]
    want = hf_model[0](text)["input_ids"]
    for llm in family["llama"].values():
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == want


def _assert_logits_and_greedy_text_match(model, llms: dict, ids: list[int]) -> None:
    """The F32 and F16 GGUFs' logits on ``ids`` within their tolerances of the HF model's, and the F32 file's
    greedy continuation of the first 16 tokens the HF model's."""
    with torch.no_grad():
        want = model(torch.tensor(ids)[None]).logits[0].numpy()
    got = {}
    for precision, llm in llms.items():
        llm.reset()
        llm.eval(ids)
        got[precision] = np.asarray(llm.scores[:len(ids)], dtype=np.float32)
    assert float(np.abs(got["f32"] - want).max()) < F32_LOGIT_TOL
    assert float(np.abs(got["f16"] - want).max()) < F16_LOGIT_TOL
    assert (got["f32"].argmax(-1) == want.argmax(-1)).all()
    assert (got["f16"].argmax(-1) == want.argmax(-1)).mean() > 0.95
    # greedy text from the F32 file: a random model's top-2 logits can lie 0.002 apart, inside F16's error
    prompt = ids[:16]
    with torch.no_grad():
        hf_greedy = model.generate(torch.tensor(prompt)[None], max_new_tokens=FAMILY_GREEDY, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, 16:].tolist()
    ours = []
    for t in llms["f32"].generate(prompt, temp=0.0, top_k=1, reset=True):
        ours.append(int(t))
        if len(ours) == FAMILY_GREEDY:
            break
    assert ours == hf_greedy


def test_family_logits_match_and_greedy_text_is_the_same(tiny_llama, hf_model, family) -> None:
    ids = hf_model[0](tiny_llama["eval"].read_text(encoding="utf-8")[:2000])["input_ids"][:WINDOW]
    _assert_logits_and_greedy_text_match(family["model"], family["llama"], ids)


def test_family_gguf_layout_is_llama_cpps(hf_model, family) -> None:
    import gguf

    reader = gguf.GGUFReader(str(family["gguf"]["f16"]))
    tensors = {t.name: t for t in reader.tensors}

    def field(key):
        return reader.fields[key].contents()

    name = family["name"]
    assert field("general.architecture") == name
    assert field(f"{name}.attention.head_count_kv") == 2 and field(f"{name}.rope.dimension_count") == 64
    if name == "qwen2":
        assert field("qwen2.rope.freq_base") == 1_000_000.0
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= set(tensors)
        assert tensors["blk.0.attn_q.bias"].tensor_type.name == "F32"
        assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd.weight for the output
        assert len(field("tokenizer.ggml.tokens")) == len(hf_model[0]) + PADDED_VOCAB
    else:
        assert "blk.0.attn_qkv.weight" in tensors and "blk.0.attn_q.weight" not in tensors
        assert "blk.0.ffn_gate.weight" not in tensors
        assert list(tensors["blk.0.ffn_up.weight"].shape) == [256, 2 * 512]  # gate and up halves in one
        assert list(tensors["blk.0.attn_qkv.weight"].shape) == [256, (4 + 2 * 2) * 64]
        assert field("phi3.attention.sliding_window") == 0
        assert field("phi3.rope.scaling.original_context_length") == 4096
        assert "phi_3" in field("general.name")  # llama.cpp's Phi-3 token quirk needs tokens this vocab lacks


def test_family_assessment_is_an_llm_with_its_kv_cache(family) -> None:
    from edgeopt.intake import assess

    kv_bytes = 2 * 2 * 2 * 64 * 2  # K and V x layers x KV heads x head_dim x F16 bytes
    for path in (family["folder"], family["gguf"]["f16"]):
        a = assess(path)
        assert a.kind == "llm" and a.llm is not None
        assert (a.llm.family, a.llm.layers, a.llm.kv_heads, a.llm.head_dim) == (family["name"], 2, 2, 64)
        assert a.llm.kv_cache_bytes_per_token == kv_bytes


def test_family_settings_llama_cpp_would_run_differently_are_refused(family, tmp_path: Path) -> None:
    import json
    import shutil

    folder = shutil.copytree(family["folder"], tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    if family["name"] == "phi3":
        scaled = {**config, "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                                "long_factor": [1.0] * 32, "short_factor": [1.0] * 32}}
        match = "RoPE scaling 'longrope' .*Phi-3 long-context"
    else:
        scaled = {**config, "use_sliding_window": True, "sliding_window": 64}
        match = "use_sliding_window"
    (folder / "config.json").write_text(json.dumps(scaled))
    with pytest.raises(ModelError, match=match):
        convert_hf_to_gguf(folder, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("family", ["qwen2"], indirect=True)
def test_qwen2_pre_tokenizer_is_named_for_llama_cpp_and_other_splits_are_refused(tiny_llama, family,
                                                                                tmp_path: Path) -> None:
    """The tiny vocabulary behind Qwen2's own split (digits one by one, newlines apart): llama.cpp's "qwen2"
    pre-tokenizer cuts the held-out text exactly as HF does; a split it has no name for is refused."""
    import json
    import shutil

    from edgeopt.convert.hf_gguf import QWEN2_SPLIT

    folder = shutil.copytree(family["folder"], tmp_path / "ckpt")
    doc = json.loads((folder / "tokenizer.json").read_text())
    doc["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    (folder / "tokenizer.json").write_text(json.dumps(doc))
    text = tiny_llama["eval"].read_text(encoding="utf-8")[:6000]
    want = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)(text)["input_ids"]
    assert want != family["llama"]["f16"].tokenize(text.encode(), add_bos=False, special=False)  # splits differ
    path = convert_hf_to_gguf(folder, tmp_path / "qwen2-split.gguf", precision="f32")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == want
    doc["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    (folder / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="neither GPT-2's nor Qwen2's split"):
        convert_hf_to_gguf(folder, tmp_path / "other.gguf")


def test_family_importance_matrix_covers_every_quantized_matrix(tiny_llama, family, tmp_path: Path) -> None:
    """The importance matrix is keyed by the GGUF's tensor names of the family (Phi-3's fused attn_qkv and
    ffn_up included): one entry per matrix llama.cpp quantizes, as long as its input columns, and a Q4_K_M
    quantization that uses it succeeds."""
    from gguf import GGUFReader

    from edgeopt.backends.llamacpp import compute_imatrix, quantize_gguf

    imatrix = compute_imatrix(family["folder"], tiny_llama["calibration"].read_text(encoding="utf-8"),
                              max_tokens=512)
    matrices = {t.name: [int(x) for x in t.shape] for t in GGUFReader(family["gguf"]["f16"]).tensors
                if t.name.startswith("blk.") and len(t.shape) == 2}
    assert set(imatrix) >= set(matrices), sorted(set(matrices) - set(imatrix))
    for name, shape in matrices.items():
        assert imatrix[name].shape == (shape[0],)  # GGUF shapes are [columns, rows]: one value per input column
    if family["name"] == "phi3":
        assert "blk.0.attn_qkv.weight" in imatrix and "blk.0.ffn_up.weight" in imatrix
    quantize_gguf(family["gguf"]["f16"], tmp_path / "q4.gguf", "Q4_K_M", imatrix=imatrix)
    assert (tmp_path / "q4.gguf").stat().st_size < family["gguf"]["f16"].stat().st_size / 2


# --- SentencePiece tokenizers (Llama-2, TinyLlama, Mistral, Phi-3-mini): a BPE SentencePiece model trained here ---

SPM_VOCAB = 512
#: text the training text never shows: lines indented by spaces, repeated spaces, tabs, blank lines, characters
#: outside the vocabulary (byte fallback: CJK, an emoji, a euro sign)
SPM_EDGE_TEXT = "indented lines follow:\n  two spaces\n\n\tthen a tab,   three spaces; 漢字, € 5 and 🙂\n    end \n"
#: Phi-3-mini's added tokens (special) and a user token; its config pads the embeddings past them
PHI3_SPECIALS = ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>"]
PHI3_ROWS = 576
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType


@pytest.fixture(scope="module")
def spm_model(tiny_llama, tmp_path_factory) -> Path:
    """A BPE SentencePiece model with byte fallback and Llama-2's normalization (identity, spaces kept),
    trained on the calibration text (a fraction of a second)."""
    import sentencepiece

    out = tmp_path_factory.mktemp("spm")
    sentencepiece.SentencePieceTrainer.train(
        input=str(tiny_llama["calibration"]), model_prefix=str(out / "spm"), vocab_size=SPM_VOCAB,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2)
    return out / "spm.model"


@pytest.fixture(scope="module", params=["llama", "phi3"])
def spm_family(request, spm_model, tmp_path_factory) -> dict:
    """A random Llama (Llama-2's tokenizer files: tokenizer.model and tokenizer.json, BOS added) or Phi-3
    (plus Phi-3-mini's added tokens, EOS <|endoftext|>, padded rows) checkpoint, converted and opened."""
    import shutil

    name = request.param
    folder = tmp_path_factory.mktemp(f"spm-{name}") / name
    folder.mkdir()
    shutil.copy(spm_model, folder / "tokenizer.model")
    tok = transformers.LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True)
    if name == "phi3":
        tok.add_tokens(PHI3_SPECIALS, special_tokens=True)
        tok.add_tokens(["edgeopt"])
        tok.eos_token = "<|endoftext|>"
    tok.save_pretrained(str(folder))
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = _family_checkpoint(name, tok, folder, vocab_size=PHI3_ROWS if name == "phi3" else None,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    ggufs = {p: convert_hf_to_gguf(folder, folder.parent / f"{name}-{p}.gguf", precision=p) for p in ("f32", "f16")}
    llamas = {p: llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, n_threads=1, verbose=False,
                                 type_k=0, type_v=0) for p, path in ggufs.items()}
    return {"name": name, "folder": folder, "tok": tok, "model": model, "gguf": ggufs, "llama": llamas}


def _assert_same_tokens_and_round_trip(tok, sp, llm, texts: list[str]) -> None:
    """llama.cpp's tokens are HF's and SentencePiece's own (``sp``), and detokenize back to the text."""
    for text in texts:
        want = tok(text)["input_ids"]
        assert want[0] == tok.bos_token_id and len(want) > 20
        got = llm.tokenize(text.encode(), add_bos=True, special=False)
        assert got == want, text[:80]
        assert got == [tok.bos_token_id, *sp.encode(text)]
        assert llm.detokenize(got).decode() == text  # bytes of <0xNN> pieces fuse back into characters
        assert tok.decode(want, skip_special_tokens=True) == text
    # a text that itself starts with spaces: SentencePiece and llama.cpp put the prefix space before them,
    # transformers 5's Metaspace (prepend_scheme "first") adds none there, so only SentencePiece is the reference
    lead = "  " + texts[-1]
    got = llm.tokenize(lead.encode(), add_bos=True, special=False)
    assert got == [tok.bos_token_id, *sp.encode(lead)] and llm.detokenize(got).decode() == lead


def test_spm_tokenization_is_identical_and_round_trips(tiny_llama, spm_family) -> None:
    """Held-out text, and text with spaces, tabs, newlines and characters only byte fallback can encode."""
    import sentencepiece

    tok, llm = spm_family["tok"], spm_family["llama"]["f32"]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_family["folder"] / "tokenizer.model"))
    texts = [tiny_llama["eval"].read_text(encoding="utf-8")[:6000], SPM_EDGE_TEXT]
    _assert_same_tokens_and_round_trip(tok, sp, llm, texts)
    pieces = tok.convert_ids_to_tokens(tok(SPM_EDGE_TEXT)["input_ids"])
    assert {"<0xE6>", "<0xF0>", "<0x0A>", "<0x09>"} <= set(pieces)  # 漢, 🙂, newline and tab: bytes


def test_spm_logits_match_and_greedy_text_is_the_same(tiny_llama, spm_family) -> None:
    ids = spm_family["tok"](tiny_llama["eval"].read_text(encoding="utf-8")[:2000])["input_ids"][:WINDOW]
    _assert_logits_and_greedy_text_match(spm_family["model"], spm_family["llama"], ids)


def test_spm_gguf_tokenizer_metadata(spm_family) -> None:
    """llama.cpp's SentencePiece vocabulary: the model's pieces, scores and types, added tokens, padding,
    special ids and flags as the HF tokenizer has them."""
    import re

    import gguf
    import sentencepiece

    reader = gguf.GGUFReader(str(spm_family["gguf"]["f16"]))

    def field(key):
        return reader.fields[key].contents()

    tok, sp = spm_family["tok"], sentencepiece.SentencePieceProcessor(
        model_file=str(spm_family["folder"] / "tokenizer.model"))
    tokens, types, scores = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type"), \
        field("tokenizer.ggml.scores")
    assert field("tokenizer.ggml.model") == "llama" and field("tokenizer.ggml.pre") == "default"
    assert len(tokens) == len(types) == len(scores) == spm_family["model"].config.vocab_size
    assert tokens[:SPM_VOCAB] == [sp.id_to_piece(i) for i in range(SPM_VOCAB)]
    assert np.allclose(scores[:SPM_VOCAB], [sp.get_score(i) for i in range(SPM_VOCAB)])
    byte_ids = [i for i, t in enumerate(tokens) if re.fullmatch(r"<0x[0-9A-F]{2}>", t)]
    assert len(byte_ids) == 256 and {types[i] for i in byte_ids} == {BYTE}
    assert (types[0], types[1], types[2]) == (UNKNOWN, CONTROL, CONTROL)
    assert types.count(NORMAL) == SPM_VOCAB - 3 - 256
    assert field("tokenizer.ggml.unknown_token_id") == tok.unk_token_id == 0
    assert field("tokenizer.ggml.bos_token_id") == tok.bos_token_id == 1
    assert field("tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field("tokenizer.ggml.add_bos_token") is True and field("tokenizer.ggml.add_eos_token") is False
    assert field("tokenizer.ggml.add_space_prefix") is True
    llm = spm_family["llama"]["f16"]
    assert (llm.token_bos(), llm.token_eos()) == (tok.bos_token_id, tok.eos_token_id)
    if spm_family["name"] == "phi3":
        added = tok.convert_tokens_to_ids(PHI3_SPECIALS + ["edgeopt"])
        assert added == list(range(SPM_VOCAB, SPM_VOCAB + 5)) and tok.eos_token_id == SPM_VOCAB
        assert [tokens[i] for i in added] == PHI3_SPECIALS + ["edgeopt"]
        assert [types[i] for i in added] == [CONTROL] * 4 + [USER_DEFINED]
        assert tokens[-1] == f"[PAD{PHI3_ROWS - 1}]" and set(types[SPM_VOCAB + 5:]) == {UNUSED}
        assert "phi_3" not in field("general.name")  # Phi-3's special tokens are there: llama.cpp's quirk applies


def test_spm_tokenizer_json_alone_converts_to_the_same_vocabulary(tiny_llama, spm_model, spm_family,
                                                                  tmp_path: Path) -> None:
    """A checkpoint with only tokenizer.json (byte-fallback BPE, Metaspace): the same pieces and types, and
    scores from the merge order, so llama.cpp merges as Hugging Face does. The same with the tokenizer.json
    Llama-2 and TinyLlama ship (a Prepend + Replace normalizer, no pre-tokenizer), checked against the
    ``tokenizers`` library reading that file as is (transformers 5 rebuilds a Metaspace instead)."""
    import json
    import shutil

    import gguf
    import sentencepiece

    folder = shutil.copytree(spm_family["folder"], tmp_path / spm_family["name"])
    (folder / "tokenizer.model").unlink()
    path = convert_hf_to_gguf(folder, tmp_path / "json-only.gguf", precision="f32")
    fields = [gguf.GGUFReader(str(p)).fields for p in (path, spm_family["gguf"]["f32"])]
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.add_space_prefix"):
        assert fields[0][key].contents() == fields[1][key].contents(), key
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    texts = [tiny_llama["eval"].read_text(encoding="utf-8")[:6000], SPM_EDGE_TEXT]
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    _assert_same_tokens_and_round_trip(spm_family["tok"], sp, llm, texts)

    doc = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    doc["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    doc["pre_tokenizer"] = None
    (folder / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    legacy = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    llm = llama_cpp.Llama(model_path=str(convert_hf_to_gguf(folder, tmp_path / "legacy.gguf", precision="f32")),
                          vocab_only=True, verbose=False)
    for text in [*texts, "  " + SPM_EDGE_TEXT]:
        got = llm.tokenize(text.encode(), add_bos=True, special=False)
        assert got == legacy.encode(text).ids == [1, *sp.encode(text)]


@pytest.mark.parametrize("spm_family", ["llama"], indirect=True)
def test_spm_tokenizers_llama_cpp_would_run_differently_are_refused(spm_family, tmp_path: Path) -> None:
    """A unigram tokenizer.model, a tokenizer.json of neither kind (a Unigram over Metaspace, as T5's), and a
    SentencePiece-style one with a pre-tokenizer step llama.cpp does not run: one line each, no file."""
    import json
    import shutil

    from sentencepiece import sentencepiece_model_pb2

    folder = shutil.copytree(spm_family["folder"], tmp_path / "ckpt")
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((folder / "tokenizer.model").read_bytes())
    proto.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.ModelType.UNIGRAM
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    with pytest.raises(ModelError, match="tokenizer.model is a SentencePiece UNIGRAM model; .* only BPE"):
        convert_hf_to_gguf(folder, tmp_path / "x.gguf")
    (folder / "tokenizer.model").unlink()
    doc = json.loads((folder / "tokenizer.json").read_text())
    digits = {**doc, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, doc["pre_tokenizer"]]}}
    (folder / "tokenizer.json").write_text(json.dumps(digits))
    with pytest.raises(ModelError, match="pre-tokenizes with 'Digits'; llama.cpp's SentencePiece tokenizer does not"):
        convert_hf_to_gguf(folder, tmp_path / "x.gguf")
    unigram = tokenizers.Tokenizer(tokenizers.models.Unigram([("<unk>", 0.0), ("\u2581a", -1.0), ("a", -2.0)], 0))
    unigram.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    unigram.save(str(folder / "tokenizer.json"))
    with pytest.raises(ModelError, match=r"tokenizer.json is a 'Unigram' tokenizer with pre-tokenizer 'Metaspace', "
                                         r"neither a byte-level BPE .* nor SentencePiece-style .*convert a checkpoint"):
        convert_hf_to_gguf(folder, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def _hf_session(tok):
    """The evaluators' tokenizer surface of the HF-tokenizer runtimes (OpenVINO GenAI, onnxruntime-genai, MLX)."""
    from edgeopt.backends.llm_session import HFTokenizerSession

    session = HFTokenizerSession()
    session.tokenizer = tok
    return session


def test_spm_special_token_text_is_tokenized_as_text_by_both_evaluator_surfaces(spm_family) -> None:
    """The text of a special token (``<s>``, ``</s>``, ``<unk>``, Phi-3's ``<|user|>``...) at the start, in the
    middle and at the end of a text, followed by a space, a word or a newline: llama.cpp as the evaluators call it
    (``special=False``: CONTROL tokens are not matched) and the HF-tokenizer session give the same ids, the
    special token's text cut into ordinary pieces; Hugging Face's default would match the token itself."""
    import sentencepiece

    from edgeopt.evaluate.llm import bos_prefix, tokenize_text

    tok, llm = spm_family["tok"], spm_family["llama"]["f32"]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_family["folder"] / "tokenizer.model"))
    session = _hf_session(tok)
    specials = ["<unk>", "<s>", "</s>", *(PHI3_SPECIALS if spm_family["name"] == "phi3" else [])]
    assert bos_prefix(session) == bos_prefix(llm) == [tok.bos_token_id]
    for special in specials:
        sid = tok.convert_tokens_to_ids(special)
        for text in (f"{special} the import", f"{special}the", f"a {special} b", f"a{special}b", f"end {special}",
                     f"end{special}", f"{special}\nnext line", f"x {special} y {special}"):
            assert sid in tok.encode(text, add_special_tokens=False), text  # the text does hold the token
            got = tokenize_text(llm, text)
            assert got == session.tokenize(text.encode(), add_bos=False, special=False), text
            assert got == sp.encode(text), text  # SentencePiece never matches a control symbol in text


@pytest.mark.parametrize("spm_family", ["phi3"], indirect=True)
def test_spm_text_after_a_user_defined_token_is_where_llama_cpp_differs(spm_family, tmp_path: Path) -> None:
    """A non-special added token (USER_DEFINED, "edgeopt" here) is matched by llama.cpp even with
    ``special=False``, and by Hugging Face; the text after it is not tokenized alike. llama.cpp starts it as a new
    SentencePiece text: a ``▁`` prefix (``add_space_prefix``) and, in a GGUF named like Phi-3 (this one,
    "phi3"), the whitespace after the token dropped first (llama.cpp's Phi-3 RSTRIP rule, keyed on
    ``general.name``). transformers 5 (Metaspace, prepend_scheme "first") adds no prefix there and keeps the
    whitespace. They agree only when the token ends the text or is followed by one space and a word."""
    import shutil

    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2

    from edgeopt.evaluate.llm import tokenize_text

    tok, llm = spm_family["tok"], spm_family["llama"]["f32"]
    session = _hf_session(tok)
    model = spm_family["folder"] / "tokenizer.model"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    bare = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())  # no prefix space
    folder = shutil.copytree(spm_family["folder"], tmp_path / "mini")  # a name without "phi3": no RSTRIP
    other = llama_cpp.Llama(model_path=str(convert_hf_to_gguf(folder, tmp_path / "mini.gguf", precision="f32")),
                            vocab_only=True, verbose=False)
    uid = tok.convert_tokens_to_ids("edgeopt")
    assert uid == SPM_VOCAB + 4
    for rest in ("", " is here", " the\n", "is", "\nthe", ". done", "  b"):
        text = "edgeopt" + rest
        hf = session.tokenize(text.encode(), add_bos=False, special=False)
        got = tokenize_text(llm, text)
        assert hf == [uid, *bare.encode(rest)], text
        assert got == [uid, *(sp.encode(rest.lstrip()) if rest.strip() else [])], text
        assert tokenize_text(other, text) == [uid, *sp.encode(rest)], text
        same = rest == "" or (rest[0] == " " and rest[1] not in " \n")
        assert (got == hf) is same, text
        assert (tokenize_text(other, text) == hf) is (rest == ""), text
    # so: "edgeoptis" is HF [edgeopt, is], llama.cpp [edgeopt, ▁is]; llama.cpp loses the newline of "edgeopt\nthe"
    assert tok.convert_ids_to_tokens(tokenize_text(llm, "edgeoptis")) == ["edgeopt", "\u2581is"]
    assert tok.convert_ids_to_tokens(session.tokenize(b"edgeoptis")) == ["edgeopt", "is"]
    assert llm.detokenize(tokenize_text(llm, "edgeopt\nthe")).decode() == "edgeopt the"
    # in the middle of a text, the same: the space before the token is kept by both
    assert tokenize_text(llm, "the edgeopt is") == session.tokenize(b"the edgeopt is")
    assert tokenize_text(llm, "the edgeoptis") != session.tokenize(b"the edgeoptis")


@pytest.mark.parametrize("spm_family", ["phi3"], indirect=True)
def test_spm_phi3_non_special_eos_text_is_text_to_llama_cpp_only(spm_family, tmp_path: Path) -> None:
    """Phi-3-mini ships ``</s>`` as a non-special added token (``special: false``, ``rstrip: true``): Hugging Face
    matches its text even with ``split_special_tokens``; the GGUF keeps SentencePiece's CONTROL type (llama.cpp
    would make this end-of-generation token CONTROL anyway), so llama.cpp with ``special=False`` reads the text
    as text: the one special-token text the two evaluator surfaces cut differently."""
    import json
    import shutil

    import gguf
    import sentencepiece

    from edgeopt.evaluate.llm import tokenize_text

    folder = shutil.copytree(spm_family["folder"], tmp_path / "phi3")
    doc = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    for added in doc["added_tokens"]:
        if added["content"] == "</s>":
            added.update(special=False, rstrip=True)
    (folder / "tokenizer.json").write_text(json.dumps(doc), encoding="utf-8")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["extra_special_tokens"] = [t for t in config.get("extra_special_tokens") or () if t != "</s>"]
    for entry in (config.get("added_tokens_decoder") or {}).values():
        if entry["content"] == "</s>":
            entry.update(special=False, rstrip=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert "</s>" not in tok.all_special_tokens
    path = convert_hf_to_gguf(folder, tmp_path / "phi3.gguf", precision="f32")
    assert gguf.GGUFReader(str(path)).fields["tokenizer.ggml.token_type"].contents()[2] == CONTROL
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    session = _hf_session(tok)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    for text in ("the end</s>", "end </s>", "x </s> y"):
        hf = session.tokenize(text.encode(), add_bos=False, special=False)
        got = tokenize_text(llm, text)
        assert 2 in hf and got == sp.encode(text) and 2 not in got, text


def test_spm_evaluation_windows_start_with_the_bos_the_model_is_run_with(tiny_llama, spm_family) -> None:
    """A SentencePiece checkpoint starts every text with BOS (Llama-2, Mistral, Phi-3 are trained so): each
    perplexity/KLD window is scored after it, as Hugging Face scores ``tokenizer(text)``: the window's
    log-probabilities equal the HF model's after [BOS] within the F32 tolerance, and differ from its
    log-probabilities without the BOS by more than that. tiny-llama's byte-level tokenizer adds none."""
    from edgeopt.evaluate.llm import _log_softmax, bos_prefix, tokenize_text, window_logprobs

    llm, tok, model = spm_family["llama"]["f32"], spm_family["tok"], spm_family["model"]
    window = 32
    ids = tokenize_text(llm, tiny_llama["eval"].read_text(encoding="utf-8")[:3000])[:2 * window + 1]
    assert bos_prefix(llm) == [tok.bos_token_id]
    logp, targets = window_logprobs(llm, ids, window=window)
    assert logp.shape[0] == 2 * window and list(targets) == ids[1:2 * window + 1]
    for k in range(2):
        part = ids[k * window:(k + 1) * window]
        with torch.no_grad():
            after_bos = model(torch.tensor([tok.bos_token_id, *part])[None]).logits[0, 1:].numpy()
            without = model(torch.tensor(part)[None]).logits[0].numpy()
        got = logp[k * window:(k + 1) * window]
        assert float(np.abs(got - _log_softmax(after_bos)).max()) < F32_LOGIT_TOL
        assert float(np.abs(got - _log_softmax(without)).max()) > 10 * F32_LOGIT_TOL
    plain = llama_cpp.Llama(model_path=str(tiny_llama["f16"]), n_ctx=64, vocab_only=True, verbose=False)
    assert bos_prefix(plain) == []
