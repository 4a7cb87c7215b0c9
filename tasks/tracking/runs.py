"""MLflow runs of the optimize flow (part of ``tasks.tracking``, the only code that talks to MLflow).

One parent run per flow run; one nested run per candidate, attached through the explicit
``mlflow.parentRunId`` tag (the fluent API's active run is per thread, and tasks run in a pool);
the selected candidate becomes a registered model version with the alias ``candidate``.
Every call uses an explicit ``MlflowClient`` and run id, never the fluent active run.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from edgeopt.records import Assessment, CandidateOutcome, HardwareFingerprint, Selection
from edgeopt.settings import mlflow_artifact_root, mlflow_tracking_uri

log = logging.getLogger(__name__)

CANDIDATE_ALIAS = "candidate"


def _transient(_task: Any, _run: Any, state: Any) -> bool:
    """Retry MLflow calls only for transient store errors (locked database, connection trouble)."""
    try:
        state.result()
    except (ConnectionError, TimeoutError):
        return True
    except Exception as exc:  # noqa: BLE001 - inspect the message of store errors
        text = str(exc).lower()
        return "database is locked" in text or "connection" in text or "temporarily" in text
    return False


def client(data_dir: str):
    return _client_for(mlflow_tracking_uri(Path(data_dir)))


@functools.lru_cache(maxsize=8)
def _client_for(uri: str):
    """One client per store: opening a SQLite store checks its schema, which takes a second."""
    import mlflow

    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return mlflow.MlflowClient(tracking_uri=uri)


def _experiment_id(cl, name: str, data_dir: str) -> str:
    exp = cl.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        root = mlflow_artifact_root(Path(data_dir))
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
    return cl.create_experiment(name, artifact_location=location)


def _flat(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)


def _log_json(cl, run_id: str, name: str, payload: Any, artifact_path: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / name
        p.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
        cl.log_artifact(run_id, str(p), artifact_path)


@task(name="mlflow-start-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=_transient)
def start_parent_run(*, data_dir: str, experiment: str, run_name: str, assessment: Assessment, profile_name: str,
                     profile_doc: dict[str, Any], hardware: HardwareFingerprint, tags: dict[str, str],
                     input_shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[str, str]:
    """Create the parent run; returns (experiment_id, run_id)."""
    from mlflow.entities import Param, RunTag

    cl = client(data_dir)
    exp_id = _experiment_id(cl, experiment, data_dir)
    run = cl.create_run(exp_id, run_name=run_name, tags={"edgeopt.profile": profile_name, **tags})
    params = {
        "model.sha256": assessment.model.sha256,
        "model.path": Path(assessment.model.path).name,
        "model.format": assessment.model.format,
        "model.kind": assessment.kind,
        "model.params": str(assessment.params),
        "model.opset": str(assessment.opset),
        "model.size_bytes": str(assessment.model.size_bytes),
        "model.int8_coverage": str(assessment.int8_coverage),
        "profile": profile_name,
        "hardware.cpu": hardware.cpu_model,
        "hardware.arch": hardware.arch,
        "hardware.cores": str(hardware.cores_logical),
        "hardware.ram_mb": str(hardware.ram_mb),
        "hardware.isa": ",".join(hardware.isa_flags),
        **{f"tool.{k}": v for k, v in hardware.tool_versions.items()},
        # the shapes the inputs ran at, batch included ("scalar" for a 0-d input)
        **{"input_shape." + re.sub(r"[^\w\-. /]", "_", k): "x".join(map(str, v)) or "scalar"
           for k, v in (input_shapes or {}).items()},
    }
    cl.log_batch(run.info.run_id, params=[Param(k, v[:500]) for k, v in params.items()],
                 tags=[RunTag("edgeopt.hostname", hardware.hostname)])
    _log_json(cl, run.info.run_id, "assessment.json", assessment.model_dump(mode="json"))
    _log_json(cl, run.info.run_id, "hardware.json", hardware.model_dump(mode="json"))
    _log_json(cl, run.info.run_id, "profile.json", profile_doc)
    return exp_id, run.info.run_id


def _log_files(o: CandidateOutcome) -> list[Path]:
    """The build log beside the artifact and the benchmark worker's stderr log (non-empty ones)."""
    found = []
    if o.artifact:
        found.append(Path(o.artifact.path).parent / "build.log")
    if o.benchmark and o.benchmark.samples_path:
        # pooled samples sit in the bench folder beside the rounds' folders (<candidate>-<key>/): the
        # newest round's worker log of this candidate stands for them
        folder = Path(o.benchmark.samples_path).parent
        rounds = [*folder.glob(f"{o.name}-*/worker.stderr.log"), folder / "worker.stderr.log"]
        found += sorted((p for p in rounds if p.is_file()), key=lambda p: p.stat().st_mtime)[-1:]
    return [p for p in found if p.is_file() and p.stat().st_size]


