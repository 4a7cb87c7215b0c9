"""ONNX Runtime GenAI backend for language models: the model builder's int4 weights, run by ``onnxruntime_genai``.

Public surface: ``OrtGenAIRecipe``, ``OrtGenAIBackend``, ``OrtGenAISession``, ``generate_job``, ``open_model``,
``matmul_weights``, ``kv_bytes_per_token`` and ``weight_bytes_per_token``.

* **Build**: ``python -m onnxruntime_genai.models.builder`` on the Hugging Face checkpoint, offline, in a fresh
  process (its output to the build log): int4 weights in ONNX Runtime's ``MatMulNBits`` kernels (block size,
  symmetry and the accuracy level, i.e. the compute type of the activations: 4 = int8 on CPU), or the fp32
  reference. The folder it writes (``genai_config.json``, ``model.onnx`` + ``model.onnx.data``, tokenizer files)
  is the artifact. What was applied is read back from ``model.onnx`` (``MatMulNBits`` nodes and their
  ``bits`` / ``block_size`` / ``accuracy_level``, matrices left in float): an int4 request with no 4-bit
  ``MatMulNBits`` at the recipe's block size fails the candidate.
* **Generation** (``generate_job``, in the fresh measuring process): ``onnxruntime_genai.Generator`` with the
  profile's threads (``session_options`` overlaid on ``genai_config.json``), greedy, exactly the job's number
  of new tokens (``min_length`` = ``max_length``: EOS does not stop it); the prompt figure times
  ``append_tokens`` of the prompt on a fresh generator, the per-token intervals are the times between
  ``generate_next_token`` returns. The KV-cache figure is what the CPU runtime stores per token: 2 (K and V) ×
  layers × KV heads × head size at the element type of the model's ``present`` outputs.
* **Evaluation** (``OrtGenAISession``): every position's logits of a token sequence (``get_output("logits")``
  after ``append_tokens``), behind the llama.cpp-like surface ``edgeopt.evaluate.llm`` uses.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from edgeopt.backends.base import Backend, Recipe
from edgeopt.backends.llm_session import HFTokenizerSession
from edgeopt.data import path_sha256
from edgeopt.errors import CandidateFailed, ModelError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from edgeopt.data import Dataset
    from edgeopt.records import Artifact, Assessment, ModelRef

__all__ = ["OrtGenAIBackend", "OrtGenAIRecipe", "OrtGenAISession", "generate_job", "kv_bytes_per_token",
           "matmul_weights", "open_model", "weight_bytes_per_token"]

log = logging.getLogger(__name__)

#: the block sizes ONNX Runtime's blockwise quantization (MLAS) accepts
BLOCK_SIZES = (16, 32, 64, 128, 256)
_BUILD_TIMEOUT_S = 3600.0
#: ONNX element types -> bytes
_ELEMENT_BYTES = {1: 4, 10: 2, 16: 2, 11: 8, 3: 1, 2: 1, 6: 4, 7: 8}
_ELEMENT_NAMES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64"}


class OrtGenAIRecipe(Recipe):
    """An ONNX Runtime GenAI candidate: the model builder's weight quantization and the runtime's threads."""

    weights: Literal["int4", "fp32"] = Field(default="int4", description="weight type (fp32: no quantization, "
                                             "the ONNX Runtime reference)")
    block_size: int = Field(default=128, description=f"int4: weights per scale block ({', '.join(map(str, BLOCK_SIZES))})")
    accuracy_level: int = Field(default=4, ge=0, le=4, description="int4: the MatMulNBits compute type of the "
                                "activations (4: int8, 3: bf16, 2: fp16, 1: fp32, 0: the kernel's default)")
    sym: bool = Field(default=True, description="int4: symmetric weights (False: with zero points)")
    threads: int | None = Field(default=None, ge=1, description="inference threads (None: the profile's budget)")

    @field_validator("block_size")
    @classmethod
    def _block(cls, value: int) -> int:
        if value not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {', '.join(map(str, BLOCK_SIZES))}; got {value}")
        return value

    def runtime_options(self) -> dict[str, Any]:
        return {"threads": self.threads, "device": "CPU"}

    def precision(self) -> str:
        return self.weights

    def builder_args(self) -> list[str]:
        """The model builder's precision and ``--extra_options`` for this recipe (CPU execution provider)."""
        args = ["-p", self.weights, "-e", "cpu"]
        if self.weights == "int4":
            args += ["--extra_options", f"block_size={self.block_size}", f"accuracy_level={self.accuracy_level}",
                     f"is_symmetric={str(self.sym).lower()}"]
        return args


