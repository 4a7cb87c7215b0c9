"""Registered versions as certification subjects; certification and cross-validation runs; the
``champion`` lifecycle (part of ``tasks.tracking``, the only code that talks to MLflow).

A registered version (made by the optimize flow, alias ``candidate``) points at its candidate's run:
``model/`` holds the artifact and ``artifact.json``; the sibling run named by ``compared_with`` holds
the FP32 baseline it was gated against; the parent run holds ``assessment.json`` and ``profile.json``.
``resolve_subject`` downloads both models and refuses them when a digest differs from the one
recorded at registration.

Certification and cross-validation each get a run nested under the version's run. Their results
go on the version as tags only at the very end (``log_certification``), so an interrupted or failed
run leaves the version as it was. ``approve`` moves ``champion`` only to a certified version and
keeps the one it replaces as ``previous-champion``; ``rollback`` swaps the two.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from edgeopt.certify.records import Certification, CrossValidation, Subject
from edgeopt.data import path_sha256
from edgeopt.errors import RegistryError
from edgeopt.input_shapes import registered_signature
from edgeopt.profiles import Profile
from edgeopt.records import Artifact, Assessment
from tasks.tracking.runs import _transient, client

CHAMPION_ALIAS = "champion"
PREVIOUS_ALIAS = "previous-champion"
#: version tag: ``certified`` or ``not-certified`` (absent: never certified to the end)
CERTIFICATION_TAG = "certification.status"

_RETRY = {"retries": 2, "retry_delay_seconds": 2, "retry_condition_fn": _transient}


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def _model(cl, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return cl.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in cl.search_registered_models())
        raise RegistryError(f"no registered model named {name!r} "
                            f"(registered: {', '.join(known) or 'none'}; `edgeopt optimize` registers one)") from None


def version_of(cl, name: str, *, version: str | None = None, alias: str | None = None):
    """The model version by number or alias; one line naming what exists when it does not."""
    from mlflow.exceptions import MlflowException

    _model(cl, name)
    if version is None and alias is None:
        raise RegistryError(f"say which version of {name!r}: --version N or --alias NAME")
    versions = sorted(int(v.version) for v in cl.search_model_versions(f"name = '{name}'"))
    try:
        if version is not None:
            return cl.get_model_version(name, str(version))
        return cl.get_model_version_by_alias(name, alias)
    except MlflowException:
        what = f"version {version}" if version is not None else f"alias {alias!r}"
        raise RegistryError(f"model {name!r} has no {what} "
                            f"(versions: {', '.join(map(str, versions)) or 'none'})") from None


def _download(cl, run_id: str, path: str, dest: Path, *, what: str) -> Path:
    try:
        return Path(cl.download_artifacts(run_id, path, str(dest)))
    except Exception as exc:  # noqa: BLE001 - any store error means the files are not there
        raise RegistryError(f"the files of {what} are gone from the artifact store ({_short(exc)}); "
                            "re-run `edgeopt optimize` to register it again") from None


def _local_artifact(cl, run_id: str, dest: Path, *, what: str, expected_sha: str | None) -> Artifact:
    """The run's ``model/`` as a local artifact whose digest matches the one recorded for it."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        folder = _download(cl, run_id, "model", Path(tmp), what=what)
        meta = folder / "artifact.json"
        if not meta.is_file():
            raise RegistryError(f"{what} has no artifact.json in its run's model/ folder: it was not registered "
                                "by edgeopt, or its files were changed")
        art = Artifact.model_validate(json.loads(meta.read_text(encoding="utf-8")))
        meta.unlink()
        name = Path(art.path).name
        if not (folder / name).is_file() and not any(folder.iterdir()):
            raise RegistryError(f"the files of {what} are gone from the artifact store (its run's model/ folder "
                                "holds only artifact.json); re-run `edgeopt optimize` to register it again")
        target = dest / name
        dest.mkdir(parents=True, exist_ok=True)
        if (folder / name).is_file():  # a single model file
            shutil.move(str(folder / name), target)
        else:  # a model folder (an OpenVINO IR): its files were logged directly under model/
            shutil.move(str(folder), target)
    sha = path_sha256(target)
    for recorded in {art.sha256, expected_sha} - {None}:
        if sha != recorded:
            raise RegistryError(f"{what}: its files changed since registration (sha256 {sha[:12]}... where "
                                f"{recorded[:12]}... was recorded); refusing to use them")
    return art.model_copy(update={"path": str(target)})


def _run_json(cl, run_id: str, name: str, dest: Path, *, what: str) -> Any:
    return json.loads(_download(cl, run_id, name, dest, what=what).read_text(encoding="utf-8"))


