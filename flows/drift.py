"""The drift flow: has production data moved away from the calibration data?

A sample of production inputs (the same data format as the calibration data: an ``.npz`` of model
inputs, or sentences for a text model) is compared with the calibration data input by input
(``edgeopt.drift``: per-feature PSI and Kolmogorov–Smirnov; for token inputs, the FP32 model's
embeddings and their shift). The verdict and figures go to MLflow (a run ``drift`` in the model's
experiment). Over the threshold the flow emits the Prefect event ``edgeopt.drift.detected`` for the
model; the automation ``edgeopt-drift-reoptimize`` (``deployments/``) starts the nightly deployment
with the production sample as calibration data. With the embedded API there are no automations, so
``reoptimize`` runs the nightly flow here instead (never both: with a Prefect server configured the
flow only emits the event).
"""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL
from pydantic import BaseModel, ConfigDict

from edgeopt import settings, workflow
from flows._names import by_profile
from flows._pools import POOL_ENV, refuse_wrong_host
from flows.nightly import NightlyReport, nightly_flow
from flows.optimize import _default_model_name
from tasks.nightly import drift_task
from tasks.phases import (
    build_task,
    fingerprint_task,
    load_profile_task,
    prepare_data_task,
    prepare_model_task,
)
from tasks.tracking.nightly import record_drift

DRIFT_EVENT = "edgeopt.drift.detected"


class DriftResult(BaseModel):
    """What the drift flow returns (and the CLI prints)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str
    drifted: bool
    summary: str
    metrics: dict[str, float]
    mlflow_run_id: str
    event: str | None = None
    nightly: NightlyReport | None = None


@flow(name="drift", flow_run_name=by_profile("drift"))
def drift_flow(
    production: str,
    calibration: str,
    model: str,
    profile: str = "intel-cpu",
    model_name: str | None = None,
    evaluation: str | None = None,
    psi_threshold: float = 0.2,
    ks_pvalue: float = 0.01,
    data_dir: str | None = None,
    reoptimize: bool = True,
) -> DriftResult:
    """Compare a sample of production inputs with the calibration data; on drift, re-optimize on it.

    Args:
        production: a sample of production inputs (.npz of model inputs, or .txt/.jsonl sentences).
        calibration: the calibration data the model was optimized with (same format).
        model: path to the model on the worker (.onnx file or Hugging Face checkpoint folder).
        profile: target profile name or YAML path (for re-optimization and the text sequence length).
        model_name: registered model name in MLflow (default: the model's name and the profile's, as in
            ``digits-resnet-intel-cpu``).
        evaluation: evaluation data for the re-optimization.
        psi_threshold: mean PSI of an input above this is drift (0.2: a significant shift).
        ks_pvalue: family-wise level of the per-feature Kolmogorov-Smirnov tests (Bonferroni).
        data_dir: edgeopt data folder (default: $EDGEOPT_HOME or ./.edgeopt).
        reoptimize: on drift, re-optimize with the production sample as calibration data (with a
            Prefect server: through the automation on the emitted event; embedded: here).
    """
    refuse_wrong_host()
    logger = get_run_logger()
    base = Path(data_dir).expanduser().resolve() if data_dir else settings.data_dir()
    work = str(base / "work")
    model = str(Path(model).expanduser().resolve())
    production = str(Path(production).expanduser().resolve())
    calibration = str(Path(calibration).expanduser().resolve())
    prof = load_profile_task(profile)
    name = model_name or _default_model_name(model, prof.name)
    source, assessment = prepare_model_task(model, work)
    seq = prof.benchmark.seq_len
    ref_npz = prepare_data_task(calibration, assessment, seq, work, "calibration")
    prod_npz = prepare_data_task(production, assessment, seq, work, "production")
    baseline = None
    if not any(s.dtype.startswith("float") for s in assessment.inputs):  # token ids: compare embeddings
        spec = prof.baseline.spec(baseline=True)
        baseline = build_task(spec, workflow.build_input(spec, source=source, converted=assessment), None, work,
                              fingerprint_task())
    report = drift_task(assessment.inputs, ref_npz, prod_npz, baseline, work, psi_threshold, ks_pvalue)
    summary = report.summary()
    logger.info("drift check of %s: %s", name, summary)
    rid = record_drift(data_dir=str(base), model_name=name, summary=summary, drifted=report.drifted,
                       metrics=report.metrics(), params={"production": production, "calibration": calibration,
                                                         "psi_threshold": psi_threshold, "ks_pvalue": ks_pvalue},
                       flow_run_id=str(flow_run.id or ""))
    create_markdown_artifact(key=f"drift-{prof.name}".lower(), description=f"Drift check of {name}",
                             markdown=f"# Drift: {name}\n\n**{'drift' if report.drifted else 'no drift'}**: "
                                      f"{summary}\n")
    event, nightly = None, None
    if report.drifted:
        # the automation of the run's pool picks the event up: a deployment's run carries its pool in
        # EDGEOPT_POOL (its profile may be a file of any name); outside a pool, the profile's name
        pool = os.environ.get(POOL_ENV, "").strip() or prof.name
        emit_event(event=DRIFT_EVENT, resource={"prefect.resource.id": f"edgeopt.model.{name}",
                                                "prefect.resource.name": name, "edgeopt.profile": prof.name,
                                                "edgeopt.pool": pool},
                   payload={"model": model, "profile": profile, "model_name": name, "production": production,
                            "calibration": calibration, "evaluation": evaluation or "", "summary": summary})
        event = DRIFT_EVENT
        if reoptimize and not PREFECT_API_URL.value():
            logger.info("drift: re-optimizing %s with the production sample as calibration data", name)
            nightly = nightly_flow(model=model, profile=profile, calibration=production, evaluation=evaluation,
                                   model_name=name, data_dir=str(base))
    return DriftResult(model_name=name, drifted=report.drifted, summary=summary, metrics=report.metrics(),
                       mlflow_run_id=rid, event=event, nightly=nightly)
