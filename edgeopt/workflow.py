"""The phases of the optimize workflow as plain functions (no Prefect, no MLflow).

``tasks/`` wraps each of these in a Prefect task; ``benchmarks/`` calls them directly to measure
the orchestration overhead. Every phase takes and returns records and paths.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from edgeopt import backends, bench, gates, intake, pareto, reproducibility
from edgeopt.comparison import with_threads
from edgeopt.data import Dataset, file_sha256, load_dataset, path_sha256, write_synthetic
from edgeopt.data_folder import first_sample, is_sample_folder
from edgeopt.errors import BackendUnavailable, CandidateFailed, ConfigError, DataError, ModelError
from edgeopt.evaluate import evaluator_for, load_outputs
from edgeopt.input_shapes import (
    INPUT_SHAPES_KEY,
    parse_shapes,
    resolve_shapes,
    shape_settings,
    shaped_signature,
)
from edgeopt.keys import digest, hardware_identity, result_key, stamp_ok, write_stamp
from edgeopt.native_log import captured
from edgeopt.profiles import Profile
from edgeopt.records import (
    Artifact,
    Assessment,
    BenchmarkResult,
    CandidateOutcome,
    CandidateSpec,
    EvalResult,
    Failure,
    HardwareFingerprint,
    Selection,
)
from edgeopt.text import is_text_data, prepare_text_data

__all__ = [
    "BUILD_LOG",
    "audit",
    "bench_dir",
    "bench_key",
    "bench_settings",
    "build",
    "build_dir",
    "build_input",
    "build_key",
    "check_data",
    "data_sha",
    "evaluate",
    "extra_shape_settings",
    "failed",
    "host_spread",
    "measure",
    "outputs_dir",
    "outputs_key",
    "plan",
    "pool",
    "prepare_data",
    "prepare_model",
    "record_speedups",
    "resolve_input_shapes",
    "result_ok",
    "run_outputs",
    "select",
    "signature",
    "synthetic_data",
    "with_gates",
    "with_input_shapes",
]

log = logging.getLogger(__name__)

#: a build's log (native runtime logs included), beside its artifact in the build folder
BUILD_LOG = "build.log"


def prepare_model(model: str, *, work_dir: Path) -> tuple[Assessment, Assessment]:
    """Assess the model as given and the ONNX model the candidates are built from.

    An ONNX file is both. A Hugging Face checkpoint folder (safetensors only) is exported to ONNX
    once, into ``work_dir/converted/<sha>/`` with its tokenizer beside it.
    """
    source = intake.assess(model)
    if source.model.format == "onnx":
        return source, source
    if source.model.format == "hf":
        from edgeopt.intake.hf import export_onnx

        out = work_dir / "converted" / source.model.sha256[:24]
        if not (out / "model.onnx").is_file():
            export_onnx(model, out_dir=out)
        return source, intake.assess(out / "model.onnx")
    raise ModelError(f"model {model}: {source.model.format} models cannot be optimized yet")


def prepare_data(path: str | None, *, assessment: Assessment, seq_len: int, work_dir: Path, role: str) -> str | None:
    """Text data (.txt / .jsonl of sentences) is tokenized with the model's own tokenizer into the
    .npz form every phase uses; other paths are returned as they are."""
    if path is None or not is_text_data(path):
        return path
    tokenizer_dir = Path(assessment.model.path).parent
    if not any((tokenizer_dir / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        raise DataError(f"{role} data {path}: text data needs a text model with its tokenizer beside it "
                        f"(none in {tokenizer_dir}); pass an .npz of model inputs instead")
    return str(prepare_text_data(path, tokenizer_dir=tokenizer_dir, out_dir=work_dir / "data", seq_len=seq_len,
                                 role=role))


def check_data(assessment: Assessment, *, calibration: str | None, evaluation: str | None) -> tuple[Dataset | None, Dataset | None]:
    """Validate both data files against the model's inputs (at the shapes resolved for the run, if
    any) before anything is built (DataError)."""
    sig = signature(assessment)
    cal = load_dataset(calibration, signature=sig, role="calibration") if calibration else None
    ev = load_dataset(evaluation, signature=sig, role="evaluation") if evaluation else None
    return cal, ev


def synthetic_data(assessment: Assessment, *, work_dir: Path | None) -> str | None:
    """``--synthetic-data``: a generated ``.npz`` at the shapes resolved for the run (``input_shapes``), for
    calibration and evaluation when the user has no data (None: only check). ``ConfigError`` when the
    run has no one shape per input (per-sample data)."""
    if assessment.per_sample_inputs or any(s.name not in assessment.input_shapes for s in assessment.inputs):
        raise ConfigError("--synthetic-data generates inputs at one shape per input: give the shapes with "
                          "--shape NAME=DxDx... (or the profile's input_shapes), not a folder of per-sample data")
    return None if work_dir is None else str(write_synthetic(signature(assessment),
                                                            out_dir=work_dir / "data" / "synthetic"))


def signature(assessment: Assessment) -> tuple:
    """The model's inputs with the dims resolved for this run fixed (``assessment.input_shapes``); inputs
    that run at each sample's own shape (``per_sample_inputs``) keep their dynamic dims."""
    return shaped_signature(assessment.inputs, _fixed(assessment.input_shapes, assessment))


