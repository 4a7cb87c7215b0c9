"""SentencePiece-style tokenizers as llama.cpp's ``llama`` vocabulary (``tokenizer.ggml.model = "llama"``).

What llama.cpp's converter does (``convert_hf_to_gguf.py``: ``_set_vocab_sentencepiece``, and
``_set_vocab_llama_hf`` for a checkpoint without ``tokenizer.model``), for the two files a Llama-2,
TinyLlama, Mistral or Phi-3-mini checkpoint carries:

* ``tokenizer.model`` (read first, as llama.cpp does): pieces, scores and types as SentencePiece stores them
  (``<unk>`` UNKNOWN, ``<s>`` / ``</s>`` CONTROL, ``<0xNN>`` BYTE, user-defined symbols USER_DEFINED);
  ``add_dummy_prefix`` becomes ``add_space_prefix``. Only a BPE-type model is converted: llama.cpp's
  SentencePiece tokenizer merges adjacent pieces by score, as a BPE model does, and would cut text
  differently from a unigram model's best segmentation;
* ``tokenizer.json`` alone (a BPE with ``byte_fallback`` and a Metaspace ``▁`` pre-tokenizer, or the older
  ``Prepend("▁")`` + ``Replace(" ", "▁")`` normalizer): pieces in id order, ``<0xNN>`` pieces as BYTE, the
  unknown token as UNKNOWN; each merged piece's score is minus the rank of the first merge that makes it,
  so llama.cpp's highest-score-first merging follows Hugging Face's merge order (gguf-py's ``LlamaHfVocab``
  gives every piece -1000, which leaves llama.cpp merging left to right). Normalizer or pre-tokenizer steps
  llama.cpp does not run (NFKC, digit splits, a Metaspace split where pieces hold ``▁`` inside) are refused;
* added tokens (``added_tokens.json``, ``tokenizer.json``'s ``added_tokens``, ``tokenizer_config.json``'s
  ``added_tokens_decoder``): special ones CONTROL, others USER_DEFINED with ``▁`` written as a space; the
  SentencePiece types of ``<unk>`` / ``<s>`` / ``</s>`` are kept. Ids past the vocabulary up to the config's
  ``vocab_size`` are ``[PAD<i>]`` entries typed UNUSED.

Added tokens inside a text, as the evaluators tokenize it (llama.cpp with ``special=False``; the HF-tokenizer
runtimes through ``HFTokenizerSession``, which then asks Hugging Face for ``split_special_tokens``):

* the text of a CONTROL or UNKNOWN token (``<s>``, ``</s>``, ``<unk>``, Phi-3's ``<|user|>``...) is text to
  both, cut into the same pieces as SentencePiece cuts it;
* a USER_DEFINED token (a non-special added token) is matched by both, but llama.cpp tokenizes the text after it
  as a new text: with the ``▁`` prefix (``add_space_prefix``), and, when ``general.name`` contains "phi3" or
  "phi-3", after dropping the whitespace that follows the token (llama.cpp's Phi-3 RSTRIP rule, keyed on the name,
  not on any metadata). transformers 5 (Metaspace, ``prepend_scheme`` "first") adds no ``▁`` there and keeps the
  whitespace. The ids agree only when the token ends the text or, under a Phi-3 name, is followed by one space
  and a word: "edgeoptis" is [edgeopt, is] to Hugging Face and [edgeopt, ▁is] to llama.cpp, and llama.cpp drops
  the newline of "edgeopt\nthe". No key changes that (``add_space_prefix`` also makes the start of every text)
  and llama.cpp's own converter writes the same types;
* Phi-3-mini ships ``</s>`` as a non-special added token (``special: false``, ``rstrip: true``): Hugging Face
  matches its text, while llama.cpp makes ``</s>`` CONTROL whatever the file says (it is an end-of-generation
  token), so with ``special=False`` it reads that text as text.

In the last two cases a candidate that tokenizes with the HF tokenizer (OpenVINO GenAI, onnxruntime-genai, MLX)
gets other tokens than the llama.cpp F16 reference, and ``run_eval_job`` refuses its KLD with a ``DataError``.
llama.cpp with ``special=True`` (a chat prompt) matches CONTROL tokens too and puts the same ``▁`` after them
(under a Phi-3 name, whitespace dropped after all but ``<unk>``, ``<s>``, ``<|endoftext|>``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeopt.errors import BackendUnavailable, ModelError

__all__ = ["SpmVocab", "is_sentencepiece_json", "sentencepiece_vocab"]

#: gguf.TokenType values (the same numbers as SentencePiece's piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # ▁, SentencePiece's whitespace
ADDED_SCORE = -1000.0
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass(frozen=True)
class SpmVocab:
    """A SentencePiece-style vocabulary in GGUF's terms: one entry per id, padded to the model's rows."""

    tokens: list[str]
    scores: list[float]
    types: list[int]
    add_space_prefix: bool
    source: str  # "tokenizer.model" or "tokenizer.json"


def _steps(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A normalizer's or pre-tokenizer's steps, a ``Sequence`` flattened."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        inner = node.get("normalizers") or node.get("pretokenizers") or []
        return [s for step in inner for s in _steps(step)]
    return [node]


def is_sentencepiece_json(doc: dict[str, Any]) -> bool:
    """Whether a ``tokenizer.json`` is SentencePiece-style: a byte-fallback BPE over ``▁``-marked text."""
    model = doc.get("model") or {}
    marks = json.dumps([doc.get("normalizer"), doc.get("pre_tokenizer")], ensure_ascii=False)
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and SPACE in marks


def _json_space_prefix(folder: Path, doc: dict[str, Any], vocab: dict[str, int]) -> bool:
    """``add_space_prefix`` of a SentencePiece-style ``tokenizer.json``; ``ModelError`` for steps llama.cpp
    would not run the same way."""
    prefix = False
    for step in _steps(doc.get("normalizer")):
        kind = step.get("type")
        if kind == "Prepend" and step.get("prepend") == SPACE:
            prefix = True
        elif not (kind == "Replace" and (step.get("pattern") or {}).get("String") == " "
                  and step.get("content") == SPACE):
            raise ModelError(f"model {folder}: SentencePiece-style tokenizer.json normalizes with {kind!r}; "
                             "llama.cpp's SentencePiece tokenizer does not, so it is not converted here")
    for step in _steps(doc.get("pre_tokenizer")):
        if step.get("type") != "Metaspace":
            raise ModelError(f"model {folder}: SentencePiece-style tokenizer.json pre-tokenizes with "
                             f"{step.get('type')!r}; llama.cpp's SentencePiece tokenizer does not split text, so "
                             "it is not converted here")
        scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
        prefix = prefix or scheme in ("first", "always")
        if step.get("split") and any(SPACE in piece[1:] for piece in vocab):
            raise ModelError(f"model {folder}: tokenizer.json's Metaspace splits words apart but pieces hold "
                             f"{SPACE!r} inside; llama.cpp would merge across words, so it is not converted here")
    return prefix


def _from_json(folder: Path, doc: dict[str, Any]) -> tuple[list[str], list[float], list[int], bool]:
    model = doc["model"]
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    prefix = _json_space_prefix(folder, doc, vocab)
    size = max(vocab.values()) + 1 if vocab else 0
    tokens, scores, types = [f"[PAD{i}]" for i in range(size)], [ADDED_SCORE] * size, [UNUSED] * size
    ranks: dict[str, int] = {}
    for rank, merge in enumerate(model.get("merges") or ()):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        ranks.setdefault(left + right, rank)
    unmerged = -float(len(ranks) + 1)  # below every merge: llama.cpp prefers any merge Hugging Face makes
    config = _read(folder / "tokenizer_config.json")
    unk = model.get("unk_token") or config.get("unk_token")
    unk = unk.get("content") if isinstance(unk, dict) else unk
    for piece, i in vocab.items():
        tokens[i] = piece
        scores[i] = -float(ranks[piece]) if piece in ranks else unmerged
        types[i] = BYTE if _BYTE_PIECE.fullmatch(piece) else UNKNOWN if piece == unk else NORMAL
    return tokens, scores, types, prefix


def _from_model(folder: Path, path: Path) -> tuple[list[str], list[float], list[int], bool]:
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as exc:
        raise BackendUnavailable("gguf", "llama", f"missing: {exc.name} (to read tokenizer.model)") from exc
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    bpe = sentencepiece_model_pb2.TrainerSpec.ModelType.BPE
    if proto.trainer_spec.model_type != bpe:
        kind = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        raise ModelError(f"model {folder}: tokenizer.model is a SentencePiece {kind} model; llama.cpp merges "
                         "pieces by score as a BPE model does and would cut text differently, so only BPE "
                         "SentencePiece models are converted here")
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]  # SentencePiece's types are GGUF's numbers
    return tokens, scores, types, bool(proto.normalizer_spec.add_dummy_prefix)


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _added_tokens(folder: Path) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) from every file Hugging Face keeps added tokens in."""
    added = {int(i): (str(text), False) for text, i in _read(folder / "added_tokens.json").items()}
    for entry in _read(folder / "tokenizer.json").get("added_tokens") or ():
        added[int(entry["id"])] = (entry["content"], bool(entry.get("special")))
    for i, entry in (_read(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}).items():
        added[int(i)] = (entry["content"], bool(entry.get("special")))
    return added


