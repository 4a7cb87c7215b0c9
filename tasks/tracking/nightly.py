"""The nightly re-optimization's and the drift check's records in MLflow (part of ``tasks.tracking``).

Each nightly run is one MLflow run named ``nightly-<profile>`` in the model's experiment
(``edgeopt/<model name>``), tagged ``nightly.result`` (``unchanged``, ``no-winner``,
``champion-reselected``, ``champion-kept``, ``not-certified``, ``promoted``) with ``nightly.reason``
and the duel's figures as metrics. The experiment's tag ``edgeopt.nightly.digest`` holds the change
digest of the last nightly run that **completed**: set as the very last step, so a killed or failed
run is re-run in full the next time, never skipped as "unchanged".
"""

from __future__ import annotations

import math
from typing import Any

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from tasks.tracking.registry import _RETRY, _alias_version
from tasks.tracking.runs import _experiment_id, client

DIGEST_TAG = "edgeopt.nightly.digest"
RESULT_TAG = "edgeopt.nightly.result"


@task(name="mlflow-nightly-state", cache_policy=NO_CACHE, **_RETRY)
def nightly_state(*, data_dir: str, model_name: str) -> dict[str, str | None]:
    """The last completed nightly's digest and result, and the versions the aliases point at."""
    cl = client(data_dir)
    exp = cl.get_experiment_by_name(f"edgeopt/{model_name}")
    tags = exp.tags if exp is not None else {}
    registered = bool(cl.search_registered_models(filter_string=f"name = '{model_name}'"))
    return {"digest": tags.get(DIGEST_TAG), "result": tags.get(RESULT_TAG),
            "champion": _alias_version(cl, model_name, "champion") if registered else None,
            "candidate": _alias_version(cl, model_name, "candidate") if registered else None}


@task(name="mlflow-nightly-record", cache_policy=NO_CACHE, **_RETRY)
def record_nightly(*, data_dir: str, model_name: str, profile: str, digest: str, result: str, reason: str,
                   params: dict[str, Any], metrics: dict[str, float], flow_run_id: str | None,
                   complete: bool = True) -> str:
    """One run with the nightly's result; ``complete`` also stores its digest on the experiment (last)."""
    cl = client(data_dir)
    exp_id = _experiment_id(cl, f"edgeopt/{model_name}", data_dir)
    run = cl.create_run(exp_id, run_name=f"nightly-{profile}", tags={
        "edgeopt.flow": "nightly", "nightly.result": result, "nightly.reason": reason[:5000],
        "nightly.digest": digest, "prefect.flow_run_id": flow_run_id or "", "mlflow.note.content": reason})
    rid = run.info.run_id
    for k, v in params.items():
        cl.log_param(rid, k, str(v)[:6000])
    for k, v in metrics.items():
        if v is not None and math.isfinite(float(v)):
            cl.log_metric(rid, k, float(v))
    cl.set_terminated(rid, "FINISHED")
    if complete:
        cl.set_experiment_tag(exp_id, RESULT_TAG, result)
        cl.set_experiment_tag(exp_id, DIGEST_TAG, digest)
    return rid


@task(name="mlflow-drift-record", cache_policy=NO_CACHE, **_RETRY)
def record_drift(*, data_dir: str, model_name: str, summary: str, drifted: bool, metrics: dict[str, float],
                 params: dict[str, Any], flow_run_id: str | None) -> str:
    """One run ``drift`` in the model's experiment: the verdict as tags, the figures as metrics."""
    cl = client(data_dir)
    exp_id = _experiment_id(cl, f"edgeopt/{model_name}", data_dir)
    run = cl.create_run(exp_id, run_name="drift", tags={
        "edgeopt.flow": "drift", "drift.verdict": "drift" if drifted else "no-drift", "drift.summary": summary[:5000],
        "prefect.flow_run_id": flow_run_id or "", "mlflow.note.content": summary})
    rid = run.info.run_id
    for k, v in params.items():
        cl.log_param(rid, k, str(v)[:6000])
    for k, v in metrics.items():
        if v is not None and math.isfinite(float(v)):
            cl.log_metric(rid, k.replace(":", "_"), float(v))
    cl.set_terminated(rid, "FINISHED")
    return rid
