"""Target profiles: the hardware a model is optimized for, its budgets, gates and candidates.

Profiles are YAML files (``profiles/<name>.yaml``) validated here with pydantic (unknown keys are
errors). A wrong profile raises ``ConfigError`` with one line naming the file, the field, what was
allowed and what was given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgeopt import backends
from edgeopt.errors import ConfigError
from edgeopt.records import CandidateSpec, HardwareFingerprint, ModelKind

__all__ = [
    "BenchmarkConfig",
    "Budgets",
    "CandidateConfig",
    "GateOverrides",
    "Gates",
    "HardwareTarget",
    "Objective",
    "Profile",
    "host_mismatches",
    "list_profiles",
    "load_profile",
    "profiles_dir",
]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HardwareTarget(_Strict):
    arch: Literal["x86_64", "arm64"] = Field(description="CPU architecture the profile targets")
    device: Literal["cpu", "gpu", "npu"] = Field("cpu", description="device the candidates run on")
    isa_required: tuple[str, ...] = Field((), description="ISA features the host must have (e.g. avx2, neon)")
    gpu_vendor: Literal["nvidia", "apple", "intel", "amd"] | None = Field(None, description="GPU vendor")
    threads: int = Field(1, ge=1, description="default intra-op threads for every candidate")
    llm_gpu_layers: int = Field(0, ge=-1, description="language models on llama.cpp: transformer layers offloaded "
                                "to its GPU backend (Metal on Apple silicon, CUDA, Vulkan) for the F16 reference "
                                "and every llama.cpp candidate alike (-1: all, 0: CPU only); a llama.cpp build "
                                "without a GPU backend runs on the CPU and its speed is marked not representative")


class LLMBenchmarkConfig(_Strict):
    """How language models are measured: the same prompt and the same number of generated tokens for the F16
    reference and every candidate, with the profile's thread budget, rounds interleaved (``repeats``)."""

    prompt_tokens: int = Field(64, ge=1, description="prompt length (tokens of the evaluation text)")
    gen_tokens: int = Field(64, ge=2, description="tokens generated per measurement (EOS does not stop it)")
    runs: int = Field(3, ge=1, description="prompt + generation runs per fresh process (after one warm-up)")
    eval_window: int = Field(128, ge=8, description="tokens per perplexity / KLD window")
    eval_max_windows: int = Field(16, ge=1, description="windows of the evaluation text scored at most")
    context_tokens: int = Field(2048, ge=1, description="context length the KV-cache memory figure is given at "
                                "(tokens; the runtime's bytes per token x this)")


class BenchmarkConfig(_Strict):
    batch_size: int = Field(1, ge=1, description="samples per inference")
    warmup_runs: int = Field(10, ge=0, description="untimed runs before timing")
    min_runs: int = Field(200, ge=10, description="timed runs at least (p99 needs >= 100)")
    min_duration_s: float = Field(2.0, gt=0, description="timed seconds at least")
    max_duration_s: float = Field(60.0, gt=0, description="stop timing after this many seconds")
    timeout_s: float = Field(300.0, gt=0, description="a measurement running longer fails as 'timeout'")
    memory_limit_mb: float | None = Field(None, gt=0, description="a process above this RSS fails as 'oom'")
    repeats: int = Field(3, ge=1, description="fresh-process measurements per candidate, interleaved "
                         "across candidates and pooled (their p50 spread is reported)")
    eval_samples: int = Field(64, ge=1, description="data samples cycled through as benchmark inputs")
    seq_len: int = Field(128, ge=1, description="token sequence length text data is padded/truncated to")
    max_eval_samples: int = Field(1000, ge=1, description="samples used for accuracy/fidelity at most")
    extra_repeats: int = Field(3, ge=0, description="rounds added at a time while a candidate's speed-up or "
                               "memory verdict is uncertain (its interval straddles the threshold): the candidate "
                               "and its baseline are measured again, interleaved, until the verdict settles or "
                               "max_repeats is reached")
    max_repeats: int = Field(12, ge=1, description="rounds per candidate at most, extra rounds included (the "
                             "budget for settling uncertain verdicts)")
    run_to_run_spread: float = Field(0.10, ge=0, le=1, description="relative run-to-run standard deviation of "
                                     "a speed-up on one host, before this host has a history (0.10 = ±10%, "
                                     "measured on a shared 2-vCPU VM): a speed-up's interval is at least "
                                     "± z times this wide, so its verdict settles only when it would hold in "
                                     "another run; 0 = trust one run's rounds alone")
    run_to_run_history: bool = Field(True, description="pool the prior with the spread of speed-ups re-measured "
                                     "in earlier runs on this hardware (the host state folder, see edgeopt.settings), which narrows the floor "
                                     "on a quiet host and widens it on a noisy one")
    llm: LLMBenchmarkConfig = Field(default_factory=LLMBenchmarkConfig, description="language models "
                                    "(llama.cpp): prompt and generation lengths, perplexity windows")

    @model_validator(mode="after")
    def _budget(self) -> BenchmarkConfig:
        if self.max_repeats < self.repeats:
            raise ValueError(f"max_repeats ({self.max_repeats}) is below repeats ({self.repeats}); "
                             "it counts every round, the first ones included")
        return self


