"""The nightly re-optimization flow: production only ever moves forward.

1. **Anything changed?** The change digest (``edgeopt.nightly.change_digest``: model, data, profile,
   candidate filter, hardware and tool versions, record schema) is compared with the last completed
   nightly's (an MLflow experiment tag). Unchanged: one MLflow run says so, in seconds.
2. **Optimize** (the optimize flow, as a subflow): builds, measures, gates, selects and registers
   tonight's winner (alias ``candidate``); its builds and measurements are reused from the cache
   where their inputs did not change.
3. **Duel**: the winner (challenger) against the current ``champion``, measured in this run with the
   same harness, interleaved, on the same inputs and thread budget (``edgeopt.nightly.duel``). The
   challenger goes on only when the lower bound of its speed-up interval over the champion clears
   ``1 + min_improvement`` (faster by more than the noise of both) and its accuracy holds.
4. **Certify** (the certify flow, as a subflow), then move ``champion`` (the old one becomes
   ``previous-champion``). A version that fails certification never becomes champion.

Every outcome is one MLflow run ``nightly-<profile>`` with ``nightly.result`` and the reason; the
digest is stored last, so a failed or killed night is re-run in full. A failed nightly run fails its
Prefect flow run, which the automation in ``deployments/`` turns into a notification
(``notify_flow``).
"""

from __future__ import annotations

import re
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict

from edgeopt import settings, workflow
from edgeopt.errors import ConfigError
from flows._names import by_profile
from flows._pools import refuse_wrong_host
from flows.certify import certify_flow
from flows.optimize import _default_model_name, optimize_flow
from tasks import tracking
from tasks.nightly import change_digest_task, duel_task
from tasks.phases import (
    benchmark_slot,
    fingerprint_task,
    host_spread_task,
    load_profile_task,
    prepare_data_task,
    prepare_model_task,
)
from tasks.tracking.nightly import nightly_state, record_nightly

#: ``nightly.result`` values
RESULTS = ("unchanged", "no-winner", "champion-reselected", "champion-kept", "not-certified", "promoted",
           "promotable")


