"""OpenVINO GenAI backend for language models: NNCF weight compression, run by ``openvino_genai``.

Public surface: ``OvGenAIRecipe``, ``OvGenAIBackend``, ``OvGenAISession`` and ``generate_job``.

* **Build**: the Hugging Face checkpoint exported to OpenVINO IR by optimum-intel with NNCF weight
  compression (INT8, or INT4 with its symmetry, group size and the share of layers in INT4; AWQ and
  scale estimation on the calibration text when the recipe asks), and the OpenVINO tokenizer and
  detokenizer ``openvino_genai`` needs. The weights' element types are read back from the IR: a
  request that was not applied (no 4-bit weight in an INT4 build) fails the candidate; what the CPU
  plugin really executes in (``INFERENCE_PRECISION_HINT``: bf16 on AMX, f32 on AVX2) is in the notes.
* **Generation** (``generate_job``, in the fresh measuring process): ``openvino_genai.LLMPipeline`` with
  the stateful SDPA attention backend (each ``generate`` starts from an empty KV cache: no prefix
  cache serves a repeated prompt), greedy, exactly the job's number of new tokens; the same figures
  as llama.cpp's worker (per-token intervals from the pipeline's token timestamps). The KV-cache figure
  (``kv_bytes_per_token``) is what the CPU plugin stores per token: the IR's KV states (their head count and
  head size) in the plugin's KV-cache precision (u8 by default on CPU, with a float scale and zero point per
  head and quantization group), read after the timed loop so it does not touch the memory figures.
* **Evaluation** (``OvGenAISession``): the IR's logits through optimum-intel, behind the small
  llama.cpp-like surface ``edgeopt.evaluate.llm`` uses (tokenize, reset, eval, scores, generate), so
  perplexity, KLD and the garbage check run on it unchanged.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from edgeopt.backends.base import Backend, Recipe, short_message
from edgeopt.backends.llm_session import HFTokenizerSession
from edgeopt.data import path_sha256
from edgeopt.errors import CandidateFailed, ModelError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from edgeopt.data import Dataset
    from edgeopt.records import Artifact, Assessment, ModelRef

__all__ = ["OvGenAIBackend", "OvGenAIRecipe", "OvGenAISession", "generate_job", "weight_types"]

log = logging.getLogger(__name__)

#: IR element types of compressed weights, by what a recipe asks for
_FOUR_BIT = frozenset({"u4", "i4", "nf4"})
_EIGHT_BIT = frozenset({"u8", "i8"})
#: text chunks the data-aware compression (AWQ, scale estimation) runs on, in characters
_CHUNK_CHARS = 512


class OvGenAIRecipe(Recipe):
    """An OpenVINO GenAI candidate: NNCF weight compression of the checkpoint and its runtime settings."""

    weights: Literal["fp16", "int8", "int4"] = Field(default="int4", description="weight type (fp16: no "
                                                     "compression, the OpenVINO reference)")
    sym: bool = Field(default=False, description="symmetric weight quantization (False: asymmetric, with zero points)")
    group_size: int = Field(default=64, description="int4: weights per scale group (-1: one per output channel)")
    ratio: float = Field(default=1.0, gt=0, le=1, description="int4: share of the layers in INT4, the rest in INT8")
    awq: bool = Field(default=False, description="int4: activation-aware scaling on the calibration text")
    scale_estimation: bool = Field(default=False, description="int4: scale estimation on the calibration text")
    calibration_samples: int = Field(default=32, gt=0, description="text chunks of the calibration text used")
    threads: int | None = Field(default=None, ge=1, description="inference threads (None: the profile's budget)")

    @model_validator(mode="after")
    def _consistent(self) -> OvGenAIRecipe:
        if self.weights != "int4" and (self.awq or self.scale_estimation):
            raise ValueError("awq and scale_estimation apply to int4 weights only")
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"group_size is a positive number of weights or -1 (per channel); got {self.group_size}")
        return self

    def needs_calibration(self) -> bool:
        return self.awq or self.scale_estimation

    def runtime_options(self) -> dict[str, Any]:
        return {"threads": self.threads, "device": "CPU"}

    def precision(self) -> str:
        return self.weights


def weight_types(xml: str | Path) -> Counter[str]:
    """Element types of the IR's weight constants (rank >= 2), counted."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    return Counter(op.get_output_element_type(0).get_type_name() for op in model.get_ordered_ops()
                   if op.get_type_name() == "Constant" and len(op.get_output_partial_shape(0)) >= 2)