def _metrics(o: CandidateOutcome) -> dict[str, float]:
    m: dict[str, float] = {}
    if o.benchmark:
        b = o.benchmark
        for field in ("latency_ms_p50", "latency_ms_p90", "latency_ms_p95", "latency_ms_p99", "latency_ms_mean",
                      "latency_ms_std", "latency_ms_min", "latency_ms_max", "throughput_per_s", "rss_peak_mb",
                      "rss_steady_mb", "rss_steady_file_mb", "rss_peak_model_mb", "load_time_ms", "size_bytes",
                      "duration_s"):
            m[field] = float(getattr(b, field))
        if b.audit_repeat_ratio is not None:
            m["audit_repeat_ratio"] = b.audit_repeat_ratio
        m["latency_samples"] = float(b.samples)
        m["latency_repeats"] = float(b.repeats)
        m["latency_p50_spread_pct"] = b.latency_p50_spread_pct
        if b.seq_len_mean is not None:
            m["seq_len_mean"] = b.seq_len_mean
    m |= _llm_metrics(o)
    if o.evaluation and o.generation is None:  # a language model's scores are in _llm_metrics
        e = o.evaluation
        m[e.metric] = e.value
        m[f"{e.metric}_baseline"] = e.baseline
        m[f"{e.metric}_delta"] = e.delta
        m.update(top1_agreement=e.top1_agreement, cosine_mean=e.cosine_mean, cosine_min=e.cosine_min,
                 max_abs_error=e.max_abs_error, eval_samples=float(e.samples))
    for name in ("speedup_p50", "speedup_p95", "memory_reduction"):
        if getattr(o, name) is not None:
            m[name] = float(getattr(o, name))
    for v in o.verdicts:  # the interval each ratio's verdict rests on
        if v.ci_low is not None and v.ci_high is not None:
            m[f"{v.gate}_ci_low"], m[f"{v.gate}_ci_high"] = v.ci_low, v.ci_high
        if v.run_to_run_sd is not None:
            m[f"{v.gate}_run_to_run_sd"] = v.run_to_run_sd
        if v.runs_pooled is not None:
            m[f"{v.gate}_runs_pooled"] = float(v.runs_pooled)
        if v.pooled_point is not None:
            m[f"{v.gate}_pooled"] = v.pooled_point
        if v.held_from_run is not None:
            m[f"{v.gate}_held_from_run"] = float(v.held_from_run)
    share = o.artifact.placement.get("target_share") if o.artifact else None
    if isinstance(share, int | float):
        m["placement_target_share"] = float(share)
    return m


