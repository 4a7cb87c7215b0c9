"""LLM evaluators on the tests' tiny Llama: garbage check, perplexity, KLD / top-1 against F16."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from edgeopt.errors import DataError

llama_cpp = pytest.importorskip("llama_cpp")

from edgeopt.backends.llamacpp import LlamaCppBackend, LlamaCppRecipe, open_llama
from edgeopt.evaluate.llm import (
    garbage_check,
    kl_divergence,
    perplexity,
    tokenize_text,
    window_logprobs,
)
from edgeopt.intake import assess

WINDOW = 128


def _scores(path: Path, text: str) -> tuple[np.ndarray, np.ndarray]:
    llm = open_llama(str(path), {"n_ctx": WINDOW + 8, "threads": 1}, logits_all=True)
    return window_logprobs(llm, tokenize_text(llm, text), window=WINDOW)


@pytest.fixture(scope="module")
def evaluated(tiny_llama, tmp_path_factory):
    text = tiny_llama["eval"].read_text(encoding="utf-8")[:8000]
    out = {"F16": _scores(tiny_llama["f16"], text)}
    a = assess(tiny_llama["f16"])
    for quant in ("Q8_0", "Q4_0"):
        art = LlamaCppBackend().optimize(model=a.model, assessment=a, recipe=LlamaCppRecipe(quant=quant),
                                         candidate=quant, out_dir=tmp_path_factory.mktemp(quant))
        out[quant] = _scores(Path(art.path), text)
    return out


def test_perplexity_matches_torch_and_kld_orders_the_quants(tiny_llama, evaluated) -> None:
    import torch
    import transformers

    logp, targets = evaluated["F16"]
    ppl = perplexity(logp, targets)
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_llama["hf"]))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama["hf"]), dtype=torch.float32).eval()
    ids = tok(tiny_llama["eval"].read_text(encoding="utf-8")[:8000])["input_ids"]
    nll = []
    with torch.no_grad():  # the same non-overlapping windows in torch
        for s in range(0, len(ids) - WINDOW, WINDOW):
            chunk = torch.tensor(ids[s:s + WINDOW + 1])[None]
            lp = torch.log_softmax(model(chunk[:, :-1]).logits[0].double(), -1)
            nll.append(-lp[torch.arange(WINDOW), chunk[0, 1:]])
    want = math.exp(float(torch.cat(nll).mean()))
    assert len(targets) == len(torch.cat(nll)) and abs(ppl / want - 1) < 0.01  # F16 weights: well under 1%
    assert kl_divergence(logp, logp) == (0.0, 0.0, 0.0, 1.0)
    k8, k4 = kl_divergence(logp, evaluated["Q8_0"][0]), kl_divergence(logp, evaluated["Q4_0"][0])
    assert 0 < k8[0] < k4[0] and k8[0] <= k8[1] <= k8[2] and k8[3] >= k4[3] and k8[3] > 0.9


def test_evaluation_text_shorter_than_a_window_is_refused(tiny_llama) -> None:
    llm = open_llama(str(tiny_llama["f16"]), {"n_ctx": WINDOW + 8, "threads": 1}, logits_all=True)
    with pytest.raises(DataError, match="shorter than one perplexity window"):
        window_logprobs(llm, tokenize_text(llm, "too short"), window=WINDOW)


def test_garbage_check_passes_the_model_and_fails_nan_weights(tiny_llama, tmp_path: Path) -> None:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from edgeopt.convert.hf_gguf import convert_hf_to_gguf

    good = open_llama(str(tiny_llama["f16"]), {"n_ctx": 128, "threads": 1}, logits_all=True)
    # the briefly trained model may well repeat itself (that is what the check is for); its logits are finite
    assert "NaN" not in garbage_check(good, "The import statement").reason
    folder = shutil.copytree(tiny_llama["hf"], tmp_path / "nan")
    state = load_file(str(folder / "model.safetensors"))
    state["model.norm.weight"] = torch.full_like(state["model.norm.weight"], float("nan"))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    bad = open_llama(str(convert_hf_to_gguf(folder, tmp_path / "nan.gguf")), {"n_ctx": 128, "threads": 1},
                     logits_all=True)
    verdict = garbage_check(bad, "The import statement")
    assert not verdict.ok and "NaN" in verdict.reason
