"""The process one Olive run happens in: ``python -m edgeopt.backends.olive_worker RUN_DIR``.

``RUN_DIR/olive_config.json`` is the Olive workflow config (``edgeopt.backends.olive_run`` writes it);
this process runs it through Olive's Python API (``olive.workflows.run``) and writes
``RUN_DIR/result.json``: every model the run recorded (pass, model path, parent, pruned or not), the
network connections it attempted, and the error that ended it, if any. The parent reads that file and
Olive's log; it never takes this process's exit code as success.

Before Olive is imported:

- **nothing reaches the network**: every connection to an address other than loopback or a local
  socket raises ``OSError`` and is recorded (a pass that would download a data set or a tokenizer from
  a hub fails, and the build is classified ``network``);
- **telemetry is off**: ``OLIVE_DISABLE_TELEMETRY=1`` only disables Olive 0.13's telemetry after it has
  logged a first heartbeat, so its CI detection (which disables it before any event) is answered yes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any

__all__ = ["block_network", "main"]

log = logging.getLogger(__name__)

#: hosts a connection may go to: the machine itself
_LOCAL = ("127.0.0.1", "::1", "localhost", "0.0.0.0")


def block_network(attempts: list[str]) -> None:
    """Make every non-local connection of this process fail, recording ``host:port`` in ``attempts``."""

    def _local(address: Any) -> bool:
        if isinstance(address, (str, bytes)):  # AF_UNIX path
            return True
        host = str(address[0]) if isinstance(address, tuple) and address else ""
        return host in _LOCAL or host.startswith("127.")

    def _refuse(address: Any) -> None:
        where = f"{address[0]}:{address[1]}" if isinstance(address, tuple) and len(address) > 1 else str(address)
        attempts.append(where)
        raise OSError(f"edgeopt: network access is blocked during an Olive build (tried {where})")

    original_connect, original_connect_ex = socket.socket.connect, socket.socket.connect_ex
    original_getaddrinfo = socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> Any:
        if not _local(address):
            _refuse(address)
        return original_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> Any:
        if not _local(address):
            _refuse(address)
        return original_connect_ex(self, address)

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in (None, *_LOCAL) and not str(host).startswith("127."):
            _refuse((host, port))
        return original_getaddrinfo(host, port, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo


def _telemetry_off() -> None:
    os.environ["OLIVE_DISABLE_TELEMETRY"] = "1"
    try:
        from olive.telemetry import telemetry
    except ImportError:  # an Olive without telemetry
        return
    # Olive 0.13 logs a heartbeat before it reads OLIVE_DISABLE_TELEMETRY; CI hosts skip it
    telemetry.Telemetry._is_ci_environment = staticmethod(lambda: True)  # type: ignore[method-assign]


def _models(run_dir: Path) -> list[dict[str, Any]]:
    """Every model the run's footprint recorded, in the order the passes made them."""
    path = run_dir / "output" / "footprint.json"
    if not path.is_file():
        return []
    nodes = json.loads(path.read_text(encoding="utf-8"))
    models = []
    for model_id, node in nodes.items():
        config = node.get("model_config_data") or node.get("model_config") or {}  # its alias, by version
        if not node.get("from_pass"):
            continue
        params = {k: v for k, v in (node.get("pass_run_config") or {}).items()
                  if isinstance(v, (str, int, float, bool)) or v is None}
        models.append({"model_id": model_id, "parent": node.get("parent_model_id"), "pass": node["from_pass"],
                       "pruned": bool(config.get("is_pruned")) or not config,
                       "model_path": (config.get("config") or {}).get("model_path"), "config": params})
    return models


def pin_unsearched(run_dir: Path) -> None:
    """In a search run, give every searchable parameter of each pass that the recipe does not search its
    fixed default, so Olive searches the recipe's values only (Olive would otherwise search its own default
    space for them: quant_preprocess, activation_type, ...). Rewrites the config Olive runs (the evidence)."""
    searched_path = run_dir / "searched.json"
    if not searched_path.is_file():
        return
    from olive.hardware.accelerator import AcceleratorSpec
    from olive.package_config import OlivePackageConfig

    searched = json.loads(searched_path.read_text(encoding="utf-8"))
    config_path = run_dir / "olive_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    accelerator = config["systems"]["local"]["accelerators"][0]
    spec = AcceleratorSpec(accelerator_type=accelerator["device"],
                           execution_provider=accelerator["execution_providers"][0])
    package = OlivePackageConfig.load_default_config()
    for name, runs in config["passes"].items():
        for run in runs:
            defaults = package.import_pass_module(run["type"]).default_config(spec)
            for param, param_config in defaults.items():
                if param_config.search_defaults is None or param in run["config"] or param in searched.get(name, ()):
                    continue
                value = param_config.default_value
                run["config"][param] = getattr(value, "value", value)
    config_path.write_text(json.dumps(config, indent=2, default=str), encoding="utf-8")


def main(run_dir: str) -> int:
    run = Path(run_dir)
    attempts: list[str] = []
    block_network(attempts)
    result: dict[str, Any] = {"error": None, "network_attempts": attempts, "models": []}
    try:
        _telemetry_off()
        pin_unsearched(run)
        from olive.workflows import run as olive_run

        output = olive_run(str(run / "olive_config.json"))
        result["has_output_model"] = bool(output is not None and output.has_output_model())
    except BaseException as exc:  # noqa: BLE001 - everything Olive raises is reported to the parent
        result["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    result["models"] = _models(run)
    result["network_attempts"] = sorted(set(attempts))
    (run / "result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sys.exit(main(sys.argv[1]))
