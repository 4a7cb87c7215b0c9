"""Hugging Face llama-family checkpoint → GGUF (F16 or F32), written with the ``gguf`` package alone.

What llama.cpp's own converter does for ``LlamaForCausalLM``, for the configs ``edgeopt`` supports
(``llama`` / ``mistral`` model types with a byte-level BPE ``tokenizer.json``):

* metadata from ``config.json`` (context, sizes, heads, KV heads, RMS-norm epsilon, RoPE base);
* tensor names from gguf's own map (``get_tensor_name_map``), ``q_proj`` / ``k_proj`` rows permuted
  from Hugging Face's rotary layout back to llama.cpp's (interleaved pairs per head);
* matrices in F16 (or F32), norms and other 1-D tensors in F32;
* the tokenizer embedded as ``gpt2`` / ``gpt-2`` (byte-level BPE): tokens in id order, special tokens as
  CONTROL, merges and special ids through ``SpecialVocab``.

Other families (Qwen2's attention biases, Phi-3's fused projections) are refused with a clear line.
The written file is read back (``GGUFReader``) and its tensor count checked.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgeopt.errors import BackendUnavailable, ModelError

__all__ = ["CONVERTIBLE", "convert_hf_to_gguf", "permute_rotary"]

log = logging.getLogger(__name__)

#: model types this converter writes (GGUF architecture "llama")
CONVERTIBLE = ("llama", "mistral")
_NORMAL, _CONTROL = 1, 3


def permute_rotary(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Rows of a q/k projection from Hugging Face's rotary order to llama.cpp's (as its converter does)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tokens(folder: Path) -> tuple[list[str], list[int]]:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"model {folder}: no tokenizer.json; the GGUF converter needs a byte-level BPE "
                         "tokenizer saved with tokenizer.save_pretrained")
    doc = json.loads(path.read_text(encoding="utf-8"))
    model = doc.get("model") or {}
    pre = json.dumps(doc.get("pre_tokenizer") or {})
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise ModelError(f"model {folder}: tokenizer is {model.get('type')!r} without a ByteLevel pre-tokenizer; "
                         "only byte-level BPE tokenizers are converted to GGUF here")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    special = set()
    for added in doc.get("added_tokens") or ():
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [_CONTROL] * size  # ids with no token stay as unused control entries
    for text, i in vocab.items():
        tokens[i], types[i] = text, _CONTROL if i in special else _NORMAL
    return tokens, types


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
    n_layer, n_head = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    tokens, types = _tokens(src)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part")
    w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name(src.name)
    w.add_context_length(int(config["max_position_embeddings"]))
    w.add_embedding_length(hidden)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    w.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if precision == "f16" else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(src, load_merges=True, n_vocab=len(tokens)).add_to_gguf(w)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    count = 0
    weight_files = sorted(src.glob("*.safetensors"))
    if not weight_files:
        raise ModelError(f"model {src}: no *.safetensors weights to convert")
    for file in weight_files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is no dict
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ModelError(f"model {src}: tensor {key!r} has no GGUF name; not a llama layout")
                data = f.get_tensor(key).float().numpy()
                if key.endswith("q_proj.weight"):
                    data = permute_rotary(data, n_head, n_head)
                elif key.endswith("k_proj.weight"):
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
    log.info("converted %s to %s (%s, %d tensors)", src, out, precision, count)
    return out