class NightlyReport(BaseModel):
    """What the nightly flow returns (and the CLI prints)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str
    profile: str
    result: str
    reason: str
    digest: str
    champion_before: str | None = None
    challenger: str | None = None
    champion_after: str | None = None
    duel: dict[str, float] = {}
    mlflow_run_id: str | None = None


def _npz_or_none(path: str | None) -> str | None:
    return path if path and path.endswith(".npz") else None


@flow(name="nightly", flow_run_name=by_profile("nightly"))
def nightly_flow(
    model: str,
    profile: str = "intel-cpu",
    calibration: str | None = None,
    evaluation: str | None = None,
    model_name: str | None = None,
    candidates: list[str] | None = None,
    data_dir: str | None = None,
    certify: bool = True,
    soak_s: float = 30.0,
    duel_rounds: int = 3,
    min_improvement: float = 0.0,
) -> NightlyReport:
    """Re-optimize MODEL for PROFILE when anything changed; promote the winner only if it beats the champion.

    Args:
        model: path to the model on the worker: an .onnx file or a Hugging Face checkpoint folder.
        profile: target profile name (profiles/*.yaml) or path to a profile file.
        calibration: calibration data (.npz, or .txt/.jsonl sentences for text models).
        evaluation: evaluation data (.npz with ``labels`` for accuracy, or sentences).
        model_name: registered model name in MLflow (default: the model's name and the profile's, as in
            ``digits-resnet-intel-cpu``).
        candidates: only these candidate names from the profile (default: all).
        data_dir: edgeopt data folder (default: $EDGEOPT_HOME or ./.edgeopt).
        certify: certify a challenger that beats the champion, then move ``champion`` (False: record it
            as promotable and move nothing).
        soak_s: duration of certification's sustained run, seconds (>= 4).
        duel_rounds: interleaved rounds of the challenger-against-champion measurement (>= 2).
        min_improvement: the challenger's speed-up over the champion must clear 1 + this at its lower bound.
    """
    refuse_wrong_host()
    logger = get_run_logger()
    if duel_rounds < 2 or min_improvement < 0 or soak_s < 4:
        raise ConfigError(f"duel_rounds must be >= 2, min_improvement >= 0 and soak_s >= 4; got "
                          f"duel_rounds={duel_rounds}, min_improvement={min_improvement:g}, soak_s={soak_s:g}")
    base = Path(data_dir).expanduser().resolve() if data_dir else settings.data_dir()
    model = str(Path(model).expanduser().resolve())
    # a blank form field (or an automation's empty template) means "none"
    calibration = str(Path(calibration).expanduser().resolve()) if calibration and calibration.strip() else None
    evaluation = str(Path(evaluation).expanduser().resolve()) if evaluation and evaluation.strip() else None
    prof = load_profile_task(profile)
    hw = fingerprint_task()
    name = model_name or _default_model_name(model, prof.name)
    digest = change_digest_task(model, calibration, evaluation, prof.model_dump(mode="json"), candidates, hw)
    before = nightly_state(data_dir=str(base), model_name=name)
    run_id = str(flow_run.id or "")

    def done(result: str, reason: str, *, complete: bool = True, **extra) -> NightlyReport:
        logger.info("nightly %s on %s: %s: %s", name, prof.name, result, reason)
        metrics = extra.pop("duel", {}) or {}
        rid = record_nightly(data_dir=str(base), model_name=name, profile=prof.name, digest=digest, result=result,
                             reason=reason, params={"model": model, "profile": prof.name}, metrics=metrics,
                             flow_run_id=run_id, complete=complete)
        rep = NightlyReport(model_name=name, profile=prof.name, result=result, reason=reason, digest=digest,
                            champion_before=before["champion"], duel=metrics, mlflow_run_id=rid, **extra)
        create_markdown_artifact(key=f"nightly-{prof.name}".lower(), description=f"Nightly {name}",
                                 markdown=f"# Nightly: {name} on {prof.name}\n\n**{result}**: {reason}\n")
        return rep

    if before["digest"] == digest:
        return done("unchanged", f"nothing changed since the last completed nightly run (model, data, profile, "
                    f"candidates, hardware and tools); its result: {before['result']}", complete=False,
                    champion_after=before["champion"])

    opt = optimize_flow(model=model, profile=profile, calibration=calibration, evaluation=evaluation,
                        candidates=candidates, model_name=name, data_dir=str(base))
    if opt.registered_version is None:
        return done("no-winner", opt.selection.message, champion_after=before["champion"])
    challenger = opt.registered_version
    champion = nightly_state(data_dir=str(base), model_name=name)["champion"]
    if champion == challenger:
        return done("champion-reselected", f"tonight's winner is the champion itself (version {champion})",
                    challenger=challenger, champion_after=champion)

    # text data is prepared (tokenized) as the optimize flow did; the duel and certification read the .npz
    _, assessment = prepare_model_task(model, str(base / "work"))
    eval_npz = _npz_or_none(prepare_data_task(evaluation, assessment, prof.benchmark.seq_len, str(base / "work"),
                                              "evaluation"))
    cal_npz = _npz_or_none(prepare_data_task(calibration, assessment, prof.benchmark.seq_len, str(base / "work"),
                                             "calibration"))
    duel_metrics: dict[str, float] = {}
    if champion is not None:
        folder = base / "nightly" / re.sub(r"[^A-Za-z0-9._-]+", "_", name) / (run_id[:8] or "local")
        subjects = {role: tracking.resolve_subject(data_dir=str(base), model_name=name, version=v,
                                                   dest=str(folder / role))
                    for role, v in (("champion", champion), ("challenger", challenger))}
        gates = prof.gates_for(assessment.kind)
        spread = host_spread_task(prof, hw, str(base))
        with benchmark_slot():
            result = duel_task(subjects["champion"], subjects["challenger"], eval_npz, str(folder / "duel"), hw,
                               workflow.bench_settings(prof), prof.hardware.threads, duel_rounds, gates.confidence,
                               spread.sd_log, min_improvement, gates.accuracy_ratio_min)
        duel_metrics = result.metrics()
        if not result.promote:
            return done("champion-kept", f"version {challenger} against champion {champion}: {result.reason()}",
                        challenger=challenger, champion_after=champion, duel=duel_metrics)
        why = f"version {challenger} against champion {champion}: {result.reason()}"
    else:
        why = f"version {challenger} is the first winner (no champion yet)"

    if not certify:
        return done("promotable", f"{why}; certification is off, so champion stays at {champion}",
                    challenger=challenger, champion_after=champion, duel=duel_metrics)
    if eval_npz is None:
        raise ConfigError(f"{name}: certification needs evaluation data; pass evaluation=<.npz or sentences>")
    cert = certify_flow(model_name=name, version=challenger, evaluation=eval_npz, calibration=cal_npz,
                        data_dir=str(base), soak_s=soak_s)
    if not cert.certified:
        failed = "; ".join(f"{c.check}: {c.reason or c.summary}" for c in cert.certification.checks if not c.passed)
        return done("not-certified", f"{why}; certification failed ({failed})",
                    challenger=challenger, champion_after=champion, duel=duel_metrics)
    moved = tracking.approve(data_dir=str(base), model_name=name, version=challenger)
    return done("promoted", f"{why}; certified; champion moved {champion} → {moved['champion']}",
                challenger=challenger, champion_after=moved["champion"], duel=duel_metrics)


@flow(name="notify", flow_run_name="notify-{flow_name}")
def notify_flow(flow_name: str = "nightly", flow_run_id: str = "", state: str = "Failed", message: str = "") -> str:
    """Record a failed (or crashed) flow run where people look: the Prefect UI's artifacts and this log.

    Started by the ``edgeopt-nightly-failed`` automation (deployments/automations.yaml).

    Args:
        flow_name: the flow whose run ended badly.
        flow_run_id: that flow run's id.
        state: its final state name.
        message: its state message.
    """
    text = f"{flow_name} run {flow_run_id} ended {state}: {message or '(no message)'}"
    get_run_logger().error("%s", text)
    create_markdown_artifact(key="edgeopt-notification", description="A nightly run needs attention",
                             markdown=f"# Needs attention\n\n{text}\n")
    return text
