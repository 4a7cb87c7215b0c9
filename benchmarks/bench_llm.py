"""LLM side-by-side benchmark: llama.cpp quant types, one run.

    .venv/bin/python benchmarks/bench_llm.py [--rounds 2] [--gen-tokens 64] [--prompt-tokens 128]
                                             [--out benchmarks/results/llm.json]

* Speed, on ``llama-speed`` (random-initialised ~0.4B Llama: speed only, no quality figure): F16, Q8_0,
  Q4_K_M, Q4_0, IQ4_XS with llama.cpp's default settings, at 1 and 2 threads. Every candidate gets the
  same prompt, the same number of generated tokens and the same threads; fresh worker process per
  measurement, rounds interleaved (F16, Q8_0, ... then again). Generation tokens/s, its fraction of the
  memory-bandwidth bound, prompt tokens/s, TTFT, per-token p50/p95, peak RSS, size.
* Quality, on ``tiny-llama`` (trained here): perplexity on eval.txt, mean / p99 / max KLD against the
  F16 GGUF, top-1 agreement, for every quant type (Q4_K_M and IQ4_XS also with an importance matrix
  from calibration.txt), after the garbage check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SPEED_QUANTS = ["F16", "Q8_0", "Q4_K_M", "Q4_0", "IQ4_XS"]
QUALITY = [("F16", False), ("Q8_0", False), ("Q6_K", False), ("Q5_K_M", False), ("Q4_K_M", False),
           ("Q4_K_M", True), ("Q4_0", False), ("IQ4_XS", False), ("IQ4_XS", True)]
WINDOW = 128


def _build(model_dir: Path, quant: str, out: Path, *, imatrix: bool = False, calibration: Path | None = None):
    from edgeopt.backends.llamacpp import LlamaCppBackend, LlamaCppRecipe
    from edgeopt.data import Dataset
    from edgeopt.intake import assess

    a = assess(model_dir)
    cal = Dataset(str(calibration), "", {}) if calibration else None
    name = f"llamacpp-{quant.lower()}" + ("-imatrix" if imatrix else "")
    return LlamaCppBackend().optimize(model=a.model, assessment=a, recipe=LlamaCppRecipe(quant=quant, imatrix=imatrix),
                                      candidate=name, out_dir=out / name, calibration=cal)


def speed(zoo_dir: Path, work: Path, *, rounds: int, prompt_tokens: int, gen_tokens: int) -> list[dict]:
    from edgeopt import zoo
    from edgeopt.bench.bandwidth import bound_fraction
    from edgeopt.bench.generate import bytes_per_token, interleaved_generation
    from edgeopt.hardware import fingerprint
    from edgeopt.intake import assess
    from edgeopt.settings import data_dir

    entry = zoo.build("llama-speed", out_dir=zoo_dir)
    info = assess(entry.model).llm
    arts = {}
    for q in SPEED_QUANTS:
        t0 = time.perf_counter()
        arts[f"llamacpp-{q.lower()}"] = _build(entry.model, q, work / "speed")
        print(f"built {q} in {time.perf_counter() - t0:.0f} s", flush=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(entry.model))
    prompt = tok(entry.evaluation.read_text())["input_ids"][:prompt_tokens]
    fp = fingerprint()
    rows = []
    for threads in (1, 2):
        res = interleaved_generation(arts, rounds=rounds, work_dir=work / f"gen-t{threads}", prompt=prompt,
                                     gen_tokens=gen_tokens, threads=threads, repeats=2)
        base = res["llamacpp-f16"]
        for name, r in res.items():
            bpt = bytes_per_token(arts[name].path, kv_bytes_per_token=info.kv_cache_bytes_per_token,
                                  context_tokens=prompt_tokens + gen_tokens // 2)
            bw, fraction = bound_fraction(tokens_per_s=r.gen_tps, bytes_per_token=bpt, fp=fp, threads=threads,
                                          store=data_dir() / "bandwidth.json")
            rows.append({"candidate": name, "threads": threads, "gen_tps": r.gen_tps,
                         "gen_tps_rounds": list(r.gen_tps_rounds), "speedup_vs_f16": r.gen_tps / base.gen_tps,
                         "bandwidth_gbps": bw, "bytes_per_token": bpt,
                         "bound_fraction": fraction, "prompt_tps": r.prompt_tps,
                         "ttft_ms": r.ttft_ms, "token_ms_p50": r.token_ms_p50, "token_ms_p95": r.token_ms_p95,
                         "token_samples": r.token_samples, "rss_peak_mb": r.rss_peak_mb,
                         "rss_model_mb": r.rss_model_mb, "size_mb": r.size_bytes / 1e6})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def quality(zoo_dir: Path, work: Path) -> tuple[list[dict], dict]:
    from edgeopt import zoo
    from edgeopt.backends.llamacpp import open_llama
    from edgeopt.evaluate.llm import garbage_check, kl_divergence, perplexity, tokenize_text, window_logprobs

    entry = zoo.build("tiny-llama", out_dir=zoo_dir)
    text = entry.evaluation.read_text(encoding="utf-8")
    ref = None
    rows = []
    for quant, imatrix in QUALITY:
        art = _build(entry.model, quant, work / "quality", imatrix=imatrix, calibration=entry.calibration)
        llm = open_llama(art.path, {"n_ctx": WINDOW + 8, "threads": 2}, logits_all=True)
        g = garbage_check(llm, "The import statement")
        logp, targets = window_logprobs(llm, tokenize_text(llm, text), window=WINDOW)
        if ref is None:
            ref = logp
        kld_mean, kld_p99, kld_max, top1 = kl_divergence(ref, logp)
        notes = [n for n in art.notes if n.startswith("tensor types")]
        rows.append({"candidate": art.candidate, "quant": quant, "imatrix": imatrix, "garbage_ok": g.ok,
                     "perplexity": perplexity(logp, targets), "kld_mean": kld_mean, "kld_p99": kld_p99,
                     "kld_max": kld_max, "top1_agreement": top1, "tokens": len(targets),
                     "size_bytes": art.size_bytes, "tensor_types": notes[0] if notes else ""})
        print(json.dumps(rows[-1]), flush=True)
        del llm
    return rows, entry.metadata


def markdown(doc: dict) -> str:
    """The two tables of benchmarks/README.md from a results document."""
    lines = [("| candidate | threads | gen tok/s | vs F16 | bound | prompt tok/s | TTFT ms | token p50 / p95 ms "
              "| peak RSS MB | size MB |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["speed"]:
        lines.append(f"| {r['candidate']} | {r['threads']} | {r['gen_tps']:.1f} | {r['speedup_vs_f16']:.2f}x | "
                     f"{r['bound_fraction']:.0%} | {r['prompt_tps']:.0f} | {r['ttft_ms']:.0f} | "
                     f"{r['token_ms_p50']:.1f} / {r['token_ms_p95']:.1f} | {r['rss_peak_mb']:.0f} | {r['size_mb']:.0f} |")
    lines += ["", ("| candidate | garbage check | perplexity | KLD mean | KLD p99 | KLD max | top-1 agreement "
                   "| size KB |"), "|---|---|---|---|---|---|---|---|"]
    for r in doc["quality"]:
        lines.append(f"| {r['candidate']} | {'ok' if r['garbage_ok'] else 'FAIL'} | {r['perplexity']:.2f} | "
                     f"{r['kld_mean']:.5f} | {r['kld_p99']:.4f} | {r['kld_max']:.4f} | {r['top1_agreement']:.4f} | "
                     f"{r['size_bytes'] / 1e3:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "llm.json")
    args = ap.parse_args()
    from edgeopt.hardware import fingerprint
    from edgeopt.settings import data_dir

    zoo_dir, work = data_dir() / "zoo", data_dir() / "bench-llm"
    started = time.time()
    q_rows, meta = ([], {}) if args.skip_quality else quality(zoo_dir, work)
    s_rows = [] if args.skip_speed else speed(zoo_dir, work, rounds=args.rounds, prompt_tokens=args.prompt_tokens,
                                                gen_tokens=args.gen_tokens)
    fp = fingerprint()
    doc = {"command": "python benchmarks/bench_llm.py " + " ".join(sys.argv[1:]),
           "seconds": round(time.time() - started), "cpu": fp.cpu_model, "cores_logical": fp.cores_logical,
           "tool_versions": {k: v for k, v in fp.tool_versions.items()},
           "tiny_llama": {k: meta.get(k) for k in ("perplexity", "accuracy", "parameter_count", "training")},
           "settings": {"rounds": args.rounds, "gen_tokens": args.gen_tokens, "prompt_tokens": args.prompt_tokens,
                        "window": WINDOW},
           "quality": q_rows, "speed": s_rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(markdown(doc))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