def _graph(onnx_path: str | Path) -> Any:
    import onnx

    return onnx.load(str(onnx_path), load_external_data=False).graph


def matmul_weights(onnx_path: str | Path) -> dict[str, Any]:
    """What the model's weight matrices are, read from ``model.onnx``: the ``MatMulNBits`` nodes (count, and their
    ``bits`` / ``block_size`` / ``accuracy_level`` attributes counted; how many carry zero points) and the MatMul /
    Gemm nodes whose weight is a float initializer (left in float), and the embedding table's element type."""
    from onnx import helper

    graph = _graph(onnx_path)
    inits = {t.name: t for t in graph.initializer}
    nbits, attrs = 0, {"bits": Counter(), "block_size": Counter(), "accuracy_level": Counter()}
    zero_points, floats, embedding = 0, [], None
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            nbits += 1
            values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            for key, counts in attrs.items():
                counts[int(values.get(key, 0))] += 1
            zero_points += len(node.input) > 3 and bool(node.input[3])
        elif node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits:
            floats.append(node.name or node.input[1])
        elif node.op_type == "Gather" and node.input[0] in inits and node.input[1] == "input_ids":
            embedding = _ELEMENT_NAMES.get(inits[node.input[0]].data_type, str(inits[node.input[0]].data_type))
    return {"matmulnbits": nbits, **{k: dict(v) for k, v in attrs.items()}, "zero_points": zero_points,
            "float": floats, "embedding": embedding}


def _check_applied(applied: dict[str, Any], recipe: OrtGenAIRecipe, candidate: str) -> None:
    if recipe.weights == "int4":
        if not applied["matmulnbits"]:
            raise CandidateFailed("unsupported-op", f"{candidate}: int4 was not applied: model.onnx has no MatMulNBits "
                                  f"node ({len(applied['float'])} MatMul weights in float)")
        if set(applied["bits"]) != {4} or set(applied["block_size"]) != {recipe.block_size}:
            raise CandidateFailed("unsupported-op", f"{candidate}: int4 block {recipe.block_size} was not applied as "
                                  f"asked: MatMulNBits bits {applied['bits']}, block sizes {applied['block_size']}")
    elif applied["matmulnbits"]:
        raise CandidateFailed("build-error", f"{candidate}: the fp32 reference came out quantized "
                              f"({applied['matmulnbits']} MatMulNBits nodes)")


