"""Where edgeopt keeps its data: one project data folder holding the embedded stores.

``$EDGEOPT_HOME`` (default ``./.edgeopt``) holds ``prefect/`` (Prefect's embedded API database and
task results), ``mlflow/`` (``mlflow.db`` and ``artifacts/``), ``zoo/`` (reference models) and
``work/`` (candidate builds and measurements, content-addressed so re-runs reuse them).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["data_dir", "mlflow_artifact_root", "mlflow_tracking_uri", "prefect_home"]


def data_dir() -> Path:
    return Path(os.environ.get("EDGEOPT_HOME", ".edgeopt")).expanduser().resolve()


def prefect_home(base: Path | None = None) -> Path:
    return (base or data_dir()) / "prefect"


def mlflow_tracking_uri(base: Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else an absolute SQLite URI under the data folder."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(base or data_dir()) / 'mlflow' / 'mlflow.db'}"


def mlflow_artifact_root(base: Path | None = None) -> Path:
    return (base or data_dir()) / "mlflow" / "artifacts"