def _fixed(shapes: dict, assessment: Assessment) -> dict:
    return {k: v for k, v in (shapes or {}).items() if k not in assessment.per_sample_inputs}


def resolve_input_shapes(assessment: Assessment, *, shapes: list[str] | tuple[str, ...], profile: Profile,
                         evaluation: str | None, seq_len: int) -> Assessment:
    """The assessment with ``input_shapes`` set (``--shape`` values, the profile's ``input_shapes``, the
    evaluation data's dims, the batch size; see ``edgeopt.input_shapes``); ``ConfigError`` in one line."""
    shapes = _with_profile_lists(assessment, shapes, profile, evaluation)
    given, defaults = parse_shapes(shape_settings(shapes)[0]), profile.default_shapes()
    per_sample: tuple[str, ...] = ()
    if is_sample_folder(evaluation):  # a folder of per-sample feeds: the first sample's shapes stand for the run's
        data = first_sample(evaluation, signature=assessment.inputs)
        per_sample = tuple(s.name for s in assessment.inputs if s.name not in given and s.name not in defaults
                           and any(not (isinstance(d, int) and d > 0) for d in s.shape))
    else:
        data = load_dataset(evaluation, signature=assessment.inputs, role="evaluation").inputs if evaluation else None
    resolved = resolve_shapes(assessment.inputs, given=given, defaults=defaults,
                              batch_size=profile.benchmark.batch_size, data=data,
                              seq_len=seq_len if assessment.kind in ("encoder", "llm") else None)
    return assessment.model_copy(update={"input_shapes": resolved, "per_sample_inputs": per_sample})


def _with_profile_lists(assessment: Assessment, shapes, profile: Profile, evaluation: str | None) -> list[str]:
    """``--shape`` values plus the profile's lists of shapes (``input_shapes: {x: [A, B]}``) for the model's
    inputs that ``--shape`` leaves alone, as if each were given on the command line (with ``--eval`` data,
    the lists' first entries serve as defaults instead)."""
    shapes = list(shapes)
    if evaluation:
        return shapes
    given = {v.partition("=")[0].strip() for v in shapes}
    names = {s.name for s in assessment.inputs}
    return shapes + [v for name, values in profile.shape_lists().items() if name in names and name not in given
                     for v in values]


def extra_shape_settings(assessment: Assessment, *, shapes: list[str] | tuple[str, ...], profile: Profile,
                         evaluation: str | None, seq_len: int) -> list[tuple[str, dict[str, tuple[int, ...]]]]:
    """The shape settings after the first (an input given several times with ``--shape``), each as (label,
    every input's shape); the label names the shapes of the repeated inputs (``1x3x640x640``). Each is
    checked as the first is; they run on generated inputs, so ``--eval`` data (one shape) is refused."""
    shapes = _with_profile_lists(assessment, shapes, profile, evaluation)
    settings = shape_settings(shapes)
    if len(settings) == 1:
        return []
    if evaluation:
        raise ConfigError(f"--shape gives {len(settings)} shape settings, measured on generated inputs at each shape; "
                          "--eval data has one shape: drop --eval (or give one --shape per input)")
    repeated = [n for n in parse_shapes(settings[0]) if sum(v.partition("=")[0].strip() == n for v in shapes) > 1]
    out = []
    for values in settings[1:]:
        resolved = resolve_shapes(assessment.inputs, given=parse_shapes(values), defaults=profile.default_shapes(),
                                  batch_size=profile.benchmark.batch_size,
                                  seq_len=seq_len if assessment.kind in ("encoder", "llm") else None)
        out.append(("-".join("x".join(map(str, resolved[n])) for n in repeated), resolved))
    labels = [label for label, _ in out]
    first = "-".join("x".join(map(str, assessment.input_shapes[n])) for n in repeated)
    if len(set(labels)) != len(labels) or first in labels:
        raise ConfigError(f"--shape: the shape settings repeat one another ({', '.join([first, *labels])}); give each once")
    return out


