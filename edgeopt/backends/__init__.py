"""Backend registry: one manifest, modules imported lazily on first use.

A backend module subclasses ``edgeopt.backends.base.Backend``; its toolchain is imported inside
its methods so that listing, validating recipes and reading profiles never needs the toolchain.
"""

from __future__ import annotations

import importlib
from functools import cache

from edgeopt.backends.base import Backend, Recipe, Session
from edgeopt.errors import ConfigError

__all__ = ["Backend", "Recipe", "Session", "get", "job_backend", "names", "recipe_type"]

#: name -> (module, class). Adding a backend is one line here plus its module.
_MANIFEST: dict[str, tuple[str, str]] = {
    "onnxruntime": ("edgeopt.backends.onnxruntime", "OnnxRuntimeBackend"),
    "openvino": ("edgeopt.backends.openvino", "OpenVinoBackend"),
    "optimum-intel": ("edgeopt.backends.optimum_intel", "OptimumIntelBackend"),
    "olive": ("edgeopt.backends.olive", "OliveBackend"),
    "llamacpp": ("edgeopt.backends.llamacpp", "LlamaCppBackend"),
    "openvino-genai": ("edgeopt.backends.ov_genai", "OvGenAIBackend"),
    "onnxruntime-genai": ("edgeopt.backends.ort_genai", "OrtGenAIBackend"),
    "mlx": ("edgeopt.backends.mlx", "MlxBackend"),
}


def names() -> tuple[str, ...]:
    return tuple(_MANIFEST)


@cache
def _backend_class(name: str) -> type[Backend]:
    if name not in _MANIFEST:
        raise ConfigError(f"unknown backend {name!r} (allowed: {', '.join(names())})")
    module, cls = _MANIFEST[name]
    return getattr(importlib.import_module(module), cls)


def get(name: str) -> Backend:
    """Return an instance of the backend registered as ``name`` (ConfigError if unknown)."""
    return _backend_class(name)()


def job_backend(job: dict) -> Backend:
    """The backend of a worker job's artifact record (``job["artifact"]["backend"]``); a job without one is a GGUF
    file, run by llama.cpp."""
    return get((job.get("artifact") or {}).get("backend") or "llamacpp")


def recipe_type(name: str) -> type[Recipe]:
    return _backend_class(name).recipe_type