class Budgets(_Strict):
    """Absolute limits; each one set becomes a gate."""

    latency_ms_p95: float | None = Field(None, gt=0, description="p95 latency at most (ms)")
    rss_peak_mb: float | None = Field(None, gt=0, description="peak resident memory at most (MB)")
    size_mb: float | None = Field(None, gt=0, description="artifact size on disk at most (MB)")


class Gates(_Strict):
    """Relative quality gates against the FP32 baseline measured in the same run."""

    accuracy_ratio_min: float = Field(0.95, gt=0, le=1.5, description="accuracy ≥ this × the baseline's")
    speedup_min: float = Field(2.0, ge=0, description="baseline latency / candidate latency at least")
    speedup_percentile: Literal["p50", "p95"] = Field("p50", description="latency percentile for speed-up")
    memory_reduction_min: float = Field(0.5, ge=-1, lt=1, description="1 - candidate/baseline model memory at least "
                                        "(negative: that much more memory is allowed)")
    cosine_min: float | None = Field(None, ge=-1, le=1, description="mean cosine similarity to the baseline at least")
    memory_basis: Literal["steady", "peak"] = Field(
        "steady", description="memory the memory gate compares: 'steady' (resident memory of the loaded, "
        "warmed-up model) or 'peak' (high-water mark during load and inference)")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="confidence level of the speed-up and memory "
                              "intervals; a gate passes only when its whole interval clears the threshold")
    perplexity_ratio_max: float | None = Field(None, gt=0, description="language models: held-out perplexity "
                                               "at most this x the F16 reference's (1.05: within 5%)")
    kld_mean_max: float | None = Field(None, ge=0, description="language models: mean KL divergence of the "
                                       "next-token distributions from the F16 reference's at most")


class GateOverrides(_Strict):
    """Gates for one model kind, over the profile's ``gates`` (fields left out keep those)."""

    accuracy_ratio_min: float | None = Field(None, gt=0, le=1.5, description="as Gates.accuracy_ratio_min")
    speedup_min: float | None = Field(None, ge=0, description="as Gates.speedup_min")
    speedup_percentile: Literal["p50", "p95"] | None = Field(None, description="as Gates.speedup_percentile")
    memory_reduction_min: float | None = Field(None, ge=-1, lt=1, description="as Gates.memory_reduction_min")
    cosine_min: float | None = Field(None, ge=-1, le=1, description="as Gates.cosine_min")
    memory_basis: Literal["steady", "peak"] | None = Field(None, description="as Gates.memory_basis")
    confidence: float | None = Field(None, gt=0.5, lt=1, description="as Gates.confidence")
    perplexity_ratio_max: float | None = Field(None, gt=0, description="as Gates.perplexity_ratio_max")
    kld_mean_max: float | None = Field(None, ge=0, description="as Gates.kld_mean_max")


class Objective(_Strict):
    """Weights of the recommendation among passing Pareto-optimal candidates."""

    latency: float = Field(0.5, ge=0, description="weight of the p95 speed-up")
    accuracy: float = Field(0.3, ge=0, description="weight of accuracy (or fidelity) kept")
    memory: float = Field(0.1, ge=0, description="weight of the model's memory reduction")
    size: float = Field(0.1, ge=0, description="weight of the size reduction")

    @model_validator(mode="after")
    def _not_all_zero(self) -> Objective:
        if self.latency + self.accuracy + self.memory + self.size <= 0:
            raise ValueError("at least one objective weight must be positive")
        return self