def with_input_shapes(artifact: Artifact, *, shapes: dict[str, tuple[int, ...]]) -> Artifact:
    """The artifact carrying the shapes it is measured at (``runtime["input_shapes"]``: part of every
    benchmark and outputs key; taken out before the backend loads it)."""
    if not shapes:
        return artifact
    return artifact.model_copy(update={"runtime": artifact.runtime | {
        INPUT_SHAPES_KEY: {name: list(shape) for name, shape in shapes.items()}}})


def _run_signature(artifact: Artifact, assessment: Assessment) -> tuple:
    return shaped_signature(assessment.inputs, _fixed(artifact.runtime.get(INPUT_SHAPES_KEY) or assessment.input_shapes,
                                                      assessment))


def build_input(spec: CandidateSpec, *, source: Assessment, converted: Assessment) -> Assessment | None:
    """The model a candidate is built from: the converted ONNX model, or the model as given (a Hugging
    Face checkpoint) for a backend that builds from that; None when its backend takes neither."""
    formats = backends.get(spec.backend).formats
    return next((a for a in (converted, source) if a.model.format in formats), None)


def plan(profile: Profile, *, only: tuple[str, ...] = (), source: Assessment,
         converted: Assessment) -> tuple[list[CandidateSpec], list[str]]:
    """The profile's candidates for this model, and why the others are left out.

    Recipes for other kinds of model are left out (``kinds`` in the profile), and so are those whose
    backend cannot take the model in any form we have (asking for one by name is a ``ConfigError``).
    Recipe fields that follow from the gates (e.g. NNCF's accuracy budget) are filled in here.
    """
    kind = converted.kind
    gates_ = profile.gates_for(kind)
    specs: list[CandidateSpec] = []
    skipped = [f"{c.name}: applies to {', '.join(c.kinds)} models, this one is {kind}"
               for c in profile.candidates if c.kinds and kind not in c.kinds and not only]
    for spec in profile.candidate_specs(only, kind=kind):
        backend = backends.get(spec.backend)
        if build_input(spec, source=source, converted=converted) is None:
            why = (f"{spec.name}: the {spec.backend} backend builds {', '.join(sorted(backend.formats))} models, "
                   f"this one is {source.model.format}")
            if only:
                raise ConfigError(why)
            skipped.append(why)
            continue
        recipe = backend.recipe_type.model_validate(spec.recipe)
        extra = recipe.from_gates(gates=gates_, kind=kind)
        spec = spec.model_copy(update={"recipe": spec.recipe | extra}) if extra else spec
        outputs = recipe.outputs()  # one build yielding several artifacts: one candidate per artifact
        specs += [spec.model_copy(update={"name": f"{spec.name}.{out}", "recipe": spec.recipe | pick})
                  for out, pick in outputs.items()] or [spec]
    for why in skipped:
        log.info("skipped %s", why)
    return specs, skipped


def data_sha(path: str | None) -> str | None:
    """sha256 of a data file or of a folder of per-sample files (None without one)."""
    if not path or not Path(path).exists():
        return None
    return file_sha256(path) if Path(path).is_file() else path_sha256(path)


