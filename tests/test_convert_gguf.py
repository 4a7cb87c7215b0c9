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

    folder = shutil.copytree(tiny_llama["hf"], tmp_path / "qwen")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    with pytest.raises(ModelError, match="convertible: llama, mistral"):
        convert_hf_to_gguf(folder, tmp_path / "q.gguf")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="no tokenizer.json"):
        convert_hf_to_gguf(folder, tmp_path / "q.gguf")
    assert not (tmp_path / "q.gguf").exists()
