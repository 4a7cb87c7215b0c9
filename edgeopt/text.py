"""Text data for text models: sentences in, tokenized ``.npz`` out.

What ``--calibration`` / ``--eval`` accept for a text model:

- ``.txt``: one sentence per line; blank lines are skipped;
- ``.jsonl``: one JSON value per line, an object with a ``"text"`` field or a string.

Files must be UTF-8 (a byte-order mark is allowed). ``tokenize_to_npz`` tokenizes with the
model's own tokenizer (``tokenizer.json``, read with the ``tokenizers`` library; transformers'
``AutoTokenizer`` only when a folder has no ``tokenizer.json``) and writes one int64 array per model
input, named as the input, samples along the first axis: what ``edgeopt.data.load_dataset`` reads.

``default_sentences()`` makes real English sentences, offline, from the reference text that
ships with Python (``pydoc_data.topics``): deterministic for a given Python version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgeopt.errors import BackendUnavailable, DataError

__all__ = [
    "TEXT_SUFFIXES",
    "default_sentences",
    "find_tokenizer_dir",
    "is_text_data",
    "length_stats",
    "load_sentences",
    "prepare_text_data",
    "token_lengths",
    "tokenize_to_npz",
]

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl")
Padding = Literal["max_length", "longest"]
_DEFAULT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_TOKENIZER_MARKERS = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")
_BOM = b"\xef\xbb\xbf"
#: Without an explicit ``seq_len``, sequences are cut at this many tokens (BERT's position limit).
MAX_TOKENS = 512


def is_text_data(path: str | Path) -> bool:
    """True for a file that ``load_sentences`` reads (by suffix: ``.txt`` or ``.jsonl``)."""
    return Path(path).suffix.lower() in TEXT_SUFFIXES


def _decode(p: Path, role: str) -> str:
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise DataError(f"{role} data {p}: cannot be read ({exc.strerror or exc}); check the path") from exc
    skip = len(_BOM) if raw.startswith(_BOM) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start + skip
        line = raw[:offset].count(b"\n") + 1
        raise DataError(
            f"{role} data {p}: not UTF-8 (byte 0x{raw[offset]:02x} at offset {offset}, line {line}); "
            "re-save the file as UTF-8"
        ) from exc


def _jsonl_sentence(value: Any, p: Path, number: int, role: str) -> str:
    if isinstance(value, dict):
        value = value.get("text")
        if not isinstance(value, str):
            raise DataError(f"{role} data {p}: line {number} has no string field \"text\"; "
                            'write one {"text": "..."} object (or one JSON string) per line')
    elif not isinstance(value, str):
        raise DataError(f"{role} data {p}: line {number} is a JSON {type(value).__name__}; "
                        'write one {"text": "..."} object (or one JSON string) per line')
    return value.strip()


def load_sentences(path: str | Path, *, role: str = "text") -> list[str]:
    """Sentences of a ``.txt`` or ``.jsonl`` file, in file order, blank ones dropped.

    Raises ``DataError`` (one line naming the file) for a missing file, another suffix, bytes that
    are not UTF-8 (with their offset), a bad JSON line (with its number) or no sentence at all.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{role} data {p}: no such file; pass an existing .txt or .jsonl file")
    suffix = p.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise DataError(f"{role} data {p}: text data must be .txt (one sentence per line) or .jsonl "
                        f"(one {{\"text\": ...}} per line), got {suffix or 'no suffix'!r}")
    text = _decode(p, role)
    sentences: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if suffix == ".jsonl":
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{role} data {p}: line {number} is not JSON ({exc.msg}); "
                                "write one JSON object per line") from exc
            sentence = _jsonl_sentence(value, p, number, role)
        else:
            sentence = line.strip()
        if sentence:
            sentences.append(sentence)
    if not sentences:
        raise DataError(f"{role} data {p}: no sentences (the file is empty or blank); "
                        "write one sentence per line")
    log.debug("%s data %s: %d sentences", role, p, len(sentences))
    return sentences


def find_tokenizer_dir(model: str | Path) -> Path:
    """The folder holding a model's tokenizer: the checkpoint folder, or the folder of an ONNX file."""
    p = Path(model)
    folder = p if p.is_dir() else p.parent
    if not any((folder / m).is_file() for m in _TOKENIZER_MARKERS):
        raise DataError(f"model {p}: no tokenizer files (tokenizer.json, vocab.txt, ...) in {folder}; "
                        "text data needs the model's tokenizer beside it")
    return folder