def _calibration_texts(path: str, samples: int) -> list[str]:
    text = Path(path).read_text(encoding="utf-8")
    chunks = [text[i:i + _CHUNK_CHARS] for i in range(0, len(text), _CHUNK_CHARS) if text[i:i + _CHUNK_CHARS].strip()]
    return chunks[:samples]


def _check_applied(types: Counter[str], recipe: OvGenAIRecipe, candidate: str) -> None:
    have = set(types)
    if recipe.weights == "int4" and not have & _FOUR_BIT:
        raise CandidateFailed("unsupported-op", f"{candidate}: INT4 weight compression was not applied (the IR's "
                              f"weights are {', '.join(sorted(have))}); the layers' shapes may not fit group size "
                              f"{recipe.group_size}")
    if recipe.weights == "int8" and (not have & _EIGHT_BIT or have & _FOUR_BIT):
        raise CandidateFailed("unsupported-op", f"{candidate}: INT8 weight compression was not applied as asked "
                              f"(the IR's weights are {', '.join(sorted(have))})")
    if recipe.weights == "fp16" and have & (_FOUR_BIT | _EIGHT_BIT):
        raise CandidateFailed("build-error", f"{candidate}: the fp16 reference came out compressed "
                              f"({', '.join(sorted(have))})")


class OvGenAIBackend(Backend):
    name: ClassVar[str] = "openvino-genai"
    formats: ClassVar[frozenset[str]] = frozenset({"hf"})
    devices: ClassVar[frozenset[str]] = frozenset({"cpu"})
    extra: ClassVar[str] = "openvino-genai"
    recipe_type: ClassVar[type[Recipe]] = OvGenAIRecipe
    requires: ClassVar[tuple[str, ...]] = ("openvino_genai", "openvino_tokenizers", "optimum.intel", "nncf")
    distributions: ClassVar[tuple[str, ...]] = ("openvino", "openvino-genai", "openvino-tokenizers", "nncf",
                                                "optimum-intel", "transformers")
    calibrated_recipe: ClassVar[str] = "AWQ / scale estimation"
    model_kinds: ClassVar[frozenset[str]] = frozenset({"llm"})

    def optimize(self, *, model: ModelRef, assessment: Assessment, recipe: Recipe, candidate: str,
                 out_dir: Path, calibration: Dataset | None = None) -> Artifact:
        from edgeopt.records import Artifact

        self.check_request(model=model, recipe=recipe, candidate=candidate, calibration=calibration)
        assert isinstance(recipe, OvGenAIRecipe)
        if assessment.kind not in self.model_kinds:
            raise CandidateFailed("build-error", f"{candidate}: openvino-genai builds language models; this model "
                                  f"is a {assessment.kind}")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        texts = (_calibration_texts(calibration.path, recipe.calibration_samples)  # type: ignore[union-attr,arg-type]
                 if recipe.needs_calibration() else None)
        final = out_dir / "ov"
        with tempfile.TemporaryDirectory(prefix=".build-", dir=out_dir) as tmp:
            built = Path(tmp) / "ov"
            try:
                _export(Path(model.path), built, recipe, texts)
            except CandidateFailed:
                raise
            except Exception as exc:
                raise CandidateFailed("build-error", f"{candidate}: OpenVINO export with weight compression "
                                      f"failed: {short_message(exc)}") from exc
            types = weight_types(built / "openvino_model.xml")
            _check_applied(types, recipe, candidate)
            executes = _executed_precision(built / "openvino_model.xml", recipe.threads)
            if final.exists():
                shutil.rmtree(final)
            os.replace(built, final)
        size = sum(p.stat().st_size for p in final.iterdir() if p.suffix in (".bin", ".xml"))
        notes = ["weights: " + ", ".join(f"{k}×{v}" for k, v in sorted(types.items())),
                 f"CPU plugin executes in {executes} (INFERENCE_PRECISION_HINT)"]
        if recipe.weights == "int4":
            notes.append(f"int4 {'sym' if recipe.sym else 'asym'}, group {recipe.group_size}, ratio {recipe.ratio:g}"
                         + (", AWQ" if recipe.awq else "") + (", scale estimation" if recipe.scale_estimation else ""))
        if texts is not None:
            notes.append(f"data-aware compression on {len(texts)} chunks of {Path(calibration.path).name}")  # type: ignore[union-attr,arg-type]
        log.info("%s: built %s (%d bytes)", candidate, final, size)
        return Artifact(candidate=candidate, backend=self.name, path=str(final), sha256=path_sha256(final),
                        size_bytes=size, parent_sha256=model.sha256, precision=recipe.precision(),
                        runtime=recipe.runtime_options(), tool_versions=self.tool_versions(), notes=tuple(notes))

    def load(self, *, path: str, runtime: dict[str, Any]) -> OvGenAISession:
        return OvGenAISession(path, runtime)

    def warm(self, *, runtime: dict[str, Any]) -> None:
        _warm_cpu_plugin(runtime.get("threads"))

    def generate_job(self, job: dict[str, Any]) -> dict[str, Any]:
        return generate_job(job)  # this module's loop (a module-level function, below)

    def llm_session(self, *, path: str, runtime: dict[str, Any], window: int) -> OvGenAISession:
        return OvGenAISession(path, runtime)  # the IR's logits of any length: no context to size

    def weight_bytes_per_token(self, *, path: str | Path) -> int:
        xml = Path(path) / "openvino_model.xml"
        if not xml.is_file():
            raise ModelError(f"{path}: no openvino_model.xml; an {self.name} artifact is the folder its build wrote")
        return weight_bytes_per_token(xml)  # the module-level function


