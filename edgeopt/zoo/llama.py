"""Llama reference models, built offline: ``tiny-llama`` (trained here) and ``llama-speed`` (random).

``tiny-llama`` is a ~4M-parameter Llama (4 layers, hidden 256, MLP 768, grouped-query attention 4/2
heads) with its own byte-level BPE tokenizer (1024 tokens, token length capped at 16 bytes, so
llama.cpp's detokenizer keeps every token), trained for a fixed number of steps on Python's own
reference text (``pydoc_data.topics``). The topics are split by name into three disjoint sets::

    hf/               the Hugging Face checkpoint (config.json, model.safetensors, tokenizer files)
    calibration.txt   text for importance matrices / calibration (never trained or evaluated on)
    eval.txt          held-out text for perplexity and KL divergence (never trained on)
    model.json        metadata: held-out perplexity and top-1 next-token accuracy (torch, float32)

Every matrix row has a multiple of 256 elements (hidden 256, MLP 768), so every llama.cpp quant type
(K and IQ types need 256) applies to every matrix. ``llama-speed`` is a random-initialised ~0.4B
Llama of the same family for speed measurements only: its quality figures mean nothing.
Training is deterministic (seeded, fixed steps, one thread count) and takes a few minutes of CPU.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeopt.errors import ModelError

__all__ = ["LLAMA_CONFIGS", "MAX_TOKEN_BYTES", "build_into", "split_topics"]

log = logging.getLogger(__name__)

#: llama-cpp-python's detokenize drops tokens longer than 32 bytes; 16 keeps a wide margin
MAX_TOKEN_BYTES = 16
VOCAB = 1024
SEQ_LEN = 128
BATCH = 8
STEPS = 240
SEED = 0
#: text kept in calibration.txt / eval.txt (characters; whole paragraphs)
TEXT_CHARS = 24_000

LLAMA_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-llama": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "max_position_embeddings": 512},
    # ~0.4B parameters at realistic shapes (speed only)
    "llama-speed": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 26,
                    "num_attention_heads": 16, "num_key_value_heads": 8, "max_position_embeddings": 2048},
}


def split_topics() -> dict[str, str]:
    """Python's reference text split by topic name into train / calibration / eval (disjoint)."""
    from pydoc_data.topics import topics

    parts: dict[str, list[str]] = {"train": [], "calibration": [], "eval": []}
    seen: set[str] = set()  # topics repeat paragraphs: each paragraph goes to the first topic's split only
    for i, key in enumerate(sorted(topics)):
        split = "eval" if i % 8 == 3 else "calibration" if i % 8 == 7 else "train"
        for paragraph in topics[key].strip().split("\n\n"):
            norm = " ".join(paragraph.split())
            if norm and norm not in seen:
                seen.add(norm)
                parts[split].append(paragraph.strip("\n"))
    out = {k: "\n\n".join(v) for k, v in parts.items()}
    for k in ("calibration", "eval"):
        text = out[k]
        if len(text) > TEXT_CHARS:
            cut = text.rfind("\n\n", 0, TEXT_CHARS)
            out[k] = text[:cut if cut > 0 else TEXT_CHARS]
    return out


def _tokenizer(train_text: str, folder: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  max_token_length=MAX_TOKEN_BYTES)
    tok.train_from_iterator(train_text.split("\n\n"), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))
    return fast


def _config(name: str, vocab: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                       bos_token_id=0, eos_token_id=1, hidden_act="silu", **LLAMA_CONFIGS[name])


def _eval(model: Any, ids: list[int], torch: Any) -> tuple[float, float]:
    """Perplexity and top-1 next-token accuracy over non-overlapping SEQ_LEN windows."""
    nll, hits, count = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(ids) - 1, SEQ_LEN):
            chunk = torch.tensor(ids[i:i + SEQ_LEN + 1])[None]
            if chunk.shape[1] < 2:
                break
            logits = model(chunk[:, :-1]).logits.float()
            target = chunk[:, 1:]
            nll += float(torch.nn.functional.cross_entropy(logits[0], target[0], reduction="sum"))
            hits += int((logits.argmax(-1) == target).sum())
            count += target.numel()
    return math.exp(nll / count), hits / count


