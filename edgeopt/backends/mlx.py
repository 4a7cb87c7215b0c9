"""Apple MLX through ``mlx-lm`` (pip extra ``mlx``): 2- to 8-bit affine weight quantization with a group size.

Public surface: ``MlxRecipe``, ``MlxBackend``, ``MlxSession``, ``generate_job``, ``quantization_applied`` and
``speed_caveat``.

* **Build**: the Hugging Face checkpoint converted and quantized by ``mlx_lm.convert`` (``quantize=True,
  q_bits, q_group_size``, affine mode) in a fresh process, offline (``HF_HUB_OFFLINE``): the artifact is the
  MLX folder (``config.json``, ``model.safetensors``, the tokenizer). mlx-lm silently leaves a layer in
  float when its input width is not a multiple of the group size, so the quantization actually applied is
  read back (``config.json``'s ``quantization`` bits / group size, and which matrices got ``.scales``): a
  request that was not applied fails the candidate; what was is in the artifact's notes.
* **Generation** (``generate_job``, in the fresh measuring process): ``mlx_lm.generate.generate_step``,
  greedy, exactly the job's number of new tokens (it has no EOS stop), each repeat from an empty KV cache;
  the same figures as llama.cpp's worker (``edgeopt.bench.generate.generation_figures``).
* **Evaluation** (``MlxSession``): the MLX model's logits behind the small llama.cpp-like surface
  ``edgeopt.evaluate.llm`` uses (tokenize, reset, eval, scores, generate), so perplexity, KLD and the
  garbage check run on it unchanged.

Threads: MLX has no thread setting. On Apple silicon it runs on the GPU (Metal); ``mlx[cpu]`` on Linux
runs its CPU backend on one core (reference BLAS). The generation figures report the cores actually
used (CPU time / wall time, rounded, at least 1), not a requested budget.

Speed on a host that is not Apple silicon is **not representative** (``speed_caveat``): the CPU backend
is a correctness build, far slower than MLX on a Mac. The generation result carries the caveat, the
speed-up gate fails on it (NaN: never a pass), and the table and MLflow say so. Quality figures
(perplexity, KLD, top-1 agreement) are the model's own on any host.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from edgeopt.backends.base import Backend, Recipe
from edgeopt.backends.llm_session import HFTokenizerSession
from edgeopt.data import path_sha256
from edgeopt.errors import CandidateFailed

if TYPE_CHECKING:
    from collections.abc import Iterator

    from edgeopt.data import Dataset
    from edgeopt.records import Artifact, Assessment, ModelRef

__all__ = ["BITS", "GROUP_SIZES", "MlxBackend", "MlxRecipe", "MlxSession", "generate_job", "quantization_applied",
           "speed_caveat"]

log = logging.getLogger(__name__)

#: weight widths MLX's affine quantization supports, and the group sizes we allow
BITS = (2, 3, 4, 6, 8)
GROUP_SIZES = (32, 64, 128)
#: the longest a conversion of one checkpoint may take (seconds)
_CONVERT_TIMEOUT_S = 1800


class MlxRecipe(Recipe):
    """An MLX candidate: affine weight quantization of the checkpoint by mlx-lm, and the device it runs on."""

    bits: int = Field(default=4, description="bits per weight (2, 3, 4, 6 or 8)")
    group_size: int = Field(default=64, description="weights sharing one scale and bias (32, 64 or 128)")
    device: Literal["auto", "cpu", "gpu"] = Field(default="auto", description="MLX device (auto: MLX's default, "
                                                  "the GPU on Apple silicon, the CPU with mlx[cpu] on Linux)")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, BITS))} (MLX affine quantization); got {v}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}; got {v}")
        return v

    def runtime_options(self) -> dict[str, Any]:
        return {"device": self.device}

    def precision(self) -> str:
        return f"int{self.bits}-g{self.group_size}"


def speed_caveat() -> str | None:
    """Why MLX speed figures measured on this host are not representative (None on Apple silicon)."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return None
    return (f"not representative: MLX on {platform.system()} {platform.machine()} runs its CPU backend "
            "(a correctness build, one core); MLX speed is only reported from Apple silicon")


def quantization_applied(folder: str | Path) -> dict[str, Any]:
    """What the MLX folder holds: ``config.json``'s ``quantization`` (bits, group_size, mode, per-layer
    overrides) and the matrices quantized (with ``.scales``) and left in float."""
    from safetensors import safe_open

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    q = dict(config.get("quantization") or {})
    names: set[str] = set()
    shapes: dict[str, int] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                names.add(k)
                shapes[k] = len(st.get_slice(k).get_shape())
    quantized = sorted(k.removesuffix(".scales") for k in names if k.endswith(".scales"))
    floats = sorted(k.removesuffix(".weight") for k in names if k.endswith(".weight") and shapes[k] == 2
                    and f"{k.removesuffix('.weight')}.scales" not in names)
    overrides = {k: v for k, v in q.items() if isinstance(v, dict)}
    return {"bits": q.get("bits"), "group_size": q.get("group_size"), "mode": q.get("mode", "affine"),
            "overrides": overrides, "quantized": quantized, "float": floats}