def build_key(spec: CandidateSpec, *, assessment: Assessment, calibration: str | None,
              hardware: HardwareFingerprint | None) -> str:
    """Key of a build: model sha, backend, recipe, calibration data (if the recipe uses it), tool
    versions, hardware (a build may choose formats by CPU), sequence choice."""
    backend = backends.get(spec.backend)
    needs_cal = backend.recipe_type.model_validate(spec.recipe).needs_calibration()
    return result_key("build", model=assessment.model.sha256, backend=spec.backend, recipe=spec.recipe,
                      calibration=data_sha(calibration) if needs_cal else None, tools=backend.tool_versions(),
                      hardware=hardware_identity(hardware), sequence=spec.sequence_runtime())


def build_dir(spec: CandidateSpec, *, assessment: Assessment, calibration: str | None, work_dir: Path,
              hardware: HardwareFingerprint | None = None) -> Path:
    """Content-addressed build folder, named by ``build_key``."""
    key = build_key(spec, assessment=assessment, calibration=calibration, hardware=hardware)
    return work_dir / "builds" / f"{spec.name}-{key}"


def build(spec: CandidateSpec, *, assessment: Assessment, calibration: str | None, work_dir: Path,
          hardware: HardwareFingerprint | None = None) -> Artifact:
    """Build one candidate into a content-addressed folder under ``work_dir/builds``.

    Raises ``CandidateFailed`` with a classified reason (``unavailable``, ``missing-data``, ...).
    """
    backend = backends.get(spec.backend)
    recipe = backend.recipe_type.model_validate(spec.recipe)
    try:
        backend.check_available()
    except BackendUnavailable as exc:
        raise CandidateFailed("unavailable", f"{spec.name}: {exc}") from exc
    cal: Dataset | None = None
    if recipe.needs_calibration():
        if not calibration:
            raise CandidateFailed("missing-data", f"{spec.name}: this recipe needs calibration data; pass --calibration DATA")
        try:
            cal = load_dataset(calibration, signature=signature(assessment), role="calibration")
        except DataError as exc:
            raise CandidateFailed("missing-data", f"{spec.name}: {exc}") from exc
    out_dir = build_dir(spec, assessment=assessment, calibration=calibration, work_dir=work_dir, hardware=hardware)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    build_log = out_dir / BUILD_LOG
    try:
        with captured(build_log, what=f"build {spec.name}"):  # native runtime logs: to the file, not the terminal
            artifact = backend.optimize(model=assessment.model, assessment=assessment, recipe=recipe,
                                        candidate=spec.name, out_dir=out_dir, calibration=cal)
    except BackendUnavailable as exc:  # a tool only some recipes need (nncf, optimum-intel)
        raise CandidateFailed("unavailable", f"{spec.name}: {exc}") from exc
    except CandidateFailed as exc:
        raise CandidateFailed(exc.reason, f"{exc} (build log: {build_log})", evidence=exc.evidence) from exc
    if spec.sequence != "fixed":  # carried to the measuring process with the artifact
        artifact = artifact.model_copy(update={"runtime": artifact.runtime | spec.sequence_runtime()})
    write_stamp(out_dir, out_dir.name.removeprefix(f"{spec.name}-"))
    log.info("built %s: %s (%d bytes)", spec.name, artifact.precision, artifact.size_bytes)
    return artifact


def bench_settings(profile: Profile) -> bench.BenchSettings:
    b = profile.benchmark
    return bench.BenchSettings(
        warmup_runs=b.warmup_runs, min_runs=b.min_runs, min_duration_s=b.min_duration_s,
        max_duration_s=b.max_duration_s, batch_size=b.batch_size, timeout_s=b.timeout_s,
        memory_limit_mb=b.memory_limit_mb, eval_samples=b.eval_samples,
    )


def bench_key(artifact: Artifact, *, profile: Profile, evaluation: str | None, hardware: HardwareFingerprint,
              group: str, repeat: int) -> str:
    """Key of one measurement: the artifact as it runs (threads made explicit), the benchmark settings,
    the evaluation data, tools, hardware, the round and the comparison group it was measured with."""
    artifact = with_threads(artifact, threads=profile.hardware.threads)
    return result_key("bench", artifact=artifact.sha256, runtime=artifact.runtime, settings=profile.benchmark,
                      evaluation=data_sha(evaluation), tools=artifact.tool_versions,
                      hardware=hardware_identity(hardware), group=group, repeat=repeat)