@task(name="mlflow-resolve-version", cache_policy=NO_CACHE, **_RETRY)
def resolve_subject(*, data_dir: str, model_name: str, dest: str, version: str | None = None,
                    alias: str | None = None) -> Subject:
    """Download a registered version and its baseline into ``dest`` (emptied first) and describe them."""
    cl = client(data_dir)
    mv = version_of(cl, model_name, version=version, alias=alias)
    what = f"{model_name} version {mv.version}"
    run = cl.get_run(mv.run_id)
    parent = run.data.tags.get("mlflow.parentRunId")
    if not parent:
        raise RegistryError(f"{what} was not registered by `edgeopt optimize` (its run has no parent run)")
    out = Path(dest)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    artifact = _local_artifact(cl, run.info.run_id, out / "artifact", what=what,
                               expected_sha=mv.tags.get("artifact.sha256"))
    base_name = run.data.params.get("compared_with") or mv.tags.get("edgeopt.compared_with") or "baseline-fp32"
    found = cl.search_runs([run.info.experiment_id], max_results=1, filter_string=(
        f"tags.mlflow.parentRunId = '{parent}' and tags.`edgeopt.candidate` = '{base_name}'"))
    if not found:
        raise RegistryError(f"{what}: the run of its baseline {base_name} is gone; re-run `edgeopt optimize`")
    baseline = _local_artifact(cl, found[0].info.run_id, out / "baseline", what=f"the baseline of {what}",
                               expected_sha=None)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        assessment = Assessment.model_validate(_run_json(cl, parent, "assessment.json", Path(tmp), what=what))
        profile = Profile.model_validate(_run_json(cl, parent, "profile.json", Path(tmp), what=what))
    p = cl.get_run(parent).data.params
    return Subject(
        model_name=model_name, version=str(mv.version), artifact=artifact, baseline=baseline,
        # at the shapes it was optimized at (stored with the version: its artifact's runtime, the run's assessment)
        signature=registered_signature(assessment.inputs, runtime=artifact.runtime, input_shapes=assessment.input_shapes,
                                       per_sample_inputs=assessment.per_sample_inputs),
        kind=assessment.kind, profile=profile.name,
        profile_doc=profile.model_dump(mode="json"),
        gates=profile.gates_for(assessment.kind).model_dump(mode="json"),
        recorded={k: float(v) for k, v in run.data.metrics.items()},
        recorded_hardware={"cpu": p.get("hardware.cpu", ""), "arch": p.get("hardware.arch", ""),
                           "isa": p.get("hardware.isa", "")})


@task(name="mlflow-start-version-run", cache_policy=NO_CACHE, **_RETRY)
def start_version_run(*, data_dir: str, model_name: str, version: str, flow: str, tags: dict[str, str]) -> str:
    """A run nested under the version's own run, for one certification or cross-validation."""
    cl = client(data_dir)
    mv = version_of(cl, model_name, version=version)
    parent = cl.get_run(mv.run_id)
    run = cl.create_run(parent.info.experiment_id, run_name=f"{flow}-v{version}", tags={
        "mlflow.parentRunId": mv.run_id, "edgeopt.flow": flow, "edgeopt.model": model_name,
        "edgeopt.version": str(version), **tags})
    return run.info.run_id


@task(name="mlflow-end-version-run", cache_policy=NO_CACHE, **_RETRY)
def finish_run(*, data_dir: str, run_id: str, status: str) -> None:
    client(data_dir).set_terminated(run_id, status)


def _log_folder(cl, run_id: str, folder: Path, artifact_path: str) -> None:
    if folder.is_dir() and any(folder.iterdir()):
        cl.log_artifacts(run_id, str(folder), artifact_path)


@task(name="mlflow-log-certification", cache_policy=NO_CACHE, **_RETRY)
def log_certification(*, data_dir: str, run_id: str, certification: Certification, report_dir: str,
                      bundle_dir: str | None) -> None:
    """The report and evidence on the certification run, the signed bundle beside them, then (last)
    the verdict as tags on the version."""
    from mlflow.entities import Metric, RunTag

    cl = client(data_dir)
    s = certification.subject
    _log_folder(cl, run_id, Path(report_dir), "report")
    if bundle_dir:
        _log_folder(cl, run_id, Path(bundle_dir), "bundle")
    metrics = [Metric(f"check.{c.check}.duration_s", float(c.duration_s), 0, 0)
               for c in certification.checks if math.isfinite(c.duration_s)]
    tags = [RunTag(f"check.{c.check}", c.status) for c in certification.checks]
    tags.append(RunTag("certification.certified", str(certification.certified).lower()))
    cl.log_batch(run_id, metrics=metrics, tags=tags)
    status = "certified" if certification.certified else "not-certified"
    version_tags = {
        CERTIFICATION_TAG: status,
        "certification.run_id": run_id,
        "certification.time": certification.created_utc,
        "certification.failed": ",".join(certification.failed_checks) or "none",
        "certification.artifact_sha256": s.artifact.sha256,
        "certification.manifest_sha256": certification.manifest_sha256 or "",
        "certification.hardware": certification.hardware.cpu_model,
    }
    for k, v in version_tags.items():
        cl.set_model_version_tag(s.model_name, s.version, k, v)