class CandidateConfig(_Strict):
    name: str = Field(description="unique candidate name, e.g. ort-int8-static-minmax")
    backend: str = Field(description="registered backend name")
    recipe: dict[str, Any] = Field(default_factory=dict, description="backend recipe fields")
    kinds: tuple[ModelKind, ...] = Field((), description="model kinds the recipe applies to (empty: every kind); "
                                         "the others skip it")
    sequence: Literal["fixed", "dynamic", "bucketed"] = Field(
        "fixed", description="text models: run inputs as given (padded to seq_len), each at its real length "
        "('dynamic'), or at the smallest of `buckets` that fits ('bucketed')")
    buckets: tuple[int, ...] = Field((), description="sequence lengths for 'bucketed', e.g. [32, 64, 128]")

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        from edgeopt.names import check_name  # a candidate's name names its build folder

        try:
            return check_name(v, what="candidate name")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _recipe_valid(self) -> CandidateConfig:
        if self.backend not in backends.names():
            raise ValueError(f"unknown backend {self.backend!r} (allowed: {', '.join(backends.names())})")
        try:
            backends.recipe_type(self.backend).model_validate(self.recipe)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in ("recipe", *err["loc"]))
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(backends.recipe_type(self.backend).model_fields)
                msg = f"unknown recipe key for backend {self.backend} (allowed: {allowed})"
            elif "input" in err and err["type"] != "value_error":
                msg += f" (got {err['input']!r})"
            raise ValueError(f"{where}: {msg}") from None
        return self

    @model_validator(mode="after")
    def _buckets_fit(self) -> CandidateConfig:
        if self.sequence == "bucketed" and (not self.buckets or min(self.buckets) < 1):
            raise ValueError(f"sequence 'bucketed' needs buckets, positive lengths (got {list(self.buckets)})")
        if self.sequence != "bucketed" and self.buckets:
            raise ValueError(f"buckets apply only with sequence 'bucketed' (received {self.sequence!r})")
        return self

    def spec(self, *, baseline: bool = False) -> CandidateSpec:
        return CandidateSpec(name=self.name, backend=self.backend, recipe=dict(self.recipe), baseline=baseline,
                             sequence=self.sequence, buckets=tuple(sorted(self.buckets)))


_DEFAULT_BASELINE = {"name": "baseline-fp32", "backend": "onnxruntime",
                     "recipe": {"precision": "fp32", "graph_optimization": "disabled"}}