def _warm_cpu_plugin(threads: int | None) -> None:
    """Load OpenVINO's CPU plugin, its thread pool and kernels with a tiny model (run once, released), so
    that the memory reference point taken after it counts only what the language model adds."""
    import openvino as ov

    from edgeopt.backends.base import WARM_SIZE, tiny_onnx_model

    core = ov.Core()
    with tempfile.TemporaryDirectory(prefix="edgeopt-warm-") as tmp:
        path = Path(tmp) / "warm.onnx"
        path.write_bytes(tiny_onnx_model())
        compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads} if threads else {})
        compiled.create_infer_request().infer({0: np.ones((1, WARM_SIZE), dtype=np.float32)})
        del compiled


def _export(src: Path, dst: Path, recipe: OvGenAIRecipe, texts: list[str] | None) -> None:
    """optimum-intel's export with the recipe's weight compression, plus the GenAI tokenizer pair; quiet (the
    exporter's warnings, NNCF's tables and progress bars go to the log) and one build at a time per process
    (the lock ``quiet_nncf`` holds: two threads importing optimum.intel at once saw half-initialised modules)."""
    import transformers

    from edgeopt.backends.optimum_intel import _declined_telemetry, _quiet
    from edgeopt.backends.ov_nncf import import_nncf
    from edgeopt.intake.hf import quiet_transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: everything is local
    import_nncf()  # before optimum.intel, which imports it (its telemetry off first)
    with _quiet(), quiet_transformers(transformers), _declined_telemetry():
        _export_quietly(src, dst, recipe, texts)