def _failure_line(text: str) -> str:
    """The builder's own reason, from its output: the last exception line, without C++ source locations."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"^\w+(\.\w+)*(Error|Exception|Interrupt)\b:?", ln)]
    line = errors[-1] if errors else (lines[-1] if lines else "no output")
    line = re.sub(r"\S+\.(?:cc|cpp|h):\d+ .*? was false\. ?", "", line)
    return line if len(line) <= 300 else line[:297] + "..."


def _build(src: Path, dst: Path, recipe: OrtGenAIRecipe, candidate: str, work: Path) -> None:
    """The model builder in a fresh process, offline; its output goes to descriptor 2 (the build log)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "1"}
    src, dst, work = src.resolve(), dst.resolve(), work.resolve()  # the builder runs in ``work``
    args = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(dst),
            "-c", str(work / "cache"), *recipe.builder_args()]
    try:
        proc = subprocess.run(args, env=env, cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=_BUILD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise CandidateFailed("timeout", f"{candidate}: the onnxruntime-genai model builder took over "
                              f"{_BUILD_TIMEOUT_S:.0f} s") from exc
    os.write(2, proc.stdout)
    if proc.returncode != 0 or not (dst / "genai_config.json").is_file() or not (dst / "model.onnx").is_file():
        text = proc.stdout.decode("utf-8", "replace")
        reason = "unsupported-op" if "not currently supported" in text or "NotImplementedError" in text else "build-error"
        raise CandidateFailed(reason, f"{candidate}: the onnxruntime-genai model builder failed "
                              f"(exit {proc.returncode}): {_failure_line(text)}")


def _session_options(threads: int | None) -> dict[str, Any]:
    return {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1} if threads else {}


def _write_threads(folder: Path, threads: int | None) -> None:
    """The recipe's threads into the artifact's ``genai_config.json`` (so the folder runs as measured elsewhere)."""
    if not threads:
        return
    path = folder / "genai_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["model"]["decoder"].setdefault("session_options", {}).update(_session_options(threads))
    path.write_text(json.dumps(config, indent=4), encoding="utf-8")


class OrtGenAIBackend(Backend):
    name: ClassVar[str] = "onnxruntime-genai"
    formats: ClassVar[frozenset[str]] = frozenset({"hf"})
    devices: ClassVar[frozenset[str]] = frozenset({"cpu"})
    extra: ClassVar[str] = "onnxruntime-genai"
    recipe_type: ClassVar[type[Recipe]] = OrtGenAIRecipe
    requires: ClassVar[tuple[str, ...]] = ("onnxruntime_genai", "onnxruntime", "onnx", "onnx_ir", "transformers",
                                           "torch")
    distributions: ClassVar[tuple[str, ...]] = ("onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir",
                                                "transformers", "torch")
    model_kinds: ClassVar[frozenset[str]] = frozenset({"llm"})

    def optimize(self, *, model: ModelRef, assessment: Assessment, recipe: Recipe, candidate: str,
                 out_dir: Path, calibration: Dataset | None = None) -> Artifact:
        from edgeopt.records import Artifact

        self.check_request(model=model, recipe=recipe, candidate=candidate, calibration=calibration)
        assert isinstance(recipe, OrtGenAIRecipe)
        if assessment.kind not in self.model_kinds:
            raise CandidateFailed("build-error", f"{candidate}: onnxruntime-genai builds language models; this "
                                  f"model is a {assessment.kind}")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        final = out_dir.resolve() / "ort-genai"
        with tempfile.TemporaryDirectory(prefix=".build-", dir=out_dir) as tmp:
            built = Path(tmp) / "ort-genai"
            _build(Path(model.path), built, recipe, candidate, Path(tmp))
            applied = matmul_weights(built / "model.onnx")
            _check_applied(applied, recipe, candidate)
            _write_threads(built, recipe.threads)
            if final.exists():
                shutil.rmtree(final)
            os.replace(built, final)
        size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
        n_q, n_f = applied["matmulnbits"], len(applied["float"])
        notes = [f"MatMulNBits read back: {n_q} of {n_q + n_f} matrices quantized"
                 + (f", bits {applied['bits']}, block sizes {applied['block_size']}, accuracy levels "
                    f"{applied['accuracy_level']}, {applied['zero_points']} with zero points" if n_q else "")
                 + (f"; left in float: {', '.join(applied['float'][:3])}" + ("..." if n_f > 3 else "") if n_f else ""),
                 f"embedding table in {applied['embedding']}",
                 f"threads: {recipe.threads or 'the profile budget'} (session_options intra_op, inter_op 1)"]
        log.info("%s: built %s (%d bytes)", candidate, final, size)
        return Artifact(candidate=candidate, backend=self.name, path=str(final), sha256=path_sha256(final),
                        size_bytes=size, parent_sha256=model.sha256, precision=recipe.precision(),
                        runtime=recipe.runtime_options(), tool_versions=self.tool_versions(), notes=tuple(notes))

    def load(self, *, path: str, runtime: dict[str, Any]) -> OrtGenAISession:
        return OrtGenAISession(path, runtime)

    def warm(self, *, runtime: dict[str, Any]) -> None:
        _warm(runtime.get("threads"))

    def generate_job(self, job: dict[str, Any]) -> dict[str, Any]:
        return generate_job(job)  # this module's loop (a module-level function, below)

    def llm_session(self, *, path: str, runtime: dict[str, Any], window: int) -> OrtGenAISession:
        return OrtGenAISession(path, runtime)  # a generator sized to each sequence: no context to size

    def weight_bytes_per_token(self, *, path: str | Path) -> int:
        folder = Path(path)
        if not (folder / "genai_config.json").is_file() or not (folder / "model.onnx").is_file():
            raise ModelError(f"{path}: does not hold genai_config.json and model.onnx; an {self.name} artifact is "
                             "the folder its model builder wrote")
        return weight_bytes_per_token(folder / "model.onnx")  # the module-level function


def _warm(threads: int | None) -> None:
    """Load ONNX Runtime (and GenAI's library), its thread pool and kernels with a tiny model (run once, released),
    so that the memory reference point taken after it counts only what the language model adds."""
    import onnxruntime as ort
    import onnxruntime_genai  # noqa: F401  (its native library)

    from edgeopt.backends.base import WARM_SIZE, tiny_onnx_model

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = int(threads), 1
    session = ort.InferenceSession(tiny_onnx_model(), options, providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.ones((1, WARM_SIZE), dtype=np.float32)})
    del session


