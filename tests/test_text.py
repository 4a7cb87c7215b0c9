"""Tests of text data (edgeopt.text): reading sentences, tokenizing to .npz, default sentences."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeopt.data import load_dataset
from edgeopt.errors import DataError
from edgeopt.records import TensorSpec
from edgeopt.text import (
    default_sentences,
    find_tokenizer_dir,
    is_text_data,
    length_stats,
    load_sentences,
    prepare_text_data,
    token_lengths,
    tokenize_to_npz,
)

tokenizers = pytest.importorskip("tokenizers")

WORDS = ["the", "a", "of", "to", "and", "in", "is", "it", "that", "for", "on", "with", "as", "was", "by",
         "this", "be", "are", "or", "an", "at", "from", "which", "can", "not", "if"]
VOCAB = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS,
                            *"abcdefghijklmnopqrstuvwxyz.,'\"()-:;!?0123456789",
                            *("##" + c for c in "abcdefghijklmnopqrstuvwxyz")]))
SENTENCES = ["The cat sat on the mat.", "A much longer sentence, with a comma, is here for the test.", "Hi."]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A WordPiece tokenizer (BERT's, lower case) over a tiny vocabulary, as tokenizer.json."""
    from tokenizers.implementations import BertWordPieceTokenizer

    d = tmp_path_factory.mktemp("tok")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    vocab = {token: i for i, token in enumerate(VOCAB)}
    BertWordPieceTokenizer(vocab, lowercase=True).save(str(d / "tokenizer.json"))
    return d


def _write(path: Path, data: str | bytes) -> Path:
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


# --- load_sentences -----------------------------------------------------------------------------


def test_txt_one_sentence_per_line_blank_lines_skipped(tmp_path: Path) -> None:
    p = _write(tmp_path / "s.txt", "first sentence\n\n   \n  second one  \nthird\n")
    assert load_sentences(p) == ["first sentence", "second one", "third"]
    assert is_text_data(p) and is_text_data("x.JSONL") and not is_text_data("x.npz")


def test_utf8_bom_and_non_ascii_are_fine(tmp_path: Path) -> None:
    p = _write(tmp_path / "s.txt", b"\xef\xbb\xbfcaf\xc3\xa9 au lait\n")
    assert load_sentences(p) == ["café au lait"]


