"""The end of an optimize run that CNN/encoder and language-model runs share: each candidate's figures to
the run's log, one MLflow child run per outcome, and the Markdown report with its links."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from edgeopt import report
from edgeopt.profiles import Profile
from edgeopt.records import CandidateOutcome, Selection
from tasks import tracking


@dataclass(frozen=True)
class Logged:
    child_ids: dict[str, str]  # outcome name -> its MLflow child run
    url: str  # the parent run's page
    chosen: CandidateOutcome | None  # the selected outcome, to register last
    markdown: str  # the report (the flow may append notes before recording it)


def log_outcomes(*, outcomes: Sequence[CandidateOutcome], selection: Selection, table: list[dict[str, Any]],
                 columns: Sequence[str], reused: Collection[str], base: str, experiment_id: str, run_id: str,
                 name: str, profile: Profile, logger: Any) -> Logged:
    """Log each row of ``table`` (the ``columns`` that have a value) and the selection to the run's log, log
    every outcome as a child run in MLflow (``reused`` ones marked cached), and write the report."""
    for row in table:
        logger.info("%s: %s", row["candidate"], "; ".join(f"{k} {row[k]}" for k in columns[1:]
                                                        if row[k] not in ("", "-")))
    logger.info("selection: %s", selection.message)
    logs = [tracking.log_candidate.submit(data_dir=base, experiment_id=experiment_id, parent_run_id=run_id,
                                          outcome=o, cached=o.name in reused) for o in outcomes]
    child_ids = {o.name: f.result() for o, f in zip(outcomes, logs, strict=True)}
    url = tracking.run_url(experiment_id=experiment_id, run_id=run_id, data_dir=base)
    chosen = next((o for o in outcomes if o.name == selection.selected), None)
    links = {"MLflow run": url}
    if chosen is not None:
        links["Registered model"] = f"{name}, alias '{tracking.CANDIDATE_ALIAS}'"
    md = report.markdown(outcomes, selection, title=f"edgeopt optimize: {name} on {profile.name}", links=links)
    return Logged(child_ids=child_ids, url=url, chosen=chosen, markdown=md)