def open_model(path: str | Path, *, threads: int | None) -> Any:
    """``onnxruntime_genai.Model`` of the folder with ``threads`` intra-op threads (overlaid, the folder untouched)."""
    import onnxruntime_genai as og

    config = og.Config(str(path))
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": _session_options(threads)}}}))
    return og.Model(config)


def _genai_config(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "genai_config.json").read_text(encoding="utf-8"))


def kv_bytes_per_token(path: str | Path) -> float | None:
    """Bytes of K and V the CPU runtime stores per context token: 2 × layers × KV heads × head size (from
    ``genai_config.json``) at the element type of the model's ``present.*`` outputs; None if not readable."""
    decoder = _genai_config(path).get("model", {}).get("decoder", {})
    try:
        layers, heads, size = (int(decoder[k]) for k in ("num_hidden_layers", "num_key_value_heads", "head_size"))
    except (KeyError, TypeError, ValueError):
        return None
    graph = _graph(Path(path) / decoder.get("filename", "model.onnx"))
    present = [o.type.tensor_type.elem_type for o in graph.output if o.name.startswith("present")]
    if not present or len(set(present)) != 1 or present[0] not in _ELEMENT_BYTES or len(present) != 2 * layers:
        return None
    return float(2 * layers * heads * size * _ELEMENT_BYTES[present[0]])


def weight_bytes_per_token(onnx_path: str | Path) -> int:
    """Weight bytes one generated token reads from ``model.onnx``: every initializer as stored (4-bit blocks with
    their scales and zero points) but the token-embedding table (the ``Gather`` on ``input_ids``: one row is read)
    and the rotary cos/sin caches (one position is read): the definition of ``edgeopt.bench.generate.bytes_per_token``."""
    graph = _graph(onnx_path)
    skip = set()
    for node in graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == "input_ids":
            skip.add(node.input[0])
        elif node.op_type == "GroupQueryAttention":
            skip.update(node.input[7:9])  # cos_cache, sin_cache
    total = 0
    for t in graph.initializer:
        if t.name in skip:
            continue
        external = {e.key: e.value for e in t.external_data}
        if "length" in external:
            total += int(external["length"])
        elif t.raw_data:
            total += len(t.raw_data)
        else:
            total += int(np.prod(t.dims, dtype=np.int64)) * _ELEMENT_BYTES.get(t.data_type, 4)
    return total


