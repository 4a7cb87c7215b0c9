"""Hugging Face llama-family checkpoint → GGUF (F16 or F32), written with the ``gguf`` package alone.

What llama.cpp's own converter (``convert_hf_to_gguf.py``: ``LlamaModel``, ``Qwen2Model``,
``Phi3MiniModel``) does, for the configs ``edgeopt`` supports, with a byte-level BPE or a SentencePiece
tokenizer:

* ``llama`` / ``mistral`` → GGUF architecture ``llama``: ``q_proj`` / ``k_proj`` rows permuted from
  Hugging Face's rotary layout back to llama.cpp's (interleaved pairs per head);
* ``qwen2`` → ``qwen2``: no permutation (llama.cpp runs qwen2 with NEOX-style rotary, as Hugging Face
  does), the q/k/v biases as ``attn_q.bias`` / ``attn_k.bias`` / ``attn_v.bias``; a checkpoint with
  ``use_sliding_window`` is refused (llama.cpp's qwen2 has no sliding window);
* ``phi3`` → ``phi3``: no permutation, the fused ``qkv_proj`` as ``attn_qkv`` and the fused
  ``gate_up_proj`` as ``ffn_up`` (gate half first, as llama.cpp reads it), ``rope.dimension_count``
  from ``partial_rotary_factor``, ``rope.scaling.original_context_length`` and
  ``attention.sliding_window`` (0 when none) as llama.cpp's converter writes them. llama.cpp currently
  ignores Phi-3's sliding window, so it matches Hugging Face only within that window. Long-context RoPE
  (``longrope`` / ``su``: Phi-3-*-128k) is refused;
* tied embeddings (``tie_word_embeddings``, small Qwen2 models): no ``output.weight``; llama.cpp then
  uses ``token_embd.weight`` for the output. An untied checkpoint without ``lm_head.weight`` is refused;
* metadata from ``config.json`` under the architecture's prefix (context, sizes, heads, KV heads,
  RMS-norm epsilon, RoPE base read from ``rope_parameters`` (transformers 5), ``rope_scaling`` or
  ``rope_theta``); RoPE scaling other than the default (linear, YaRN, llama3, longrope) is refused;
* tensor names from gguf's own map (``get_tensor_name_map``); matrices in F16 (or F32), norms, biases
  and other 1-D tensors in F32;
* the tokenizer embedded as ``gpt2`` (byte-level BPE) with the pre-tokenizer named for llama.cpp:
  ``gpt-2`` for a plain ``ByteLevel`` pre-tokenizer, ``qwen2`` for Qwen2's split regex; any other split
  is refused (llama.cpp would cut text differently). Tokens in id order, padded with ``[PAD<i>]`` up to
  the config's ``vocab_size``, special tokens as CONTROL, merges and special ids through ``SpecialVocab``;
* a SentencePiece tokenizer (``tokenizer.model``, or a ``tokenizer.json`` that is a byte-fallback BPE over
  ``▁``: Llama-2, TinyLlama, Mistral, Phi-3-mini) embedded as ``llama`` (pre-tokenizer ``default``) with
  scores, token types (BYTE for ``<0xNN>``), added tokens, ``add_space_prefix``, special ids and add-BOS/EOS
  flags: ``edgeopt.convert.spm_vocab``, which also names the SentencePiece settings it refuses. A tokenizer
  of neither kind is refused in one line.

Other families are refused in one line naming the convertible model types.
The written file is read back (``GGUFReader``) and its tensor count checked.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgeopt.convert.spm_vocab import SpmVocab, is_sentencepiece_json, sentencepiece_vocab
from edgeopt.errors import BackendUnavailable, ModelError

__all__ = ["CONVERTIBLE", "convert_hf_to_gguf", "permute_rotary"]

log = logging.getLogger(__name__)

#: HF model_type -> GGUF architecture this converter writes
CONVERTIBLE: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "phi3": "phi3"}
_NORMAL, _CONTROL = 1, 3
#: Qwen2's pre-tokenizer split (tokenizer.json, ``Split`` before ``ByteLevel(use_regex=False)``);
#: llama.cpp's pre-tokenizer "qwen2" applies the same expression
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def permute_rotary(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Rows of a q/k projection from Hugging Face's rotary order to llama.cpp's (as its converter does)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _pre_tokenizer(folder: Path, pre: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE's ``pre_tokenizer``; ``ModelError`` otherwise."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if (steps and len(steps) == 2 and steps[0].get("type") == "Split"
            and (steps[0].get("pattern") or {}).get("Regex") == QWEN2_SPLIT
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
        return "qwen2"
    raise ModelError(f"model {folder}: byte-level pre-tokenizer {json.dumps(pre)[:120]} is neither GPT-2's nor "
                     "Qwen2's split; llama.cpp would split text differently, so it is not converted here")


def _tokens(folder: Path, vocab_size: int) -> SpmVocab | tuple[list[str], list[int], str]:
    """The SentencePiece-style vocabulary, or a byte-level BPE's (tokens, types, pre-tokenizer name)."""
    if (folder / "tokenizer.model").is_file():
        return sentencepiece_vocab(folder, vocab_size=vocab_size)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"model {folder}: no tokenizer.json or tokenizer.model; the GGUF converter needs the "
                         "tokenizer saved with tokenizer.save_pretrained beside the weights")
    doc = json.loads(path.read_text(encoding="utf-8"))
    if is_sentencepiece_json(doc):
        return sentencepiece_vocab(folder, vocab_size=vocab_size)
    model = doc.get("model") or {}
    pre = doc.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(pre):
        raise ModelError(f"model {folder}: tokenizer.json is a {model.get('type')!r} tokenizer with pre-tokenizer "
                         f"{pre.get('type')!r}, neither a byte-level BPE (GPT-2, Llama-3, Qwen2) nor SentencePiece-"
                         "style (tokenizer.model, or a byte-fallback BPE over '\u2581': Llama-2, Mistral, Phi-3); "
                         "llama.cpp has no tokenizer that matches it, so convert a checkpoint with one of those")
    pre_name = _pre_tokenizer(folder, pre)
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    special = set()
    for added in doc.get("added_tokens") or ():
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    size = max(max(vocab.values()) + 1, vocab_size)  # padded embeddings (Qwen2) get [PAD<i>] entries
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [_CONTROL] * size  # ids with no token stay as unused control entries
    for text, i in vocab.items():
        tokens[i], types[i] = text, _CONTROL if i in special else _NORMAL
    return tokens, types, pre_name