@task(name="mlflow-log-candidate", task_run_name="mlflow-{outcome.spec.name}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=2, retry_condition_fn=_transient)
def log_candidate(*, data_dir: str, experiment_id: str, parent_run_id: str, outcome: CandidateOutcome,
                  cached: bool = False) -> str:
    """One nested run per candidate: recipe as params, figures as metrics, verdicts as tags."""
    from mlflow.entities import Metric, Param, RunTag

    cl = client(data_dir)
    spec = outcome.spec
    run = cl.create_run(experiment_id, run_name=spec.name, tags={"mlflow.parentRunId": parent_run_id})
    rid = run.info.run_id
    params = {"backend": spec.backend, "baseline": str(spec.baseline), "sequence": spec.sequence}
    _flat("recipe", spec.recipe, params)
    if outcome.artifact:
        params["precision"] = outcome.artifact.precision
        params["artifact.sha256"] = outcome.artifact.sha256
        _flat("runtime", outcome.artifact.runtime, params)
    if outcome.benchmark:
        params["bench.batch_size"] = str(outcome.benchmark.batch_size)
        params["bench.threads"] = str(outcome.benchmark.threads)
        params["bench.inter_op_threads"] = str(outcome.benchmark.inter_op_threads)
        params["bench.memory_source"] = outcome.benchmark.memory_source or "unknown"
    if outcome.baseline:
        params["compared_with"] = outcome.baseline
    tags = {"edgeopt.candidate": spec.name, "edgeopt.cached": str(cached).lower()}
    if outcome.failure:
        tags.update({"edgeopt.status": "failed", "edgeopt.failure.stage": outcome.failure.stage,
                     "edgeopt.failure.reason": outcome.failure.reason,
                     "edgeopt.failure.message": outcome.failure.message[:4000]})
    elif spec.baseline:
        tags["edgeopt.status"] = "baseline"
    else:
        tags["edgeopt.status"] = "passed" if outcome.passed else ("uncertain" if outcome.uncertain else "rejected")
    if outcome.generation and outcome.generation.not_representative:
        tags["edgeopt.speed.not_representative"] = outcome.generation.not_representative[:4000]
    for v in outcome.verdicts:
        tags[f"gate.{v.gate}"] = v.describe()
        tags[f"gate.{v.gate}.status"] = v.status
    if outcome.artifact and outcome.artifact.placement:
        tags["edgeopt.placement"] = "; ".join(n for n in outcome.artifact.notes
                                              if n.startswith(("placement:", "compiled for", "FALLBACK")))[:4000]
    cl.log_batch(rid, metrics=[Metric(k, v, 0, 0) for k, v in _metrics(outcome).items()],
                 params=[Param(k, str(v)[:500]) for k, v in params.items()],
                 tags=[RunTag(k, v) for k, v in tags.items()])
    if outcome.artifact and Path(outcome.artifact.path).exists():
        p = Path(outcome.artifact.path)
        if p.is_dir():
            cl.log_artifacts(rid, str(p), "model")
        else:
            cl.log_artifact(rid, str(p), "model")
        _log_json(cl, rid, "artifact.json", outcome.artifact.model_dump(mode="json"), "model")
    evidence = (outcome.artifact.evidence if outcome.artifact else ()) + (outcome.failure.evidence if outcome.failure else ())
    for path in dict.fromkeys(evidence):  # a toolchain's config and log: how the artifact was (not) made
        if Path(path).is_file():
            cl.log_artifact(rid, path, "build")
    if outcome.benchmark and outcome.benchmark.samples_path and Path(outcome.benchmark.samples_path).exists():
        cl.log_artifact(rid, outcome.benchmark.samples_path, "latency")
    for log_file in _log_files(outcome):  # native runtime logs of the build and the benchmark workers
        cl.log_artifact(rid, str(log_file), "logs")
    _log_json(cl, rid, "outcome.json", outcome.model_dump(mode="json"))
    cl.set_terminated(rid, "FAILED" if outcome.failure else "FINISHED")
    return rid


def signature_tags(assessment: Assessment | None) -> dict[str, str]:
    """The model's input/output signature as version tags (JSON lists of name, dtype, shape; dynamic dims
    by their symbol) and the shapes it was measured at."""
    if assessment is None:
        return {}

    def spec(ts) -> str:
        return json.dumps([{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in ts])[:5000]

    tags = {"signature.inputs": spec(assessment.inputs), "signature.outputs": spec(assessment.outputs)}
    if assessment.input_shapes:
        tags["signature.measured_shapes"] = json.dumps({k: list(v) for k, v in assessment.input_shapes.items()})[:5000]
    return tags


@task(name="mlflow-register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=_transient)
def register_selected(*, data_dir: str, model_name: str, run_id: str, outcome: CandidateOutcome,
                      selection: Selection, assessment: Assessment | None = None) -> str:
    """Register the selected candidate's model as a new version with alias ``candidate``, its verdicts and
    the model's input/output signature (``signature_tags``) as tags.

    The optimize flow calls this last. A version created here whose alias then cannot be set is
    deleted again, so a failure leaves no new version behind.
    """
    from mlflow.exceptions import MlflowException

    cl = client(data_dir)
    try:
        cl.get_registered_model(model_name)
    except MlflowException:
        cl.create_registered_model(model_name, description="edgeopt-selected edge artifacts")
    sha = outcome.artifact.sha256 if outcome.artifact else None
    if sha:  # the same artifact selected again: point the alias at its existing version
        for existing in cl.search_model_versions(f"name = '{model_name}'"):
            if existing.tags.get("artifact.sha256") == sha:
                cl.set_registered_model_alias(model_name, CANDIDATE_ALIAS, existing.version)
                return str(existing.version)
    source = f"{cl.get_run(run_id).info.artifact_uri}/model"
    tags = {"edgeopt.candidate": outcome.spec.name, "edgeopt.backend": outcome.spec.backend,
            **{f"gate.{v.gate}": v.describe() for v in outcome.verdicts}, **signature_tags(assessment)}
    if outcome.baseline:
        tags["edgeopt.compared_with"] = outcome.baseline
    if outcome.artifact:
        tags["artifact.sha256"] = outcome.artifact.sha256
        tags["precision"] = outcome.artifact.precision
    mv = cl.create_model_version(model_name, source, run_id=run_id, tags=tags, description=selection.message)
    try:
        cl.set_registered_model_alias(model_name, CANDIDATE_ALIAS, mv.version)
    except Exception:
        cl.delete_model_version(model_name, mv.version)
        raise
    return str(mv.version)


@task(name="mlflow-record-selection", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      retry_condition_fn=_transient)
def record_selection(*, data_dir: str, run_id: str, selection: Selection, report_md: str | None = None,
                     outcomes: list[CandidateOutcome] | None = None) -> None:
    """The selection (tags + selection.json), the Markdown report (artifact, and the run's description in
    the MLflow UI) and the selected candidate's figures as the parent run's metrics (``selected_*``)."""
    from mlflow.entities import Metric, RunTag

    cl = client(data_dir)
    _log_json(cl, run_id, "selection.json", selection.model_dump(mode="json"))
    if report_md:
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "report.md"
            p.write_text(report_md, encoding="utf-8")
            cl.log_artifact(run_id, str(p))
    chosen = next((o for o in outcomes or [] if o.name == selection.selected), None)
    now = int(time.time() * 1000)
    metrics = [Metric(f"selected_{k}", float(v), now, 0) for k, v in _selected_figures(chosen).items()]
    metrics += [Metric("candidates_passing", float(len(selection.passing)), now, 0)]
    if outcomes is not None:
        metrics.append(Metric("candidates_measured", float(sum(1 for o in outcomes if o.benchmark)), now, 0))
    note = report_md if report_md else selection.message
    cl.log_batch(run_id, metrics=metrics, tags=[RunTag("edgeopt.selected", selection.selected or "none"),
                                                RunTag("edgeopt.selection", selection.message[:4000]),
                                                RunTag("mlflow.note.content", note[:20000])])


#: a language model's headline figures, also the parent run's ``selected_*`` metrics
_LLM_HEADLINE = ("gen_tps", "prompt_tps", "ttft_ms", "rss_peak_mb", "perplexity", "kld_mean", "top1_agreement")


def _llm_metrics(o: CandidateOutcome) -> dict[str, float]:
    """A language model's generation benchmark and scores against the F16 reference (NaN kept: a gate failed on it)."""
    m: dict[str, float] = {}
    g, e = o.generation, o.llm_eval
    if g is not None:
        for field in ("prompt_tps", "gen_tps", "ttft_ms", "token_ms_p50", "token_ms_p95", "token_ms_p99",
                      "rss_peak_mb", "rss_model_mb", "load_time_ms", "size_bytes"):
            m[field] = float(getattr(g, field))
        m |= {"prompt_tokens": float(g.prompt_tokens), "gen_tokens": float(g.gen_tokens),
              "threads": float(g.threads), "gen_runs": float(len(g.gen_tps_rounds)),
              "speed_representative": 0.0 if g.not_representative else 1.0}
        if g.bandwidth_fraction is not None:
            m |= {"bandwidth_fraction": float(g.bandwidth_fraction), "bandwidth_gbps": float(g.bandwidth_gbps),
                  "bytes_per_token": float(g.bytes_per_token)}
        if g.kv_cache_mb is not None:
            m |= {"kv_cache_mb": float(g.kv_cache_mb), "kv_cache_bytes_per_token": float(g.kv_cache_bytes_per_token),
                  "kv_context_tokens": float(g.kv_context_tokens)}
        if o.speedup_p50 is not None:
            m["generation_speedup"] = float(o.speedup_p50)
    if e is not None:
        m |= {"perplexity": e.perplexity, "perplexity_baseline": e.baseline_perplexity, "kld_mean": e.kld_mean,
              "kld_p99": e.kld_p99, "kld_max": e.kld_max, "top1_agreement": e.top1_agreement,
              "eval_tokens": float(e.tokens)}
    return m


def _selected_figures(o: CandidateOutcome | None) -> dict[str, float]:
    """The selected candidate's headline figures (finite ones only)."""
    if o is None:
        return {}
    b, e = o.benchmark, o.evaluation
    figures = {"speedup_p50": o.speedup_p50, "speedup_p95": o.speedup_p95, "memory_reduction": o.memory_reduction}
    if b is not None:
        figures |= {"latency_ms_p50": b.latency_ms_p50, "latency_ms_p95": b.latency_ms_p95,
                    "rss_steady_mb": b.rss_steady_mb, "size_mb": b.size_bytes / 1e6}
    if e is not None:
        figures |= {"accuracy": e.value, "accuracy_baseline": e.baseline}
    if o.generation is not None:
        figures |= {k: v for k, v in _llm_metrics(o).items() if k in _LLM_HEADLINE}
        figures["size_mb"] = o.generation.size_bytes / 1e6
    return {k: float(v) for k, v in figures.items() if v is not None and math.isfinite(v)}


@task(name="mlflow-end-run", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2, retry_condition_fn=_transient)
def end_parent_run(*, data_dir: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the parent run FINISHED (or FAILED)."""
    client(data_dir).set_terminated(run_id, status)


def run_url(*, experiment_id: str, run_id: str, data_dir: str) -> str:
    """Where to see the run: the tracking server's page, or the local UI's (``make mlflow-ui``)."""
    uri = mlflow_tracking_uri(Path(data_dir))
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
