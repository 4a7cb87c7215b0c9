"""Model intake: detect a model's format, validate it, hash it and assess it.

ONNX files, Hugging Face checkpoint folders (safetensors only; encoders exported to ONNX for the
candidates, llama-like causal LMs converted to GGUF) and GGUF files (``edgeopt.intake.llm``) are supported.
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
    from edgeopt.intake.llm import assess_gguf

    return assess_gguf(path)
