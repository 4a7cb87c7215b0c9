"""MLflow tracking: the only code that talks to MLflow.

``runs``      the optimize flow's parent and candidate runs, registration of the winner (alias ``candidate``)
``registry``  registered versions as certification subjects, certification and cross-validation runs,
              the ``champion`` / ``previous-champion`` aliases (approve, rollback)
"""

from tasks.tracking.registry import (
    CERTIFICATION_TAG,
    CHAMPION_ALIAS,
    PREVIOUS_ALIAS,
    approve,
    certified_bundle,
    finish_run,
    log_certification,
    log_cross_validation,
    resolve_subject,
    rollback,
    start_version_run,
)
from tasks.tracking.runs import (
    CANDIDATE_ALIAS,
    client,
    end_parent_run,
    log_candidate,
    record_selection,
    register_selected,
    run_url,
    start_parent_run,
)

__all__ = [
    "CANDIDATE_ALIAS",
    "CERTIFICATION_TAG",
    "CHAMPION_ALIAS",
    "PREVIOUS_ALIAS",
    "approve",
    "certified_bundle",
    "client",
    "end_parent_run",
    "finish_run",
    "log_candidate",
    "log_certification",
    "log_cross_validation",
    "record_selection",
    "register_selected",
    "resolve_subject",
    "rollback",
    "run_url",
    "start_parent_run",
    "start_version_run",
]
