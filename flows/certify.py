"""Certification and cross-validation of a registered model version.

``certify_flow``: every production-readiness check is a task with a verdict and its evidence (data
quality with Great Expectations, accuracy with a bootstrap interval, robustness, stress, soak, power,
provenance with a signed manifest), then one HTML + JSON report, logged to a run nested under the
version's MLflow run and linked from a Prefect artifact. The verdict goes on the version as tags as
the very last step: a failed, partial or killed certification changes nothing on the version, and
the next run starts from an empty folder. ``edgeopt approve`` then moves ``champion``.

``cross_validate_flow``: the artifact on every runtime × device of this host that can load it, its
outputs against the FP32 baseline and each other, its speed-up re-measured in fresh processes,
interleaved with the baseline (``edgeopt.certify.crossval``). With ``pools``, the same flow runs on
each named work pool through its deployment (``run_deployment``) and the matrices are gathered.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict

from edgeopt import settings, workflow
from edgeopt.certify.records import Certification, CheckResult, CrossValidateReport, CrossValidation
from edgeopt.data import load_dataset
from edgeopt.errors import ConfigError, DataError, EdgeOptError
from edgeopt.hardware import fingerprint
from edgeopt.profiles import Profile
from edgeopt.text import is_text_data
from flows._pools import refuse_wrong_host
from tasks import tracking
from tasks.certification import (
    accuracy_task,
    cross_validate_task,
    data_quality_task,
    power_task,
    provenance_task,
    robustness_task,
    soak_task,
    stress_task,
)
from tasks.phases import benchmark_slot, host_spread_task

log = logging.getLogger(__name__)


class CertifyReport(BaseModel):
    """What the certify flow returns (and the CLI prints)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    certification: Certification
    html: str
    json_path: str
    bundle: str
    mlflow_run_id: str

    @property
    def certified(self) -> bool:
        return self.certification.certified


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:100] or "model"


def _data_dir(data_dir: str | None) -> Path:
    return Path(data_dir).expanduser().resolve() if data_dir else settings.data_dir()


def _npz(path: str | None, role: str) -> str | None:
    if path is None:
        return None
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        raise DataError(f"{role} data {path}: certification takes one .npz of the model's inputs; a folder of "
                        "per-sample feeds is not supported by its checks yet (pass an .npz at the optimized shapes)")
    if not p.is_file():
        raise DataError(f"{role} data {path} does not exist; pass the .npz the model was optimized with")
    if is_text_data(p):
        raise DataError(f"{role} data {path}: certification takes the model's inputs as .npz; for a text model "
                        "pass the tokenized .npz that `edgeopt optimize` wrote under .edgeopt/work/data")
    return str(p)


@contextlib.contextmanager
def _version_run(base: Path, subject, flow_name: str, tags: dict[str, str]):
    """A run nested under the version's MLflow run: FINISHED when the body returns, FAILED when it
    raises (a failure to mark it never masks the body's own error)."""
    run_id = tracking.start_version_run(data_dir=str(base), model_name=subject.model_name, version=subject.version,
                                        flow=flow_name, tags=tags)
    try:
        yield run_id
    except BaseException:
        try:
            tracking.finish_run(data_dir=str(base), run_id=run_id, status="FAILED")
        except Exception as exc:  # noqa: BLE001 - the body's error is the one to report
            log.warning("could not mark the MLflow run %s failed: %s", run_id, exc)
        raise
    tracking.finish_run(data_dir=str(base), run_id=run_id, status="FINISHED")


def _table(checks: list[CheckResult]) -> str:
    rows = [f"| {c.check} | {c.status} | {c.summary.replace('|', '/')} |" for c in checks]
    return "\n".join(["| check | verdict | evidence |", "|---|---|---|", *rows])