def _model_name(name: str, tokens: list[str]) -> str:
    """``general.name``: llama.cpp gives a model whose name contains "phi3" / "phi-3" Phi-3's special-token
    attributes and fails to load it (``unordered_map::at``) when one of those tokens is missing, so such a
    name is written as "phi_3" then."""
    if re.search(r"phi-?3", name, re.IGNORECASE) and not {"<unk>", "<s>", "</s>", "<|endoftext|>"} <= set(tokens):
        log.info("GGUF name %r written as phi_3: its vocabulary lacks Phi-3's special tokens", name)
        return re.sub(r"phi-?3", "phi_3", name, flags=re.IGNORECASE)
    return name


def _add_sentencepiece(w: Any, gguf: Any, src: Path, vocab: SpmVocab) -> None:
    """The ``llama`` tokenizer keys, as llama.cpp's ``_set_vocab_sentencepiece`` writes them, and the special
    ids and add-BOS/EOS flags (``SpecialVocab``). llama.cpp adds a BOS by default for this tokenizer, so a flag
    SpecialVocab leaves unset is written from the ``tokenizer.json`` post-processor (false when it adds none)."""
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_add_space_prefix(vocab.add_space_prefix)
    special = gguf.SpecialVocab(src, n_vocab=len(vocab.tokens))
    path = src / "tokenizer.json"
    post = (json.loads(path.read_text(encoding="utf-8")).get("post_processor") or {}) if path.is_file() else {}
    if post.get("type") == "TemplateProcessing":  # what Hugging Face adds to one text, where SpecialVocab is silent
        single = post.get("single") or [{}]
        special.add_special_token.setdefault("bos", "SpecialToken" in single[0])
        special.add_special_token.setdefault("eos", len(single) > 1 and "SpecialToken" in single[-1])
    special.add_to_gguf(w)
    log.info("tokenizer from %s written as llama.cpp's SentencePiece vocabulary (%d ids)", vocab.source,
             len(vocab.tokens))


