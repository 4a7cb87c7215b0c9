"""Model intake: detect a model's format, validate it, hash it and assess it.

ONNX files and Hugging Face checkpoint folders (safetensors only; exported to ONNX for the
candidates) are supported; GGUF files arrive with the LLM work and are refused clearly until then.
"""

from __future__ import annotations

from pathlib import Path

from edgeopt.errors import ModelError
from edgeopt.intake.onnx import assess_onnx
from edgeopt.records import Assessment

__all__ = ["assess", "detect_format"]


def detect_format(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model {p}: no such file or folder; check the path")
    if p.is_dir():
        if (p / "config.json").is_file():
            return "hf"
        raise ModelError(f"model {p}: a folder without config.json; pass an .onnx file or a Hugging Face checkpoint folder")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return "gguf"
    return "onnx"


def assess(path: str | Path) -> Assessment:
    """Assess a model file; ``ModelError`` names the problem and what to do."""
    fmt = detect_format(path)
    if fmt == "onnx":
        return assess_onnx(path)
    if fmt == "hf":
        from edgeopt.intake.hf import assess_hf

        return assess_hf(path)
    raise ModelError(f"model {path}: {fmt} models are not supported yet; export the model to ONNX first")