@task(name="mlflow-log-cross-validation", cache_policy=NO_CACHE, **_RETRY)
def log_cross_validation(*, data_dir: str, run_id: str, cv: CrossValidation, out_dir: str) -> None:
    """The matrix on the cross-validation run, its verdict as tags on the run and the version."""
    from mlflow.entities import Metric, RunTag

    cl = client(data_dir)
    _log_folder(cl, run_id, Path(out_dir), "cross-validation")
    metrics = []
    for c in cv.cells:
        key = f"{c.runtime}.{c.device}".replace("/", "_")
        for name in ("latency_ms_p50", "speedup_p50", "cosine_vs_baseline", "top1_vs_baseline"):
            v = float(getattr(c, name))
            if math.isfinite(v):
                metrics.append(Metric(f"{key}.{name}", v, 0, 0))
    cl.log_batch(run_id, metrics=metrics, tags=[RunTag("crossval.verdict", cv.verdict)])
    s = cv.subject
    cl.set_model_version_tag(s.model_name, s.version, "crossval.verdict", cv.verdict)
    cl.set_model_version_tag(s.model_name, s.version, "crossval.run_id", run_id)


def _alias_version(cl, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(cl.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def approve(*, data_dir: str, model_name: str, version: str) -> dict[str, str | None]:
    """Move ``champion`` to a certified ``version``; the one it replaces becomes ``previous-champion``."""
    cl = client(data_dir)
    mv = version_of(cl, model_name, version=version)
    status = mv.tags.get(CERTIFICATION_TAG)
    if status != "certified":
        why = ("it has never been certified to the end" if status is None
               else f"its last certification failed ({mv.tags.get('certification.failed', '?')})")
        raise RegistryError(f"{model_name} version {mv.version} is not certified: {why}; run "
                            f"`edgeopt certify {model_name} --version {mv.version}` first")
    if mv.tags.get("certification.artifact_sha256") != mv.tags.get("artifact.sha256"):
        raise RegistryError(f"{model_name} version {mv.version}: the certified artifact's digest differs from "
                            "the version's; certify it again")
    current = _alias_version(cl, model_name, CHAMPION_ALIAS)
    if current == str(mv.version):
        return {"champion": current, "previous": _alias_version(cl, model_name, PREVIOUS_ALIAS), "changed": None}
    if current is not None:
        cl.set_registered_model_alias(model_name, PREVIOUS_ALIAS, current)
    cl.set_registered_model_alias(model_name, CHAMPION_ALIAS, str(mv.version))
    cl.set_model_version_tag(model_name, str(mv.version), "champion.approved",
                             datetime.now(UTC).isoformat(timespec="seconds"))
    return {"champion": str(mv.version), "previous": current, "changed": "yes"}


def rollback(*, data_dir: str, model_name: str) -> dict[str, str | None]:
    """Swap ``champion`` and ``previous-champion``."""
    cl = client(data_dir)
    _model(cl, model_name)
    previous = _alias_version(cl, model_name, PREVIOUS_ALIAS)
    current = _alias_version(cl, model_name, CHAMPION_ALIAS)
    if previous is None:
        raise RegistryError(f"{model_name} has no {PREVIOUS_ALIAS!r} to roll back to "
                            f"(champion: {'version ' + current if current else 'none'}); nothing changed")
    cl.set_registered_model_alias(model_name, CHAMPION_ALIAS, previous)
    if current is not None:
        cl.set_registered_model_alias(model_name, PREVIOUS_ALIAS, current)
    else:
        cl.delete_registered_model_alias(model_name, PREVIOUS_ALIAS)
    return {"champion": previous, "previous": current}


def certified_bundle(*, data_dir: str, model_name: str, version: str | None, alias: str | None, dest: str) -> Path:
    """The signed bundle of a version's last certification, downloaded into ``dest``."""
    cl = client(data_dir)
    mv = version_of(cl, model_name, version=version, alias=alias)
    run_id = mv.tags.get("certification.run_id")
    if not run_id:
        raise RegistryError(f"{model_name} version {mv.version} has no certification to verify; "
                            f"run `edgeopt certify {model_name} --version {mv.version}`")
    return _download(cl, run_id, "bundle", Path(dest), what=f"the certified bundle of {model_name} version {mv.version}")