def bench_dir(artifact: Artifact, *, profile: Profile, evaluation: str | None, hardware: HardwareFingerprint,
              group: str, repeat: int, work_dir: Path) -> Path:
    key = bench_key(artifact, profile=profile, evaluation=evaluation, hardware=hardware, group=group, repeat=repeat)
    return work_dir / "bench" / f"{artifact.candidate}-{key}"


def outputs_key(artifact: Artifact, *, profile: Profile, evaluation: str | None,
                hardware: HardwareFingerprint | None) -> str:
    artifact = with_threads(artifact, threads=profile.hardware.threads)
    return result_key("outputs", artifact=artifact.sha256, runtime=artifact.runtime,
                      batch_size=profile.benchmark.batch_size, max_samples=profile.benchmark.max_eval_samples,
                      evaluation=data_sha(evaluation), tools=artifact.tool_versions,
                      hardware=hardware_identity(hardware))


def outputs_dir(artifact: Artifact, *, profile: Profile, evaluation: str | None,
                hardware: HardwareFingerprint | None, work_dir: Path) -> Path:
    key = outputs_key(artifact, profile=profile, evaluation=evaluation, hardware=hardware)
    return work_dir / "outputs" / f"{artifact.candidate}-{key}"


def result_ok(folder: Path, *, name: str) -> bool:
    """A finished result folder whose stamp matches its name's key and whose files their digests."""
    return stamp_ok(folder, folder.name.removeprefix(f"{name}-"))