def _rope(src: Path, config: dict[str, Any], model_type: str) -> tuple[float, float]:
    """(RoPE base, partial rotary factor); ``ModelError`` for a RoPE scaling this converter does not write."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    params = params.get("full_attention", params)
    rope_type = str(params.get("rope_type") or params.get("type") or "default")
    if rope_type != "default":
        hint = " (Phi-3 long-context checkpoints; use a 4k-context one)" if rope_type in ("longrope", "su") else ""
        raise ModelError(f"model {src}: RoPE scaling {rope_type!r}{hint} is not converted to GGUF here; only "
                         "unscaled RoPE is")
    theta = float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)
    factor = float(params.get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0)
    if factor != 1.0 and model_type != "phi3":
        raise ModelError(f"model {src}: partial_rotary_factor {factor} of a {model_type} model is not converted "
                         "to GGUF here")
    return theta, factor


def convert_hf_to_gguf(folder: str | Path, out_path: str | Path, *,
                       precision: Literal["f16", "f32"] = "f16") -> Path:
    """Write the llama-family checkpoint in ``folder`` to ``out_path`` as a GGUF file; return the path."""
    try:
        import gguf
        from safetensors import safe_open
    except ImportError as exc:
        raise BackendUnavailable("gguf", "llama", f"missing: {exc.name}") from exc
    src, out = Path(folder), Path(out_path)
    config: dict[str, Any] = json.loads((src / "config.json").read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type not in CONVERTIBLE:
        raise ModelError(f"model {src}: model_type {model_type!r} cannot be converted to GGUF here; "
                         f"convertible: {', '.join(CONVERTIBLE)}")
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
            "phi3": gguf.MODEL_ARCH.PHI3}[CONVERTIBLE[model_type]]
    if model_type == "qwen2" and config.get("use_sliding_window"):
        raise ModelError(f"model {src}: Qwen2 checkpoint with use_sliding_window; llama.cpp's qwen2 has no "
                         "sliding window, so it is not converted here")
    n_layer, n_head = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    rope_theta, rotary_factor = _rope(src, config, model_type)
    vocab = _tokens(src, int(config.get("vocab_size") or 0))
    tokens = vocab.tokens if isinstance(vocab, SpmVocab) else vocab[0]

    weight_files = sorted(src.glob("*.safetensors"))
    if not weight_files:
        raise ModelError(f"model {src}: no *.safetensors weights to convert")
    keys: list[tuple[Path, str]] = []
    for file in weight_files:
        with safe_open(str(file), framework="pt") as f:
            keys += [(file, k) for k in f.keys()]  # noqa: SIM118 - safe_open is no dict
    if not config.get("tie_word_embeddings") and not any(k == "lm_head.weight" for _, k in keys):
        raise ModelError(f"model {src}: no lm_head.weight and tie_word_embeddings is false; the checkpoint is "
                         "incomplete")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(_model_name(src.name, tokens))
    w.add_context_length(int(config["max_position_embeddings"]))
    w.add_embedding_length(hidden)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    w.add_rope_freq_base(rope_theta)
    if arch == gguf.MODEL_ARCH.PHI3:  # as llama.cpp's Phi3MiniModel.set_gguf_parameters
        w.add_rope_dimension_count(int(rotary_factor * hidden) // n_head)
        w.add_rope_scaling_orig_ctx_len(int(config.get("original_max_position_embeddings")
                                            or config["max_position_embeddings"]))
        w.add_sliding_window(int(config.get("sliding_window") or 0))
    else:
        w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if precision == "f16" else gguf.LlamaFileType.ALL_F32)
    if isinstance(vocab, SpmVocab):
        _add_sentencepiece(w, gguf, src, vocab)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab[2])
        w.add_token_list(tokens)
        w.add_token_types(vocab[1])
        gguf.SpecialVocab(src, load_merges=True, n_vocab=len(tokens)).add_to_gguf(w)

    names = gguf.get_tensor_name_map(arch, n_layer)
    permute = arch == gguf.MODEL_ARCH.LLAMA
    count = 0
    for file in weight_files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is no dict
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ModelError(f"model {src}: tensor {key!r} has no GGUF name; not a {model_type} layout")
                data = f.get_tensor(key).float().numpy()
                if permute and key.endswith("q_proj.weight"):
                    data = permute_rotary(data, n_head, n_head)
                elif permute and key.endswith("k_proj.weight"):
                    data = permute_rotary(data, n_head, n_kv)
                dtype = np.float16 if precision == "f16" and data.ndim == 2 else np.float32
                w.add_tensor(name, np.ascontiguousarray(data.astype(dtype)))
                count += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    written = len(gguf.GGUFReader(str(tmp)).tensors)
    if written != count:
        raise ModelError(f"model {src}: GGUF holds {written} tensors, {count} were written")
    tmp.replace(out)
    log.info("converted %s to %s (%s %s, %d tensors)", src, out, gguf.MODEL_ARCH_NAMES[arch], precision, count)
    return out