def sentencepiece_vocab(folder: str | Path, *, vocab_size: int) -> SpmVocab:
    """The SentencePiece-style vocabulary of the checkpoint in ``folder`` (``tokenizer.model`` if present,
    else a SentencePiece-style ``tokenizer.json``), padded to ``vocab_size`` ids."""
    src = Path(folder)
    if (src / "tokenizer.model").is_file():
        source = "tokenizer.model"
        tokens, scores, types, prefix = _from_model(src, src / source)
    else:
        source = "tokenizer.json"
        doc = _read(src / source)
        if not is_sentencepiece_json(doc):
            raise ModelError(f"model {src}: tokenizer.json is not a SentencePiece-style tokenizer (a byte-fallback "
                             "BPE with a Metaspace pre-tokenizer)")
        tokens, scores, types, prefix = _from_json(src, doc)
    added = _added_tokens(src)
    size = max([len(tokens), vocab_size, *(i + 1 for i in added)])
    pad = size - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), size)]
    scores += [ADDED_SCORE] * pad
    types += [UNUSED] * pad
    for i, (text, special) in sorted(added.items()):
        if tokens[i] == text and types[i] in (UNKNOWN, CONTROL, BYTE):
            continue  # <unk>, <s>, </s>: SentencePiece's own type stands
        tokens[i] = text if special else text.replace(SPACE, " ")  # llama.cpp matches user tokens in raw text
        scores[i], types[i] = ADDED_SCORE, CONTROL if special else USER_DEFINED
    return SpmVocab(tokens=tokens, scores=scores, types=types, add_space_prefix=prefix, source=source)