class OrtGenAISession(HFTokenizerSession):
    """The model's logits (``onnxruntime_genai``) behind the llama.cpp-like surface of ``edgeopt.evaluate.llm``, and
    the ``Session`` protocol: ``run({"input_ids": [batch, seq]})`` -> logits [batch, seq, vocab]."""

    def __init__(self, path: str, runtime: dict[str, Any]) -> None:
        from transformers import AutoTokenizer

        super().__init__()
        self.model = open_model(path, threads=runtime.get("threads"))
        self.tokenizer = AutoTokenizer.from_pretrained(path)

    def _generator(self, length: int) -> Any:
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=length, do_sample=False)
        return og.Generator(self.model, params)

    def _logits(self, ids: list[int]) -> np.ndarray:
        """Every position's logits: ``append_tokens`` runs the whole sequence, ``logits`` holds them all."""
        generator = self._generator(len(ids))
        generator.append_tokens(np.asarray([ids], dtype=np.int32))
        return np.asarray(generator.get_output("logits")[0], dtype=np.float32)

    def generate(self, ids: list[int], *, temp: float = 0.0, top_k: int = 1, reset: bool = True,
                 max_tokens: int = 64) -> Iterator[int]:
        """Greedy continuation of ``ids`` (only greedy: ``temp`` 0 / ``top_k`` 1, as the evaluators ask)."""
        context = self._context(ids, temp=temp, top_k=top_k, reset=reset)
        generator = self._generator(len(context) + max_tokens)
        generator.append_tokens(np.asarray([context], dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])


def generate_job(job: dict[str, Any]) -> dict[str, Any]:
    """Worker side of a generation measurement (``edgeopt.bench.generate``): the same figures as llama.cpp's."""
    import onnxruntime_genai as og

    from edgeopt.bench import memory
    from edgeopt.bench.generate import generation_figures

    threads = int(job["runtime"].get("threads") or os.cpu_count() or 1)
    _warm(threads)  # ONNX Runtime and its thread pool are the runtime's, not the model's memory
    before = memory.read()
    memory.reset_peak()
    t0 = time.perf_counter()
    model = open_model(job["path"], threads=threads)
    load_ms = (time.perf_counter() - t0) * 1e3
    prompt = np.asarray([[int(t) for t in job["prompt"]]], dtype=np.int32)
    n_gen = int(job["gen_tokens"])
    params = og.GeneratorParams(model)
    total = prompt.shape[1] + n_gen  # EOS does not stop it: the same work every time
    params.set_search_options(max_length=total, min_length=total, do_sample=False)

    def generate() -> tuple[float, list[float]]:
        generator = og.Generator(model, params)  # an empty KV cache: nothing of the previous repeat reused
        stamps: list[float] = []
        start = time.perf_counter()
        generator.append_tokens(prompt)
        while not generator.is_done():
            generator.generate_next_token()
            stamps.append(time.perf_counter())
        if len(stamps) != n_gen:
            raise RuntimeError(f"onnxruntime_genai generated {len(stamps)} tokens, not {n_gen}")
        return (stamps[0] - start) * 1e3, list(np.diff(stamps) * 1e3)

    generate()  # warm-up: kernels, thread pools, pages of the weights
    prompt_tps, ttft, gen_tps, latencies = [], [], [], []
    for _ in range(int(job["repeats"])):
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt)  # the prompt's forward pass: what llama.cpp's prompt figure times
        prompt_tps.append(prompt.shape[1] / (time.perf_counter() - start))
        del generator
        first, steps = generate()
        ttft.append(first)
        latencies.extend(steps)
        gen_tps.append(len(steps) / (sum(steps) / 1e3))
    return generation_figures(prompt_tps=prompt_tps, gen_tps=gen_tps, ttft=ttft, latencies=latencies, before=before,
                              load_ms=load_ms, threads=threads, kv_bytes_per_token=kv_bytes_per_token(job["path"]))