def _check_applied(applied: dict[str, Any], recipe: MlxRecipe, candidate: str) -> None:
    if (applied["bits"], applied["group_size"]) != (recipe.bits, recipe.group_size):
        raise CandidateFailed("build-error", f"{candidate}: mlx-lm wrote quantization bits={applied['bits']} "
                              f"group_size={applied['group_size']}, not the {recipe.bits}-bit group "
                              f"{recipe.group_size} asked for")
    if not applied["quantized"]:
        raise CandidateFailed("unsupported-op", f"{candidate}: mlx-lm quantized no matrix: no layer's input width "
                              f"is a multiple of group size {recipe.group_size}; choose another group size")


class MlxBackend(Backend):
    name: ClassVar[str] = "mlx"
    formats: ClassVar[frozenset[str]] = frozenset({"hf"})
    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "gpu"})
    extra: ClassVar[str] = "mlx"
    recipe_type: ClassVar[type[Recipe]] = MlxRecipe
    requires: ClassVar[tuple[str, ...]] = ("mlx", "mlx_lm")
    distributions: ClassVar[tuple[str, ...]] = ("mlx", "mlx-lm", "transformers")
    model_kinds: ClassVar[frozenset[str]] = frozenset({"llm"})

    def optimize(self, *, model: ModelRef, assessment: Assessment, recipe: Recipe, candidate: str,
                 out_dir: Path, calibration: Dataset | None = None) -> Artifact:
        from edgeopt.records import Artifact

        self.check_request(model=model, recipe=recipe, candidate=candidate, calibration=calibration)
        assert isinstance(recipe, MlxRecipe)
        if assessment.kind not in self.model_kinds:
            raise CandidateFailed("build-error", f"{candidate}: mlx builds language models; this model is a "
                                  f"{assessment.kind}")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        final = out_dir / "mlx"
        with tempfile.TemporaryDirectory(prefix=".build-", dir=out_dir) as tmp:
            built = Path(tmp) / "mlx"
            _convert(Path(model.path), built, recipe, candidate)
            applied = quantization_applied(built)
            _check_applied(applied, recipe, candidate)
            if final.exists():
                shutil.rmtree(final)
            os.replace(built, final)
        size = sum(p.stat().st_size for p in final.iterdir() if p.suffix == ".safetensors")
        n_q, n_f = len(applied["quantized"]), len(applied["float"])
        notes = [f"quantization read back: {applied['bits']}-bit {applied['mode']}, group {applied['group_size']}; "
                 f"{n_q} of {n_q + n_f} matrices quantized"
                 + (f" ({', '.join(applied['float'][:3])} left in float: width not a multiple of the group)"
                    if n_f else ""),
                 "threads: MLX has no thread setting (GPU on Apple silicon; one CPU core with mlx[cpu] on Linux)"]
        if applied["overrides"]:
            notes.append(f"per-layer overrides: {len(applied['overrides'])}")
        if (caveat := speed_caveat()) is not None:
            notes.append(f"speed {caveat}")
        log.info("%s: built %s (%d bytes)", candidate, final, size)
        return Artifact(candidate=candidate, backend=self.name, path=str(final), sha256=path_sha256(final),
                        size_bytes=size, parent_sha256=model.sha256, precision=recipe.precision(),
                        runtime=recipe.runtime_options(), tool_versions=self.tool_versions(), notes=tuple(notes))

    def load(self, *, path: str, runtime: dict[str, Any]) -> MlxSession:
        return MlxSession(path, runtime)

    def warm(self, *, runtime: dict[str, Any]) -> None:
        _warm(runtime)

    def generate_job(self, job: dict[str, Any]) -> dict[str, Any]:
        return generate_job(job)  # this module's loop (a module-level function, below)

    def llm_session(self, *, path: str, runtime: dict[str, Any], window: int) -> MlxSession:
        return MlxSession(path, runtime)  # the model's logits of any length: no context to size

    # weight_bytes_per_token: the base class's None; an MLX artifact gets no memory-bandwidth bound