def _export_quietly(src: Path, dst: Path, recipe: OvGenAIRecipe, texts: list[str] | None) -> None:
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer
    from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig
    from transformers import AutoTokenizer

    quantization = None
    if recipe.weights != "fp16":
        options: dict[str, Any] = {"bits": 4 if recipe.weights == "int4" else 8, "sym": recipe.sym}
        if recipe.weights == "int4":
            options |= {"group_size": recipe.group_size, "ratio": recipe.ratio}
        if texts is not None:
            options |= {"dataset": texts, "tokenizer": str(src), "awq": recipe.awq,
                        "scale_estimation": recipe.scale_estimation, "num_samples": len(texts)}
        quantization = OVWeightQuantizationConfig(**options)
    model = OVModelForCausalLM.from_pretrained(str(src), export=True, compile=False, load_in_8bit=False,
                                               quantization_config=quantization)
    model.save_pretrained(str(dst))
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    tokenizer.save_pretrained(str(dst))
    encoder, decoder = convert_tokenizer(tokenizer, with_detokenizer=True)
    ov.save_model(encoder, str(dst / "openvino_tokenizer.xml"))
    ov.save_model(decoder, str(dst / "openvino_detokenizer.xml"))


def _executed_precision(xml: Path, threads: int | None) -> str:
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
    compiled = core.compile_model(core.read_model(str(xml)), "CPU", config)
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    return hint.to_string() if hasattr(hint, "to_string") else str(hint)


_CACHE_BYTES = {"u8": 1.0, "i8": 1.0, "u4": 0.5, "i4": 0.5, "f16": 2.0, "bf16": 2.0, "f32": 4.0}


def kv_bytes_per_token(xml: str | Path) -> float | None:
    """Bytes the CPU plugin keeps in its KV cache per token of context for the IR ``xml``: for every KV state
    (``ReadValue`` of shape [batch, kv_heads, tokens, head_size]) kv_heads × head_size elements in the key or
    value cache precision the plugin uses (``KEY_CACHE_PRECISION`` / ``VALUE_CACHE_PRECISION``), plus, for an
    integer cache, a float32 scale and zero point per head and group (``*_CACHE_GROUP_SIZE``; 0 = one group
    per head). None when the IR has no KV state of that shape (not a stateful LLM) or a precision is unknown."""
    import openvino as ov

    core = ov.Core()
    prec = {side: str(core.get_property("CPU", f"{side.upper()}_CACHE_PRECISION").get_type_name())
            for side in ("key", "value")}
    group = {side: int(core.get_property("CPU", f"{side.upper()}_CACHE_GROUP_SIZE")) for side in ("key", "value")}
    states = [op for op in core.read_model(str(xml)).get_ops() if op.get_type_name() == "ReadValue"]
    total = 0.0
    for op in states:
        shape = op.get_output_partial_shape(0)
        if shape.rank.is_dynamic or shape.rank.get_length() != 4 or shape[1].is_dynamic or shape[3].is_dynamic:
            return None
        heads, size = shape[1].get_length(), shape[3].get_length()
        # optimum-intel names them "past_key_values.<layer>.keypresent.<layer>.key" / "...value"
        side = "value" if str(op.get_variable_id()).lower().endswith("value") else "key"
        if prec[side] not in _CACHE_BYTES:
            return None
        total += heads * size * _CACHE_BYTES[prec[side]]
        if prec[side] in ("u8", "i8", "u4", "i4"):
            groups = size // group[side] if group[side] and size % group[side] == 0 else 1
            total += heads * groups * 2 * 4  # float32 scale and zero point per head and group
    return total or None


def weight_bytes_per_token(xml: str | Path) -> int:
    """Weight bytes one generated token reads from the IR ``xml``: every constant at its stored element type
    (compressed weights with their scales and zero points) but the token-embedding table's, of which one row
    is gathered: the same definition as ``edgeopt.bench.generate.bytes_per_token`` for a GGUF. The embedding
    table is the constant (and its decompression scales / zero points) named ``embed_tokens``, as optimum-intel
    names it for every llama-like model."""
    import openvino as ov

    total = 0
    for op in ov.Core().read_model(str(xml)).get_ops():
        if op.get_type_name() == "Constant" and "embed_tokens" not in op.get_friendly_name():
            total += int(op.get_byte_size())
    return total


