"""The registry as ``edgeopt fleet status`` shows it (part of ``tasks.tracking``, the only code that
talks to MLflow): per registered model, the versions its aliases point at."""

from __future__ import annotations

from tasks.tracking.runs import client


def model_aliases(*, data_dir: str) -> dict[str, dict[str, str]]:
    """``{registered model: {alias: version}}`` for every registered model of the tracking store."""
    cl = client(data_dir)
    out: dict[str, dict[str, str]] = {}
    token = None
    while True:
        page = cl.search_registered_models(max_results=200, page_token=token)
        for rm in page:
            out[rm.name] = {alias: str(version) for alias, version in (rm.aliases or {}).items()}
        token = page.token
        if not token:
            return out
