"""llama.cpp through ``llama-cpp-python`` (pip extra ``llama``): GGUF quantization and generation.

A Hugging Face llama-family checkpoint is first converted to GGUF F16 (``edgeopt.convert.hf_gguf``);
a GGUF input is used as it is. ``llama_model_quantize`` then writes the recipe's quant type, with an
importance matrix when the recipe asks for one (computed from the calibration text on the F32
checkpoint: the mean squared input activation of every matrix's columns, as llama.cpp's ``imatrix``
tool collects it). llama.cpp reports success even when it silently falls back to another type for a
tensor whose rows the type cannot take: the result's tensor types are read back, recorded in the
artifact's notes, and a candidate whose matrices did not get the requested type fails.
Runtime settings (threads, batch / micro-batch, context, KV-cache type, flash attention, mmap) are
recipe fields carried to the measuring process in ``Artifact.runtime``; the generation measuring loop is in
``edgeopt.backends.llamacpp_generate``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from edgeopt.backends.base import Backend, Recipe
from edgeopt.data import file_sha256
from edgeopt.errors import CandidateFailed, ModelError

if TYPE_CHECKING:
    from edgeopt.data import Dataset
    from edgeopt.records import Artifact, Assessment, ModelRef

__all__ = ["ALLOWED_TYPES", "QUANT_TYPES", "LlamaCppBackend", "LlamaCppRecipe", "LlamaSession", "build_isa_gap",
           "check_types", "compute_imatrix", "quantize_gguf"]

log = logging.getLogger(__name__)

QuantType = Literal["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K_M", "Q2_K"]
#: recipe quant -> llama_ftype name in llama_cpp
QUANT_TYPES: dict[str, str] = {"F16": "LLAMA_FTYPE_MOSTLY_F16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
                               "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K", "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                               "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
                               "IQ4_XS": "LLAMA_FTYPE_MOSTLY_IQ4_XS", "Q4_K_S": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
                               "IQ4_NL": "LLAMA_FTYPE_MOSTLY_IQ4_NL", "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
                               "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K"}
#: types llama.cpp's own mix puts in matrices for each quant (its K-mixes give some tensors more bits;
#: output.weight gets Q6_K by default). Anything else in a matrix is a fallback: the type was not applied.
ALLOWED_TYPES: dict[str, frozenset[str]] = {
    "F16": frozenset({"F16"}),
    "Q8_0": frozenset({"Q8_0"}),
    "Q6_K": frozenset({"Q6_K"}),
    "Q5_K_M": frozenset({"Q5_K", "Q6_K"}),
    "Q4_K_M": frozenset({"Q4_K", "Q6_K"}),
    "Q4_0": frozenset({"Q4_0", "Q6_K"}),
    "IQ4_XS": frozenset({"IQ4_XS", "Q4_K", "Q5_K", "Q6_K"}),
    "Q4_K_S": frozenset({"Q4_K", "Q5_K", "Q6_K"}),
    "IQ4_NL": frozenset({"IQ4_NL", "Q5_K", "Q6_K"}),
    "Q3_K_M": frozenset({"Q3_K", "Q4_K", "Q5_K", "Q6_K"}),
    "Q2_K": frozenset({"Q2_K", "Q3_K", "Q4_K", "Q6_K"}),
}
#: KV-cache type -> ggml type name
KV_TYPES = {"f16": "GGML_TYPE_F16", "q8_0": "GGML_TYPE_Q8_0", "q4_0": "GGML_TYPE_Q4_0"}
_IMATRIX_CHUNK = 128
#: llama.cpp's own choice for output.weight (Q6_K, or Q8_0 when its rows do not take 256-blocks)
_OUTPUT_TYPES = frozenset({"Q6_K", "Q8_0"})


class LlamaCppRecipe(Recipe):
    """A llama.cpp candidate: a quant type and the settings it runs with."""

    quant: QuantType = Field(default="Q4_K_M", description="GGUF weight type (llama.cpp's file-type mixes; "
                             "F16 is the unquantized baseline)")
    imatrix: bool = Field(default=False, description="quantize with an importance matrix computed from the "
                          "calibration text (needs --calibration)")
    threads: int | None = Field(default=None, ge=1, description="generation threads (None: the profile's "
                                "thread budget, else all physical cores)")
    n_batch: int = Field(default=512, ge=1, description="logical batch: prompt tokens submitted per decode call")
    n_ubatch: int = Field(default=512, ge=1, description="physical micro-batch: tokens computed at once")
    n_ctx: int = Field(default=512, ge=16, description="context length the model is run with (tokens)")
    kv_type: Literal["f16", "q8_0", "q4_0"] = Field(default="f16", description="KV-cache element type "
                                                    "(quantized caches need flash_attn)")
    flash_attn: bool = Field(default=False, description="llama.cpp's flash-attention kernels")
    mmap: bool = Field(default=True, description="map the weights from the file instead of reading them in")

    def needs_calibration(self) -> bool:
        return self.imatrix

    def runtime_options(self) -> dict[str, Any]:
        return {"threads": self.threads, "n_batch": self.n_batch, "n_ubatch": self.n_ubatch, "n_ctx": self.n_ctx,
                "kv_type": self.kv_type, "flash_attn": self.flash_attn, "mmap": self.mmap}


def check_types(types: dict[str, str], quant: str) -> list[str]:
    """Matrices (2-D ``*.weight`` tensors other than norms) whose type is outside the quant's mix."""
    allowed = ALLOWED_TYPES[quant]
    return sorted(f"{name}={t}" for name, t in types.items()
                  if name.endswith(".weight") and "norm" not in name and t not in allowed and t != "F32"
                  and not (name == "output.weight" and t in _OUTPUT_TYPES))