@flow(name="certify", flow_run_name="certify-{model_name}")
def certify_flow(
    model_name: str,
    version: str | None = None,
    alias: str | None = None,
    evaluation: str | None = None,
    calibration: str | None = None,
    data_dir: str | None = None,
    soak_s: float = 60.0,
    stress_s: float = 10.0,
    callers: int = 4,
    noise_level: float = 0.01,
) -> CertifyReport:
    """Certify a registered version for production on this machine.

    Args:
        model_name: registered model name in MLflow (e.g. digits-resnet-intel-cpu).
        version: the version to certify (or give ``alias``).
        alias: an alias of the version instead (e.g. candidate).
        evaluation: .npz evaluation data (inputs named as the model's; ``labels`` for accuracy).
        calibration: .npz calibration data: the reference for value ranges and distribution shift.
        data_dir: edgeopt data folder (default: $EDGEOPT_HOME or ./.edgeopt).
        soak_s: duration of the sustained run, seconds.
        stress_s: duration of the concurrent-callers run, seconds.
        callers: concurrent callers in the stress run.
        noise_level: input noise of the robustness check, as a fraction of each input's std.
    """
    refuse_wrong_host()
    logger = get_run_logger()
    base = _data_dir(data_dir)
    if soak_s < 4 or stress_s < 1 or callers < 1:
        raise ConfigError(f"soak_s must be >= 4 (a warm-up window and three to compare), stress_s >= 1 and callers "
                          f">= 1; got soak_s={soak_s:g}, stress_s={stress_s:g}, callers={callers}")
    if evaluation is None:
        raise DataError("certification needs evaluation data: pass --eval DATA.npz (the model's inputs, "
                        "with 'labels' for accuracy)")
    evaluation, calibration = _npz(evaluation, "evaluation"), _npz(calibration, "calibration")
    work = base / "certify" / _safe(model_name) / _safe(version or alias or "")
    subject = tracking.resolve_subject(data_dir=str(base), model_name=model_name, version=version, alias=alias,
                                       dest=str(work / "subject"))
    ev = load_dataset(evaluation, signature=subject.signature, role="evaluation")
    cal = load_dataset(calibration, signature=subject.signature, role="calibration") if calibration else None
    hw = fingerprint()
    threads = Profile.model_validate(subject.profile_doc).hardware.threads
    with _version_run(base, subject, "certify", {"edgeopt.evaluation": Path(evaluation).name}) as run_id:
        out = work / "run"
        shutil.rmtree(out, ignore_errors=True)  # a killed run's leftovers never mix with this one's
        dirs = {k: out / k for k in ("data-quality", "accuracy", "robustness", "stress", "soak", "power")}
        for d in dirs.values():
            d.mkdir(parents=True)
        conf = float(subject.gates.get("confidence", 0.95))
        checks = [data_quality_task(subject, ev, cal, str(dirs["data-quality"])),
                  accuracy_task(subject, evaluation, str(dirs["accuracy"]), conf),
                  robustness_task(subject, ev, cal, str(dirs["robustness"]), noise_level)]
        with benchmark_slot():  # timing checks: one measurement at a time on this host, across flows
            checks.append(stress_task(subject, evaluation, str(dirs["stress"]), callers, stress_s, threads))
            soak = soak_task(subject, evaluation, str(dirs["soak"]), soak_s, threads)
        checks += [soak, power_task(soak, str(dirs["power"]))]
        for c in checks:
            logger.info("%s: %s — %s", c.check, c.status, c.summary)
        bundle = out / "bundle"
        prov = provenance_task(subject, hw, str(bundle), str(base / "keys"), checks)
        checks.append(prov)
        cert = Certification(subject=subject, checks=tuple(checks), hardware=hw,
                             created_utc=datetime.now(UTC).isoformat(timespec="seconds"),
                             manifest_sha256=prov.evidence.get("manifest_sha256"))
        html, js = _render(cert, out / "report")
        tracking.log_certification(data_dir=str(base), run_id=run_id, certification=cert,
                                   report_dir=str(out / "report"), bundle_dir=str(bundle) if bundle.is_dir() else None)
        verdict = "CERTIFIED" if cert.certified else f"NOT CERTIFIED (failed: {', '.join(cert.failed_checks)})"
        create_markdown_artifact(markdown=f"## {model_name} version {subject.version}: {verdict}\n\n{_table(checks)}",
                                 key=f"certify-{_safe(model_name)}".lower().replace("_", "-").replace(".", "-"),
                                 description=f"Certification of {model_name} version {subject.version}")
        create_link_artifact(link=tracking.run_url(experiment_id=_experiment(base, run_id), run_id=run_id,
                                                   data_dir=str(base)), link_text="certification report (MLflow)")
        return CertifyReport(certification=cert, html=str(html), json_path=str(js), bundle=str(bundle),
                             mlflow_run_id=run_id)


def _experiment(base: Path, run_id: str) -> str:
    return tracking.client(str(base)).get_run(run_id).info.experiment_id


def _render(cert: Certification, out: Path) -> tuple[Path, Path]:
    """The report, with the stress run's latency samples (single caller) and the soak's time series as charts."""
    import json

    import numpy as np

    from edgeopt.certify import report

    samples, series = None, None
    for c in cert.checks:
        for f in map(Path, c.files):
            if c.check == "stress" and f.name == "stress_latency_ms.npz":
                with np.load(f) as z:
                    key = "concurrent_ms" if "concurrent_ms" in z.files and z["concurrent_ms"].size else "single_ms"
                    samples = z[key].astype(float).ravel().tolist() if key in z.files else None
            elif c.check == "soak" and f.name == "soak_series.json":
                doc = json.loads(f.read_text(encoding="utf-8"))
                series = [{"t_s": w.get("start_s"), "p50_ms": w.get("p50_ms"), "p99_ms": w.get("p99_ms"),
                           "rss_mb": w.get("rss_mb")} for w in doc.get("windows", []) if not w.get("warmup")]
    return report.render(certification=cert, out_dir=out, latency_samples_ms=samples, soak_series=series)