class Profile(_Strict):
    name: str = Field(description="profile name (the file stem)")
    description: str = Field("", description="one line shown by `edgeopt profiles list`")
    hardware: HardwareTarget
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    budgets: Budgets = Field(default_factory=Budgets)
    gates: Gates = Field(default_factory=Gates)
    kind_gates: dict[ModelKind, GateOverrides] = Field(
        default_factory=dict, description="per model kind, gates that replace those in `gates` "
        "(e.g. encoder: {cosine_min: 0.99})")
    objective: Objective = Field(default_factory=Objective)
    baseline: CandidateConfig = Field(default_factory=lambda: CandidateConfig(**_DEFAULT_BASELINE),
                                      description="the reference every candidate is compared with")
    candidates: tuple[CandidateConfig, ...] = Field(description="recipes to try (at least one)")
    input_shapes: dict[str, str | list[str]] = Field(
        default_factory=dict, description="default shape per input name for models with dynamic dims, e.g. "
        "{input: 1x3x640x640}, or a list of shapes measured as separate settings ({input: [1x3x320x320, "
        "1x3x640x640]}; with --eval data, the first); --shape overrides it, and inputs a model does not have "
        "are ignored (see edgeopt.input_shapes)")

    @field_validator("input_shapes")
    @classmethod
    def _shapes_parse(cls, v: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        from edgeopt.input_shapes import parse_shapes

        try:
            for k, s in v.items():
                for one in ([s] if isinstance(s, str) else s or [""]):
                    parse_shapes([f"{k}={one}"], source="input_shapes")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return v

    def default_shapes(self) -> dict[str, tuple[int, ...]]:
        """``input_shapes`` parsed: input name -> dims (the first of a list)."""
        from edgeopt.input_shapes import parse_shapes

        return parse_shapes([f"{k}={s if isinstance(s, str) else s[0]}" for k, s in self.input_shapes.items()],
                            source="input_shapes")

    def shape_lists(self) -> dict[str, list[str]]:
        """The inputs given several shapes in ``input_shapes``: name -> ``NAME=DxD...`` values."""
        return {k: [f"{k}={one}" for one in s] for k, s in self.input_shapes.items()
                if not isinstance(s, str) and len(s) > 1}

    @field_validator("candidates")
    @classmethod
    def _non_empty_unique(cls, v: tuple[CandidateConfig, ...]) -> tuple[CandidateConfig, ...]:
        if not v:
            raise ValueError("the candidate list is empty; list at least one candidate recipe")
        seen: set[str] = set()
        for c in v:
            if c.name in seen:
                raise ValueError(f"candidate name {c.name!r} appears twice")
            seen.add(c.name)
        return v

    def candidate_specs(self, only: tuple[str, ...] = (), *, kind: str | None = None) -> tuple[CandidateSpec, ...]:
        """The candidates to build, optionally filtered to the names in ``only``, and to the
        recipes that apply to a ``kind`` of model (a name asked for that does not apply is an error)."""
        if only:
            unknown = sorted(set(only) - {c.name for c in self.candidates})
            if unknown:
                raise ConfigError(
                    f"profile {self.name}: unknown candidate(s) {', '.join(unknown)} "
                    f"(allowed: {', '.join(c.name for c in self.candidates)})"
                )
        chosen = [c for c in self.candidates if not only or c.name in only]
        if kind is not None:
            misfits = [c.name for c in chosen if only and c.kinds and kind not in c.kinds]
            if misfits:
                raise ConfigError(f"profile {self.name}: candidate(s) {', '.join(misfits)} apply to "
                                  f"{' / '.join(self._kinds_of(misfits))} models; this model is {kind}")
            chosen = [c for c in chosen if not c.kinds or kind in c.kinds]
        return tuple(c.spec() for c in chosen)

    def _kinds_of(self, names: list[str]) -> list[str]:
        return sorted({k for c in self.candidates if c.name in names for k in c.kinds})

    def gates_for(self, kind: str) -> Gates:
        """The profile's gates with the overrides for ``kind`` applied."""
        overrides = self.kind_gates.get(kind)  # type: ignore[call-overload]
        if overrides is None:
            return self.gates
        return self.gates.model_copy(update=overrides.model_dump(exclude_none=True))


def profiles_dir() -> Path:
    """``$EDGEOPT_PROFILES_DIR`` if set, else the ``profiles/`` folder shipped beside the package."""
    env = os.environ.get("EDGEOPT_PROFILES_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "profiles"


def list_profiles() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.yaml"))


def _allowed_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names allowed at the parent of ``loc`` (for 'unknown key' messages)."""
    current: Any = model
    mapping_key = False  # the part after a dict field is a key (e.g. kind_gates.<kind>)
    for part in loc[:-1]:
        if isinstance(part, int) or mapping_key:
            mapping_key = False
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        ann = current.model_fields[part].annotation
        mapping_key = getattr(ann, "__origin__", None) is dict
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        current = args[0] if args else ann
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _describe(source: str, exc: ValidationError, model: type[BaseModel]) -> str:
    err = exc.errors(include_url=False)[0]
    loc = tuple(err["loc"])
    field = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[") or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        allowed = _allowed_fields(model, loc)
        msg = f"unknown key {loc[-1]!r}" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    elif err["type"] == "missing":
        msg = "required field is missing"
    elif "input" in err and err["type"] not in ("value_error",):
        msg += f" (got {err['input']!r})"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{source}: {field}: {msg}{more}"


def _resolve(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"profile file {p}: no such file")
        return p
    candidate = profiles_dir() / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = ", ".join(list_profiles()) or "none"
        raise ConfigError(f"unknown profile {name_or_path!r} (allowed: {known}); or pass a path to a .yaml file")
    return candidate


def load_profile(name_or_path: str) -> Profile:
    """Load a profile by name (``profiles/<name>.yaml``) or by path; ConfigError on any problem."""
    path = _resolve(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML ({first})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a profile is a YAML mapping; got {type(data).__name__}")
    data.setdefault("name", path.stem)
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(str(path), exc, Profile)) from exc


def host_mismatches(profile: Profile, fp: HardwareFingerprint) -> list[str]:
    """What about this machine does not fit the profile's hardware target (empty when it fits)."""
    problems = []
    hw = profile.hardware
    if fp.arch != hw.arch:
        problems.append(f"architecture {fp.arch} (profile wants {hw.arch})")
    missing = [f for f in hw.isa_required if f.lower() not in fp.isa_flags]
    if missing:
        problems.append(f"missing ISA features {', '.join(missing)}")
    if hw.device == "gpu" and hw.gpu_vendor and not any(g.startswith(hw.gpu_vendor) for g in fp.gpus):
        problems.append(f"no {hw.gpu_vendor} GPU found")
    return problems
