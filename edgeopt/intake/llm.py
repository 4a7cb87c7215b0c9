"""Language-model intake: llama-like Hugging Face checkpoints and GGUF files.

``llm_info_hf`` reads ``config.json`` (never the weights) of a causal LM of a llama-like family and
checks that a tokenizer is there. ``assess_gguf`` reads a GGUF file's metadata and tensor table with
the ``gguf`` package (memory-mapped, nothing dequantized): architecture, parameter count, per-tensor
weight types, context length, vocabulary and whether a tokenizer is embedded. Any problem is one
``ModelError`` line that names it and what to do.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from edgeopt.errors import BackendUnavailable, ModelError
from edgeopt.records import Assessment, LLMInfo, ModelRef, TensorSpec

__all__ = ["GGUF_ARCHITECTURES", "LLAMA_LIKE", "assess_gguf", "llm_info_hf", "read_gguf_types"]

log = logging.getLogger(__name__)

#: HF model_type -> family: configs with Llama's layout (RMSNorm, rotary, SwiGLU MLP, GQA)
LLAMA_LIKE: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "phi3": "phi3"}
#: GGUF general.architecture values this project runs (llama.cpp names)
GGUF_ARCHITECTURES = ("llama", "qwen2", "phi3")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def _int(config: dict[str, Any], *keys: str, folder: Path) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise ModelError(f"model {folder}: config.json has no positive {' / '.join(keys)}; save the model with "
                     "save_pretrained")


def llm_info_hf(folder: Path, config: dict[str, Any], model_type: str, architecture: str) -> LLMInfo:
    """The LLM description of a checkpoint folder; ``ModelError`` for an unsupported family or no tokenizer."""
    family = LLAMA_LIKE.get(model_type)
    if family is None:
        raise ModelError(f"model {folder}: causal LM of model_type {model_type or 'missing'!r} ({architecture}) "
                         f"is not supported; supported llama-like model types: {', '.join(LLAMA_LIKE)}")
    tokenizer = [n for n in _TOKENIZER_FILES if (folder / n).is_file()]
    if not tokenizer:
        raise ModelError(f"model {folder}: no tokenizer ({' or '.join(_TOKENIZER_FILES)}); save the tokenizer "
                         "into the checkpoint folder with tokenizer.save_pretrained")
    hidden = _int(config, "hidden_size", folder=folder)
    heads = _int(config, "num_attention_heads", folder=folder)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    layers = _int(config, "num_hidden_layers", folder=folder)
    return LLMInfo(architecture=architecture, family=family,
                   context_length=_int(config, "max_position_embeddings", folder=folder),
                   vocab_size=_int(config, "vocab_size", folder=folder), layers=layers, hidden_size=hidden,
                   heads=heads, kv_heads=int(kv_heads), head_dim=int(head_dim),
                   kv_cache_bytes_per_token=2 * layers * int(kv_heads) * int(head_dim) * 2,
                   tokenizer=", ".join(tokenizer))


def _reader(path: Path) -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise BackendUnavailable("gguf", "llama", "missing: gguf") from exc
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # the reader raises ValueError, IndexError, struct or mmap errors on bad files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ModelError(f"model {path}: not a readable GGUF file ({first}); the file is truncated or corrupt: "
                         "copy or convert it again") from exc


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception:  # noqa: BLE001 - an unreadable value is as good as a missing one here
        return None


def read_gguf_types(path: str | Path) -> dict[str, str]:
    """Tensor name -> weight type name (e.g. 'Q4_K', 'F32') of a GGUF file."""
    reader = _reader(Path(path))
    return {t.name: t.tensor_type.name for t in reader.tensors}


def assess_gguf(path: str | Path) -> Assessment:
    """Assess a GGUF file; ``ModelError`` (one line) when it is corrupt or of an unsupported architecture."""
    p = Path(path)
    reader = _reader(p)
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise ModelError(f"model {p}: GGUF without general.architecture; convert the model again")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelError(f"model {p}: GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(GGUF_ARCHITECTURES)}")
    size = p.stat().st_size
    for t in reader.tensors:  # a truncated file's tensor table points past its end
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise ModelError(f"model {p}: tensor {t.name} lies outside the file (truncated?); copy or convert "
                             "it again")

    def num(key: str) -> int:
        value = _field(reader, f"{arch}.{key}")
        if not isinstance(value, int) or value <= 0:
            raise ModelError(f"model {p}: GGUF metadata {arch}.{key} missing or invalid; convert the model again")
        return value

    tokens = _field(reader, "tokenizer.ggml.tokens")
    tok_model = _field(reader, "tokenizer.ggml.model")
    if not tokens or not isinstance(tok_model, str):
        raise ModelError(f"model {p}: GGUF without an embedded tokenizer (tokenizer.ggml.*); convert the model "
                         "again with its tokenizer")
    hidden, heads, layers = num("embedding_length"), num("attention.head_count"), num("block_count")
    kv_value = _field(reader, f"{arch}.attention.head_count_kv")
    kv_heads = kv_value if isinstance(kv_value, int) and kv_value > 0 else heads
    head_dim = hidden // heads
    types = Counter(t.tensor_type.name for t in reader.tensors)
    params = sum(int(t.n_elements) for t in reader.tensors)
    file_type = _field(reader, "general.file_type")
    try:
        import gguf

        ft_name = gguf.LlamaFileType(file_type).name if isinstance(file_type, int) else ""
    except ValueError:
        ft_name = str(file_type)
    info = LLMInfo(architecture=arch, family=arch, context_length=num("context_length"), vocab_size=len(tokens),
                   layers=layers, hidden_size=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                   kv_cache_bytes_per_token=2 * layers * kv_heads * head_dim * 2, tokenizer=tok_model,
                   tensor_types=dict(sorted(types.items())), file_type=ft_name)
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    seq = ("batch", "sequence")
    log.info("assessed %s: GGUF %s, %d params, %s", p.name, arch, params, dict(types))
    return Assessment(model=ModelRef(path=str(p.resolve()), format="gguf", sha256=h.hexdigest(), size_bytes=size),
                      kind="llm", kind_reason=f"GGUF {arch} language model", params=params,
                      producer=str(_field(reader, "general.name") or "gguf"),
                      op_histogram={arch: 1},
                      inputs=(TensorSpec(name="input_ids", dtype="int64", shape=seq),),
                      outputs=(TensorSpec(name="logits", dtype="float32", shape=(*seq, len(tokens))),),
                      llm=info)