def _gguf_name_map(n_layer: int, model_type: str = "llama") -> Any:
    """gguf's map from the checkpoint's tensor names to the GGUF's for the architecture the converter writes
    (Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` become ``attn_qkv`` / ``ffn_up``)."""
    import gguf

    from edgeopt.convert.hf_gguf import CONVERTIBLE

    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
            "phi3": gguf.MODEL_ARCH.PHI3}[CONVERTIBLE.get(model_type, "llama")]
    return gguf.get_tensor_name_map(arch, n_layer)


def compute_imatrix(hf_folder: str | Path, text: str, *, max_tokens: int = 4096) -> dict[str, np.ndarray]:
    """GGUF tensor name -> mean squared input activation per column, from ``text`` on the F32 checkpoint."""
    import torch
    import transformers

    from edgeopt.intake.hf import quiet_transformers

    with quiet_transformers(transformers):
        tok = transformers.AutoTokenizer.from_pretrained(str(hf_folder), local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_folder), local_files_only=True,
                                                                  dtype=torch.float32).eval()
    names = _gguf_name_map(model.config.num_hidden_layers, model.config.model_type)
    sums: dict[str, torch.Tensor] = {}
    counts: Counter[str] = Counter()
    hooks = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            gguf_name = names.get_name(f"{module_name}.weight", try_suffixes=(".weight",))
            if gguf_name is None:
                continue

            def hook(_m, args, _out, key=gguf_name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sums[key] = sums.get(key, 0) + (x * x).sum(0)
                counts[key] += x.shape[0]

            hooks.append(module.register_forward_hook(hook))
    ids = tok(text)["input_ids"][:max_tokens]
    if len(ids) < _IMATRIX_CHUNK:
        raise CandidateFailed("missing-data", f"calibration text has {len(ids)} tokens; the importance matrix "
                              f"needs at least {_IMATRIX_CHUNK}")
    with torch.no_grad():
        for i in range(0, len(ids) - _IMATRIX_CHUNK + 1, _IMATRIX_CHUNK):
            model(torch.tensor(ids[i:i + _IMATRIX_CHUNK])[None])
    for h in hooks:
        h.remove()
    return {k: (v / counts[k]).float().numpy() for k, v in sums.items()}


def quantize_gguf(src: Path, dst: Path, quant: str, *, imatrix: dict[str, np.ndarray] | None = None,
                  threads: int | None = None) -> None:
    """``llama_model_quantize`` of ``src`` (F16/F32 GGUF) to ``dst``; CandidateFailed when it fails."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[quant])
    params.nthread = threads or 0
    keep: list[Any] = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(arr)
            entries[i].name = name.encode()
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None
        params.imatrix = entries
        keep.append(entries)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise CandidateFailed("build-error", f"llama_model_quantize to {quant} failed (return code {rc})")


class LlamaCppBackend(Backend):
    name: ClassVar[str] = "llamacpp"
    formats: ClassVar[frozenset[str]] = frozenset({"hf", "gguf"})
    devices: ClassVar[frozenset[str]] = frozenset({"cpu"})
    extra: ClassVar[str] = "llama"
    recipe_type: ClassVar[type[Recipe]] = LlamaCppRecipe
    requires: ClassVar[tuple[str, ...]] = ("llama_cpp", "gguf")
    distributions: ClassVar[tuple[str, ...]] = ("llama-cpp-python", "gguf")
    calibrated_recipe: ClassVar[str] = "an importance matrix"

    def optimize(self, *, model: ModelRef, assessment: Assessment, recipe: Recipe, candidate: str,
                 out_dir: Path, calibration: Dataset | None = None) -> Artifact:
        from edgeopt.intake.llm import read_gguf_types
        from edgeopt.records import Artifact

        self.check_request(model=model, recipe=recipe, candidate=candidate, calibration=calibration)
        assert isinstance(recipe, LlamaCppRecipe)
        if assessment.llm is not None and recipe.n_ctx > assessment.llm.context_length:
            raise CandidateFailed("build-error", f"{candidate}: n_ctx {recipe.n_ctx} exceeds the model's context "
                                  f"length {assessment.llm.context_length}; lower n_ctx in the recipe")
        out_dir.mkdir(parents=True, exist_ok=True)
        src = Path(model.path)
        notes: list[str] = []
        if model.format == "hf":
            try:
                f16 = converted_f16(src, model_sha256=model.sha256, cache_dir=out_dir.parent / ".gguf-f16")
            except ModelError as exc:
                raise CandidateFailed("unsupported-op", f"{candidate}: {exc}") from exc
        else:
            f16 = src
            found = {t for t in read_gguf_types(src).values()} - {"F32", "F16", "BF16"}
            if found and recipe.quant == "F16":
                notes.append(f"measured as-is: {src.name} is already quantized ({', '.join(sorted(found))})")
            if found and recipe.quant != "F16":
                raise CandidateFailed("build-error", f"{candidate}: {src.name} is already quantized "
                                      f"({', '.join(sorted(found))}); re-quantizing loses quality: give the F16 "
                                      "GGUF, or measure this file as-is with quant F16")
        final = out_dir / f"model-{recipe.quant.lower()}.gguf"
        if recipe.quant == "F16":
            final.unlink(missing_ok=True)
            shutil.copy2(f16, final)
        else:
            imatrix = None
            if recipe.imatrix:
                if model.format != "hf":
                    raise CandidateFailed("missing-data", f"{candidate}: an importance matrix is computed on the "
                                          "Hugging Face checkpoint; give the checkpoint folder, not a GGUF")
                text = Path(calibration.path).read_text(encoding="utf-8")  # type: ignore[union-attr,arg-type]
                imatrix = compute_imatrix(src, text)
                notes.append(f"importance matrix: {len(imatrix)} tensors from the calibration text")
            quantize_gguf(f16, final, recipe.quant, imatrix=imatrix, threads=recipe.threads)
        caveat = build_note()
        if caveat:
            log.warning("%s: %s", candidate, caveat)
            notes.append(caveat)
        types = read_gguf_types(final)
        mix = Counter(types.values())
        notes.append("tensor types: " + ", ".join(f"{k}×{v}" for k, v in sorted(mix.items())))
        bad = [] if any(n.startswith("measured as-is") for n in notes) else check_types(types, recipe.quant)
        if bad:
            raise CandidateFailed("unsupported-op", f"{candidate}: llama.cpp did not apply {recipe.quant} to "
                                  f"{len(bad)} matrices (e.g. {', '.join(bad[:3])}): their rows do not fit the "
                                  "type's block size; choose another quant type")
        return Artifact(candidate=candidate, backend=self.name, path=str(final), sha256=file_sha256(final),
                        size_bytes=final.stat().st_size, parent_sha256=model.sha256,
                        precision=recipe.quant.lower(), runtime=recipe.runtime_options(),
                        tool_versions=self.tool_versions(), notes=tuple(notes))

    def load(self, *, path: str, runtime: dict[str, Any]) -> LlamaSession:
        return LlamaSession(path, runtime)

    def warm(self, *, runtime: dict[str, Any]) -> None:
        import llama_cpp

        llama_cpp.llama_backend_init()

    def generate_job(self, job: dict[str, Any]) -> dict[str, Any]:
        from edgeopt.backends.llamacpp_generate import generate_job

        return generate_job(job)

    def llm_session(self, *, path: str, runtime: dict[str, Any], window: int) -> Any:
        """A ``llama_cpp.Llama`` keeping every position's logits, its context one window plus room for a BOS."""
        return open_llama(path, {**runtime, "n_ctx": window + 8}, logits_all=True)

    def weight_bytes_per_token(self, *, path: str | Path) -> int:
        """Every tensor of the GGUF as stored but ``token_embd.weight`` (a ``ModelError`` if not a readable GGUF)."""
        from edgeopt.intake.llm import _reader

        return sum(int(t.n_bytes) for t in _reader(Path(path)).tensors if t.name != "token_embd.weight")


def converted_f16(folder: Path, *, model_sha256: str, cache_dir: Path) -> Path:
    """The checkpoint ``folder`` as an F16 GGUF, converted once per checkpoint and converter and shared by
    every llama.cpp candidate built beside it (``cache_dir``: the builds folder's ``.gguf-f16``). Named by a
    digest of the checkpoint's content, the gguf package's version and the converter's source; a hit is
    used only when the file's sha256 still matches the one written with it, else it is converted again."""
    from importlib.metadata import version

    from edgeopt.bench.supervise import exclusive
    from edgeopt.convert import hf_gguf, spm_vocab
    from edgeopt.keys import digest

    name = digest("gguf-f16", model_sha256, version("gguf"), file_sha256(Path(hf_gguf.__file__)),
                  file_sha256(Path(spm_vocab.__file__)))
    path, stamp = cache_dir / f"{name}.gguf", cache_dir / f"{name}.sha256"
    with exclusive(cache_dir / f"{name}.lock"):  # candidates built at the same time convert once, in turn
        if path.is_file() and stamp.is_file():
            if file_sha256(path) == stamp.read_text(encoding="utf-8").strip():
                log.info("%s: F16 GGUF of this checkpoint reused (%s)", folder, path.name)
                return path
            log.warning("%s: the cached F16 GGUF %s does not match its digest; converting again", folder, path.name)
        tmp = cache_dir / f"{name}.{os.getpid()}.partial.gguf"
        try:
            hf_gguf.convert_hf_to_gguf(folder, tmp)
            sha = file_sha256(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        stamp.write_text(sha + "\n", encoding="utf-8")
    return path


#: the CPU features llama.cpp reports compiled in (``llama_print_system_info``) -> the CPU flag each needs
#: (``edgeopt.hardware.ISA_FLAGS`` names)
BUILD_ISA = {"AVX2": "avx2", "AVX_VNNI": "avx-vnni", "AVX512": "avx512f", "AVX512_VNNI": "avx512-vnni",
             "AVX512_BF16": "avx512-bf16", "AMX_INT8": "amx-int8", "DOTPROD": "dotprod", "MATMUL_INT8": "i8mm",
             "SVE": "sve"}


def build_isa_gap(system_info: str, isa_flags: Any) -> tuple[list[str], list[str]]:
    """(features the llama.cpp build uses that this CPU lacks, features this CPU has that the build was not
    compiled for), from llama.cpp's system info line (``AVX2 = 1 | ...``) and this CPU's flags. llama-cpp-python
    compiles llama.cpp for the CPU it is built on, and pip reuses that wheel on any later machine: on a CPU
    without a compiled-in feature its kernels stop the process (illegal instruction); on a CPU with more, its
    kernels for them are not used."""
    compiled = set(re.findall(r"(\w+) = 1", system_info))
    flags = set(isa_flags)
    missing = [name for name, flag in BUILD_ISA.items() if name in compiled and flag not in flags]
    unused = [name for name, flag in BUILD_ISA.items() if flag in flags and name not in compiled]
    return missing, unused


def build_note() -> str | None:
    """Why this llama-cpp-python build does not give this CPU's llama.cpp speed (None when it does); raises
    CandidateFailed when the build uses a feature this CPU lacks (it would stop at the first kernel)."""
    import llama_cpp

    from edgeopt.hardware import cpu_features

    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    missing, unused = build_isa_gap(info, cpu_features()[1])
    rebuild = "pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python==0.3.36"
    if missing:
        raise CandidateFailed("unavailable", f"this llama-cpp-python build was compiled for {', '.join(missing)}, "
                              f"which this CPU lacks (a wheel built on another machine); rebuild it here: {rebuild}")
    if unused:
        return (f"llama.cpp build without this CPU's {', '.join(unused)} (a wheel built on another CPU): speed "
                f"below what llama.cpp does on this host; rebuild it here for its kernels: {rebuild}")
    return None


def offload_caveat(runtime: dict[str, Any]) -> str | None:
    """Why speed figures of a run with GPU offload (``runtime["gpu_layers"]``, the profile's
    ``hardware.llm_gpu_layers``) do not stand for the target: this llama.cpp build has no GPU backend, so
    llama.cpp ignores the offload and runs on the CPU. None when nothing is offloaded or it can be."""
    if not runtime.get("gpu_layers"):
        return None
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        return None
    return (f"GPU offload of {runtime['gpu_layers']} layer(s) asked (the profile's hardware.llm_gpu_layers), but "
            "this llama-cpp-python build has no GPU backend and ran on the CPU; rebuild it with "
            "CMAKE_ARGS=-DGGML_METAL=on (Apple) or -DGGML_CUDA=on (NVIDIA) on the target host")


def open_llama(path: str, runtime: dict[str, Any], *, logits_all: bool = False) -> Any:
    """A ``llama_cpp.Llama`` with the recipe's runtime settings (and the profile's GPU offload,
    ``gpu_layers``: -1 = every layer); a load failure says why."""
    import llama_cpp

    kv = getattr(llama_cpp, KV_TYPES[runtime.get("kv_type", "f16")])
    threads = runtime.get("threads") or None
    try:
        return llama_cpp.Llama(model_path=path, n_ctx=runtime.get("n_ctx", 512), n_batch=runtime.get("n_batch", 512),
                               n_ubatch=runtime.get("n_ubatch", 512), n_threads=threads, n_threads_batch=threads,
                               type_k=kv, type_v=kv, flash_attn=bool(runtime.get("flash_attn", False)),
                               use_mmap=bool(runtime.get("mmap", True)), n_gpu_layers=int(runtime.get("gpu_layers", 0)),
                               logits_all=logits_all, verbose=False)
    except ValueError as exc:  # verbose=False hides llama.cpp's reason; the file's own check gives one
        from edgeopt.intake.llm import assess_gguf

        assess_gguf(path)
        raise CandidateFailed("invalid-output", f"llama.cpp cannot load {Path(path).name} ({exc}); run with "
                              "verbose logging to see why") from exc


class LlamaSession:
    """A loaded GGUF: ``run({"input_ids": [batch, seq]})`` -> logits [batch, seq, vocab] (float32)."""

    def __init__(self, path: str, runtime: dict[str, Any]) -> None:
        self.input_names = ["input_ids"]
        self.llm = open_llama(path, runtime, logits_all=True)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = []
        for row in np.asarray(feeds["input_ids"]):
            self.llm.reset()
            self.llm.eval([int(t) for t in row])
            out.append(np.array(self.llm.scores[: len(row)], dtype=np.float32))
        return [np.stack(out)]
