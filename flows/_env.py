"""Embedded defaults: call before importing prefect so nothing needs to be started.

Prefect's ephemeral API keeps its SQLite database under ``$EDGEOPT_HOME/prefect`` (unless
``PREFECT_API_URL`` or ``PREFECT_HOME`` is set) and MLflow uses ``$EDGEOPT_HOME/mlflow`` (unless
``MLFLOW_TRACKING_URI`` is set).

``ensure_prefect_api()`` brings the API up (or checks the configured one) *before* a flow runs, so
a start-up failure is one ``PrefectAPIUnavailable`` line and nothing (no flow run, no MLflow run)
has been written yet.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from edgeopt.errors import EdgeOptError
from edgeopt.settings import data_dir, prefect_home

#: Exit code of ``edgeopt optimize`` when Prefect's API could not be started or reached (nothing ran;
#: retrying may help). 2 is a user error, 3 is ``--strict`` with no passing candidate.
EXIT_PREFECT_API = 4


class PrefectAPIUnavailable(EdgeOptError):
    """Prefect's API (embedded or at ``PREFECT_API_URL``) did not start or cannot be reached."""

    exit_code = EXIT_PREFECT_API


def configure_embedded_defaults(*, quiet: bool = True) -> None:
    base = data_dir()
    if "PREFECT_HOME" not in os.environ and "PREFECT_PROFILES_PATH" not in os.environ:
        # edgeopt keeps Prefect's database and results in its own data folder, but a server chosen in the
        # user's Prefect profile (`prefect config set PREFECT_API_URL=...`) must still apply: read the
        # profiles where Prefect reads them by default
        user_profiles = Path("~/.prefect/profiles.toml").expanduser()
        if user_profiles.is_file():
            os.environ["PREFECT_PROFILES_PATH"] = str(user_profiles)
    os.environ.setdefault("PREFECT_HOME", str(prefect_home(base)))
    # Prefect creates only the last level of its home, with a warning on stderr when the parent
    # (e.g. a new $EDGEOPT_HOME) does not exist yet.
    with contextlib.suppress(OSError):
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    if quiet:
        # The CLI prints one line per problem and a summary of candidate failures itself; the flow and
        # task runs' logs (phases, each candidate's build/measure/verdict, tracebacks of failed task
        # runs) go to the Prefect API only, where the run's page in the UI shows them (--verbose also
        # prints them here).
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        quiet_config = _quiet_logging_config(Path(os.environ["PREFECT_HOME"]).expanduser())
        if quiet_config is not None:
            os.environ.setdefault("PREFECT_LOGGING_SETTINGS_PATH", str(quiet_config))


def _quiet_logging_config(home: Path) -> Path | None:
    """Prefect's own logging config with the flow- and task-run loggers sending INFO and above to the API
    handler only (not propagated to the console); written under ``home``. None if it cannot be made
    (Prefect's default config then applies)."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("prefect")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "logging" / "logging.yml"
    try:
        config = yaml.safe_load(source.read_text(encoding="utf-8"))
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            config["loggers"][name] = {"level": "INFO", "handlers": ["api"], "propagate": False}
        text = yaml.safe_dump(config, sort_keys=False)
        target = home / "logging-quiet.yml"
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None
    return target


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def ensure_prefect_api() -> None:
    """Start Prefect's embedded API, or check the server at ``PREFECT_API_URL``, before a flow runs.

    Prefect 3.8 starts the embedded API lazily, in the flow's first ``get_client()``, through
    ``SubprocessASGIServer().start()``; it raises ``RuntimeError("Timed out while attempting to
    connect to ephemeral Prefect API server. ...")`` after
    ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``, ``httpx.HTTPStatusError`` when the server
    answers ``/health`` with an error, or ``RuntimeError("Unable to find an available port ...")``.
    With ``PREFECT_API_URL`` set, the flow's client raises ``RuntimeError("Failed to reach API at
    <url>")`` (from an ``httpx.ConnectError``). Doing the same here first means the flow then reuses
    the running server (``SubprocessASGIServer`` is a per-process singleton) and a failure happens
    before any flow run or MLflow run exists. Raises ``PrefectAPIUnavailable`` (the original
    exception is its ``__cause__``).
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    api_url = PREFECT_API_URL.value()
    if api_url:
        _check_api(str(api_url))
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    try:
        server.start()
    except Exception as exc:
        timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        proc = server.server_process
        code = proc.poll() if proc is not None else None
        if code is not None:
            what = f"did not start: its server process exited with code {code}"
        elif isinstance(exc, RuntimeError) and str(exc).startswith("Timed out"):
            what = f"did not start within {timeout} s (timed out; the machine may be busy)"
        else:
            what = f"did not start ({_first_line(exc)})"
        # do not leave a half-started server behind until exit; the start-up failure is what to report
        with contextlib.suppress(Exception):
            server.stop()
        raise PrefectAPIUnavailable(
            f"Prefect's embedded API {what}; nothing was run. Retry, raise "
            f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (now {timeout}), or start a server "
            "(`prefect server start`) and set PREFECT_API_URL") from exc


def _check_api(url: str) -> None:
    from prefect.client.orchestration import get_client

    hint = ("; nothing was run. Start that server (`prefect server start`), fix PREFECT_API_URL, "
            "or unset it to use the embedded API")
    try:
        with get_client(sync_client=True) as client:
            problem = client.api_healthcheck()
            if problem is None:
                # the check the flow's client makes once per process; a mismatch is a RuntimeError
                client.raise_for_api_version_mismatch_once()
    except Exception as exc:
        raise PrefectAPIUnavailable(f"the Prefect API at {url} (PREFECT_API_URL) is not usable: "
                                    f"{_first_line(exc)}{hint}") from exc
    if problem is not None:
        raise PrefectAPIUnavailable(f"no Prefect API answers at {url} (PREFECT_API_URL): "
                                    f"{_first_line(problem)}{hint}") from problem