def measure(artifact: Artifact, *, profile: Profile, assessment: Assessment, hardware: HardwareFingerprint,
            evaluation: str | None, work_dir: Path, group: str = "", lock_path: Path | None = None,
            repeat: int = 0) -> BenchmarkResult:
    """Benchmark one artifact in a fresh process (CandidateFailed on crash, oom, timeout, audit...).

    ``repeat`` numbers the rounds (``profile.benchmark.repeats`` of them, plus extra rounds for
    uncertain verdicts), interleaved across the members of a comparison ``group`` by the caller so
    that each sees the same machine conditions.
    """
    artifact = with_threads(artifact, threads=profile.hardware.threads)
    out_dir = bench_dir(artifact, profile=profile, evaluation=evaluation, hardware=hardware, group=group,
                        repeat=repeat, work_dir=work_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    result = bench.measure(artifact=artifact, settings=bench_settings(profile), signature=_run_signature(artifact, assessment),
                           hardware=hardware, out_dir=out_dir, data_path=evaluation, lock_path=lock_path)
    write_stamp(out_dir, out_dir.name.removeprefix(f"{artifact.candidate}-"))
    return result


def pool(results: list[BenchmarkResult]) -> BenchmarkResult:
    """One result from an artifact's rounds (pooled samples in round order, p50 spread)."""
    name = f"pooled-{digest([r.samples_path for r in results])}.npy"
    return bench.combine(results, out_path=Path(results[0].samples_path).parent.parent / name)


def run_outputs(artifact: Artifact, *, profile: Profile, assessment: Assessment, evaluation: str | None,
                work_dir: Path, hardware: HardwareFingerprint | None = None) -> str:
    """Run the artifact over the evaluation data (or synthetic inputs) in a fresh process; path of outputs."""
    artifact = with_threads(artifact, threads=profile.hardware.threads)
    folder = outputs_dir(artifact, profile=profile, evaluation=evaluation, hardware=hardware, work_dir=work_dir)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    path = bench.infer(artifact=artifact, signature=_run_signature(artifact, assessment), out_path=folder / "outputs.npz",
                       data_path=evaluation, batch_size=profile.benchmark.batch_size,
                       max_samples=profile.benchmark.max_eval_samples, timeout_s=profile.benchmark.timeout_s)
    write_stamp(folder, folder.name.removeprefix(f"{artifact.candidate}-"), files=["outputs.npz"])
    return str(path)


def audit(outcome: CandidateOutcome, *, outputs: str) -> CandidateOutcome:
    """The outcome, or a failure with reason ``audit`` when the outputs its timed runs produced differ
    from the evaluation run's for the same inputs (MLPerf TEST01)."""
    if outcome.benchmark is None:
        return outcome
    try:
        bench.check_outputs(benchmark=outcome.benchmark, outputs_path=outputs)
    except CandidateFailed as exc:
        return failed(outcome.spec, stage="benchmark", error=exc, artifact=outcome.artifact)
    return outcome


def evaluate(candidate: str, *, outputs: str, baseline_outputs: str, assessment: Assessment,
             evaluation: str | None, max_samples: int) -> EvalResult:
    """Accuracy (with labels) and fidelity against the baseline's outputs on the same samples."""
    labels = None
    if evaluation:
        data = load_dataset(evaluation, signature=signature(assessment), role="evaluation").head(max_samples)
        labels = data.labels
        if assessment.kind == "encoder" and "attention_mask" in data.inputs:
            from edgeopt.evaluate.embedding import evaluate_embeddings

            return evaluate_embeddings(candidate=candidate, outputs=load_outputs(outputs),
                                       baseline_outputs=load_outputs(baseline_outputs),
                                       attention_mask=data.inputs["attention_mask"])
    evaluator = evaluator_for(assessment.kind)
    out, base = load_outputs(outputs), load_outputs(baseline_outputs)
    if assessment.kind == "cnn" and out.ndim == 4 and base.ndim == 4:  # a dense prediction [N, C, H, W]
        out, base = _pixel_rows(out), _pixel_rows(base)
        labels = None if labels is None else labels.reshape(-1)
    return evaluator(candidate=candidate, outputs=out, baseline_outputs=base, labels=labels)


def _pixel_rows(arr):
    """``[N, C, H, W]`` → ``[N * H * W, C]``: one row per pixel, its classes last, so top-1 is per pixel over the
    channel axis (as ``edgeopt.bench.worker`` writes outputs of per-sample images of varying size)."""
    import numpy as np

    return np.moveaxis(arr, 1, -1).reshape(-1, arr.shape[1])


def failed(spec: CandidateSpec, *, stage: str, error: CandidateFailed, artifact: Artifact | None = None) -> CandidateOutcome:
    return CandidateOutcome(spec=spec, artifact=artifact,
                            failure=Failure(stage=stage, reason=error.reason, message=str(error),
                                            evidence=getattr(error, "evidence", ())))


def with_gates(outcomes: list[CandidateOutcome], *, profile: Profile, kind: str,
               baselines: dict[str, str] | None = None, run_to_run_sd: float = 0.0,
               earlier: dict[str, list[tuple[float, float]]] | None = None) -> list[CandidateOutcome]:
    """Apply the profile's gates for this ``kind`` of model to every successful candidate against its
    like-for-like baseline (``baselines``: candidate name -> baseline variant name; default: the
    first baseline outcome). A candidate whose baseline failed is left without verdicts.
    ``run_to_run_sd``: this host's run-to-run spread of log speed-up (``edgeopt.reproducibility``);
    ``earlier``: candidate name -> (log speed-up, own sd) of its comparison in earlier runs (``earlier_speedups``)."""
    kind_gates = profile.gates_for(kind)
    gated = []
    for o in outcomes:
        base = _baseline_of(o, outcomes, baselines)
        if o.spec.baseline or not base.ok:
            gated.append(o)
            continue
        gated.append(gates.outcome_with_gates(o, baseline=base, gates=kind_gates, budgets=profile.budgets,
                                              run_to_run_sd=run_to_run_sd,
                                              earlier_speedups=(earlier or {}).get(o.name, ())))
    return gated


def host_spread(*, profile: Profile, hardware: HardwareFingerprint, data_dir: Path,
                kind: str = "") -> reproducibility.Spread:
    """This host's run-to-run spread of speed-ups: the profile's prior, pooled with the host's history
    (``kind="llm"``: of generation speed-ups)."""
    cfg = profile.benchmark
    history = (reproducibility.read_history(reproducibility.history_path(data_dir, hardware, kind=kind))
               if cfg.run_to_run_history else [])
    return reproducibility.estimate(history, prior=cfg.run_to_run_spread)


def _baseline_of(o: CandidateOutcome, outcomes: list[CandidateOutcome],
                 baselines: dict[str, str] | None) -> CandidateOutcome:
    """``o``'s like-for-like baseline outcome: the one ``baselines`` names, else the first baseline."""
    named = (baselines or {}).get(o.name)
    return next((b for b in outcomes if b.name == named), None) or next(b for b in outcomes if b.spec.baseline)


def _comparison(o: CandidateOutcome, baseline: CandidateOutcome, *, artifacts: dict[str, Artifact],
                profile: Profile, kind: str, evaluation: str | None,
                hardware: HardwareFingerprint) -> tuple[str, str] | None:
    """The key of the speed-up comparison ``o`` vs ``baseline`` (both sides as they ran: artifact, runtime,
    benchmark settings, evaluation data, tools, hardware; and the gate's metric) and a digest of this
    measurement of it (both sides' latency samples); None when either side has no artifact."""
    if o.name not in artifacts or baseline.name not in artifacts:
        return None
    metric = gates.speedup_metric(profile.gates_for(kind).speedup_percentile, baseline.name)
    keys = [bench_key(artifacts[n], profile=profile, evaluation=evaluation, hardware=hardware, group="",
                      repeat=0) for n in (o.name, baseline.name)]
    samples = [x.benchmark.samples_path if x.benchmark else None for x in (o, baseline)]
    measured = digest(*[file_sha256(Path(p)) if p and Path(p).is_file() else None for p in samples])
    return digest(metric, *keys), measured


def earlier_speedups(outcomes: list[CandidateOutcome], *, artifacts: dict[str, Artifact], run: str,
                     profile: Profile, kind: str, baselines: dict[str, str] | None, evaluation: str | None,
                     hardware: HardwareFingerprint, data_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """For each measured candidate, the log speed-ups of the same comparison in earlier runs on this
    host (``edgeopt.reproducibility.earlier_runs``), to pool with this run's in its verdict; empty when
    the profile keeps no history."""
    if not profile.benchmark.run_to_run_history:
        return {}
    history = reproducibility.read_history(reproducibility.history_path(data_dir, hardware))
    if not history:
        return {}
    out: dict[str, list[tuple[float, float]]] = {}
    for o in outcomes:
        base = _baseline_of(o, outcomes, baselines)
        if o.spec.baseline or base is None or not (o.ok and base.ok):
            continue
        found = _comparison(o, base, artifacts=artifacts, profile=profile, kind=kind, evaluation=evaluation,
                            hardware=hardware)
        if found is not None:
            earlier = reproducibility.earlier_runs(history, found[0], run=run, measurement=found[1])
            if earlier:
                out[o.name] = earlier
    return out


def record_speedups(outcomes: list[CandidateOutcome], *, artifacts: dict[str, Artifact], fresh: set[str],
                    run: str, profile: Profile, kind: str, evaluation: str | None, hardware: HardwareFingerprint,
                    data_dir: Path) -> int:
    """Append the gated speed-ups of this run's freshly measured comparisons to the host's history.

    A comparison is keyed by both sides as they ran (artifact, runtime, benchmark settings, evaluation
    data, tools) and the gate's metric (its percentile); one served from the cache is not recorded again.
    Each line carries this run's own ratio and the standard deviation of its own interval (neither floored
    nor pooled), and a digest of the measurement.
    """
    ratios, measurements, sds = {}, {}, {}
    by_name = {o.name: o for o in outcomes}
    for o in outcomes:
        v = next((v for v in o.verdicts if v.gate == "speedup"), None)
        if v is None or o.baseline is None or not ({o.name, o.baseline} <= fresh) or o.baseline not in by_name:
            continue
        found = _comparison(o, by_name[o.baseline], artifacts=artifacts, profile=profile, kind=kind,
                            evaluation=evaluation, hardware=hardware)
        if found is not None:
            ratios[found[0]], measurements[found[0]] = v.measured, found[1]
            g = profile.gates_for(kind)  # this run's own interval, before any floor or pooling
            own = gates.speedup_interval(candidate_bench=o.benchmark, baseline_bench=by_name[o.baseline].benchmark,
                                         percentile=g.speedup_percentile, confidence=g.confidence)
            sds[found[0]] = reproducibility.own_sd(own)
    return reproducibility.record(reproducibility.history_path(data_dir, hardware), run=run, ratios=ratios,
                                  measurements=measurements, sds=sds)


def select(outcomes: list[CandidateOutcome], *, profile: Profile) -> Selection:
    return pareto.select(outcomes, objective=profile.objective)

