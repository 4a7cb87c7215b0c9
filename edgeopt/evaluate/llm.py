"""Language-model evaluators on any LLM backend's session (``Backend.llm_session``; llama.cpp for a GGUF):
garbage check, perplexity, KL divergence.

* ``garbage_check`` is cheap and runs first: NaN / infinite logits on a short prompt, and a greedy
  continuation that is empty or degenerate (one token over and over) fail a broken candidate before
  the expensive evaluation.
* ``window_logprobs`` runs the evaluation text through the model in non-overlapping windows of
  ``window`` tokens (a fresh context for each), keeping the log-probabilities of every position.
* ``perplexity`` is exp(mean negative log-likelihood of each next token), as llama.cpp's perplexity
  tool computes it over the same windows; ``kl_divergence`` compares a candidate's next-token
  distributions with the F16 reference's on the same positions: mean, p99 and max KLD, and top-1
  agreement (how often both predict the same token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt import backends
from edgeopt.errors import DataError

__all__ = ["GarbageVerdict", "LLMScores", "bos_prefix", "garbage_check", "kl_divergence", "perplexity",
           "run_eval_job", "tokenize_text", "window_logprobs"]

#: a greedy continuation whose most frequent token makes up more than this share is degenerate
DEGENERATE_SHARE = 0.8


@dataclass(frozen=True)
class GarbageVerdict:
    ok: bool
    reason: str
    text: str


@dataclass(frozen=True)
class LLMScores:
    perplexity: float
    kld_mean: float
    kld_p99: float
    kld_max: float
    top1_agreement: float
    tokens: int


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def tokenize_text(llm: Any, text: str) -> list[int]:
    return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))


def bos_prefix(llm: Any) -> list[int]:
    """``[BOS]`` when the model's tokenizer starts every text with it, else ``[]``: the GGUF's
    ``add_bos_token`` for llama.cpp, the tokenizer's post-processor for Hugging Face tokenizers. Models
    trained with a BOS (Llama-2, Mistral, Phi-3: SentencePiece checkpoints) are scored as they are run."""
    return [int(t) for t in llm.tokenize(b"", add_bos=True, special=False)]


def window_logprobs(llm: Any, ids: list[int], *, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities [positions, vocab] and the next tokens they predict, over non-overlapping windows.
    Each window is evaluated from an empty context after the model's ``bos_prefix`` (none for tiny-llama's
    byte-level BPE), as llama.cpp's perplexity tool starts its chunks; the BOS position itself is not scored.

    ``llm`` is a ``llama_cpp.Llama`` opened with ``logits_all=True`` and ``n_ctx >= window + 1``."""
    if len(ids) < window + 1:
        raise DataError(f"evaluation text has {len(ids)} tokens, shorter than one perplexity window of "
                        f"{window} + 1; give a longer text or a smaller window")
    prefix = bos_prefix(llm)
    logps, targets = [], []
    for start in range(0, len(ids) - window, window):
        chunk = ids[start:start + window + 1]
        llm.reset()
        llm.eval(prefix + chunk[:-1])
        logps.append(_log_softmax(np.asarray(llm.scores[len(prefix):len(prefix) + window], dtype=np.float32)))
        targets.append(np.asarray(chunk[1:]))
    return np.concatenate(logps), np.concatenate(targets)


def perplexity(logp: np.ndarray, targets: np.ndarray) -> float:
    nll = -logp[np.arange(len(targets)), targets]
    value = float(np.exp(nll.mean()))
    return value if math.isfinite(value) else math.nan


def kl_divergence(ref_logp: np.ndarray, logp: np.ndarray) -> tuple[float, float, float, float]:
    """(mean, p99, max) of KL(reference || candidate) per position, and top-1 agreement."""
    if ref_logp.shape != logp.shape:
        raise DataError(f"reference and candidate logits differ in shape: {ref_logp.shape} vs {logp.shape}")
    kld = (np.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1)
    if not np.isfinite(kld).all():
        return math.nan, math.nan, math.nan, math.nan
    agree = float((ref_logp.argmax(-1) == logp.argmax(-1)).mean())
    return float(kld.mean()), float(np.percentile(kld, 99)), float(kld.max()), agree


def garbage_check(llm: Any, prompt: str, *, tokens: int = 32) -> GarbageVerdict:
    """Fail NaN logits or an empty / degenerate greedy continuation of ``prompt``."""
    ids = bos_prefix(llm) + tokenize_text(llm, prompt)
    llm.reset()
    llm.eval(ids)
    last = np.asarray(llm.scores[len(ids) - 1], dtype=np.float32)
    if not np.isfinite(last).all():
        return GarbageVerdict(False, "NaN or infinite logits", "")
    out: list[int] = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if tok == llm.token_eos() or len(out) >= tokens:
            break
        out.append(int(tok))
    text = llm.detokenize(out).decode("utf-8", "replace")
    if not out or not text.strip():
        return GarbageVerdict(False, "empty continuation", text)
    top = max(out.count(t) for t in set(out))
    if len(out) >= 8 and top / len(out) > DEGENERATE_SHARE:
        return GarbageVerdict(False, f"degenerate continuation (one token is {top}/{len(out)} of it)", text)
    return GarbageVerdict(True, "", text)


#: the prompt of the garbage check (any short text the tokenizer knows)
GARBAGE_PROMPT = "The import statement"


def run_eval_job(job: dict[str, Any]) -> dict[str, Any]:
    """Worker side (``python -m edgeopt.bench.worker``, job mode ``llm-eval``): the garbage check, then the
    log-probabilities of the evaluation text's first ``max_windows`` windows, on the artifact's backend's
    ``Backend.llm_session`` (llama.cpp for a job without an artifact record: a GGUF). The F16 reference writes
    them to ``reference_out`` (float32 npz); a candidate reads the reference's and returns its perplexity, KLD
    and top-1 agreement on the same positions."""
    window, max_windows = int(job["window"]), int(job["max_windows"])
    llm = backends.job_backend(job).llm_session(path=job["path"], runtime=job["runtime"], window=window)
    g = garbage_check(llm, GARBAGE_PROMPT)
    ids = tokenize_text(llm, Path(job["evaluation"]).read_text(encoding="utf-8"))
    logp, targets = window_logprobs(llm, ids[:window * max_windows + 1], window=window)
    out: dict[str, Any] = {"garbage": g.reason, "garbage_text": g.text[:200], "tokens": len(targets),
                           "perplexity": perplexity(logp, targets), "window": window}
    if job.get("reference_out"):
        np.savez(job["reference_out"], logp=logp.astype(np.float32), targets=targets)
        out.update(kld_mean=0.0, kld_p99=0.0, kld_max=0.0, top1_agreement=1.0)
        return out
    with np.load(job["reference"]) as ref:
        if not np.array_equal(ref["targets"], targets):
            raise DataError("the candidate tokenizes the evaluation text differently from the F16 reference; "
                            "KLD needs the same tokens")
        kld_mean, kld_p99, kld_max, top1 = kl_divergence(ref["logp"].astype(np.float64), logp)
    out.update(kld_mean=kld_mean, kld_p99=kld_p99, kld_max=kld_max, top1_agreement=top1)
    return out
