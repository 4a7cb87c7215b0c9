"""Embedded defaults: call before importing prefect so nothing needs to be started.

Prefect's ephemeral API keeps its SQLite database under ``$EDGEOPT_HOME/prefect`` (unless
``PREFECT_API_URL`` or ``PREFECT_HOME`` is set) and MLflow uses ``$EDGEOPT_HOME/mlflow`` (unless
``MLFLOW_TRACKING_URI`` is set).
"""

from __future__ import annotations

import os

from edgeopt.settings import data_dir, prefect_home


def configure_embedded_defaults(*, quiet: bool = True) -> None:
    base = data_dir()
    os.environ.setdefault("PREFECT_HOME", str(prefect_home(base)))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    if quiet:
        # The CLI prints one line per problem and a summary of candidate failures itself; Prefect's
        # tracebacks for failed task runs stay in the Prefect UI (and show with --verbose).
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