class OvGenAISession(HFTokenizerSession):
    """The IR's logits (optimum-intel) behind the llama.cpp-like surface of ``edgeopt.evaluate.llm``, and the
    ``Session`` protocol: ``run({"input_ids": [batch, seq]})`` -> logits [batch, seq, vocab]."""

    def __init__(self, path: str, runtime: dict[str, Any]) -> None:
        from optimum.intel import OVModelForCausalLM
        from transformers import AutoTokenizer

        threads = runtime.get("threads")
        super().__init__()
        self.model = OVModelForCausalLM.from_pretrained(
            path, ov_config={"INFERENCE_NUM_THREADS": str(threads)} if threads else {}, compile=True)
        self.tokenizer = AutoTokenizer.from_pretrained(path)

    def _logits(self, ids: list[int]) -> np.ndarray:
        import torch

        x = torch.tensor([ids], dtype=torch.int64)
        out = self.model(input_ids=x, attention_mask=torch.ones_like(x))
        return np.asarray(out.logits[0].float().numpy(), dtype=np.float32)

    def generate(self, ids: list[int], *, temp: float = 0.0, top_k: int = 1, reset: bool = True,
                 max_tokens: int = 64) -> Iterator[int]:
        """Greedy continuation of ``ids`` (only greedy: ``temp`` 0 / ``top_k`` 1, as the evaluators ask)."""
        import torch

        context = self._context(ids, temp=temp, top_k=top_k, reset=reset)
        x = torch.tensor([context], dtype=torch.int64)
        out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False)
        yield from (int(t) for t in out[0][len(context):])


def generate_job(job: dict[str, Any]) -> dict[str, Any]:
    """Worker side of a generation measurement (``edgeopt.bench.generate``): the same figures as llama.cpp's."""
    import openvino as ov
    import openvino_genai

    from edgeopt.bench import memory
    from edgeopt.bench.generate import generation_figures

    threads = int(job["runtime"].get("threads") or os.cpu_count() or 1)
    _warm_cpu_plugin(threads)  # the CPU plugin and its thread pool are the runtime's, not the model's memory
    before = memory.read()
    memory.reset_peak()
    t0 = time.perf_counter()
    pipe = openvino_genai.LLMPipeline(job["path"], "CPU", INFERENCE_NUM_THREADS=threads, ATTENTION_BACKEND="SDPA")
    load_ms = (time.perf_counter() - t0) * 1e3
    prompt = np.asarray([[int(t) for t in job["prompt"]]], dtype=np.int64)
    inputs = openvino_genai.TokenizedInputs(ov.Tensor(prompt), ov.Tensor(np.ones_like(prompt)))
    n_gen = int(job["gen_tokens"])

    def config(tokens: int) -> Any:
        cfg = openvino_genai.GenerationConfig()
        cfg.max_new_tokens = cfg.min_new_tokens = tokens  # EOS does not stop it: the same work every time
        cfg.do_sample = False
        return cfg

    full, first = config(n_gen), config(1)
    pipe.generate(inputs, full)  # warm-up: kernels, thread pools, pages of the weights
    prompt_tps, ttft, gen_tps, latencies = [], [], [], []
    for _ in range(int(job["repeats"])):
        start = time.perf_counter()
        pipe.generate(inputs, first)  # the prompt and one token: what llama.cpp's prompt figure times
        prompt_tps.append(prompt.shape[1] / (time.perf_counter() - start))
        result = pipe.generate(inputs, full)
        metrics = result.perf_metrics
        stamps = np.asarray(list(metrics.raw_metrics.m_new_token_times), dtype=np.float64)  # ms
        steps = list(np.diff(stamps))
        if len(steps) != n_gen - 1:
            raise RuntimeError(f"openvino_genai generated {len(steps) + 1} tokens, not {n_gen}")
        ttft.append(float(metrics.get_ttft().mean))
        latencies.extend(steps)
        gen_tps.append(len(steps) / (sum(steps) / 1e3))
    figures = generation_figures(prompt_tps=prompt_tps, gen_tps=gen_tps, ttft=ttft, latencies=latencies,
                                 before=before, load_ms=load_ms, threads=threads)
    figures["kv_bytes_per_token"] = kv_bytes_per_token(Path(job["path"]) / "openvino_model.xml")  # after the timing
    return figures
