"""One Olive run for the Olive backend: its workflow config, its process, and what it left behind.

``run(...)`` writes the Olive workflow config for a recipe into a run folder, runs
``edgeopt.backends.olive_worker`` on it in a fresh process (network blocked, telemetry off, a
timeout), and returns ``RunResult``: the models the run recorded, one per pass in order, and the
evidence (config, log). The run folder is keyed by everything that determines the run (model,
passes, calibration data, tool versions), so the candidates one run yields (``each_pass: true``) share
one run: the first build runs Olive, the others wait on its lock and read its result.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeopt.keys import digest

if TYPE_CHECKING:
    from edgeopt.backends.olive import OliveRecipe

__all__ = ["OLIVE_TYPES", "SEARCHED_FILE", "RunResult", "run", "workflow_config"]

log = logging.getLogger(__name__)

#: edgeopt's pass names -> Olive pass types
OLIVE_TYPES: dict[str, str] = {
    "transformer-optimization": "OrtTransformersOptimization",
    "quantize-static": "OnnxStaticQuantization",
    "quantize-dynamic": "OnnxDynamicQuantization",
    "fp16": "OnnxFloatToFloat16",
    "quant-preprocess": "OnnxQuantizationPreprocess",
    "peephole": "OnnxPeepholeOptimizer",
}
_EP = {"cpu": ("cpu", "CPUExecutionProvider"), "cuda": ("gpu", "CUDAExecutionProvider"),
       "tensorrt": ("gpu", "TensorrtExecutionProvider")}
_DATA = "edgeopt_calibration"
#: the run folder's file naming the parameters a search varies (the worker pins every other one)
SEARCHED_FILE = "searched.json"
#: a failed run is reused this long (the sibling candidates of one flow); after that it is run again
_FAILED_RUN_REUSE_S = 900.0
#: environment of the Olive process: nothing asks a hub, nothing reports usage
_OFFLINE_ENV = {"OLIVE_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}


@dataclass(frozen=True)
class RunResult:
    """What one Olive run left behind (from its ``result.json``, never from its exit code)."""

    folder: Path
    models: tuple[dict[str, Any], ...]  # one per pass that ran, in pass order: pass, model_path, pruned
    error: str | None
    network_attempts: tuple[str, ...]
    exit_code: int | None
    timed_out: bool
    duration_s: float
    all_models: tuple[dict[str, Any], ...] = ()  # every model recorded (a search: one chain per point)

    @property
    def config_path(self) -> Path:
        return self.folder / "olive_config.json"

    @property
    def log_path(self) -> Path:
        return self.folder / "olive.log"

    def last_pass_started(self) -> str | None:
        """The name of the last pass Olive's log says it started (the one that failed, when a run fails)."""
        if not self.log_path.is_file():
            return None
        started = re.findall(r"Running pass ([\w-]+):", self.log_path.read_text(encoding="utf-8", errors="replace"))
        return started[-1] if started else None

    def log_reason(self) -> str:
        """The last error line of Olive's log (where a swallowed pass failure is explained), or ''."""
        if not self.log_path.is_file():
            return ""
        lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        errors = [ln.strip() for ln in lines if re.search(r"\b\w*(Error|Exception)\b: ", ln)]
        return errors[-1] if errors else ""


def workflow_config(*, model_path: str, recipe: OliveRecipe, folder: Path, calibration: str | None,
                    input_names: list[str]) -> dict[str, Any]:
    """The Olive workflow config of ``recipe``: its passes in order, each output recorded. With a pass
    ``search``, Olive's sequential search over exactly those values (every point run; parameters not
    searched are pinned by the worker), with the latency evaluator Olive requires to search: its figures
    are not used, edgeopt measures every point itself."""
    from edgeopt.backends import olive_data

    device, provider = _EP[recipe.execution_provider]
    config: dict[str, Any] = {
        "input_model": {"type": "ONNXModel", "config": {"model_path": model_path}},
        "systems": {"local": {"type": "LocalSystem",
                              "accelerators": [{"device": device, "execution_providers": [provider]}]}},
        "passes": {},
        "engine": {"host": "local", "target": "local", "evaluate_input_model": False, "log_severity_level": 1,
                   "output_dir": str(folder / "output"), "cache_dir": str(folder / "cache")},
    }
    if calibration is not None:
        config["data_configs"] = [{
            "name": _DATA, "type": "DataContainer", "user_script": olive_data.__file__,
            "load_dataset_config": {"type": "edgeopt_npz", "params": {
                "data_path": calibration, "input_names": input_names, "max_samples": recipe.calibration_samples}},
            "dataloader_config": {"type": "default_dataloader", "params": {"batch_size": 1}},
        }]
    for p in recipe.passes:
        options = dict(p.options) | {k: list(v) for k, v in p.search.items()}
        if p.type == "quantize-static":
            options["data_config"] = _DATA
        config["passes"][p.output_name] = [{"type": OLIVE_TYPES[p.type], "config": options}]
    if recipe.searched:
        config["evaluators"] = {"edgeopt_minimal": {"type": "OnnxEvaluator", "metrics": [{
            "name": "latency", "type": "latency", "data_config": _DATA,
            "sub_types": [{"name": "avg", "priority": 1, "metric_config": {"warmup_num": 0, "repeat_test_num": 1}}]}]}}
        config["engine"] |= {"evaluator": "edgeopt_minimal",
                             "search_strategy": {"execution_order": "joint", "sampler": "sequential"}}
    return config