def test_jsonl_objects_and_strings(tmp_path: Path) -> None:
    lines = [json.dumps({"text": " one ", "id": 1}), "", json.dumps("two"), json.dumps({"text": "three"})]
    p = _write(tmp_path / "s.jsonl", "\n".join(lines) + "\n")
    assert load_sentences(p) == ["one", "two", "three"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"text": "ok"}\n{"text": 3}\n', "line 2 has no string field"),
        ('{"text": "ok"}\n[1, 2]\n', "line 2 is a JSON list"),
        ('{"text": "ok"}\n\n{not json\n', "line 3 is not JSON"),
    ],
)
def test_bad_jsonl_lines_are_named(tmp_path: Path, content: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        load_sentences(_write(tmp_path / "s.jsonl", content))


@pytest.mark.parametrize("content", ["", "\n\n  \n", '""\n{"text": "  "}\n'])
def test_no_sentences_is_an_error(tmp_path: Path, content: str) -> None:
    suffix = ".jsonl" if content.startswith('"') else ".txt"
    p = _write(tmp_path / f"empty{suffix}", content)
    with pytest.raises(DataError, match="no sentences") as info:
        load_sentences(p, role="calibration")
    assert str(p) in str(info.value) and str(info.value).startswith("calibration data")
    assert "\n" not in str(info.value)


def test_not_utf8_names_the_file_and_byte_offset(tmp_path: Path) -> None:
    p = _write(tmp_path / "latin1.txt", b"first line\nsecond caf" + "é\n".encode("latin-1"))
    with pytest.raises(DataError) as info:
        load_sentences(p, role="evaluation")
    msg = str(info.value)
    assert str(p) in msg and "not UTF-8" in msg and "offset 21" in msg and "line 2" in msg and "\n" not in msg


def test_missing_file_and_other_suffix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_sentences(tmp_path / "nope.txt")
    with pytest.raises(DataError, match=r"\.txt .*\.jsonl"):
        load_sentences(_write(tmp_path / "s.csv", "a,b\n"))


# --- tokenizing ---------------------------------------------------------------------------------


def test_tokenize_max_length(tokenizer_dir: Path, tmp_path: Path) -> None:
    out = tokenize_to_npz(SENTENCES, tokenizer_dir=tokenizer_dir, out_path=tmp_path / "d.npz", seq_len=16)
    with np.load(out) as npz:
        assert sorted(npz.files) == ["attention_mask", "input_ids", "token_type_ids"]
        ids, mask = npz["input_ids"], npz["attention_mask"]
        assert ids.shape == (3, 16) and ids.dtype == np.int64 and mask.dtype == np.int64
        assert (npz["token_type_ids"] == 0).all()
    cls, sep, pad = VOCAB.index("[CLS]"), VOCAB.index("[SEP]"), VOCAB.index("[PAD]")
    lengths = token_lengths(SENTENCES, tokenizer_dir=tokenizer_dir)
    assert (ids[:, 0] == cls).all()
    for row, n in enumerate(lengths):
        n = min(n, 16)
        assert mask[row].sum() == n and (ids[row, n:] == pad).all()
        assert ids[row, n - 1] == sep  # truncated rows still end with [SEP]
    assert lengths[1] > 16 and lengths[2] == 5  # [CLS] h ##i . [SEP]
    assert not list(tmp_path.glob(".*"))  # the temporary file was renamed into place


def test_tokenize_longest_and_load_dataset(tokenizer_dir: Path, tmp_path: Path) -> None:
    out = tokenize_to_npz(SENTENCES, tokenizer_dir=tokenizer_dir, out_path=tmp_path / "d.npz", seq_len=None,
                          padding="longest", input_names=["input_ids", "attention_mask"])
    lengths = token_lengths(SENTENCES, tokenizer_dir=tokenizer_dir)
    signature = tuple(TensorSpec(name=n, dtype="int64", shape=("batch", "sequence"))
                      for n in ("input_ids", "attention_mask"))
    data = load_dataset(out, signature=signature, role="evaluation")
    assert data.count == 3 and data.inputs["input_ids"].shape == (3, max(lengths))
    assert data.inputs["attention_mask"].sum(axis=1).tolist() == lengths


def test_tokenize_rejects_bad_settings(tokenizer_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs a seq_len"):
        tokenize_to_npz(SENTENCES, tokenizer_dir=tokenizer_dir, out_path=tmp_path / "d.npz", seq_len=None)
    with pytest.raises(DataError, match="padding must be"):
        tokenize_to_npz(SENTENCES, tokenizer_dir=tokenizer_dir, out_path=tmp_path / "d.npz",
                        padding="right")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="not produced by a tokenizer"):
        tokenize_to_npz(SENTENCES, tokenizer_dir=tokenizer_dir, out_path=tmp_path / "d.npz",
                        input_names=["input_ids", "pixel_values"])
    with pytest.raises(DataError, match="no sentences"):
        tokenize_to_npz([], tokenizer_dir=tokenizer_dir, out_path=tmp_path / "d.npz")


def test_length_stats(tokenizer_dir: Path) -> None:
    stats = length_stats(SENTENCES, tokenizer_dir=tokenizer_dir)
    lengths = sorted(token_lengths(SENTENCES, tokenizer_dir=tokenizer_dir))
    assert stats["count"] == 3 and stats["tokens_median"] == lengths[1] and stats["tokens_max"] == lengths[2]
    assert lengths[1] <= stats["tokens_p90"] <= lengths[2]


def test_prepare_text_data_reuses_its_result(tokenizer_dir: Path, tmp_path: Path) -> None:
    src = _write(tmp_path / "eval.txt", "\n".join(SENTENCES) + "\n")
    first = prepare_text_data(src, tokenizer_dir=tokenizer_dir, out_dir=tmp_path / "work", seq_len=16)
    mtime = first.stat().st_mtime_ns
    assert prepare_text_data(src, tokenizer_dir=tokenizer_dir, out_dir=tmp_path / "work", seq_len=16) == first
    assert first.stat().st_mtime_ns == mtime
    other = prepare_text_data(src, tokenizer_dir=tokenizer_dir, out_dir=tmp_path / "work", seq_len=32)
    assert other != first and np.load(other)["input_ids"].shape == (3, 32)


def test_find_tokenizer_dir(tokenizer_dir: Path, tmp_path: Path) -> None:
    assert find_tokenizer_dir(tokenizer_dir) == tokenizer_dir
    assert find_tokenizer_dir(tokenizer_dir / "model.onnx") == tokenizer_dir
    with pytest.raises(DataError, match="no tokenizer files"):
        find_tokenizer_dir(tmp_path / "model.onnx")


# --- default sentences --------------------------------------------------------------------------


def test_default_sentences_are_real_distinct_and_deterministic() -> None:
    a = default_sentences(count=500)
    assert a == default_sentences(count=500)
    assert len(a) == 500 and len({s.lower() for s in a}) == 500
    assert all(s[0].isupper() and s.endswith(".") and 7 <= len(s.split()) <= 35 for s in a)
    assert not any("::" in s or ">>>" in s or "\n" in s for s in a)
    assert default_sentences(count=50) == a[:50]  # a prefix: calibration/evaluation splits stay disjoint
    assert default_sentences(count=50, seed=1) != a[:50]
    with pytest.raises(DataError, match="available"):
        default_sentences(count=10**6)


def test_import_is_light() -> None:
    code = ("import sys, edgeopt.text; edgeopt.text.default_sentences(count=10)\n"
            "sys.exit(any(m in sys.modules for m in ('torch', 'transformers', 'tokenizers')))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