@flow(name="cross-validate", flow_run_name="cross-validate-{model_name}", persist_result=True)
def cross_validate_flow(
    model_name: str,
    version: str | None = None,
    alias: str | None = None,
    evaluation: str | None = None,
    data_dir: str | None = None,
    rounds: int = 3,
    pools: list[str] | None = None,
    timeout_s: float = 3600.0,
) -> CrossValidateReport:
    """Run a registered version on every runtime × device that can load it, here or on ``pools``.

    Args:
        model_name: registered model name in MLflow.
        version: the version (or give ``alias``).
        alias: an alias of the version instead (e.g. candidate).
        evaluation: .npz evaluation data for the output comparisons (default: generated inputs).
        data_dir: edgeopt data folder (default: $EDGEOPT_HOME or ./.edgeopt).
        rounds: interleaved measuring rounds of the baseline and every runtime.
        pools: work pools to fan out to (each through its ``cross-validate/cross-validate-<pool>``
            deployment); default: this host only.
        timeout_s: how long to wait for each pool's run.
    """
    refuse_wrong_host()
    if pools:
        return _fan_out(model_name=model_name, version=version, alias=alias, evaluation=evaluation, rounds=rounds,
                        pools=pools, timeout_s=timeout_s)
    logger = get_run_logger()
    base = _data_dir(data_dir)
    evaluation = _npz(evaluation, "evaluation")
    work = base / "cross-validate" / _safe(model_name) / _safe(version or alias or "")
    subject = tracking.resolve_subject(data_dir=str(base), model_name=model_name, version=version, alias=alias,
                                       dest=str(work / "subject"))
    if evaluation:
        load_dataset(evaluation, signature=subject.signature, role="evaluation")
    prof = Profile.model_validate(subject.profile_doc)
    hw = fingerprint()
    with _version_run(base, subject, "cross-validate", {}) as run_id:
        out = work / "run"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        cosine_min = subject.gates.get("cosine_min") or 0.99
        spread = host_spread_task(prof, hw, str(base))
        with benchmark_slot():  # one measurement at a time on this host, across flows
            cv = cross_validate_task(subject, evaluation, str(out), hw, workflow.bench_settings(prof), rounds,
                                     float(subject.gates.get("confidence", 0.95)), float(cosine_min),
                                     prof.hardware.threads, str(base / "work" / "bench.lock"), spread.sd_log)
        logger.info("cross-validation of %s version %s: %s", model_name, subject.version, cv.verdict)
        tracking.log_cross_validation(data_dir=str(base), run_id=run_id, cv=cv, out_dir=str(out))
        from edgeopt.certify import crossval

        rows = crossval.matrix_rows(cv)
        if rows:
            create_table_artifact(table=rows, key=f"cross-validate-{_safe(model_name)}".lower().replace("_", "-")
                                  .replace(".", "-"), description=f"{model_name} version {subject.version}: "
                                  f"{cv.verdict}. {cv.summary}"[:4000])
        return CrossValidateReport(matrices=(cv,), mlflow_run_id=run_id)


def _fan_out(*, model_name, version, alias, evaluation, rounds, pools, timeout_s) -> CrossValidateReport:
    """One run per pool through its deployment, all started at once; the matrices of those that finished.

    Each pool's run returns its report through Prefect's result storage (``persist_result``): the
    caller and the workers must share it (one host: the same ``PREFECT_HOME``; several hosts: a
    shared result storage block, e.g. S3, as ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``).
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise ConfigError("cross-validating on work pools needs a Prefect server with workers on them: set "
                          "PREFECT_API_URL (see deployments/README.md), or leave out --pool to run here")
    logger = get_run_logger()
    started = {}
    for pool in pools:
        try:
            started[pool] = run_deployment(name=f"cross-validate/cross-validate-{pool}", timeout=0, parameters={
                "model_name": model_name, "version": version, "alias": alias, "evaluation": evaluation,
                "rounds": rounds})
        except Exception as exc:
            raise ConfigError(f"no deployment 'cross-validate/cross-validate-{pool}' to run on pool {pool} "
                              f"({type(exc).__name__}: {str(exc)[:200]}); deploy it (prefect deploy --all)") from exc
        logger.info("cross-validation on pool %s: flow run %s", pool, started[pool].id)
    matrices: list[CrossValidation] = []
    failed: list[str] = []
    deadline = time.monotonic() + timeout_s
    for pool, run in started.items():
        with get_client(sync_client=True) as client:
            done = client.read_flow_run(run.id)
            while not (done.state and done.state.is_final()) and time.monotonic() < deadline:
                time.sleep(5)
                done = client.read_flow_run(run.id)
        if done.state is None or not done.state.is_completed():
            failed.append(f"{pool} ({done.state.name if done.state else 'no state'})")
            continue
        matrices.extend(done.state.result().matrices)
    if failed:
        logger.warning("cross-validation did not complete on: %s", ", ".join(failed))
    if not matrices:
        raise EdgeOptError(f"cross-validation did not complete on any pool ({', '.join(failed)})")
    return CrossValidateReport(matrices=tuple(matrices))