def run_key(*, model_sha: str, recipe: OliveRecipe, calibration_sha: str | None, tools: dict[str, str]) -> str:
    """What determines a run: the model, the passes and their options, the data, the tool versions."""
    fields = recipe.model_dump(mode="json", exclude={"output", "point", "each_pass", "timeout_s", "intra_op_threads"})
    return digest("olive-run", model_sha, fields, calibration_sha, tools)[:24]


def run(*, model_path: str, model_sha: str, recipe: OliveRecipe, runs_dir: Path, calibration: str | None,
        calibration_sha: str | None, input_names: list[str], tools: dict[str, str]) -> RunResult:
    """The result of the Olive run of ``recipe`` on the model: reused if this key ran (and succeeded, or
    failed within the last minutes), else run now in a fresh process."""
    key = run_key(model_sha=model_sha, recipe=recipe, calibration_sha=calibration_sha, tools=tools)
    folder = runs_dir / key
    runs_dir.mkdir(parents=True, exist_ok=True)
    with _locked(runs_dir / f"{key}.lock"):
        previous = _read(folder)
        if previous is not None and _reusable(previous):
            log.info("olive run %s: reusing its result", key)
            return previous
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        config = workflow_config(model_path=model_path, recipe=recipe, folder=folder, calibration=calibration,
                                 input_names=input_names)
        (folder / "olive_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        if recipe.searched:  # what the worker leaves Olive to search: these values only
            searched = {p.output_name: sorted(p.search) for p in recipe.passes}
            (folder / SEARCHED_FILE).write_text(json.dumps(searched), encoding="utf-8")
        return _run_process(folder, timeout_s=recipe.timeout_s)


def _reusable(result: RunResult) -> bool:
    complete = bool(result.models) and not result.models[-1]["pruned"] and result.error is None
    if complete:
        return all(Path(m["model_path"] or "").exists() for m in result.all_models or result.models
                   if not m["pruned"])
    age = time.time() - (result.folder / "result.json").stat().st_mtime
    return age < _FAILED_RUN_REUSE_S


def _run_process(folder: Path, *, timeout_s: float) -> RunResult:
    env = {**os.environ, **_OFFLINE_ENV}
    env.pop("PYTHONSTARTUP", None)
    command = [sys.executable, "-m", "edgeopt.backends.olive_worker", str(folder)]
    log.info("olive run %s: starting (timeout %.0f s)", folder.name, timeout_s)
    started = time.perf_counter()
    timed_out = False
    with open(folder / "olive.log", "wb") as out:
        proc = subprocess.Popen(command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    duration = time.perf_counter() - started
    log.info("olive run %s: exit code %s after %.1f s", folder.name, proc.returncode, duration)
    path = folder / "result.json"  # absent when the process died first (crash, OOM kill, timeout)
    doc = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"error": None, "models": []}
    doc.update(exit_code=proc.returncode, timed_out=timed_out, duration_s=round(duration, 3))
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    result = _read(folder)
    assert result is not None  # written just above
    return result


def _read(folder: Path) -> RunResult | None:
    path = folder / "result.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text(encoding="utf-8"))
    return RunResult(folder=folder, models=tuple(_in_pass_order(doc.get("models", []))),
                     all_models=tuple(doc.get("models", [])), error=doc.get("error"),
                     network_attempts=tuple(doc.get("network_attempts", [])), exit_code=doc.get("exit_code"),
                     timed_out=bool(doc.get("timed_out")), duration_s=float(doc.get("duration_s") or 0.0))


def _in_pass_order(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chain of models from the input model on (a no-search run is one pass flow)."""
    ids = {m["model_id"] for m in models}
    children = {m["parent"]: m for m in models}
    first = next((m for m in models if m["parent"] not in ids), None)
    chain = []
    while first is not None and len(chain) < len(models):
        chain.append(first)
        first = children.get(first["model_id"])
    return chain


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