def _model_input_names(folder: Path) -> tuple[str, ...]:
    onnx_path = folder / "model.onnx"
    if onnx_path.is_file():
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
        init = {t.name for t in model.graph.initializer}
        return tuple(v.name for v in model.graph.input if v.name not in init)
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            names = json.loads(config.read_text(encoding="utf-8")).get("model_input_names")
        except (OSError, ValueError, AttributeError):
            names = None
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            return tuple(names)
    return _DEFAULT_INPUTS


def _pad_token(folder: Path) -> str:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / name
        try:
            value = json.loads(f.read_text(encoding="utf-8")).get("pad_token") if f.is_file() else None
        except (OSError, ValueError, AttributeError):
            value = None
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return value
    return "[PAD]"


def _fast_tokenizer(folder: Path, *, max_length: int | None, pad_to: int | None, pad: bool):
    """The folder's ``tokenizer.json`` as a configured ``tokenizers.Tokenizer``; None without that file."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise BackendUnavailable("tokenizers", "hf", "missing: tokenizers") from exc
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises plain Exception
        raise DataError(f"tokenizer {path}: cannot be read ({str(exc)[:200]})") from exc
    tok.no_padding()
    tok.no_truncation()
    if max_length is not None:
        tok.enable_truncation(max_length=max_length)
    if pad:
        pad_token = _pad_token(folder)
        pad_id = tok.token_to_id(pad_token)
        if pad_id is None:
            log.warning("tokenizer %s: pad token %r is not in the vocabulary; padding with id 0",
                        path, pad_token)
            pad_id = 0
        tok.enable_padding(pad_id=pad_id, pad_token=pad_token, length=pad_to)
    return tok


def _auto_tokenizer(folder: Path):
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise BackendUnavailable("transformers", "hf", "missing: transformers (no tokenizer.json)") from exc
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _padded(sentences: Sequence[str], folder: Path, *, max_length: int, pad_to: int | None
            ) -> dict[str, np.ndarray]:
    """input_ids, attention_mask and token_type_ids, int64 ``[N, seq]``."""
    tok = _fast_tokenizer(folder, max_length=max_length, pad_to=pad_to, pad=True)
    if tok is None:
        padding = {"padding": "max_length", "max_length": pad_to} if pad_to else {"padding": "longest"}
        enc = _auto_tokenizer(folder)(list(sentences), truncation=True, return_token_type_ids=True,
                                      return_tensors="np", **{"max_length": max_length, **padding})
        return {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}
    encodings = tok.encode_batch(list(sentences))
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


def token_lengths(sentences: Sequence[str], *, tokenizer_dir: str | Path) -> list[int]:
    """Tokens per sentence, special tokens included, without truncation or padding."""
    folder = Path(tokenizer_dir)
    tok = _fast_tokenizer(folder, max_length=None, pad_to=None, pad=False)
    if tok is None:
        return [len(ids) for ids in _auto_tokenizer(folder)(list(sentences))["input_ids"]]
    return [len(e.ids) for e in tok.encode_batch(list(sentences))]


def length_stats(sentences: Sequence[str], *, tokenizer_dir: str | Path) -> dict[str, float]:
    """Token-count summary of ``sentences`` for reports: count, mean, median, p90, max."""
    lengths = np.array(token_lengths(sentences, tokenizer_dir=tokenizer_dir), dtype=np.float64)
    if lengths.size == 0:
        raise DataError("no sentences to measure")
    return {
        "count": int(lengths.size),
        "tokens_mean": round(float(lengths.mean()), 2),
        "tokens_median": float(np.median(lengths)),
        "tokens_p90": float(np.percentile(lengths, 90)),
        "tokens_max": int(lengths.max()),
    }


def tokenize_to_npz(
    sentences: Sequence[str],
    *,
    tokenizer_dir: str | Path,
    out_path: str | Path,
    seq_len: int | None = 128,
    padding: Padding = "max_length",
    input_names: Sequence[str] | None = None,
) -> Path:
    """Tokenize ``sentences`` and save one int64 ``[N, seq]`` array per model input to ``out_path``.

    ``padding="max_length"`` pads (and truncates) every sentence to ``seq_len``; ``"longest"``
    pads to the longest sentence, truncated at ``seq_len`` (or 512 when ``seq_len`` is None).
    ``input_names`` default to the inputs of ``model.onnx`` in ``tokenizer_dir``, else the
    tokenizer's ``model_input_names``, else input_ids / attention_mask / token_type_ids.
    """
    if padding not in ("max_length", "longest"):
        raise DataError(f"padding must be 'max_length' or 'longest', got {padding!r}")
    if padding == "max_length" and seq_len is None:
        raise DataError("padding 'max_length' needs a seq_len (e.g. 128); or use padding 'longest'")
    if seq_len is not None and seq_len < 2:
        raise DataError(f"seq_len must be at least 2 (room for the special tokens), got {seq_len}")
    if not sentences:
        raise DataError("no sentences to tokenize")
    folder = Path(tokenizer_dir)
    names = tuple(input_names) if input_names else _model_input_names(folder)
    unknown = sorted(set(names) - set(_DEFAULT_INPUTS))
    if unknown:
        raise DataError(f"model inputs {unknown} are not produced by a tokenizer; text data fills only "
                        f"{', '.join(_DEFAULT_INPUTS)}")
    max_length = seq_len if seq_len is not None else MAX_TOKENS
    pad_to = seq_len if padding == "max_length" else None
    arrays = _padded(sentences, folder, max_length=max_length, pad_to=pad_to)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.npz")  # unique per process, renamed into place
    np.savez(tmp, **{n: arrays[n] for n in names})
    tmp.replace(out)
    full = int(np.sum(arrays["attention_mask"][:, -1] == 1))
    log.info("tokenized %d sentences to %s (padding %s to %d tokens; %d fill them all, maybe truncated)",
             len(sentences), out, padding, arrays["input_ids"].shape[1], full)
    return out


def prepare_text_data(
    path: str | Path,
    *,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    seq_len: int | None = 128,
    padding: Padding = "max_length",
    role: str = "evaluation",
) -> Path:
    """``load_sentences`` + ``tokenize_to_npz`` into ``out_dir``, reusing an earlier identical result.

    The ``.npz`` name carries a digest of the text file, the tokenizer and the settings, so a
    changed file or tokenizer makes a new one.
    """
    sentences = load_sentences(path, role=role)
    folder = Path(tokenizer_dir)
    h = hashlib.sha256(Path(path).read_bytes())
    for marker in sorted(folder.glob("tokenizer*.json")) + [folder / "vocab.txt", folder / "model.onnx"]:
        if marker.is_file():
            h.update(marker.name.encode() + marker.read_bytes()[:1 << 20])
    h.update(f"{seq_len}|{padding}".encode())
    out = Path(out_dir) / f"{role}-{h.hexdigest()[:16]}.npz"
    if out.is_file():
        return out
    return tokenize_to_npz(sentences, tokenizer_dir=folder, out_path=out, seq_len=seq_len, padding=padding)


# --- default sentences --------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_NOT_PROSE = re.compile(r"::|>>>|\*\*|\.\.\.|[|=_{}\[\]<>\\#@`~^$]|\b(?:e\.g|i\.e|etc|cf|vs)\.|\s[.,]|\d\.\d")


def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs: blocks of unindented lines, without headings and code."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(line.startswith((" ", "\t")) for line in lines):
            continue  # code samples and grammar rules are indented
        if len(lines) >= 2 and set(lines[1].strip()) <= set("*=-~^"):
            continue  # a heading with its underline
        out.append(" ".join(line.strip() for line in lines))
    return out


def _is_sentence(s: str) -> bool:
    words = s.split()
    return (
        40 <= len(s) <= 200 and 7 <= len(words) <= 35 and s[0].isupper() and s.endswith(".")
        and s.count('"') % 2 == 0 and s.count("(") == s.count(")") and not _NOT_PROSE.search(s)
        and sum(c.isalpha() or c == " " for c in s) / len(s) > 0.9
    )


def default_sentences(*, count: int = 500, seed: int = 0) -> list[str]:
    """``count`` distinct English sentences from Python's own reference text, deterministic.

    Sentences of 7-35 words, prose only (no code, grammar or headings), deduplicated, then drawn
    in a seeded order so that every part of the text is represented. Raises ``DataError`` if
    fewer than ``count`` are available.
    """
    from pydoc_data.topics import topics

    seen: set[str] = set()
    pool: list[str] = []
    for key in sorted(topics):
        for paragraph in _paragraphs(topics[key]):
            for sentence in _SENTENCE_END.split(paragraph):
                s = " ".join(sentence.split())
                if _is_sentence(s) and s.lower() not in seen:
                    seen.add(s.lower())
                    pool.append(s)
    if count > len(pool):
        raise DataError(f"only {len(pool)} default sentences are available, {count} were asked for")
    random.Random(seed).shuffle(pool)
    return pool[:count]