def _convert(src: Path, dst: Path, recipe: MlxRecipe, candidate: str) -> None:
    """``mlx_lm.convert`` in a fresh process, offline; its output goes to descriptor 2 (the build log)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    args = [sys.executable, "-m", "edgeopt.backends.mlx", str(src), str(dst), str(recipe.bits), str(recipe.group_size)]
    try:
        proc = subprocess.run(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=_CONVERT_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise CandidateFailed("timeout", f"{candidate}: mlx-lm conversion took over {_CONVERT_TIMEOUT_S} s") from exc
    os.write(2, proc.stdout)
    if proc.returncode != 0 or not (dst / "config.json").is_file():
        lines = [ln for ln in proc.stdout.decode("utf-8", "replace").splitlines() if ln.strip()]
        raise CandidateFailed("build-error", f"{candidate}: mlx-lm conversion failed (exit {proc.returncode}): "
                              f"{lines[-1][:300] if lines else 'no output'}")


def _device(runtime: dict[str, Any]) -> None:
    import mlx.core as mx

    device = runtime.get("device", "auto")
    if device != "auto":
        mx.set_default_device(mx.cpu if device == "cpu" else mx.gpu)


def _warm(runtime: dict[str, Any]) -> None:
    """MLX's device, allocator and kernels, before the memory reference point (a 16x16 matmul)."""
    import mlx.core as mx

    _device(runtime)
    x = mx.ones((16, 16))
    mx.eval(x @ x)


class MlxSession(HFTokenizerSession):
    """The MLX model's logits behind the llama.cpp-like surface of ``edgeopt.evaluate.llm``, and the
    ``Session`` protocol: ``run({"input_ids": [batch, seq]})`` -> logits [batch, seq, vocab]."""

    def __init__(self, path: str, runtime: dict[str, Any]) -> None:
        from mlx_lm import load
        from transformers import AutoTokenizer

        _device(runtime)
        super().__init__()
        self.model, _ = load(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)

    def _logits(self, ids: list[int]) -> np.ndarray:
        import mlx.core as mx

        out = self.model(mx.array([ids]))
        return np.array(out[0].astype(mx.float32), dtype=np.float32)

    def generate(self, ids: list[int], *, temp: float = 0.0, top_k: int = 1, reset: bool = True,
                 max_tokens: int = 64) -> Iterator[int]:
        """Greedy continuation of ``ids`` (only greedy: ``temp`` 0 / ``top_k`` 1, as the evaluators ask)."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        context = self._context(ids, temp=temp, top_k=top_k, reset=reset)
        for tok, _ in generate_step(mx.array(context), self.model, max_tokens=max_tokens, sampler=_greedy):
            yield int(tok)


def _greedy(logprobs: Any) -> Any:
    import mlx.core as mx

    return mx.argmax(logprobs, axis=-1)


def generate_job(job: dict[str, Any]) -> dict[str, Any]:
    """Worker side of a generation measurement (``edgeopt.bench.generate``): the same figures as llama.cpp's,
    plus ``not_representative`` (``speed_caveat``) off Apple silicon."""
    import resource

    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    from edgeopt.bench import memory
    from edgeopt.bench.generate import generation_figures

    _warm(job["runtime"])  # MLX's device and allocator are the runtime's, not the model's memory
    before = memory.read()
    memory.reset_peak()
    t0 = time.perf_counter()
    model, _ = load_model(Path(job["path"]))  # the weights only: the prompt is token ids, no tokenizer needed
    mx.eval(model.parameters())
    load_ms = (time.perf_counter() - t0) * 1e3
    prompt = mx.array([int(t) for t in job["prompt"]])
    n_gen = int(job["gen_tokens"])

    def generate() -> tuple[float, list[float]]:
        stamps: list[float] = []
        start = time.perf_counter()  # generate_step starts from a new, empty KV cache each call
        for _tok, _ in generate_step(prompt, model, max_tokens=n_gen, sampler=_greedy):
            stamps.append(time.perf_counter())
        if len(stamps) != n_gen:
            raise RuntimeError(f"mlx-lm generated {len(stamps)} tokens, not {n_gen}")
        return (stamps[0] - start) * 1e3, list(np.diff(stamps) * 1e3)

    generate()  # warm-up: kernels, pages of the weights
    prompt_tps, ttft, gen_tps, latencies = [], [], [], []
    cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(int(job["repeats"])):
        cache = make_prompt_cache(model)
        start = time.perf_counter()
        mx.eval(model(prompt[None], cache=cache))  # the prompt alone: what llama.cpp's prompt figure times
        prompt_tps.append(prompt.size / (time.perf_counter() - start))
        first, steps = generate()
        ttft.append(first)
        latencies.extend(steps)
        gen_tps.append(len(steps) / (sum(steps) / 1e3))
    cpu1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall0
    cores = (cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime) / wall
    out = generation_figures(prompt_tps=prompt_tps, gen_tps=gen_tps, ttft=ttft, latencies=latencies, before=before,
                             load_ms=load_ms, threads=max(1, round(cores)))
    out["not_representative"] = speed_caveat()
    return out


def _main(argv: list[str]) -> int:
    """``python -m edgeopt.backends.mlx SRC DST BITS GROUP_SIZE``: the conversion, in its own process."""
    from mlx_lm import convert

    src, dst, bits, group = argv
    convert(src, mlx_path=dst, quantize=True, q_bits=int(bits), q_group_size=int(group), q_mode="affine")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