def build_into(name: str, folder: Path, *, description: str, progress: Callable[[str], None] | None = None,
               steps: int = STEPS) -> dict[str, Any]:
    """Write ``name``'s checkpoint (and, for tiny-llama, its texts) into ``folder``; return metadata.

    ``steps`` below the default gives a lightly trained model (tests use one for conversion and
    backend checks); only the full run is held to the perplexity check."""
    import torch
    from transformers import LlamaForCausalLM

    def say(msg: str) -> None:
        log.info("zoo %s: %s", name, msg)
        if progress is not None:
            progress(msg)

    hf = folder / "hf"
    hf.mkdir()
    texts = split_topics()
    torch.manual_seed(SEED)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread count, so the float results are the same on every host
    try:
        say("training the tokenizer")
        tok = _tokenizer(texts["train"], hf)
        model = LlamaForCausalLM(_config(name, len(tok))).float()
        start = time.perf_counter()
        metrics: dict[str, Any] = {}
        for split in ("calibration", "eval"):
            (folder / f"{split}.txt").write_text(texts[split] + "\n", encoding="utf-8")
        if name == "tiny-llama":
            train_ids = tok(texts["train"])["input_ids"]
            eval_ids = tok(texts["eval"])["input_ids"]
            data = torch.tensor(train_ids)
            gen = torch.Generator().manual_seed(SEED)
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
            model.train()
            for step in range(steps):
                starts = torch.randint(0, len(data) - SEQ_LEN - 1, (BATCH,), generator=gen)
                batch = torch.stack([data[s:s + SEQ_LEN + 1] for s in starts.tolist()])
                logits = model(batch[:, :-1]).logits
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                if step % 10 == 0 or step == steps - 1:
                    say(f"step {step + 1}/{steps} loss {float(loss.detach()):.3f}")
            model.eval()
            ppl, top1 = _eval(model, eval_ids, torch)
            # a uniform guess has perplexity len(tok); training that did not take stays near it
            if steps >= STEPS and not ppl < len(tok) / 5:
                raise ModelError(f"zoo {name}: held-out perplexity {ppl:.1f} is not far below the vocabulary "
                                 f"size {len(tok)}; training failed")
            metrics = {"perplexity": ppl, "accuracy": top1, "eval_tokens": len(eval_ids),
                       "train_tokens": len(train_ids), "steps": steps, "batch": BATCH, "seq_len": SEQ_LEN}
            say(f"held-out perplexity {ppl:.2f}, top-1 {top1:.3f}")
        train_seconds = time.perf_counter() - start
        if name != "tiny-llama":
            model = model.half()  # random weights: F16 halves the checkpoint and loses nothing that matters
        model.save_pretrained(str(hf), safe_serialization=True)
    finally:
        torch.set_num_threads(threads)
    params = sum(p.numel() for p in model.parameters())
    longest = max(len(t) for t in tok.convert_ids_to_tokens(list(range(len(tok)))))  # byte-level: a char per byte
    return {
        "name": name,
        "description": description,
        "kind": "llm",
        "accuracy": metrics.get("accuracy", float("nan")),
        "accuracy_metric": "top-1 next-token accuracy on eval.txt (torch float32)" if metrics else
                           "none: random weights, speed only",
        "perplexity": metrics.get("perplexity", float("nan")),
        "counts": {"calibration": len(texts["calibration"]), "evaluation": len(texts["eval"])},
        "train_seconds": round(train_seconds, 3),
        "training": {k: v for k, v in metrics.items() if k not in ("perplexity", "accuracy")},
        "parameter_count": params,
        "config": LLAMA_CONFIGS[name],
        "vocab_size": len(tok),
        "max_token_bytes": longest,
        "seed": SEED,
        "hf_folder": "hf",
        "text": {"source": f"pydoc_data.topics (Python {platform.python_version()})",
                 "calibration_file": "calibration.txt", "evaluation_file": "eval.txt"},
        "versions": {p: importlib.metadata.version(p) for p in ("torch", "transformers", "tokenizers")},
    }
