"""Flow-run names: ``<flow>-<profile>``, a profile file shown by its stem, never by its path."""

from __future__ import annotations

from collections.abc import Callable

from prefect.runtime import flow_run

from edgeopt.names import profile_label


def by_profile(prefix: str) -> Callable[[], str]:
    """A ``flow_run_name`` callable: ``<prefix>-<profile>`` from the run's ``profile`` parameter."""

    def name() -> str:
        return f"{prefix}-{profile_label(flow_run.parameters['profile'])}"

    return name
