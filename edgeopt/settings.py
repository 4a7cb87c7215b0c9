"""Where edgeopt keeps its data: one project data folder holding the embedded stores.

``$EDGEOPT_HOME`` (default ``./.edgeopt``) holds ``prefect/`` (Prefect's embedded API database and
task results), ``mlflow/`` (``mlflow.db`` and ``artifacts/``), ``zoo/`` (reference models) and
``work/`` (candidate builds and measurements, content-addressed so re-runs reuse them).

This host's run-to-run evidence (``edgeopt.reproducibility``: every re-measured speed-up, keyed by the
artifacts' content, the data, settings, tools and hardware) belongs to the host, not to one project
folder: with the default data folder it is kept in ``$XDG_STATE_HOME/edgeopt/hosts`` (default
``~/.local/state/edgeopt/hosts``), so a fresh clone or a second project on the same machine judges its
verdicts on what this host measured before. A data folder chosen explicitly (``$EDGEOPT_HOME``, or a
flow's ``data_dir``) is self-contained and keeps it in its own ``hosts/``; ``$EDGEOPT_HOST_STATE`` names
the folder outright.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_DATA_DIR", "data_dir", "host_state_dir", "mlflow_artifact_root", "mlflow_tracking_uri",
           "prefect_home"]

DEFAULT_DATA_DIR = ".edgeopt"


def data_dir() -> Path:
    return Path(os.environ.get("EDGEOPT_HOME", DEFAULT_DATA_DIR)).expanduser().resolve()


def host_state_dir(base: Path | str | None = None) -> Path:
    """Where this host's run-to-run evidence is kept for the data folder ``base`` (see the module's text):
    ``$EDGEOPT_HOST_STATE``; else ``base/hosts`` when ``base`` was chosen (``$EDGEOPT_HOME`` set, or a
    folder other than the default); else the user's state folder, shared by every project on this host."""
    env = os.environ.get("EDGEOPT_HOST_STATE")
    if env:
        return Path(env).expanduser().resolve()
    folder = Path(base).expanduser().resolve() if base is not None else data_dir()
    if "EDGEOPT_HOME" in os.environ or folder != Path(DEFAULT_DATA_DIR).resolve():
        return folder / "hosts"
    state = os.environ.get("XDG_STATE_HOME") or str(Path("~/.local/state").expanduser())
    return Path(state).expanduser().resolve() / "edgeopt" / "hosts"


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
