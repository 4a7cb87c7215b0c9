"""The optimize workflow's language-model phases as plain functions (no Prefect, no MLflow).

A language model (a llama-like Hugging Face checkpoint, or a GGUF file) is optimized with llama.cpp:
the F16 GGUF is the reference (``BASELINE``: converted from the checkpoint, or the GGUF as given), and
the profile's ``kinds: [llm]`` recipes are the candidates. Like for like: every candidate and the
reference generate from the same prompt (the first ``prompt_tokens`` tokens of the evaluation text), the
same number of tokens, with the same threads, each measurement in a fresh process, the rounds
interleaved (reference, candidate, ..., then again); a speed-up is the ratio of generation tokens/s
measured in the same run, its interval from the per-round ratios (``edgeopt.intervals``). Quality is
perplexity on the evaluation text, and KLD and top-1 agreement against the reference on the same
positions, after a garbage check (``edgeopt.evaluate.llm``). Gates: ``edgeopt.gates.llm_verdicts``.

Every result folder is content-addressed like the other candidates' (``edgeopt.keys``): builds by
``workflow.build_key`` (model, recipe, calibration text when the recipe uses it, tools, hardware),
measurements and evaluations by the artifact, its runtime, the LLM benchmark settings, the evaluation
text's digest, tools and hardware.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeopt import backends, gates, reproducibility
from edgeopt.bench.generate import bytes_per_token, measure_generation
from edgeopt.bench.supervise import run_worker
from edgeopt.data import Dataset
from edgeopt.errors import BackendUnavailable, CandidateFailed, ConfigError, DataError
from edgeopt.intervals import Interval, ratio_interval
from edgeopt.keys import digest, hardware_identity, result_key, write_stamp
from edgeopt.native_log import captured
from edgeopt.profiles import Profile
from edgeopt.records import (
    SCHEMA_VERSION,
    Artifact,
    Assessment,
    CandidateOutcome,
    CandidateSpec,
    EvalResult,
    GenerationResult,
    HardwareFingerprint,
    LLMEvalResult,
)
from edgeopt.workflow import BUILD_LOG, build_dir, data_sha

__all__ = ["BASELINE", "LLM_BACKENDS", "build", "check_data", "check_model", "comparison_group", "earlier_speedups",
           "eval_dir", "evaluate", "gate", "generation_dir", "measure", "plan", "pool", "prompt_ids", "record_speedups",
           "with_bound"]

log = logging.getLogger(__name__)

#: the reference every llama.cpp candidate is compared with: the F16 GGUF, run with the recipes' defaults
BASELINE = CandidateSpec(name="llamacpp-f16", backend="llamacpp", recipe={"quant": "F16"}, baseline=True)
#: the speed-up verdict's metric suffix when a side's speed figures do not stand for the target
#: (``GenerationResult.not_representative``, e.g. MLX off Apple silicon): the verdict fails, its measurement NaN
NOT_REPRESENTATIVE = "(not representative)"
#: backends that build language-model candidates (the model formats each takes: its ``Backend.formats``)
LLM_BACKENDS = ("llamacpp", "openvino-genai", "onnxruntime-genai", "mlx")


def plan(profile: Profile, *, only: tuple[str, ...] = (), model_format: str = "hf") -> tuple[list[CandidateSpec], list[str]]:
    """The profile's language-model candidates (``kinds: [llm]`` recipes of a GGUF backend), and why others are
    left out; a candidate asked for by name that cannot run a language model (or, from a GGUF, needs the
    checkpoint for its importance matrix) is a ``ConfigError``."""
    specs, skipped = [], []
    for spec in profile.candidate_specs(only, kind="llm"):
        why = None
        if spec.backend not in LLM_BACKENDS:
            why = (f"{spec.name}: the {spec.backend} backend does not run language models here "
                   f"({' and '.join(LLM_BACKENDS)} do)")
        elif model_format not in backends.get(spec.backend).formats:
            why = f"{spec.name}: {spec.backend} builds from the Hugging Face checkpoint; this model is a {model_format} file"
        elif model_format == "gguf" and spec.recipe.get("imatrix"):
            why = (f"{spec.name}: its importance matrix is computed on the Hugging Face checkpoint; "
                   "this model is a GGUF file")
        if why:
            if only:
                raise ConfigError(why)
            skipped.append(why)
            continue
        specs.append(spec)
    if not specs:
        raise ConfigError(f"profile {profile.name}: no candidate for a language model; add recipes with backend "
                          f"{', '.join(LLM_BACKENDS)} and kinds [llm] (see profiles/intel-cpu.yaml)")
    return specs, skipped


def check_model(assessment: Assessment) -> None:
    """A GGUF that is already quantized is not quantized again (quality lost twice): one ``ConfigError`` line."""
    types = set(assessment.llm.tensor_types) if assessment.llm else set()
    quantized = sorted(types - {"F32", "F16", "BF16"})
    if assessment.model.format == "gguf" and quantized:
        raise ConfigError(f"model {Path(assessment.model.path).name} is already quantized ({', '.join(quantized)}); "
                          "re-quantizing it loses quality twice: give the F16 GGUF (or the Hugging Face checkpoint)")


def check_data(specs: list[CandidateSpec], *, calibration: str | None, evaluation: str | None) -> None:
    """One ``DataError`` line before anything is built: evaluation text is required (perplexity, KLD and the
    prompt come from it), and calibration text when a recipe computes an importance matrix."""
    from edgeopt.text import load_sentences

    if not evaluation:
        raise DataError("language models are evaluated on text: pass --eval TEXT.txt (perplexity, KLD and the "
                        "benchmark prompt come from it)")
    load_sentences(evaluation, role="evaluation")
    needs = [s.name for s in specs if backends.get(s.backend).recipe_type.model_validate(s.recipe).needs_calibration()]
    if needs and not calibration:
        raise DataError(f"{', '.join(needs)} compute an importance matrix from calibration text: pass "
                        "--calibration TEXT.txt, or leave these candidates out with -c")
    if needs:
        load_sentences(calibration, role="calibration")


_LOG_CALLBACK: list = []


def _llama_log_to_fd2() -> None:
    """llama-cpp-python prints llama.cpp's log lines to Python's ``sys.stderr`` (the terminal, under the command
    line's ``native_log.divert``); send them to descriptor 2 like every native log, so a build's lines land in
    its ``build.log``. Installed once per process."""
    if _LOG_CALLBACK:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _to_fd2(_level: int, text: bytes, _user: object) -> None:
        os.write(2, text)

    _LOG_CALLBACK.append(_to_fd2)  # kept alive: llama.cpp holds only the C pointer
    llama_cpp.llama_log_set(_to_fd2, ctypes.c_void_p(0))


def build(spec: CandidateSpec, *, assessment: Assessment, calibration: str | None, work_dir: Path,
          hardware: HardwareFingerprint | None = None) -> Artifact:
    """Build one GGUF into its content-addressed folder (``workflow.build_dir``); ``CandidateFailed``."""
    backend = backends.get(spec.backend)
    recipe = backend.recipe_type.model_validate(spec.recipe)
    try:
        backend.check_available()
    except BackendUnavailable as exc:
        raise CandidateFailed("unavailable", f"{spec.name}: {exc}") from exc
    cal = None
    if recipe.needs_calibration():
        if not calibration:
            raise CandidateFailed("missing-data", f"{spec.name}: this recipe needs calibration text; pass "
                                  "--calibration TEXT.txt")
        cal = Dataset(calibration, data_sha(calibration) or "", {})
    out_dir = build_dir(spec, assessment=assessment, calibration=calibration, work_dir=work_dir, hardware=hardware)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    build_log = out_dir / BUILD_LOG
    _llama_log_to_fd2()
    try:
        with captured(build_log, what=f"build {spec.name}"):
            artifact = backend.optimize(model=assessment.model, assessment=assessment, recipe=recipe,
                                        candidate=spec.name, out_dir=out_dir, calibration=cal)
    except CandidateFailed as exc:
        raise CandidateFailed(exc.reason, f"{exc} (build log: {build_log})", evidence=exc.evidence) from exc
    write_stamp(out_dir, out_dir.name.removeprefix(f"{spec.name}-"))
    log.info("built %s: %s (%d bytes)", spec.name, artifact.precision, artifact.size_bytes)
    return artifact


def prompt_ids(artifact: Artifact, *, evaluation: str, tokens: int) -> list[int]:
    """The benchmark prompt: the first ``tokens`` tokens of the evaluation text (repeated if shorter), in the
    reference GGUF's own tokenizer; the same list for every candidate."""
    import llama_cpp

    _llama_log_to_fd2()
    llm = llama_cpp.Llama(model_path=artifact.path, vocab_only=True, verbose=False)
    ids = list(llm.tokenize(Path(evaluation).read_text(encoding="utf-8").encode("utf-8"), add_bos=False))
    if not ids:
        raise DataError(f"evaluation data {evaluation}: no tokens; give a non-empty text")
    return (ids * (tokens // len(ids) + 1))[:tokens]


def _run_artifact(artifact: Artifact, profile: Profile) -> Artifact:
    """The artifact as it runs: the profile's thread budget where the recipe leaves threads open; for llama.cpp
    (the reference and its candidates alike), the profile's GPU offload (``hardware.llm_gpu_layers``)."""
    threads = artifact.runtime.get("threads") or profile.hardware.threads
    extra = {"gpu_layers": profile.hardware.llm_gpu_layers} \
        if artifact.backend == "llamacpp" and profile.hardware.llm_gpu_layers else {}
    return artifact.model_copy(update={"runtime": artifact.runtime | {"threads": threads} | extra})


def comparison_group(artifacts: dict[str, Artifact]) -> str:
    """Names the set measured together (interleaved): part of every measurement's key, so a run with another
    set of candidates measures the reference again beside them instead of reusing one measured in another run."""
    return digest(sorted((name, a.sha256) for name, a in artifacts.items()))


def generation_dir(artifact: Artifact, *, profile: Profile, evaluation: str | None,
                   hardware: HardwareFingerprint | None, group: str, round_: int, work_dir: Path) -> Path:
    """Folder of one generation measurement, named by its key (artifact as it runs, LLM benchmark settings,
    evaluation text, tools, hardware, the comparison group, the round)."""
    a = _run_artifact(artifact, profile)
    key = result_key("generate", artifact=a.sha256, runtime=a.runtime, settings=profile.benchmark.llm,
                     timeout=profile.benchmark.timeout_s, evaluation=data_sha(evaluation), tools=a.tool_versions,
                     hardware=hardware_identity(hardware), group=group, round=round_)
    return work_dir / "generate" / f"{a.candidate}-{key}"


def measure(artifact: Artifact, *, profile: Profile, prompt: list[int], evaluation: str | None,
            hardware: HardwareFingerprint | None, group: str, round_: int, work_dir: Path,
            lock_path: Path | None = None) -> GenerationResult:
    """One round of one artifact: a fresh process generating ``gen_tokens`` from ``prompt`` (``CandidateFailed``)."""
    a = _run_artifact(artifact, profile)
    folder = generation_dir(artifact, profile=profile, evaluation=evaluation, hardware=hardware, group=group,
                            round_=round_, work_dir=work_dir)
    if folder.exists():
        shutil.rmtree(folder)
    cfg = profile.benchmark.llm
    result = measure_generation(a, prompt=prompt, gen_tokens=cfg.gen_tokens, threads=int(a.runtime["threads"]),
                                repeats=cfg.runs, work_dir=folder, timeout_s=profile.benchmark.timeout_s,
                                lock_path=lock_path, context_tokens=cfg.context_tokens)
    (folder / "generation.json").write_text(result.model_dump_json(indent=1), encoding="utf-8")
    write_stamp(folder, folder.name.removeprefix(f"{a.candidate}-"), files=["generation.json"])
    return result


def pool(results: list[GenerationResult]) -> GenerationResult:
    """One result from an artifact's rounds: medians over every run of every round (all runs kept, in order)."""
    runs = [v for r in results for v in r.gen_tps_rounds]
    return results[0].model_copy(update={
        "repeats": sum(r.repeats for r in results), "gen_tps": float(np.median(runs)),
        "prompt_tps": float(np.median([r.prompt_tps for r in results])),
        "ttft_ms": float(np.median([r.ttft_ms for r in results])),
        "rss_peak_mb": max(r.rss_peak_mb for r in results),
        "rss_model_mb": float(np.median([r.rss_model_mb for r in results])), "gen_tps_rounds": tuple(runs)})


def with_bound(generation: GenerationResult, artifact: Artifact, *, assessment: Assessment,
               hardware: HardwareFingerprint, store: Path) -> GenerationResult:
    """``generation`` with its tokens/s as a fraction of the memory-bandwidth bound (``edgeopt.bench.bandwidth``):
    bytes read per token (the weights but the embedding table, as the artifact's backend counts them:
    ``Backend.weight_bytes_per_token``, plus the KV cache at mid-generation, at the bytes per token the runtime
    allocated) x tokens/s / this hardware's read bandwidth at the same threads. Left unset for artifacts whose
    backend gives no weight figure (MLX folders) and for models whose bytes per token fit in the last-level cache
    (read from the cache, not memory: no such bound)."""
    if not generation.gen_tps > 0:
        return generation
    kv = generation.kv_cache_bytes_per_token or (assessment.llm.kv_cache_bytes_per_token if assessment.llm else 0)
    bpt = bytes_per_token(artifact.path, backend=artifact.backend, kv_bytes_per_token=round(kv),
                          context_tokens=generation.prompt_tokens + generation.gen_tokens // 2)
    if bpt is None:
        return generation
    from edgeopt.bench.bandwidth import bound_fraction, last_level_cache_bytes

    if bpt <= last_level_cache_bytes():
        log.info("%s reads %.1f MB per token, within the last-level cache: no memory-bandwidth bound",
                 artifact.candidate, bpt / 1e6)
        return generation.model_copy(update={"bytes_per_token": bpt})
    bw, fraction = bound_fraction(tokens_per_s=generation.gen_tps, bytes_per_token=bpt, fp=hardware,
                                  threads=generation.threads, store=store)
    return generation.model_copy(update={"bytes_per_token": bpt, "bandwidth_gbps": bw, "bandwidth_fraction": fraction})


def _speedup_interval(name: str, reference: str, rounds: dict[str, list[GenerationResult]], *, confidence: float,
                      floor_sd: float = 0.0) -> Interval:
    """The generation speed-up's interval from the per-round, per-run token times (reference / candidate, rounds
    paired by index as for latency), at least ``floor_sd`` wide in log terms."""
    per_round = {n: [1e3 / np.asarray(r.gen_tps_rounds, float) for r in rounds[n]] for n in (name, reference)}
    return ratio_interval(baseline=per_round[reference], candidate=per_round[name], confidence=confidence,
                          floor_sd=floor_sd)


def _speedup_comparison(outcome: CandidateOutcome, reference: CandidateOutcome, *, profile: Profile,
                        evaluation: str | None, hardware: HardwareFingerprint | None) -> tuple[str, str] | None:
    """The key of ``outcome``'s generation speed-up comparison with the reference (both artifacts as they run,
    the LLM benchmark settings, evaluation text, tools, hardware, the gate's metric; not the comparison group
    nor the rounds) and a digest of this measurement of it (both sides' tokens/s of every run); None without
    artifacts or figures."""
    if outcome.artifact is None or reference.artifact is None or outcome.generation is None \
            or reference.generation is None:
        return None
    sides = [_run_artifact(o.artifact, profile) for o in (outcome, reference)]
    key = digest("llm-generation-speedup", SCHEMA_VERSION, profile.benchmark.llm, data_sha(evaluation),
                 hardware_identity(hardware), [(a.sha256, a.runtime, a.tool_versions) for a in sides])
    return key, digest([list(o.generation.gen_tps_rounds) for o in (outcome, reference)])


def earlier_speedups(outcomes: list[CandidateOutcome], *, run: str, profile: Profile, evaluation: str | None,
                     hardware: HardwareFingerprint, history_file: Path) -> dict[str, list[tuple[float, float]]]:
    """For each measured candidate, its speed-up comparison's (log ratio, own sd) in earlier runs on this host
    (``edgeopt.reproducibility.earlier_runs``); empty when the profile keeps no history."""
    if not profile.benchmark.run_to_run_history:
        return {}
    history = reproducibility.read_history(history_file)
    ref = next((o for o in outcomes if o.spec.baseline), None)
    out: dict[str, list[tuple[float, float]]] = {}
    for o in outcomes:
        if not history or ref is None or o.spec.baseline or not (o.ok and ref.ok):
            continue
        found = _speedup_comparison(o, ref, profile=profile, evaluation=evaluation, hardware=hardware)
        earlier = reproducibility.earlier_runs(history, found[0], run=run, measurement=found[1]) if found else []
        if earlier:
            out[o.name] = earlier
    return out


def record_speedups(outcomes: list[CandidateOutcome], *, rounds: dict[str, list[GenerationResult]], fresh: set[str],
                    run: str, profile: Profile, evaluation: str | None, hardware: HardwareFingerprint,
                    history_file: Path) -> int:
    """Append this run's freshly measured generation speed-ups (both sides re-measured) to the host's history,
    each with its own interval's sd (before the floor and the pooling); returns how many were written."""
    ref = next((o for o in outcomes if o.spec.baseline), None)
    ratios, measurements, sds = {}, {}, {}
    for o in outcomes:
        v = next((v for v in o.verdicts if v.gate == "speedup"), None)
        if ref is None or v is None or not ({o.name, ref.name} <= fresh) or not math.isfinite(v.measured):
            continue
        found = _speedup_comparison(o, ref, profile=profile, evaluation=evaluation, hardware=hardware)
        if found is not None and rounds.get(o.name):
            paired = {o.name: rounds[o.name], ref.name: rounds[ref.name][:len(rounds[o.name])]}
            own = _speedup_interval(o.name, ref.name, paired, confidence=profile.gates_for("llm").confidence)
            ratios[found[0]], measurements[found[0]] = v.measured, found[1]
            sds[found[0]] = reproducibility.own_sd(own)
    return reproducibility.record(history_file, run=run, ratios=ratios, measurements=measurements, sds=sds) \
        if profile.benchmark.run_to_run_history else 0


def eval_dir(artifact: Artifact, *, profile: Profile, evaluation: str | None, hardware: HardwareFingerprint | None,
             reference: Artifact | None, work_dir: Path) -> Path:
    a = _run_artifact(artifact, profile)
    key = result_key("llm-eval", artifact=a.sha256, runtime=a.runtime, window=profile.benchmark.llm.eval_window,
                     windows=profile.benchmark.llm.eval_max_windows, evaluation=data_sha(evaluation),
                     reference=reference.sha256 if reference else None, tools=a.tool_versions,
                     hardware=hardware_identity(hardware))
    return work_dir / "llm-eval" / f"{a.candidate}-{key}"


def evaluate(artifact: Artifact, *, profile: Profile, evaluation: str, hardware: HardwareFingerprint | None,
             work_dir: Path, reference: Artifact | None = None, reference_dir: str | None = None) -> tuple[LLMEvalResult, str]:
    """Garbage check, perplexity, and (for a candidate) KLD / top-1 agreement against the reference's
    log-probabilities in ``reference_dir``, in a fresh process; returns (scores, this result's folder)."""
    a = _run_artifact(artifact, profile)
    folder = eval_dir(artifact, profile=profile, evaluation=evaluation, hardware=hardware, reference=reference,
                      work_dir=work_dir)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    cfg = profile.benchmark.llm
    job = {"mode": "llm-eval", "path": a.path, "runtime": a.runtime, "evaluation": evaluation,
           "window": cfg.eval_window, "max_windows": cfg.eval_max_windows,
           "artifact": a.model_dump(mode="json")}
    if reference is None:
        job["reference_out"] = str(folder / "reference.npz")
    else:
        job["reference"] = str(Path(reference_dir or "") / "reference.npz")
    # a DataError (the text shorter than one window) comes back as one: the user's to fix, not the candidate's
    out = run_worker(job, work_dir=folder, candidate=a.candidate, what="evaluation",
                     timeout_s=profile.benchmark.timeout_s, memory_limit_mb=profile.benchmark.memory_limit_mb)
    result = LLMEvalResult(candidate=a.candidate, perplexity=out["perplexity"],
                           baseline_perplexity=out["perplexity"], kld_mean=out["kld_mean"], kld_p99=out["kld_p99"],
                           kld_max=out["kld_max"], top1_agreement=out["top1_agreement"], tokens=out["tokens"],
                           window=out["window"], garbage=out["garbage"])
    (folder / "scores.json").write_text(result.model_dump_json(indent=1), encoding="utf-8")
    write_stamp(folder, folder.name.removeprefix(f"{a.candidate}-"),
                files=["scores.json"] + (["reference.npz"] if reference is None else []))
    return result, str(folder)


def gate(outcome: CandidateOutcome, *, baseline: CandidateOutcome, rounds: dict[str, list[GenerationResult]],
         profile: Profile, run_to_run_sd: float = 0.0,
         earlier: Sequence[tuple[float, float]] = ()) -> CandidateOutcome:
    """The candidate's verdicts against the reference (``gates.llm_verdicts``; NaN fails its gate), the
    speed-up's interval from the per-round ratios of generation tokens/s (rounds paired by index: measured
    side by side), and the figures the selection and the table use. ``earlier``: (log speed-up, own sd) of
    the same comparison in earlier runs on this host (``earlier_speedups``), pooled with this run's for the
    speed-up verdict as for every other model (``edgeopt.reproducibility.sequential``)."""
    g = profile.gates_for("llm")
    cand = outcome.generation
    # the reference's rounds measured beside this candidate's (the same indices): extra rounds for other,
    # uncertain candidates are not mixed into this ratio
    base = pool(rounds[baseline.name][:len(rounds[outcome.name])]) if rounds.get(outcome.name) else baseline.generation
    ev, ref = outcome.llm_eval, baseline.llm_eval
    if ev is not None and ref is not None:
        ev = ev.model_copy(update={"baseline_perplexity": ref.perplexity})
    caveat = (cand.not_representative if cand else None) or (base.not_representative if base else None)
    if caveat and cand is not None:  # speed figures that do not stand for the target never pass the speed gate
        cand = cand.model_copy(update={"gen_tps": math.nan})
    verdicts = list(gates.llm_verdicts(candidate=cand, baseline=base,
                                       perplexity=ev.perplexity if ev else math.nan,
                                       baseline_perplexity=ref.perplexity if ref else math.nan,
                                       kld_mean=ev.kld_mean if ev else math.nan, gates=g))
    if caveat:  # the verdict says why it has no figure (a NaN measurement fails)
        verdicts = [v.model_copy(update={"metric": f"{v.metric} {NOT_REPRESENTATIVE}"}) if v.gate == "speedup" else v
                    for v in verdicts]
    iv = _speedup_interval(outcome.name, baseline.name, rounds, confidence=g.confidence, floor_sd=run_to_run_sd)
    speed = next(v for v in verdicts if v.gate == "speedup")
    if iv.finite and math.isfinite(speed.measured):
        iv = type(iv)(speed.measured, min(iv.low, speed.measured), max(iv.high, speed.measured), iv.confidence,
                      iv.rounds)
        judged = reproducibility.sequential(iv, list(earlier), sd_log=run_to_run_sd, threshold=speed.threshold)
        verdicts = [gates.verdict(gate="speedup", metric=speed.metric, comparator=">=", threshold=speed.threshold,
                                  measured=speed.measured, run_to_run_sd=run_to_run_sd or None, decision=judged)
                    if v.gate == "speedup" else v for v in verdicts]
    memory = next(v for v in verdicts if v.gate == "memory").measured
    quality = None
    if ev is not None:  # top-1 agreement with the reference: the quality the Pareto selection weighs
        quality = EvalResult(candidate=outcome.name, metric="top1_agreement", value=ev.top1_agreement, baseline=1.0,
                             delta=ev.top1_agreement - 1.0, samples=ev.tokens, top1_agreement=ev.top1_agreement,
                             cosine_mean=math.nan, cosine_min=math.nan, max_abs_error=math.nan)
    return outcome.model_copy(update={"baseline": baseline.name, "speedup_p50": speed.measured,
                                      "speedup_p95": speed.measured, "memory_reduction": memory,
                                      "verdicts": tuple(verdicts), "llm_eval": ev, "evaluation": quality})
